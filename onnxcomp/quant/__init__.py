"""int8 quantization internals."""
