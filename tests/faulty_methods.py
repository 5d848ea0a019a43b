"""Selectors and mergers for ``tests/test_check_selector.py``: two that keep the contract and
several that each break one part of it, to be loaded as ``faulty_methods:<function>``."""

from __future__ import annotations

import torch


def _norm_top_k(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tokens of largest norm, ties to the lower index (float64 norms: no overflow)."""
    norms = tokens.detach().double().norm(dim=-1)
    return norms.argsort(dim=-1, descending=True, stable=True)[..., :k]


def _refuse_non_finite(tokens: torch.Tensor) -> None:
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens contain NaN or Inf")


def select_good(tokens, k):
    """Keeps the contract: the k largest-norm tokens, sorted, NaN refused."""
    _refuse_non_finite(tokens)
    return _norm_top_k(tokens, k).sort(dim=-1).values


def select_good_batched(tokens, k):
    """As ``select_good``, for (B, N, d) batches too."""
    return select_good(tokens, k)


select_good_batched.accepts_batches = True


def select_unsorted(tokens, k):
    """Indices in order of norm, not sorted ascending."""
    _refuse_non_finite(tokens)
    return _norm_top_k(tokens, k)


def select_int32(tokens, k):
    """Sorted indices of dtype int32 instead of torch.long."""
    return select_good(tokens, k).to(torch.int32)


def select_short(tokens, k):
    """One index fewer than the budget."""
    return select_good(tokens, k)[..., : max(k - 1, 0)]


def select_accepts_nan(tokens, k):
    """Keeps the contract except that tokens holding NaN are not refused."""
    return _norm_top_k(tokens, k).sort(dim=-1).values


def select_claims_batches(tokens, k):
    """Says it takes (B, N, d) batches, but answers only the first image."""
    if tokens.dim() == 3:
        tokens = tokens[0]
    return select_good(tokens, k)


select_claims_batches.accepts_batches = True


def select_via_numpy(tokens, k):
    """Reads the tokens through NumPy, which raises for tokens that require a gradient."""
    values = torch.from_numpy(tokens.float().cpu().numpy())
    return select_good(values, k).to(tokens.device)


def select_nan_crashes(tokens, k):
    """Refuses NaN only by crashing on it, not with a ValueError."""
    if not bool(torch.isfinite(tokens).all()):
        raise RuntimeError("linalg.cholesky: the factorization could not be completed")
    return select_good(tokens, k)


def select_nondeterministic(tokens, k):
    """A fresh random subset at every call."""
    _refuse_non_finite(tokens)
    return torch.randperm(tokens.shape[-2], device=tokens.device)[:k].sort().values


def select_crashes_at_k_equals_n(tokens, k):
    """Raises when asked to keep every token."""
    if k == tokens.shape[-2]:
        raise RuntimeError("k = N was not expected")
    return select_good(tokens, k)


def select_with_context(tokens, k, *, text, grid, attention, layer_index, weight=1.0):
    """Keeps the contract using every context: the tokens most attended, checking what it is given."""
    _refuse_non_finite(tokens)
    assert text.shape[-1] == tokens.shape[-1] and text.dtype == tokens.dtype
    assert sum(g.size for g in grid) == tokens.shape[-2]
    assert attention.shape == tokens.shape[-2:-1] and isinstance(layer_index, int)
    scores = attention.detach().double() * weight
    return scores.argsort(descending=True, stable=True)[:k].sort().values


def select_needs_option(tokens, k, *, strength):
    """Has an option without a default, which the battery must be given."""
    return select_good(tokens, k)


def merge_good(tokens, k):
    """Keeps the merger contract: k contiguous chunks, each averaged, standing at its first token."""
    _refuse_non_finite(tokens)
    x = tokens.detach()
    n = x.shape[0]
    starts = torch.div(torch.arange(k, device=x.device) * n, k, rounding_mode="floor")
    merged = torch.stack([chunk.double().mean(0) for chunk in torch.tensor_split(x, starts[1:].cpu())]).to(x.dtype)
    return merged, starts


def merge_float32(tokens, k):
    """Merged tokens always float32, whatever the input dtype."""
    merged, positions = merge_good(tokens, k)
    return merged.float(), positions


def merge_keeps_grad(tokens, k):
    """Merged tokens that carry the input's gradient."""
    _refuse_non_finite(tokens)
    merged, positions = merge_good(tokens, k)
    return tokens[positions] * 1.0, positions


def bad_signature(tokens):
    """Not a selector: one positional parameter."""
    return tokens


NOT_A_FUNCTION = 3
