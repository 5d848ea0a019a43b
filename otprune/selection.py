"""Selection for many images at once: group by token count, run each group as one batch.

Model-agnostic: takes each image's visual tokens as a tensor and returns kept indices into it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from otprune.prune_config import PruneConfig
from otprune.measures import empirical_ot_distance
from otprune.selectors import budget, get_selector
from otprune.sample_timer import phase

__all__ = ["log_selection", "select_per_image", "select_top_scores", "selection_clock"]

logger = logging.getLogger("otprune")


def select_top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(N,)`` scores -> the sorted indices of the ``k`` largest (ties: lower index first)."""
    order = scores.float().argsort(descending=True, stable=True)
    return order[:k].sort().values


# Kept indices carry no gradient, and the selectors' in-place kernels (``out=``) refuse tokens that
# require one, as a caller's ``generate`` outside ``no_grad`` (lmms-eval's llava_hf) passes them.
@torch.no_grad()
def select_per_image(
    config: PruneConfig,
    images: Sequence[torch.Tensor],
    texts: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Kept indices for each image's ``(N_i, d)`` tokens under ``config`` (a feature selector, or
    ``VTW`` at ``LAYER_INDEX = 0``, which keeps none: the prompt's text alone reaches the LLM).

    Images with the same ``N`` (all of LLaVA-1.5's) go through the selector as one ``(B, N, d)``
    batch; each is still pruned to its own budget ``budget(config.ratio, N_i)``. ``texts`` gives,
    per image, the text-token embeddings TRIM scores against. Runs without autograd: a choice of
    indices has no gradient, and the caller's indexing of its own tensors keeps theirs.
    """
    with phase("selection"):
        kept = _select(config, images, texts)
    if config.dump_dir:
        _dump(config.dump_dir, images)
    return kept


def _select(config: PruneConfig, images: Sequence[torch.Tensor], texts) -> list[torch.Tensor]:
    start = selection_clock(config, images)
    if config.method == "VTW":
        kept = [torch.empty(0, dtype=torch.long, device=tokens.device) for tokens in images]
        log_selection(config, images, kept, start)
        return kept
    selector = get_selector(config.method)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, tokens in enumerate(images):
        groups[tokens.shape[0]].append(i)
    kept: list[torch.Tensor | None] = [None] * len(images)
    for n, members in groups.items():
        k = budget(config.ratio, n)
        if config.method == "TRIM":
            # Each image scores against its own question, whose length varies: one call each.
            for i in members:
                kept[i] = selector(images[i], k, text=_text_for(texts, i), **config.options)
            continue
        batch = torch.stack([images[i] for i in members])
        for i, indices in zip(members, selector(batch, k, **config.options)):
            kept[i] = indices
    log_selection(config, images, kept, start)
    return kept


def selection_clock(config: PruneConfig, images: Sequence[torch.Tensor]) -> float:
    """``time.perf_counter()``, after the GPU has finished its queued work when the selection is
    to be timed (``OTPRUNE_LOG=1``), so the vision tower's time is not counted as the selector's."""
    if config.log and images and images[0].is_cuda:
        torch.cuda.synchronize(images[0].device)
    return time.perf_counter()


def log_selection(config: PruneConfig, images: Sequence[torch.Tensor], kept: Sequence[torch.Tensor], start: float) -> None:
    """With ``OTPRUNE_LOG=1``: one line per forward, each image's tokens before -> after and the
    selection's wall time since ``start`` (``time.perf_counter()``). With ``OTPRUNE_OT=1`` also each
    image's exact empirical OT distance between its kept and full token sets (``nan`` when none is
    kept), measured after the timing."""
    if not config.log:
        return
    seconds = selection_clock(config, images) - start
    pairs = ", ".join(f"{t.shape[0]}->{k.numel()}" for t, k in zip(images, kept))
    line = f"otprune {config.method}: visual tokens {pairs}; selector {seconds * 1e3:.2f} ms"
    if config.record_ot:
        distances = [empirical_ot_distance(t, k) if k.numel() else math.nan for t, k in zip(images, kept)]
        line += "; ot " + ", ".join(f"{v:.6g}" for v in distances)
    logger.info(line)


def _text_for(texts, i: int) -> torch.Tensor:
    if texts is None or texts[i] is None or texts[i].shape[0] == 0:
        raise ValueError("BASELINE=TRIM needs the prompt's text tokens, but an image's prompt has none")
    return texts[i]


_dumped = itertools.count()


def _dump(directory: str, images: Sequence[torch.Tensor]) -> None:
    """Saves each image's tokens as ``tokens_<pid>_<n>.pt``: processes sharing a folder (one per
    GPU under accelerate) never write the same name."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for tokens in images:
        torch.save(tokens.detach().cpu(), folder / f"tokens_{os.getpid()}_{next(_dumped):06d}.pt")
