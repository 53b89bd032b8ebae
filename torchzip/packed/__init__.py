"""Packed weight formats (one module each) and the inference layers that hold them."""

from torchzip.packed.base import PackedWeight
from torchzip.packed.codebook import CodebookWeight
from torchzip.packed.csr import CsrWeight
from torchzip.packed.int8 import Int8Weight
from torchzip.packed.layers import PackedConv, PackedEmbedding, PackedLinear
from torchzip.packed.sparse24 import Sparse24Weight

FORMATS = {cls.format_name: cls for cls in (Int8Weight, CodebookWeight, Sparse24Weight, CsrWeight)}

__all__ = [
    "PackedWeight", "Int8Weight", "CodebookWeight", "Sparse24Weight", "CsrWeight",
    "PackedLinear", "PackedConv", "PackedEmbedding", "FORMATS",
]
