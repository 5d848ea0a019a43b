"""A pruning method outside otprune, as a researcher would ship one: the visual tokens of largest
L2 norm (high-norm tokens are often the ones a vision encoder uses as global registers).

It imports nothing from otprune: the contract (otprune.contract) is plain tensors in, tensors out.
"""

import torch


@torch.no_grad()
def select_top_norm(tokens: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """``tokens`` ``(N, d)`` -> the sorted indices ``(k,)`` of the ``k`` tokens of largest norm
    (``largest=False``: smallest), ties to the lower index. ``largest`` is an option:
    ``OTPRUNE_OPTIONS='{"largest": false}'``."""
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens contain NaN or Inf; every entry must be finite")
    # Divided by the largest magnitude first, so squares neither overflow nor underflow.
    peak = tokens.abs().amax().clamp_min(torch.finfo(tokens.dtype).tiny)
    norms = (tokens / peak).float().norm(dim=-1)
    order = norms.argsort(descending=largest, stable=True)
    return order[:k].sort().values
