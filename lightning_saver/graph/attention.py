"""Our lowering of ``scaled_dot_product_attention`` to matmul + softmax, used when decomposing.

torch's own decomposition of SDPA (its math kernel) views the query with the strides of the fused
kernels' layout, which fails on the symbolic batch of models that transpose heads first (GPT-2 and
T5 in ``transformers``: "Cannot view a tensor with shape [s43, 16, 64] and strides (64, 64*s43, 1)").
This one uses only shape-agnostic ops (matmul, transpose, masked_fill, softmax), and follows torch's
math backend: scores = q k^T * scale, a boolean mask (or ``is_causal``'s lower triangle) fills -inf, a
float mask is added, and rows masked everywhere give zeros (torch's ``_safe_softmax``) instead of NaN.

Example::

    program = torch.export.export(model, args).run_decompositions(decompositions())
"""

from __future__ import annotations

import math
from typing import Any

import torch

aten = torch.ops.aten

# the SDPA overloads torch.export may leave in a program before decomposition
SDPA_OPS = (aten.scaled_dot_product_attention.default,)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
         enable_gqa: bool = False) -> torch.Tensor:
    """Attention in eval mode (``dropout_p`` is ignored: exports are for inference)."""
    if enable_gqa and query.size(-3) != key.size(-3):
        repeats = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    masked = None
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        masked = keep.logical_not()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        masked = attn_mask.logical_not() if masked is None else masked | attn_mask.logical_not()
    elif attn_mask is not None:
        scores = scores + attn_mask
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if masked is not None:  # a query that may attend to nothing gets zeros, as in torch
        probs = probs.masked_fill(masked.all(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, value)


def decompositions() -> dict[Any, Any]:
    """torch.export's default decomposition table, with SDPA lowered by ``sdpa``."""
    table = dict(torch.export.default_decompositions())
    for op in SDPA_OPS:
        table[op] = sdpa
    return table
