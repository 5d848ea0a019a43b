"""FasterVLM (``BASELINE=FASTERVLM``; Zhang et al. 2024, "[CLS] attention is all you need for
training-free visual token pruning", public code github Theia-4869/FasterVLM) as a bundled plugin:
keep the patch tokens the vision tower's [CLS] attends to most.

The public code (``llava/model/multimodal_encoder/clip_encoder.py``, ``feature_select``; and
``llava/model/llava_arch.py``, ``encode_images``) reads ``attentions[select_layer]`` (LLaVA's -2:
the block that produces the features, CLIP encoder layer 22 of 24), row [CLS], patch columns,
averages it over the heads and keeps the ``topk``; it projects every token and drops the others
after the projector. That is ``VisionContext.head_attention`` averaged over heads.

Written against the public API only (``torch``, ``otprune.contract``); found as the selector
``FASTERVLM = "otprune.plugins.fastervlm:select_fastervlm"`` (``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import torch

from otprune.contract import VisionContext, check_image_tokens
from otprune.plugins.vision_checks import check_finite_tokens, check_vision, vision_field

__all__ = ["select_fastervlm"]


@torch.no_grad()
def select_fastervlm(tokens: torch.Tensor, k: int, *, vision: VisionContext) -> torch.Tensor:
    """The ``k`` tokens of largest [CLS] attention, averaged over heads, at LLaVA's feature layer.

    ``tokens``: ``(N, d)``, one image's visual tokens (before or after the projector: the picks
    do not read them; float16, bfloat16, float32 or float64, finite); ``k``: an int in ``[1, N]``;
    ``vision``: the image's :class:`VisionContext`, whose ``head_attention`` ``(H, N)`` is read.
    Returns ``(k,)`` ``torch.long`` indices, sorted ascending, on ``tokens.device``.

    Score ``s_i = mean_h head_attention[h, i]`` in float32 (the code's ``mean(dim=1)``); kept: the
    ``k`` largest.

    **Choices**:

    - the layer: the code's ``attentions[-2]`` (encoder layer 22 of 24, the block whose output
      LLaVA takes), not the last layer METHOD.md's summary of the paper names; the code is followed.
    - ties: the lower index first (``torch.topk`` leaves it open).
    - after the projector (``before_projector`` left False), as the code prunes; the indices are
      the same either way.
    - float32 scores (the code averages in the tower's dtype, float16 in LLaVA, which can tie
      tokens that float32 tells apart).
    """
    k = check_image_tokens(tokens, k)
    check_finite_tokens(tokens)
    check_vision(vision, tokens.shape[0], ("head_attention",))
    scores = vision_field(vision, "head_attention", tokens.device).mean(0)
    return scores.argsort(descending=True, stable=True)[:k].sort().values
