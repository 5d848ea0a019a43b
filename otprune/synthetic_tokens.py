"""Synthetic token matrices shaped like LLaVA's projected visual tokens, for tests and demos."""

from __future__ import annotations

import torch

__all__ = ["clustered_tokens"]


def clustered_tokens(
    n: int = 576,
    d: int = 4096,
    *,
    clusters: int = 12,
    spread: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    batch: int | None = None,
) -> torch.Tensor:
    """``(N, d)`` (or ``(batch, N, d)``) tokens drawn around a few centres plus a shared offset.

    Real projected visual tokens share a large common component and fall into a handful of
    semantic groups of unequal size (sky, object, background); i.i.d. Gaussian tokens have
    neither, which makes every subset look alike. Cluster sizes follow a geometric-like law.
    """
    if n < 1 or d < 1 or clusters < 1:
        raise ValueError(f"n, d and clusters must be >= 1; got n={n}, d={d}, clusters={clusters}")
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or 1, n, d)
    offset = torch.randn(shape[0], 1, d, generator=generator)
    centres = 2.0 * torch.randn(shape[0], clusters, d, generator=generator)
    weights = 0.7 ** torch.arange(clusters, dtype=torch.float64)
    assignment = torch.multinomial(weights.expand(shape[0], clusters), n, replacement=True, generator=generator)
    tokens = offset + centres.gather(1, assignment[..., None].expand(*shape)) + spread * torch.randn(*shape, generator=generator)
    tokens = tokens.to(dtype)
    return tokens if batch is not None else tokens[0]
