"""onnxcomp's model zoo: `from models import zoo; zoo.get("digits_cnn").path` (see models/zoo.py)."""
