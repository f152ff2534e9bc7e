"""The passes, installed as `onnxcomp.passes`: one module per pass, each registering itself.

Import them through `onnxcomp.passes` (or let `onnxcomp.registry` do it). Importing this folder
as a top-level `passes` package from the repository root would load every module a second time;
the registry recognises such a duplicate and keeps the first class.
"""
