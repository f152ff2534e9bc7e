"""The packed file (.onnxc): its format, writer, reader and entropy coders (coding/)."""
