"""SparseMultiheadAttention: nn.MultiheadAttention for inference with sparse projections (export.py builds it).

The attention is nn.MultiheadAttention's own (torch 2.x `multi_head_attention_forward`, same calls in the same
order): batch_first, unbatched inputs, key_padding_mask and attn_mask (bool or float, 2-D or 3-D), is_causal,
need_weights / average_attn_weights; dropout as torch applies it (in train mode only). NestedTensor inputs raise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

def _float_mask(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch's _canonical_mask: a bool mask becomes 0 / -inf in `dtype`, a float mask is added as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


class SparseMultiheadAttention(nn.Module):
    """nn.MultiheadAttention for inference with sparse projections (module doc): q_proj, k_proj, v_proj and
    out_proj are FanInLinear / CSRLinear / SemiStructuredLinear where their weight was sparse, dense nn.Linear
    elsewhere, each with its own bias. forward takes and returns what nn.MultiheadAttention's does, computed as
    torch's multi_head_attention_forward computes it (scaled_dot_product_attention when need_weights is False, an
    explicit softmax when the weights are returned); dropout only in train mode, as torch.

    `in_proj_weight` and `in_proj_bias` are None: there is no packed in-projection here (the biases are inside
    q_proj/k_proj/v_proj). `formats` maps each projection to 'fan_in', 'csr', 'semi_structured' or 'dense'."""

    def __init__(self, mha: nn.MultiheadAttention, projections: dict, formats: dict):
        super().__init__()
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.in_proj_weight = self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.q_proj, self.k_proj, self.v_proj = projections["q_proj"], projections["k_proj"], projections["v_proj"]
        self.out_proj = projections["out_proj"]
        self.formats = dict(formats)
        self.train(mha.training)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        _check_ranks(query, key, value, key_padding_mask, attn_mask, is_causal)
        batched = query.dim() == 3
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if batched and self.batch_first:  # to (L, N, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        self._check_shapes(query, key, value)
        # torch: with is_causal, no key padding and no weights wanted, SDPA's is_causal replaces the mask
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # merged with the padding, the mask is no longer causal
        tgt_len, bsz, _ = query.shape
        src_len, H, D = key.shape[0], self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        attn_mask = self._merged_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len, batched)
        q = q.view(tgt_len, bsz * H, D).transpose(0, 1)
        k = k.view(src_len, bsz * H, D).transpose(0, 1)
        v = v.view(src_len, bsz * H, D).transpose(0, 1)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = self._with_weights(q, k, v, attn_mask, dropout_p, average_attn_weights)
        else:
            out, weights = self._sdpa(q, k, v, attn_mask, dropout_p, is_causal), None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not batched:
            out, weights = out.squeeze(1), None if weights is None else weights.squeeze(0)
        if batched and self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_shapes(self, query, key, value):
        """(L, N, E) query, (S, N, kdim) key, (S, N, vdim) value, as nn.MultiheadAttention requires."""
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key and value's last dimensions must be kdim={self.kdim} and vdim={self.vdim}, got "
                             f"{key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != query.shape[1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match query "
                             f"{tuple(query.shape)} in batch and each other in length")

    def _merged_mask(self, attn_mask, key_padding_mask, bsz, tgt_len, src_len, batched):
        """The float attention mask (N*H or 1, L, S) with the key padding added, as torch merges them; or None."""
        H = self.num_heads
        if attn_mask is not None:
            want = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * H, tgt_len, src_len)
            if tuple(attn_mask.shape) != want:
                raise ValueError(f"attn_mask of a {attn_mask.dim()}-D shape must be {want}, got "
                                 f"{tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(f"key_padding_mask must have shape {(bsz, src_len)[int(not batched):]}, got "
                                 f"{tuple(key_padding_mask.shape)[int(not batched):]}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        return attn_mask

    def _with_weights(self, q, k, v, attn_mask, dropout_p, average_attn_weights):
        """torch's need_weights path: an explicit softmax; (out (L*N, E), weights (N, [H,] L, S))."""
        F = torch.nn.functional
        bh, tgt_len, D = q.shape
        bsz, src_len = bh // self.num_heads, k.shape[1]
        q_scaled = q * math.sqrt(1.0 / float(D))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
        weights = weights.view(bsz, self.num_heads, tgt_len, src_len)
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _sdpa(self, q, k, v, attn_mask, dropout_p, is_causal):
        """torch's path without weights: scaled_dot_product_attention; out (L*N, E)."""
        bh, tgt_len, D = q.shape
        H, src_len = self.num_heads, k.shape[1]
        bsz = bh // H
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, H, -1, src_len)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(bsz, H, tgt_len, D), k.view(bsz, H, src_len, D), v.view(bsz, H, src_len, D), attn_mask,
            dropout_p, is_causal)
        return out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)


def _check_ranks(query, key, value, key_padding_mask, attn_mask, is_causal):
    """What nn.MultiheadAttention takes, before anything is computed: plain 2-D/3-D tensors, masks of fitting rank."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError("SparseMultiheadAttention does not take NestedTensor inputs (nn.MultiheadAttention "
                         "takes them only on its fused fast path); pass padded tensors and key_padding_mask")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and "
                         f"{value.dim()}-D")
    if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
        raise ValueError(f"key_padding_mask must be None or {2 if batched else 1}-D for a {query.dim()}-D query,"
                         f" got {key_padding_mask.dim()}-D")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(f"attn_mask must be None, 2-D or 3-D, got {attn_mask.dim()}-D")
    if is_causal and attn_mask is None:
        raise ValueError("is_causal needs attn_mask too (as nn.MultiheadAttention): pass the causal mask, e.g. "
                         "nn.Transformer.generate_square_subsequent_mask(L)")


def dense_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An nn.Linear holding a copy of `weight` / `bias` (no initialisation run: the global RNG is not touched)."""
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin
