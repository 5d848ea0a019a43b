"""PyramidDrop (``BASELINE=PYRAMIDDROP``; Xing et al., CVPR 2025, arXiv 2410.17247) as an outside
plugin: a schedule of stages at fixed layers, each keeping a fixed share of the visual tokens
still alive, ranked by the attention the last instruction token pays them.

Written against the public API only (``otprune.contract``, ``otprune.selectors``); found as the
selector ``PYRAMIDDROP = "otprune.plugins.pyramiddrop:select_pyramiddrop"`` (``otprune.methods.BUNDLED``),
whose ``stages`` is its schedule (``otprune.contract``).

**Choices** where the paper and its public code (github Cooperx521/PyramidDrop) leave them open
for this project: ``SUBSET_RATIO`` is the retention per stage λ (the public LLaVA-1.5 setting
keeps 1/2, 1/4, 1/8 of the image after layers 8, 16, 24: λ = 0.5 at ``layers = [8, 16, 24]``, the
defaults); "after layer K" is read as pruning before 0-based layer K, ranked by the attention of
layer K - 1 (the ``attention`` context).

Against the public code (``llava/model/modeling_llama_pdrop.py``, ``pdrop_rank_drop``;
``tests/test_pyramiddrop_emulation.py``): the same rule (the prompt's last token as query, softmax
over every key, mean over heads, top-k kept in order), with three differences of choice: the public
code ranks with layer K's own norm and q/k on layer K - 1's output, not with layer K - 1's
attention; it renumbers positions ``0 .. L' - 1`` after each drop, where otprune keeps the original
ones; it keeps ``int(N0 * ratio)`` tokens (rounding down) where otprune keeps ``budget`` (half up),
the same for LLaVA-1.5's 576 at λ = 0.5.
"""

from __future__ import annotations

import torch

from otprune.contract import check_image_tokens
from otprune.selectors import select_top_scores

__all__ = ["DEFAULT_LAYERS", "select_pyramiddrop", "stages"]

DEFAULT_LAYERS = (8, 16, 24)


@torch.no_grad()
def select_pyramiddrop(tokens: torch.Tensor, k: int, *, attention: torch.Tensor) -> torch.Tensor:
    """The ``k`` of the image's ``(N, d)`` alive tokens the last instruction token attends to most
    (``attention`` ``(N,)``, the stage's layer K - 1); ``(k,)`` sorted ``torch.long`` indices."""
    k = check_image_tokens(tokens, k)
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens must be finite; they hold NaN or Inf")
    if attention.shape != (tokens.shape[0],):
        raise ValueError(f"attention must have shape ({tokens.shape[0]},), one weight per token; got {tuple(attention.shape)}")
    return select_top_scores(attention, k).to(tokens.device)


def stages(*, ratio: float, layers=DEFAULT_LAYERS) -> tuple[tuple[int, float], ...]:
    """Stage i (before ``layers[i]``) keeps ``ratio ** (i + 1)`` of each image's tokens."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of increasing decoder layers such as [8, 16, 24]; got {layers!r}")
    return tuple((layer, ratio ** (i + 1)) for i, layer in enumerate(layers))


select_pyramiddrop.stages = stages
