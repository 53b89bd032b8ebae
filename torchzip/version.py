"""The package version (one place, read by ``torchzip.__version__`` and written into .tzip manifests)."""

__version__ = "0.1.0"
