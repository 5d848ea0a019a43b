"""PruMerge and PruMerge+ (``BASELINE=PRUMERGE`` / ``PRUMERGE_PLUS``; Shang et al. 2024, public
code github 42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``:
``outlier_dectection``, ``token_prune_merge_advanced``, ``token_prune_merge_advanced_plus``) as
bundled plugins: adaptive pruning of the vision tower's features by the outliers of the [CLS]
attention, and merging of each kept token with its key-nearest neighbours.

Both run before the projector (``before_projector = True``) on the tower's features and ask for
``vision`` (``cls_attention``, ``keys``) and ``adaptive``. The per-image count
(:func:`outlier_count`, :func:`prumerge_token_count`) is shared with DIVPRUNE_ADAPTIVE.

Written against the public API only (``torch``, ``otprune.contract``); found as the mergers
``PRUMERGE = "otprune.plugins.prumerge:merge_prumerge"`` and
``PRUMERGE_PLUS = "otprune.plugins.prumerge:merge_prumerge_plus"`` (``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import math

import torch

from otprune.contract import VisionContext, check_image_tokens
from otprune.plugins.vision_checks import check_finite_tokens, check_vision, vision_field

__all__ = [
    "NEIGHBOURS",
    "kept_count",
    "merge_prumerge",
    "merge_prumerge_plus",
    "outlier_count",
    "prumerge_token_count",
    "quartiles",
]

# Each kept token absorbs this many of its key-nearest other tokens (the code's ``topk(k=32)``).
NEIGHBOURS = 32
# The outlier fence: above Q3 + IQR_FACTOR * IQR.
IQR_FACTOR = 1.5


def quartiles(values: torch.Tensor) -> tuple[float, float]:
    """``(Q1, Q3)`` of a 1-D tensor, linear interpolation between order statistics
    (``torch.quantile``'s default, as ``numpy.percentile``'s, which the public code calls), in float64."""
    q1, q3 = torch.quantile(values.detach().double().flatten(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device)).tolist()
    return q1, q3


def outlier_count(cls_attention: torch.Tensor) -> int:
    """The number of entries of ``cls_attention`` ``(N,)`` strictly above ``Q3 + 1.5 IQR``
    (:func:`quartiles`), the public code's ``outlier_dectection`` (which returns it as a share of
    ``N``). **Choice**: the quartiles and the fence in float64; the code's numpy works in float32
    on the float32 attention, so the two can differ only for a value within a float32 rounding of
    the fence."""
    q1, q3 = quartiles(cls_attention)
    fence = q3 + IQR_FACTOR * (q3 - q1)
    return int((cls_attention.detach().double() > fence).sum())


def kept_count(cls_attention: torch.Tensor) -> int:
    """PruMerge's adaptive count of kept tokens for one image: ``int(N * (outliers / N))`` as the
    code computes it (in float64 this is ``outliers - 1`` for some ``N`` and counts, e.g.
    ``N = 2880``, 13 outliers; never for LLaVA-1.5's ``N = 576``), at least 1 (**choice**: the code would keep none, and fail, for an
    image without outliers)."""
    n = cls_attention.numel()
    ratio = outlier_count(cls_attention) / n
    return max(1, int(n * ratio))


def prumerge_token_count(cls_attention: torch.Tensor) -> int:
    """The tokens PruMerge hands the projector for one image: :func:`kept_count` merged tokens plus
    the extra token over the unkept ones, when there are any; in ``[1, N]``."""
    n = cls_attention.numel()
    kept = kept_count(cls_attention)
    return kept + (1 if kept < n else 0)


@torch.no_grad()
def merge_prumerge(tokens: torch.Tensor, k: int, *, vision: VisionContext, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge: keep the tokens of largest [CLS] attention, each merged with its nearest neighbours.

    ``tokens``: ``(N, C_v)``, one image's vision-tower features before the projector (float16,
    bfloat16, float32 or float64, finite); ``k``: an int in ``[1, N]`` (``N`` when ``adaptive``);
    ``vision``: its :class:`VisionContext`, of which ``cls_attention`` ``a`` ``(N,)`` and ``keys``
    ``(N, C)`` are read; ``adaptive``: the run leaves the count to the method. Returns ``(merged,
    positions)``: ``merged`` ``(m, C_v)`` in ``tokens``' dtype and device, ``positions`` ``(m,)``
    ``torch.long``, sorted, distinct; ``merged`` in position order.

    - kept set ``S``: the top ``s`` tokens by ``a``; adaptive: ``s`` = :func:`kept_count` (the
      outliers of ``a`` above ``Q3 + 1.5 IQR``, as ``outlier_dectection``), which varies per image;
      with a budget: ``s = k - 1`` (see below).
    - merge (``token_prune_merge_advanced``): with ``u_i`` the unit keys, each kept token ``i``
      becomes ``x_i + sum_{j in NN(i)} a_j x_j`` over its 32 other tokens (kept or not) of largest
      ``<u_i, u_j>``, unnormalised as the code has it (its ``/ torch.sum(weights)`` is commented out).
    - the extra token ``sum_{j not in S} a_j x_j`` over every unkept token (the code's
      ``extra_one_token``), when there is one.

    **Choices**:

    - budget: the code keeps ``int(N ratio)`` tokens and adds the extra one (``k + 1`` tokens). Here
      the extra token counts in the budget: ``s = k - 1`` merged tokens plus the extra one, ``k``
      in all; ``k = 1``: the top token alone, merged, no extra token; ``k = N``: every token,
      merged, no extra token (none is unkept). Adaptive: ``s + 1 <= N`` tokens (``s`` outliers are
      at most a quarter of ``N``), ``s`` alone when ``s = N`` (``N = 1``).
    - order and positions: the code emits the kept tokens in descending attention, then the extra
      token; here each kept token sits at its own index and the output is in position order (the
      LLaVA families at K = 0 read that order). The extra token takes the largest unkept index, so
      it comes last, as in the code, whenever the last patch is unkept.
    - ties in ``a`` or in key similarity: the lower index first (``torch.topk`` leaves it open);
      fewer than 33 tokens: every other token is a neighbour.
    - float32 work (the code works in the tower's dtype, float16 in LLaVA), output cast back.
    """
    return _prumerge(tokens, k, vision, adaptive, plus=False)


merge_prumerge.before_projector = True


@torch.no_grad()
def merge_prumerge_plus(tokens: torch.Tensor, k: int, *, vision: VisionContext, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+: PruMerge's outliers plus spatially uniform tokens, then PruMerge's merge.

    Inputs, output and merge as :func:`merge_prumerge`. Kept set
    (``token_prune_merge_advanced_plus``):

    - adaptive: the top ``s`` = :func:`kept_count` tokens by ``a``, plus the indices
      ``0, t, 2t, ... < N - 1`` not already kept, with ``t = floor(floor(1 / r) / 3)`` and
      ``r = s_o / N`` (``s_o`` the outlier count, at least 1), as the code's
      ``torch.arange(0, 575, int(step_length / 3))`` over LLaVA's 576 patches; then the extra
      token over the unkept ones. ``N - 1`` is the code's 575: the last patch is never a uniform pick.

    **Choices**:

    - ``t`` at least 1 (the code's step is 0 once ``r > 1/3``, which outliers never reach but a
      forced count of 1 on a tiny image may);
    - with a budget ``k`` (the code's other branch is its training form, top ``N r`` plus ``N r``
      stride positions, duplicates not removed): ``b = k - 1`` kept tokens plus the extra one
      (``b = k`` at ``k = 1`` or ``k = N``, no extra token), ``ceil(b / 2)`` of them the top by
      ``a`` and the other ``floor(b / 2)`` spread uniformly over the unkept tokens: with ``M`` of
      them in index order, the ``floor((2 j + 1) M / (2 u))``-th for ``j < u``;
    - everything else as :func:`merge_prumerge`.
    """
    return _prumerge(tokens, k, vision, adaptive, plus=True)


merge_prumerge_plus.before_projector = True


def _prumerge(tokens, k, vision, adaptive, plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = check_image_tokens(tokens, k)
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False; got {adaptive!r}")
    n = tokens.shape[0]
    check_finite_tokens(tokens)
    check_vision(vision, n, ("cls_attention", "keys"))
    device = tokens.device
    attention = vision_field(vision, "cls_attention", device)
    keys = vision_field(vision, "keys", device)
    x = tokens.detach().to(torch.float32)
    by_attention = attention.argsort(descending=True, stable=True)
    if adaptive:
        kept_top = kept_count(attention)
        kept = by_attention[:kept_top]
        if plus:
            ratio = max(1, outlier_count(attention)) / n
            step = max(1, int(int(1 / ratio) / 3))
            uniform = torch.arange(0, n - 1, step, device=device)
            kept = torch.cat([kept, uniform])
        extra = True
    else:
        budget = k if k in (1, n) else k - 1
        top = (budget + 1) // 2 if plus else budget
        kept = by_attention[:top]
        if plus and budget > top:
            rest = _complement(kept, n)
            count = budget - top
            picks = torch.div((2 * torch.arange(count, device=device) + 1) * rest.numel(), 2 * count, rounding_mode="floor")
            kept = torch.cat([kept, rest[picks]])
        extra = k not in (1, n)
    keep_mask = torch.zeros(n, dtype=torch.bool, device=device)
    keep_mask[kept] = True
    kept = keep_mask.nonzero().flatten()
    merged = _merge_kept(x, attention, keys, kept)
    positions = kept
    unkept = (~keep_mask).nonzero().flatten()
    if extra and unkept.numel():
        extra_token = (attention * (~keep_mask)) @ x
        merged = torch.cat([merged, extra_token[None]])
        positions = torch.cat([positions, unkept[-1:]])
        positions, order = positions.sort()
        merged = merged[order]
    return merged.to(tokens.dtype), positions


def _complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=indices.device)
    mask[indices] = False
    return mask.nonzero().flatten()


def _merge_kept(x: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(s, C_v)``: each kept token ``x_i + sum_{j in NN(i)} a_j x_j``, ``NN(i)`` its ``NEIGHBOURS``
    other tokens of largest key cosine (ties: the lower index)."""
    n = x.shape[0]
    unit = torch.nn.functional.normalize(keys, p=2, dim=-1)
    cosine = unit[kept] @ unit.T  # (s, N)
    rows = torch.arange(kept.numel(), device=x.device)
    cosine[rows, kept] = -math.inf
    neighbours = cosine.argsort(dim=-1, descending=True, stable=True)[:, : min(NEIGHBOURS, n - 1)]
    weights = torch.zeros_like(cosine)
    weights.scatter_(1, neighbours, attention[neighbours])
    return x[kept] + weights @ x
