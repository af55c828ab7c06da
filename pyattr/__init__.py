"""pyattr: attribution maps for PyTorch vision models, exported as single graphs."""

__version__ = "0.1.0"
