"""The fsapp version, in one place (the package face and every module import it from here)."""

__version__ = "0.1.0"
