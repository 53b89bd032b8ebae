"""Triton kernels for packed torchzip weights (import name ``torchzip.kernels``)."""
