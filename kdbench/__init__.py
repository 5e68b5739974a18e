"""kdbench: a plugin-registry benchmarking suite for knowledge distillation."""
__version__ = "0.1.0"
