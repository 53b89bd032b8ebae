"""The built-in passes, one module per family, and what they share (``base``, ``layer``)."""
