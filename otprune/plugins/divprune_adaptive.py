"""DivPrune* (``BASELINE=DIVPRUNE_ADAPTIVE``; the adaptive row of the DivPrune paper, Alvar et al.,
CVPR 2025): DivPrune's greedy max-min diversity with PruMerge's per-image token count.

A selector after the projector (the LLM-space tokens, as DIVPRUNE) that asks for ``vision`` (its
``cls_attention``, for the count only) and ``adaptive``. Written against the public API
(``otprune.contract``, ``otprune.selectors.select_divprune``) and PruMerge's count
(``otprune.plugins.prumerge.prumerge_token_count``); found as the selector
``DIVPRUNE_ADAPTIVE = "otprune.plugins.divprune_adaptive:select_divprune_adaptive"``
(``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import torch

from otprune.contract import VisionContext, check_image_tokens
from otprune.plugins.prumerge import prumerge_token_count
from otprune.plugins.vision_checks import check_vision, vision_field
from otprune.selectors import select_divprune

__all__ = ["select_divprune_adaptive"]


@torch.no_grad()
def select_divprune_adaptive(tokens: torch.Tensor, k: int, *, vision: VisionContext, adaptive: bool) -> torch.Tensor:
    """DivPrune at PruMerge's per-image count (adaptive), plain DivPrune at ``k`` otherwise.

    ``tokens``: ``(N, d)``, one image's visual tokens after the projector (float16, bfloat16,
    float32 or float64, finite); ``k``: an int in ``[1, N]`` (``N`` when ``adaptive``); ``vision``:
    the image's :class:`VisionContext` (``cls_attention`` ``(N,)`` read); ``adaptive``: the run
    leaves the count to the method. Returns ``(m,)`` ``torch.long`` indices, sorted ascending, on
    ``tokens.device``: ``m = k`` with a budget, ``m`` in ``[1, N]`` varying per image when adaptive.

    The picks are ``otprune.selectors.select_divprune(tokens, m)`` (``D = 1 - cos``: the token
    farthest from its nearest other token first, then the unchosen token farthest from the chosen
    ones), with float32 work.

    **Choice**: adaptive ``m`` is the number of tokens PruMerge hands the LLM for the same image
    (``prumerge_token_count``: the outliers of the [CLS] attention above ``Q3 + 1.5 IQR`` as
    PruMerge's code counts them, at least 1, plus PruMerge's extra token when some token is
    unkept), so DivPrune* and PruMerge spend the same prefill per image.
    """
    k = check_image_tokens(tokens, k)
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False; got {adaptive!r}")
    if adaptive:
        check_vision(vision, tokens.shape[0], ("cls_attention",))
        k = prumerge_token_count(vision_field(vision, "cls_attention", tokens.device))
    return select_divprune(tokens, k)
