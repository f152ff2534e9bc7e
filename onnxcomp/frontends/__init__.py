"""Front-ends that bring models from other frameworks to ONNX (Hugging Face transformers)."""
