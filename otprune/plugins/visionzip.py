"""VisionZip (``BASELINE=VISIONZIP``; Yang et al., CVPR 2025, public code github
dvlab-research/VisionZip, ``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``,
with ``visionzip/utils.py`` and ``visionzip/main.py``) as a bundled plugin: dominant tokens by the
[CLS] attention, the rest merged into a few contextual tokens.

A merger before the projector (``before_projector = True``) on the tower's features, asking for
``vision`` (``head_attention``, ``head_keys``, ``cls_feature``). Written against the public API
only (``torch``, ``otprune.contract``); found as the merger
``VISIONZIP = "otprune.plugins.visionzip:merge_visionzip"`` (``otprune.methods.BUNDLED``).
"""

from __future__ import annotations

import torch

from otprune.contract import VisionContext, check_image_tokens
from otprune.plugins.vision_checks import check_finite_tokens, check_vision, vision_field

__all__ = ["DOMINANT_SHARE", "merge_visionzip", "visionzip_split"]

# The code's default at 64 tokens: 54 dominant ([CLS] included) and 10 contextual; 192 -> 162 + 30,
# 128 -> 108 + 20 (its README) are the same share.
DOMINANT_SHARE = (54, 64)


def visionzip_split(k: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget of ``k`` tokens: ``dominant = floor(54 k / 64 + 1/2)``
    (the [CLS] token included; half up, at least 1), ``contextual = k - dominant``. Exact integer
    arithmetic: 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30), 1 -> (1, 0)."""
    share, whole = DOMINANT_SHARE
    dominant = max(1, (2 * share * k + whole) // (2 * whole))
    return dominant, k - dominant


@torch.no_grad()
def merge_visionzip(tokens: torch.Tensor, k: int, *, vision: VisionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip: the [CLS] token and the dominant tokens as they are, the rest merged into
    contextual tokens; ``k`` tokens in all.

    ``tokens``: ``(N, C_v)``, one image's vision-tower features before the projector (float16,
    bfloat16, float32 or float64, finite); ``k``: an int in ``[1, N]``; ``vision``: its
    :class:`VisionContext`: ``head_attention`` ``(H, N)`` (per head, [CLS] over the patches at the
    block producing the features, the code's ``attentions[-2]``), ``head_keys`` ``(N, c)`` (that
    block's keys, mean over heads: the code's ``metric``), ``cls_feature`` ``(C_v,)``. Returns
    ``(merged, positions)``: ``merged`` ``(k, C_v)`` in ``tokens``' dtype and device, in position
    order; ``positions`` ``(k,)`` ``torch.long``, sorted, distinct.

    With ``(D, C) = visionzip_split(k)`` and ``a_i = sum_h head_attention[h, i]``:

    - dominant: the [CLS] feature, and the ``D - 1`` tokens of largest ``a`` as they are;
    - contextual: the other ``M = N - D + 1`` tokens in index order; targets the ones at
      ``0, s, 2s, ...`` (the first ``C``), ``s = max(1, floor(M / C))``; every other of them goes
      to the target of largest ``<m_i, m_t>`` on the unit rows of ``head_keys`` (the first on
      ties); contextual token = target + the mean of the tokens assigned to it (the target alone
      when none is), as the code's ``target_hidden + aggregated_hidden``.

    **Choices**:

    - budget split (:func:`visionzip_split`): 54 : 10 of 64 scaled to ``k``, rounded half up;
      no contextual token for ``k <= 3``;
    - positions: the [CLS] token takes the lowest index no dominant token and no target holds (it
      stands for the whole image, and so comes first whenever token 0 is not kept otherwise, as
      the code puts it first); a dominant token its own index; a contextual token its target's
      index. The output is in position order, where the code emits [CLS], the dominant tokens in
      index order, then the contextual ones;
    - a tower without a [CLS] (``cls_feature`` ``None``): its slot goes to one more dominant token;
    - ties in ``a``: the lower index first (``torch.topk`` leaves it open);
    - float32 work (the code works in the tower's dtype, float16 in LLaVA), output cast back.
    """
    k = check_image_tokens(tokens, k)
    n, width = tokens.shape
    check_finite_tokens(tokens)
    check_vision(vision, n, ("head_attention", "head_keys"))
    has_cls = vision.cls_feature is not None
    if has_cls:
        check_vision(vision, n, ("cls_feature",))
        if vision.cls_feature.shape[0] != width:
            raise ValueError(f"vision.cls_feature must have the tokens' width {width}; got shape {tuple(vision.cls_feature.shape)}")
    device = tokens.device
    x = tokens.detach().to(torch.float32)
    scores = vision_field(vision, "head_attention", device).sum(0)
    dominant_total, contextual = visionzip_split(k)
    dominant_count = dominant_total - 1 if has_cls else dominant_total
    dominant = scores.argsort(descending=True, stable=True)[:dominant_count]
    rest_mask = torch.ones(n, dtype=torch.bool, device=device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().flatten()  # index order
    pieces = [x[dominant]]
    positions = [dominant]
    taken = ~rest_mask
    if contextual:
        metric = vision_field(vision, "head_keys", device)[rest]
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        step = max(1, rest.numel() // contextual)
        targets = torch.arange(0, rest.numel(), step, device=device)[:contextual]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[targets] = True
        others = (~is_target).nonzero().flatten()
        assigned = (metric[others] @ metric[targets].T).argmax(-1)  # (M - C,), into targets
        sums = torch.zeros(contextual, width, dtype=torch.float32, device=device).index_add(0, assigned, x[rest[others]])
        counts = torch.bincount(assigned, minlength=contextual).clamp_min(1).to(torch.float32)
        pieces.append(x[rest[targets]] + sums / counts[:, None])
        positions.append(rest[targets])
        taken = taken.clone()
        taken[rest[targets]] = True
    if has_cls:
        free = (~taken).nonzero().flatten()[:1]
        pieces.append(vision_field(vision, "cls_feature", device)[None])
        positions.append(free)
    merged = torch.cat(pieces)
    positions, order = torch.cat(positions).sort()
    return merged[order].to(tokens.dtype), positions


merge_visionzip.before_projector = True
