"""Entropy coders used by the packed (.onnxc) container."""
