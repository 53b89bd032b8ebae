"""``PackedView``: what a packed layer's ``.weight`` returns, for code that reads weights itself.

Modules such as ``nn.MultiheadAttention`` (``F.linear(x, self.out_proj.weight)``), torchvision's
Swin (``F.linear(x, self.qkv.weight)``) or the ``nn.TransformerEncoderLayer`` fast path do not call
their linear layers; they read ``.weight``. A ``PackedView`` is a tensor with the weight's shape,
dtype and device but no data of its own: ``F.linear(x, view, bias)`` runs the packed weight's own
linear (its Triton kernel on CUDA), splitting or chunking it along rows gives views of those rows,
and any other use dequantizes it first. Because it overrides ``__torch_function__``, the fused
fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` step aside for their
plain path, which calls ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import inspect
import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

_LINEAR = (F.linear, torch._C._nn.linear)
_SPLITS = (torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk)
_MHA = inspect.signature(F.multi_head_attention_forward)


class PackedView(torch.Tensor):
    """A lazily dequantized ``[N, K]`` view of a :class:`~torchzip.packed.PackedWeight` (see module doc)."""

    @staticmethod
    def __new__(cls, packed, shape: tuple[int, ...] | None = None) -> "PackedView":
        device = next((b.device for b in packed.buffers()), torch.device("cpu"))
        self = torch.Tensor._make_wrapper_subclass(cls, shape or packed.shape, dtype=packed.dtype, device=device,
                                                   requires_grad=False)
        self.packed = packed
        self.view_shape = tuple(shape or packed.shape)
        return self

    def __repr__(self) -> str:
        return f"PackedView({self.packed.format_name}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def materialize(self) -> torch.Tensor:
        """The dense weight (in the view's shape)."""
        return self.packed.dequantize().reshape(self.view_shape)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, PackedView) and not isinstance(x, PackedView) and weight.view_shape == weight.packed.shape:
                return weight.packed.linear(x, _plain(bias))
        if func is F.multi_head_attention_forward:
            return multi_head_attention(**_MHA.bind(*args, **kwargs).arguments)
        if func in _SPLITS and isinstance(args[0], PackedView) and _dim(func, args, kwargs) == 0 \
                and args[0].view_shape == args[0].packed.shape:
            return args[0]._split_rows(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs or {}))

    def _split_rows(self, func, args, kwargs) -> tuple["PackedView", ...]:
        n = self.view_shape[0]
        spec = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("chunks"))
        if func in (torch.Tensor.chunk, torch.chunk):
            step = -(-n // int(spec))
            sizes = [min(step, n - start) for start in range(0, n, step)]
        elif isinstance(spec, int):
            sizes = [min(spec, n - start) for start in range(0, n, spec)]
        else:
            sizes = list(spec)
        out, start = [], 0
        for size in sizes:
            out.append(PackedView(self.packed.row_view(start, start + size)))
            start += size
        return tuple(out)


def _dim(func, args, kwargs) -> int:
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    return int(dim)


def _plain(a: Any) -> Any:
    return a.materialize() if isinstance(a, PackedView) else a


def multi_head_attention(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                         add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                         need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                         k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                         is_causal=False):
    """``F.multi_head_attention_forward`` when some of its weights are packed: the same steps, in
    the same order (so outputs match the dense module's plain path bit for bit), with projections
    through ``F.linear``, which runs the packed linears of :class:`PackedView` weights.

    (``F.multi_head_attention_forward`` itself cannot be reused: with any tensor-like argument it
    defers to ``__torch_function__`` before it starts, so its own linears could never be reached.)
    """
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    if embed_dim != embed_dim_to_check or embed_dim % num_heads:
        raise ValueError(f"attention expects embed_dim {embed_dim_to_check} divisible by {num_heads} heads, got {embed_dim}")
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention takes the hint instead
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        is_causal = is_causal and key_padding_mask is None

    if use_separate_proj_weight:
        biases = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, *biases)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = static_k if static_k is not None else k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = static_v if static_v is not None else v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        key_padding_mask = key_padding_mask.reshape(bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = dropout_p if training else 0.0

    if need_weights:
        scores = q * math.sqrt(1.0 / float(q.shape[-1]))
        scores = torch.bmm(scores, k.transpose(-2, -1)) if attn_mask is None else torch.baddbmm(attn_mask, scores,
                                                                                                 k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, num_heads, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, num_heads, tgt_len, head_dim),
                                             k.view(bsz, num_heads, src_len, head_dim),
                                             v.view(bsz, num_heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        weights = None
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
