"""How well a kept subset represents the full token set, and what pruning saves.

All distribution measures take one image's ``tokens`` ``(N, d)`` and ``kept_indices`` ``(k,)``
and compute in float64 on the tokens' device. Tokens are column-normalised first (each embedding
dimension scaled to unit norm over the N full-set tokens, as OTPrune's kernel does), so every
measure compares the same geometry the selectors see; pass ``normalise=False`` for raw points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from otprune.checks import as_int, check_positive
from otprune.selectors import DEFAULT_GAMMA, NORM_EPS, budget

__all__ = [
    "MODELS",
    "ModelShape",
    "column_normalise",
    "empirical_ot_distance",
    "gaussian_w2",
    "logdet_objective",
    "near_duplicate_share",
    "prefill_flops",
    "pruned_prefill_flops",
    "staged_prefill_flops",
    "w2_trace_term",
]


def column_normalise(tokens: torch.Tensor) -> torch.Tensor:
    """``(N, d) -> (N, d)`` float64 with every column scaled to unit L2 norm over the N rows."""
    x = tokens.to(torch.float64)
    return x / x.norm(dim=-2, keepdim=True).clamp_min(NORM_EPS)


def _prepare(tokens, kept_indices, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a floating-point tensor of shape (N, d); got {shape}")
    kept = torch.as_tensor(kept_indices, device=tokens.device)
    n = tokens.shape[0]
    if kept.dim() != 1 or kept.numel() < 1 or kept.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kept_indices must be a non-empty 1-D integer tensor; got shape {tuple(kept.shape)}, {kept.dtype}")
    if bool((kept < 0).any()) or bool((kept >= n).any()):
        raise ValueError(f"kept_indices must lie in [0, {n - 1}]; got min {int(kept.min())}, max {int(kept.max())}")
    x = column_normalise(tokens) if normalise else tokens.to(torch.float64)
    return x, kept


def w2_trace_term(tokens: torch.Tensor, kept_indices, *, normalise: bool = True) -> torch.Tensor:
    """``tr((S^1/2 S_S S^1/2)^1/2)`` for ``S = X^T X / N`` and ``S_S = X_S^T X_S / k``.

    The eigenvalues of ``S^1/2 S_S S^1/2`` are those of the ``k x k`` matrix
    ``(X_S X^T)(X X_S^T) / (N k)``, so the trace of its square root is the nuclear norm of
    ``X_S X^T / sqrt(N k)``: exact, with no ``d x d`` square root.
    """
    x, kept = _prepare(tokens, kept_indices, normalise)
    cross = x[kept] @ x.T
    return torch.linalg.matrix_norm(cross, ord="nuc") / math.sqrt(x.shape[0] * kept.numel())


def gaussian_w2(tokens: torch.Tensor, kept_indices, *, normalise: bool = True) -> torch.Tensor:
    """Squared 2-Wasserstein distance between zero-mean Gaussians fitted to the full and kept sets.

    ``W2^2 = tr S + tr S_S - 2 tr((S^1/2 S_S S^1/2)^1/2)`` with ``S = X^T X / N``,
    ``S_S = X_S^T X_S / k`` (second moments: the zero-mean surrogate of METHOD.md). Scalar float64.
    """
    x, kept = _prepare(tokens, kept_indices, normalise)
    n, k = x.shape[0], kept.numel()
    trace_full = x.square().sum() / n
    trace_kept = x[kept].square().sum() / k
    w2 = trace_full + trace_kept - 2 * w2_trace_term(x, kept, normalise=False)
    return w2.clamp_min(0.0)


def empirical_ot_distance(tokens: torch.Tensor, kept_indices, *, normalise: bool = True) -> float:
    """Exact squared 2-Wasserstein distance between the uniform empirical distributions of the N
    tokens and of the k kept tokens, squared-Euclidean cost, solved by POT's network simplex
    (``ot.emd2``)."""
    import ot

    x, kept = _prepare(tokens, kept_indices, normalise)
    full = x.cpu().numpy()
    subset = x[kept].cpu().numpy()
    cost = ot.dist(full, subset, metric="sqeuclidean")
    weights_full = torch.full((full.shape[0],), 1.0 / full.shape[0], dtype=torch.float64).numpy()
    weights_kept = torch.full((subset.shape[0],), 1.0 / subset.shape[0], dtype=torch.float64).numpy()
    return float(ot.emd2(weights_full, weights_kept, cost, numItermax=10_000_000))


NEAR_DUPLICATE_COSINE = 0.95


def near_duplicate_share(tokens: torch.Tensor, *, threshold: float = NEAR_DUPLICATE_COSINE) -> torch.Tensor:
    """``(..., N, d) -> (...)`` float64: the share of an image's tokens whose nearest other token
    (by cosine similarity, after subtracting the image's mean token) lies above ``threshold``,
    i.e. that another token nearly repeats.

    **Choices**: cosine rather than distance (scale-free across models and layers), threshold 0.95,
    and centred on the image's mean token: a vision tower's tokens share a large common component
    (measured on the synthetic benchmark's tiny LLaVA: the raw cosine of nearly every token's
    nearest neighbour exceeds 0.95 on every background, 99.5-99.8 %), which says how alike all
    tokens are, not which repeat each other. A token equal to the mean has cosine 0 with every
    other token.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or not tokens.is_floating_point() or tokens.shape[-2] < 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a floating-point tensor of shape (..., N, d) with N >= 2; got {shape}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold!r} is not allowed; it must be a cosine in [-1, 1)")
    x = tokens.to(torch.float64)
    x = x - x.mean(dim=-2, keepdim=True)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    cosine = unit @ unit.transpose(-1, -2)
    cosine.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    return (cosine.amax(dim=-1) > threshold).to(torch.float64).mean(dim=-1)


def logdet_objective(tokens: torch.Tensor, kept_indices, *, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """OTPrune's objective ``log det(I_k + gamma A_S A_S^T)`` with ``A = X_hat X_hat^T``, float64."""
    gamma = check_positive(gamma, "gamma")
    x, kept = _prepare(tokens, kept_indices, normalise=True)
    a_rows = x[kept] @ x.T
    kernel = gamma * (a_rows @ a_rows.T)
    kernel.diagonal().add_(1.0)
    return torch.linalg.slogdet(kernel).logabsdet


@dataclass(frozen=True)
class ModelShape:
    """The language model's size for FastV's prefill-FLOPs formula."""

    hidden: int
    ffn: int
    layers: int


MODELS: dict[str, ModelShape] = {
    "llava-1.5-7b": ModelShape(hidden=4096, ffn=11008, layers=32),
    "llava-1.5-13b": ModelShape(hidden=5120, ffn=13824, layers=40),
    "llava-1.6-7b": ModelShape(hidden=4096, ffn=11008, layers=32),
    # The LLMs of Qwen2.5-VL-7B (Qwen2.5-7B), Qwen3-VL-8B (Qwen3-8B), LLaVA-OneVision-7B (Qwen2-7B).
    "qwen2.5-vl-7b": ModelShape(hidden=3584, ffn=18944, layers=28),
    "qwen3-vl-8b": ModelShape(hidden=4096, ffn=12288, layers=36),
    "llava-onevision-7b": ModelShape(hidden=3584, ffn=18944, layers=28),
}


def _model(model: str | ModelShape) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)} or a ModelShape")
    return MODELS[model]


def _layer_flops(n: float, shape: ModelShape) -> float:
    d, m = shape.hidden, shape.ffn
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(n_tokens: int, model: str | ModelShape = "llava-1.5-7b") -> float:
    """FLOPs of the LLM prefill of ``n_tokens`` tokens: ``T x (4nd^2 + 2n^2 d + 2ndm)`` (FastV)."""
    n = as_int(n_tokens, "n_tokens")
    if n < 0:
        raise ValueError(f"n_tokens must be >= 0; got {n}")
    shape = _model(model)
    return shape.layers * _layer_flops(n, shape)


def pruned_prefill_flops(
    n_text: int,
    n_visual: int,
    ratio: float | None,
    model: str | ModelShape = "llava-1.5-7b",
    layer_index: int = 0,
) -> float:
    """Prefill FLOPs with ``n_visual`` tokens pruned to ``budget(ratio, n_visual)`` at ``layer_index``.

    Layers ``0 .. K-1`` process all ``n_text + n_visual`` tokens, layers ``K .. T-1`` the pruned
    count. ``ratio=None`` means no pruning; ``ratio=0`` means every visual token is dropped (VTW).
    """
    shape = _model(model)
    n_text = as_int(n_text, "n_text")
    n_visual = as_int(n_visual, "n_visual")
    layer_index = as_int(layer_index, "layer_index")
    if n_text < 0 or n_visual < 0:
        raise ValueError(f"token counts must be >= 0; got n_text={n_text}, n_visual={n_visual}")
    if not 0 <= layer_index <= shape.layers:
        raise ValueError(f"layer_index must be in [0, {shape.layers}]; got {layer_index}")
    if ratio is None:
        kept = n_visual
    elif ratio == 0:
        kept = 0
    else:
        kept = budget(ratio, n_visual)
    return staged_prefill_flops(n_text, n_visual, [(layer_index, kept)], shape)


def staged_prefill_flops(n_text: int, n_visual: int, stages, model: str | ModelShape = "llava-1.5-7b") -> float:
    """Prefill FLOPs of a schedule: ``stages`` ``[(K_i, kept_i), ...]`` (``K`` increasing), layers
    before ``K_1`` at ``n_text + n_visual`` tokens, layers ``K_i .. K_{i+1} - 1`` at ``n_text + kept_i``."""
    shape = _model(model)
    total, at, visual = 0.0, 0, n_visual
    for layer, kept in (*stages, (shape.layers, None)):
        if not at <= layer <= shape.layers:
            raise ValueError(f"stage layers must increase within [0, {shape.layers}]; got {[s[0] for s in stages]}")
        total += (layer - at) * _layer_flops(n_text + visual, shape)
        at, visual = layer, kept
    return total
