"""Stand-ins for the methods issue 34 adds on other branches (PRUMERGE, PRUMERGE_PLUS,
DIVPRUNE_ADAPTIVE, VISIONZIP, FASTERVLM), registered by ``conftest.peer_methods`` only where the
real one is not installed: the harness's labels, configs and adaptive runs, tested without them."""

from __future__ import annotations

import torch


def _by_norm(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` tokens of largest norm, sorted (float64 norms: no overflow)."""
    norms = tokens.detach().double().norm(dim=-1)
    return norms.argsort(descending=True, stable=True)[:k].sort().values


def select_adaptive(tokens, k, *, adaptive):
    """Adaptive (``SUBSET_RATIO`` unset): the tokens of above-mean norm, at least one, so that the
    count follows the image; else the ``k`` of largest norm."""
    if adaptive:
        norms = tokens.detach().double().norm(dim=-1)
        k = max(1, int((norms > norms.mean()).sum()))
    return _by_norm(tokens, k)


def select_top_norm(tokens, k):
    """The ``k`` tokens of largest norm."""
    return _by_norm(tokens, k)
