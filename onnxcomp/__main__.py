"""`python -m onnxcomp` runs the CLI (through the same entry function as the console script)."""

from onnxcomp.entry import main

main()
