"""Each image's patch grids (the ``grid`` context), told from its visual tokens.

LLaVA-1.5 (and transformers' ``LlavaForConditionalGeneration``): one square grid of the vision
tower's ``side x side`` patches. LLaVA-1.6 / NeXT and OneVision's any-resolution images: that base
grid, then the unpadded grid of the tiles with a learned newline vector ending each row; its rows
are found where the newline vector sits, so no version's unpadding arithmetic is repeated here.
A single-tile image (OneVision's images of a multi-image prompt) is the base grid and one newline
token, which belongs to no grid.
Qwen's grids come from ``image_grid_thw`` (``vlm.py``).
"""

from __future__ import annotations

import math

import torch

from otprune.contract import PatchGrid


def image_grids(tokens: torch.Tensor, side: int | None, newline: torch.Tensor | None) -> tuple[PatchGrid, ...] | None:
    """The grids of one image's ``(N, d)`` tokens, or ``None`` when they cannot be told.

    ``side``: the vision tower's patches per side (the base grid), or ``None`` for tokens that
    are one square grid (OneVision's pooled video frames); ``newline``: the model's ``(d,)``
    newline vector, if it has one.
    """
    n = tokens.shape[0]
    if side and n == side * side:
        return (PatchGrid(0, side, side),)
    if side and newline is not None and n == side * side + 1 and torch.equal(tokens[-1], newline.to(tokens.device, tokens.dtype)):
        # A single-tile image: the base grid and one newline token after it, in no grid.
        return (PatchGrid(0, side, side),)
    if side and newline is not None and n > side * side:
        rest = tokens[side * side :]
        rows = (rest == newline.to(rest.device, rest.dtype)).all(-1).nonzero().flatten()
        count = rows.numel()
        if count and rest.shape[0] % count == 0:
            stride = rest.shape[0] // count
            expected = torch.arange(1, count + 1, device=rows.device) * stride - 1
            if stride > 1 and torch.equal(rows, expected):
                return (PatchGrid(0, side, side), PatchGrid(side * side, count, stride - 1, newlines=True))
    root = math.isqrt(n)
    if side is None and root * root == n:
        return (PatchGrid(0, root, root),)
    return None
