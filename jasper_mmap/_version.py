"""The package version (a leaf: no imports)."""

__version__ = "0.1.0"
