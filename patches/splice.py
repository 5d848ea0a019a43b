"""Sequence surgery shared by the adapters: which text an image's question is, and re-padding."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def question_positions(spans: list[tuple[int, int]], text: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the text positions after it up to the next image (before it, if none follow)."""
    bounds = [end for _, end in spans]
    starts = [start for start, _ in spans[1:]] + [text.shape[0]]
    result = []
    for i, (lo, hi) in enumerate(zip(bounds, starts)):
        after = text[lo:hi].nonzero().flatten() + lo
        if after.numel() == 0:
            after = text[: spans[i][0]].nonzero().flatten()
        result.append(after)
    return result


def repad(keep: torch.Tensor, side: str, *columns: tuple[torch.Tensor, object]):
    """Keep the ``keep`` ``(B, L)`` positions of each row and pad rows to one length on ``side``.

    ``columns``: ``(tensor, fill)`` pairs of shape ``(B, L, ...)``. Returns the new boolean
    attention mask followed by each tensor cut and padded with its ``fill``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right'; got {side!r}")
    batch = keep.shape[0]
    length = int(keep.sum(1).max())
    mask = torch.zeros(batch, length, dtype=torch.bool, device=keep.device)
    outputs = [t.new_full((batch, length, *t.shape[2:]), fill) for t, fill in columns]
    for b in range(batch):
        idx = keep[b].nonzero().flatten()
        target = slice(length - idx.numel(), length) if side == "left" else slice(0, idx.numel())
        mask[b, target] = True
        for out, (t, _) in zip(outputs, columns):
            out[b, target] = t[b, idx]
    return (mask, *outputs)
