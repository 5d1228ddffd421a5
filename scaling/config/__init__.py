"""Config: the schema of every field, experiment files, and command-line overrides."""

from scaling.config.experiments import load_config

__all__ = ["load_config"]
