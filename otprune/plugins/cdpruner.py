"""CDPruner (``BASELINE=CDPRUNER``; Zhang et al., NeurIPS 2025, arXiv 2506.10967) as an outside
plugin: a conditional DPP over the visual tokens, diversity weighted by relevance to the question.

Written against the public API only (``torch``, ``otprune.selectors.greedy_logdet``,
``otprune.contract.check_image_tokens``), as a package outside otprune would write it; found as the selector
``CDPRUNER = "otprune.plugins.cdpruner:select_cdpruner"`` (``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import torch

from otprune.contract import PatchGrid, check_grids, check_image_tokens
from otprune.selectors import greedy_logdet

__all__ = ["DEFAULT_THETA", "RELEVANCE_OFFSET", "SHORT_ANSWER", "crop_budgets", "crops_of", "select_cdpruner"]

# The public code's kernel: q = r (its theta lines are commented out), relevance from -cos.
DEFAULT_THETA = 1.0
# The public code's min-max normalisation adds this to the numerator: the least relevant token keeps
# a small weight instead of none.
RELEVANCE_OFFSET = 1e-6
# The instruction the public code removes from the question (newline included) before scoring relevance.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@torch.no_grad()
def select_cdpruner(
    tokens: torch.Tensor,
    k: int,
    *,
    text: torch.Tensor,
    grid: tuple[PatchGrid, ...],
    theta: float = DEFAULT_THETA,
    negate_relevance: bool = True,
) -> torch.Tensor:
    """CDPruner: greedy MAP of a relevance-weighted DPP on the visual tokens.

    ``tokens``: ``(N, d)``, one image's visual tokens (float16, bfloat16, float32 or float64,
    finite); ``k``: an int in ``[1, N]``; ``text``: ``(T, d)``, ``T >= 1``, the prompt's embedded
    text tokens (context, always passed by the patches). Returns ``(k,)`` ``torch.long`` indices,
    sorted ascending, on ``tokens.device``.

    With ``x~_i`` the unit-norm rows of ``tokens`` and ``t~_j`` those of ``text``:

    - similarity ``S_il = <x~_i, x~_l>`` (cosine, ``(N, N)``);
    - relevance ``r_i = mean_j -<x~_i, t~_j>`` (``+<x~_i, t~_j>`` with ``negate_relevance=False``),
      min-max normalised over the N tokens as the public code does:
      ``(r_i - min r + RELEVANCE_OFFSET) / (max r - min r)``;
    - weight ``q_i = r_i`` (``theta = 1``, the default); with ``theta`` in ``(0, 1)`` the paper
      text's ``q_i = exp(alpha r_i)``, ``alpha = theta / (2 (1 - theta))``;
    - kernel ``L = diag(q) S diag(q)``; the ``k`` picks are ``greedy_logdet(L, k)``'s greedy MAP of
      ``log det L_S`` (incremental Cholesky; past the kernel's rank it fills with the unchosen
      tokens of largest residual variance, as DPP does).

    **Choices** (METHOD.md):

    - relevance embeddings: the paper scores the vision encoder's features against its CLIP text
      encoder's embedding of the instruction; the models here have no CLIP text encoder, so
      relevance is measured in the LLM's input space, between the projected visual tokens (the
      ``tokens`` selected on) and the LLM-embedded question (``text``), as TRIM's text context is;
    - the default is the authors' public code (github Theia-4869/CDPruner, ``encode_images``),
      which produced their numbers: ``q = r`` from the negated cosine with its ``+1e-6`` offset; the
      paper text's weighting (``theta = 0.5``, its stated default) and sign (``negate_relevance=False``)
      are options;
    - crops (``grid``, :func:`crops_of`): as the public code on LLaVA-1.6, one DPP per crop (the
      base image, and each base-sized block of the any-resolution tiles), the budget split evenly
      over them (:func:`crop_budgets`) after every newline vector is kept; relevance normalised
      over all the image's patch tokens at once, as the code normalises over all its crops. A
      single grid (LLaVA-1.5, Qwen) is one crop. A budget below the newlines plus one token a crop
      runs one DPP over all tokens;
    - the short-answer instruction: as the public code (``llava/eval/model_vqa_loader.py``), which
      removes ``SHORT_ANSWER`` from the question before embedding it, the question leaves it out
      (``select_cdpruner.text_leaves_out``, ``otprune.contract``): the patches drop its tokens from
      ``text``, newline included where the tokenizer gives it a token of its own;
    - a zero span (every ``r_i`` equal, to within float rounding of ``16 eps``): min-max is
      undefined; every token is then equally relevant, ``r_i = 1``, and ``L`` is ``S`` up to one
      scale, so the picks are plain DPP's (``select_dpp``).

    Notes: ``q`` is computed as ``exp(alpha (r_i - 1))``, i.e. divided by its largest value
    ``exp(alpha)``; that scales ``L`` by one positive constant, which leaves ``log det``'s greedy
    picks unchanged, and keeps ``q`` finite for ``theta`` near 1. Each vector is divided by its
    largest magnitude before it is squared, so tokens of ``1e20`` or ``1e-20`` (any finite scale)
    neither overflow nor underflow and pick as unscaled ones do. Work is in float32 (float64 input
    stays float64), without autograd. Called one image at a time (no ``accepts_batches``).
    """
    k = _check_inputs(tokens, k, text)
    check_grids(grid, tokens.shape[0])
    theta = _check_theta(theta)
    if not isinstance(negate_relevance, bool):
        raise ValueError(f"negate_relevance must be True or False; got {negate_relevance!r}")
    work = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    crops, kept = crops_of(grid, tokens.shape[0], tokens.device)
    if k < kept.numel() + len(crops):
        # Too small a budget to keep every newline and a token of every crop: one DPP over all tokens.
        crops, kept = [torch.arange(tokens.shape[0], device=tokens.device)], kept[:0]
    patches = torch.cat(crops)
    x = _unit_rows(tokens.detach()[patches].to(work))
    t = _unit_rows(text.detach().to(device=tokens.device, dtype=work))
    cosine = x @ t.T
    relevance = (-cosine if negate_relevance else cosine).mean(-1)
    low, high = torch.aminmax(relevance)
    span = high - low
    zero_span = span <= 16 * torch.finfo(work).eps
    relevance = torch.where(zero_span, torch.ones_like(relevance), (relevance - low + RELEVANCE_OFFSET) / torch.where(zero_span, 1.0, span))
    if theta == 1.0:
        weight = relevance
    else:
        alpha = theta / (2.0 * (1.0 - theta))
        weight = torch.exp(alpha * (relevance - 1.0))
    picks = [kept]
    start = 0
    for crop, share in zip(crops, crop_budgets(k - kept.numel(), [c.numel() for c in crops]), strict=True):
        rows = slice(start, start + crop.numel())
        start += crop.numel()
        if share:
            kernel = weight[rows, None] * (x[rows] @ x[rows].T) * weight[None, rows]
            picks.append(crop[greedy_logdet(kernel[None], share)[0]])
    return torch.cat(picks).sort().values


select_cdpruner.text_leaves_out = (SHORT_ANSWER,)


def crops_of(grid: tuple[PatchGrid, ...], n: int, device=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(crops, kept)``: the token indices of each crop one DPP runs on, and the tokens kept
    whatever the budget (newline vectors, and tokens in no grid such as a single tile's lone
    newline). A grid is one crop, but for any-resolution tiles (a grid with newline rows after a
    first, base grid): those are cut into the base grid's ``rows x cols`` blocks from their top-left
    (**choice**: the public code cuts its crops before unpadding, which removes up to half a crop
    from both ends of one side; the unpadded grid here does not say where, so the last block of a
    row or column may be partial)."""
    crops: list[torch.Tensor] = []
    covered = torch.zeros(n, dtype=torch.bool, device=device)
    for index, patch_grid in enumerate(grid):
        cells = patch_grid.cell_positions(device)
        covered[cells.flatten()] = True
        if index == 0 or not patch_grid.newlines:
            crops.append(cells.flatten())
            continue
        tall, wide = grid[0].rows, grid[0].cols
        for top in range(0, patch_grid.rows, tall):
            for left in range(0, patch_grid.cols, wide):
                crops.append(cells[top : top + tall, left : left + wide].flatten())
    return crops, (~covered).nonzero().flatten()


def crop_budgets(total: int, sizes: list[int]) -> list[int]:
    """``total`` dealt one token at a time to the crops in turn (an even split, the earlier crops
    first for a remainder), skipping a crop once it is full."""
    shares = [0] * len(sizes)
    left = min(total, sum(sizes))
    while left:
        for i, size in enumerate(sizes):
            if left and shares[i] < size:
                shares[i] += 1
                left -= 1
    return shares


def _check_inputs(tokens, k, text) -> int:
    k = check_image_tokens(tokens, k)
    n, d = tokens.shape
    if not isinstance(text, torch.Tensor) or not text.is_floating_point():
        got = f"a tensor of dtype {text.dtype}" if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"text must be a floating-point torch.Tensor of shape (T, {d}); got {got}")
    if text.dim() != 2 or text.shape[0] < 1 or text.shape[1] != d:
        raise ValueError(f"text must have shape (T, {d}) with T >= 1, the tokens' width; got shape {tuple(text.shape)}")
    if text.device.type == "meta":
        raise ValueError("text is on the meta device, which holds no values; pass a CPU or GPU tensor")
    # One read-back for both (on a GPU each is a host synchronisation); the second only on failure.
    tokens_finite = torch.isfinite(tokens).all()
    if not bool(tokens_finite & torch.isfinite(text).all().to(tokens_finite.device)):
        what = "tokens contain" if not bool(tokens_finite) else "text contains"
        raise ValueError(f"{what} NaN or Inf; every entry must be finite")
    return k


def _check_theta(theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be a number in (0, 1] (1: q = r, no exponential); got {theta!r}")
    return float(theta)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(M, d)`` scaled to unit L2 norm (all-zero rows stay zero), each divided by its
    largest magnitude first so that no finite scale overflows or underflows the squares."""
    peak = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).smallest_normal)
    scaled = x / peak
    norm = scaled.square().sum(-1, keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    return scaled / norm
