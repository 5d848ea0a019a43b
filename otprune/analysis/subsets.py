"""Batched scoring of many k-subsets of one token set under the Gaussian-W2 objectives.

For column-normalised tokens ``X`` ``(N, d)`` let ``A = X X^T`` ``(N, N)`` and ``K = A A``. With
``S = X^T X / N`` and ``S_S = X_S^T X_S / k`` (the normalisation of ``otprune.measures``), the
eigenvalues of ``S^1/2 S_S S^1/2`` are those of the ``k x k`` block ``K[S, S] / (N k)``. So one
``N x N`` product up front turns every subset's score into a gather and a small batched
``eigvalsh``, and the same eigenvalues ``mu`` of ``K[S, S]`` give all three objectives:

- trace term ``tr((S^1/2 S_S S^1/2)^1/2) = sum sqrt(mu) / sqrt(N k)`` (higher is better);
- Gaussian ``W2^2 = tr S + tr S_S - 2 * trace term`` with ``tr S_S = sum_{i in S} A_ii / k``
  (lower is better);
- OTPrune's surrogate ``log det(I_k + gamma K[S, S]) = sum log(1 + gamma mu)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from otprune.measures import column_normalise
from otprune.selectors import DEFAULT_GAMMA

__all__ = ["SubsetScorer", "enumerate_subsets", "sample_subsets", "score_subsets"]

# Batched eigvalsh on CPU slows down sharply once a batch outgrows the cache (5000 blocks of
# 100 x 100 run ~5x slower per block than 500), so subsets are scored in chunks of this many.
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class SubsetScorer:
    """Precomputed state for scoring subsets of one token set.

    ``k_matrix``: ``(N, N)`` float64, ``K = A A`` with ``A = X_hat X_hat^T``.
    ``a_diag``: ``(N,)`` float64, ``A_ii = ||x_hat_i||^2``.
    ``trace_full``: ``tr S = ||X_hat||_F^2 / N``.
    """

    k_matrix: torch.Tensor
    a_diag: torch.Tensor
    trace_full: float

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor) -> SubsetScorer:
        """``tokens``: ``(N, d)`` raw tokens; column-normalised here exactly as the measures do."""
        x = column_normalise(tokens)
        a = x @ x.T
        return cls(k_matrix=a @ a, a_diag=a.diagonal().clone(), trace_full=float(x.square().sum()) / x.shape[0])

    @property
    def n(self) -> int:
        return self.k_matrix.shape[0]


def score_subsets(scorer: SubsetScorer, subsets: torch.Tensor, *, gamma: float = DEFAULT_GAMMA, chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Scores ``subsets`` ``(M, k)`` (distinct indices per row, any order) in chunks.

    Returns float64 tensors of shape ``(M,)``: ``"trace"`` (the W2 trace term), ``"w2"`` (Gaussian
    ``W2^2``) and ``"logdet"`` (OTPrune's ``log det(I + gamma K_S)``).
    """
    if subsets.dim() != 2 or subsets.shape[1] < 1:
        raise ValueError(f"subsets must have shape (M, k) with k >= 1; got {tuple(subsets.shape)}")
    m, k = subsets.shape
    scale = math.sqrt(scorer.n * k)
    trace = torch.empty(m, dtype=torch.float64)
    w2 = torch.empty(m, dtype=torch.float64)
    logdet = torch.empty(m, dtype=torch.float64)
    previous_threads = torch.get_num_threads()
    # Batched CPU eigvalsh nests MKL's threads inside ATen's; on a loaded 2-core machine that
    # thrashed (268 ms per 100 x 100 block with 2 threads vs 0.9 ms with 1), so score single-threaded.
    torch.set_num_threads(1)
    try:
        _score_chunks(scorer, subsets, gamma, chunk, scale, trace, w2, logdet)
    finally:
        torch.set_num_threads(previous_threads)
    return {"trace": trace, "w2": w2, "logdet": logdet}


def _score_chunks(scorer, subsets, gamma, chunk, scale, trace, w2, logdet) -> None:
    """Fills ``trace``, ``w2``, ``logdet`` ``(M,)`` in place, ``chunk`` subsets at a time."""
    k = subsets.shape[1]
    for start in range(0, subsets.shape[0], chunk):
        idx = subsets[start : start + chunk]
        block = scorer.k_matrix[idx[:, :, None], idx[:, None, :]]
        # K_S is PSD; round-off can push its smallest eigenvalues just below zero.
        mu = torch.linalg.eigvalsh(block).clamp_min(0.0)
        t = mu.sqrt().sum(-1) / scale
        trace[start : start + chunk] = t
        w2[start : start + chunk] = (scorer.trace_full + scorer.a_diag[idx].sum(-1) / k - 2 * t).clamp_min(0.0)
        logdet[start : start + chunk] = torch.log1p(gamma * mu).sum(-1)


def enumerate_subsets(n: int, k: int) -> torch.Tensor:
    """All ``C(n, k)`` k-subsets of ``range(n)`` in lexicographic order, ``(C(n, k), k)`` long."""
    return torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).reshape(-1, k)


def sample_subsets(n: int, k: int, count: int, generator: torch.Generator, *, chunk: int = 4096) -> torch.Tensor:
    """``count`` k-subsets of ``range(n)``, each uniform over all ``C(n, k)`` (drawn with
    replacement across rows: the top-k of i.i.d. uniform keys is a uniform k-subset)."""
    parts = [torch.rand(min(chunk, count - start), n, generator=generator).topk(k, dim=-1).indices for start in range(0, count, chunk)]
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)
