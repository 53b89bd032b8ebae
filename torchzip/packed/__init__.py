"""Packed weight formats (one module each), the table of formats, and the packed inference layers."""

from torchzip.packed.base import FORMATS, PackedWeight, WeightState, formats_in_order, register_format
from torchzip.packed.codebook import CodebookWeight
from torchzip.packed.csr import CsrWeight
from torchzip.packed.int8 import Int8Weight
from torchzip.packed.layers import (LAYER_KINDS, LayerKind, PackedConv, PackedEmbedding, PackedLayer, PackedLinear,
                                    register_layer_kind)
from torchzip.packed.sparse24 import Sparse24Weight
from torchzip.packed.values import CodebookValues, Int8Values

__all__ = [
    "PackedWeight", "WeightState", "FORMATS", "register_format", "formats_in_order",
    "Int8Weight", "CodebookWeight", "Sparse24Weight", "CsrWeight", "Int8Values", "CodebookValues",
    "PackedLayer", "PackedLinear", "PackedConv", "PackedEmbedding", "LayerKind", "LAYER_KINDS", "register_layer_kind",
]
