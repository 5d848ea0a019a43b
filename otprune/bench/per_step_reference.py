"""The straightforward per-step OTPrune greedy, kept only as a baseline for ``otprune.bench.selectors``.

It follows the shape of the published reference code on purpose: one image at a time, the
identity matrix built on the host and copied to the tokens' device at every call, and one host
synchronisation (``.item()``) per selected token to read the argmax back. It must pick exactly
the indices ``otprune.selectors.select_otprune`` picks; only its speed differs. Like the library
it computes in float32, or in float64 for float64 tokens (which the exactness checks use).
"""

from __future__ import annotations

import math

import torch

from otprune.selectors import DEFAULT_GAMMA, NORM_EPS

__all__ = ["per_step_otprune"]


def _one_image(x: torch.Tensor, k: int, gamma: float) -> list[int]:
    """``x``: ``(N, d)``; returns the ``k`` picks in the order chosen."""
    n = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    # The library's column normalisation, so the two differ only in how the greedy runs.
    x_hat = x / x.square().sum(0, keepdim=True).sqrt().clamp_min(NORM_EPS)
    a = x_hat @ x_hat.T
    identity = torch.eye(n, dtype=dtype).to(x.device)
    kernel = identity + gamma * (a @ a)
    chol = torch.zeros(k, n, dtype=dtype, device=x.device)
    d2 = kernel.diagonal().clone()
    j = int(d2.argmax().item())
    chosen = [j]
    while len(chosen) < k:
        t = len(chosen) - 1
        e = (kernel[j] - chol[:t, j] @ chol[:t]) / d2[j].sqrt()
        chol[t] = e
        d2 -= e.square()
        d2[j] = -math.inf
        j = int(d2.argmax().item())
        chosen.append(j)
    return chosen


def per_step_otprune(tokens: torch.Tensor, k: int, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """``tokens``: ``(N, d)`` or ``(B, N, d)``; returns sorted ``(k,)`` or ``(B, k)`` long indices
    on ``tokens.device``, like ``select_otprune``, computed one image and one token at a time."""
    single = tokens.dim() == 2
    images = tokens.unsqueeze(0) if single else tokens
    picks = torch.tensor([sorted(_one_image(x, k, gamma)) for x in images], dtype=torch.long, device=tokens.device)
    return picks[0] if single else picks
