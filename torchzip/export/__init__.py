"""The ``.tzip`` artifact: Huffman-coded streams in a checked, pickle-free container."""

from torchzip.export.artifact import export, load, read_manifest

__all__ = ["export", "load", "read_manifest"]
