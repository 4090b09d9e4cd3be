"""The version of partc, written once."""

__version__ = "0.1.0"
