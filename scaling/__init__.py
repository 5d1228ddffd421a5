"""scaling: a JAX research framework for training and serving scaled models."""

__version__ = "0.1.0"
