"""An example third-party kdbench plugin: one student method, ``logit_mse``."""
__version__ = "0.1.0"
