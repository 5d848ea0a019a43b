"""Selection for many images at once: group by token count, run each group as one batch.

Model-agnostic: takes each image's visual tokens (and the context its method asks for) and returns,
per image, the kept indices into its tokens and, for a merger, the tokens that replace them.
A plugin's every answer is checked against its contract before the model reads it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from otprune.contract import CONTEXT, PER_IMAGE_CONTEXT, VisionContext, check_grids, kept_indices_fault, merge_fault
from otprune.measures import empirical_ot_distance, near_duplicate_share
from otprune.methods import Method
from otprune.prune_config import PruneConfig
from otprune.sample_timer import phase
from otprune.schedule import stage_counts

__all__ = ["Kept", "PluginFault", "log_selection", "select_per_image", "selection_clock", "stop_run"]

logger = logging.getLogger("otprune")


class Kept(NamedTuple):
    """One image's outcome: ``indices`` ``(m,)`` sorted positions kept in its tokens (``m = k``
    but for a merger, ``m <= k``); ``tokens`` ``(m, d)`` a merger's tokens that take those
    positions (``None``: the image's own tokens)."""

    indices: torch.Tensor
    tokens: torch.Tensor | None = None


class PluginFault(RuntimeError):
    """A plugin broke its contract while the model ran (a setting given in code; from the
    environment the process stops instead, see ``PruneConfig.from_environment``)."""


# Kept indices carry no gradient, and the selectors' in-place kernels (``out=``) refuse tokens that
# require one, as a caller's ``generate`` outside ``no_grad`` (lmms-eval's llava_hf) passes them.
@torch.no_grad()
def select_per_image(
    config: PruneConfig,
    images: Sequence[torch.Tensor],
    context: Mapping[str, Sequence] | None = None,
    stage: tuple[int, Sequence[int]] | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Kept]:
    """What to keep of each image's ``(N_i, d)`` tokens under ``config`` (a selector or merger, or
    ``VTW`` at ``LAYER_INDEX = 0``, which keeps none: the prompt's text alone reaches the LLM).

    ``context``: per image, the context the method asks for (``config.spec.context``): ``text``,
    ``attention``, ``grid`` and ``vision`` as lists with one entry per image (``None`` where the
    adapter cannot tell it); ``layer_index`` and ``adaptive`` come from ``config``. A method that
    runs before the projector (``spec.before_projector``) gets each image's ``vision.features`` as
    its tokens, and ``project`` (the model's projector, ``(m, C_v) -> (m, d)``) turns a merger's
    features into the tokens that take the kept places. ``stage``: ``(layer, counts)`` for one stage of
    a schedule, ``counts[i]`` the tokens image ``i`` keeps (its ``layer_index``; by default
    ``budget(config.ratio, N_i)``). Images with the same ``N`` (all of LLaVA-1.5's)
    go through a batching selector that asks for no per-image context as one ``(B, N, d)`` batch;
    each is still pruned to its own budget ``budget(config.ratio, N_i)``. Runs without autograd: a
    choice of indices has no gradient, and the caller's indexing of its own tensors keeps theirs.
    """
    with phase("selection"):
        kept = _select(config, images, context or {}, stage, project)
    if config.dump_dir:
        _dump(config.dump_dir, images)
    return kept


def _select(config: PruneConfig, images: Sequence[torch.Tensor], context: Mapping[str, Sequence], stage, project) -> list[Kept]:
    start = selection_clock(config, images)
    layer, counts = stage if stage is not None else (config.layer_index, [stage_counts(config.stages[:1], t.shape[0])[0] for t in images])
    spec = config.spec
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, tokens in enumerate(images):
        groups[tokens.shape[0], counts[i]].append(i)
    kept: list[Kept | None] = [None] * len(images)
    # An adaptive run's images keep counts of their own choosing: one call each.
    one_by_one = (
        spec.kind != "selector"
        or not spec.accepts_batches
        or spec.before_projector
        or config.adaptive
        or any(name in PER_IMAGE_CONTEXT for name in spec.context)
    )
    for (n, k), members in groups.items():
        if k == 0:
            for i in members:
                kept[i] = Kept(torch.arange(k, device=images[i].device))
        elif one_by_one:
            for i in members:
                kept[i] = _one_image(config, spec, images[i], k, _context_for(config, spec, context, i, n, layer), context, i, project)
        else:
            batch = torch.stack([images[i] for i in members])
            answer = _call(config, spec, batch, k, _context_for(config, spec, context, None, n, layer))
            for i, indices in zip(members, answer.indices):
                kept[i] = Kept(indices)
    log_selection(config, images, kept, start, layer if stage is not None and len(config.stages) > 1 else None)
    return kept


# Where the adapters give a context only in part, what they give.
_WHY_MISSING = {
    "vision": (
        " (the adapters give it on the LLaVA families, LLaVA-OneVision and Qwen-VL where the tower's rows map onto the image's tokens;"
        " not on OneVision's videos, nor on its images whose tiles its anyres_max cap downsamples)"
    ),
}


def _one_image(config: PruneConfig, spec: Method, image: torch.Tensor, k: int, given: dict, context: Mapping[str, Sequence], i: int, project) -> Kept:
    """Image ``i`` (``image`` ``(N, d)``) through ``spec`` with its context ``given``.

    A method that reads the vision tower (``vision``, or running before the projector) on an image
    with tokens no patch stands for (``VisionContext.patches``: LLaVA-NeXT's newline vectors) is
    given the patch tokens and their context rows alone, with the budget the other tokens leave
    (``k`` less their count; an adaptive run: all patches), and every other token is kept in its
    place: **choice**, as CDPruner's public code keeps LLaVA-1.6's newline vectors. A ``k`` that
    leaves no patch (at most the other tokens' count) stops the run: it would keep more than ``k``.
    """
    vision = (context.get("vision") or [None] * (i + 1))[i] if spec.before_projector or "vision" in spec.context else None
    if spec.before_projector and vision is None:
        stop_run(
            config,
            f"BASELINE={spec.name} runs on the vision tower's features, which this model does not give for an image of {image.shape[0]} tokens{_WHY_MISSING['vision']}",
            ValueError,
        )
    tokens = vision.features if spec.before_projector else image
    if vision is None or vision.patches is None or bool(vision.patches.all()):
        kept = _call(config, spec, tokens, k, given)
        return _projected(config, spec, kept, project) if spec.before_projector else kept
    if "grid" in spec.context:
        stop_run(config, f"BASELINE={spec.name} asks for grid and vision, which cannot both be cut to an image's patch tokens", ValueError)
    patches = vision.patches.nonzero().flatten()
    others = (~vision.patches).nonzero().flatten()
    if not config.adaptive and k <= others.numel():
        stop_run(
            config,
            f"BASELINE={spec.name} keeps k = {k} of an image's {image.shape[0]} tokens, and {others.numel()} of them no tower patch "
            f"stands for (newline vectors), which it keeps whole: that leaves no patch; SUBSET_RATIO must leave k >= {others.numel() + 1}",
            ValueError,
        )
    budget = patches.numel() if config.adaptive else min(patches.numel(), k - others.numel())
    if "vision" in given:
        given = {**given, "vision": _patch_rows(vision, patches)}
    kept = _call(config, spec, tokens[patches], budget, given)
    if spec.before_projector:
        kept = _projected(config, spec, kept, project)
    indices = torch.cat([patches[kept.indices.to(patches.device)], others])
    order = indices.argsort()
    if kept.tokens is None:
        return Kept(indices[order].to(image.device))
    merged = torch.cat([kept.tokens.to(image.device, image.dtype), image[others.to(image.device)]])
    return Kept(indices[order].to(image.device), merged[order.to(image.device)])


def _patch_rows(vision: VisionContext, patches: torch.Tensor) -> VisionContext:
    """``vision`` cut to the rows of its patch tokens (``patches``: their indices)."""
    return VisionContext(
        features=vision.features[patches],
        cls_attention=vision.cls_attention[patches],
        keys=vision.keys[patches],
        head_attention=vision.head_attention[:, patches],
        head_keys=vision.head_keys[patches],
        cls_feature=vision.cls_feature,
    )


def _projected(config: PruneConfig, spec: Method, kept: Kept, project) -> Kept:
    """A before-projector method's outcome in the LLM's space: kept indices stand as they are (the
    projector maps each token on its own), a merger's features go through the projector."""
    if kept.tokens is None:
        return kept
    if project is None:
        stop_run(config, f"BASELINE={spec.name} merges the vision tower's features, and this model gives no projector to map them", ValueError)
    return Kept(kept.indices, project(kept.tokens))


def _context_for(config: PruneConfig, spec: Method, context: Mapping[str, Sequence], i: int | None, n: int, layer: int) -> dict:
    """The keyword arguments of the context ``spec`` asks for, for image ``i`` of ``n`` tokens
    pruned before ``layer``."""
    given = {}
    for name in spec.context:
        if name == "layer_index":
            given[name] = layer
            continue
        if name == "adaptive":
            given[name] = config.adaptive
            continue
        values = context.get(name)
        value = None if values is None or i is None else values[i]
        if value is None or (name == "text" and value.shape[0] == 0):
            stop_run(
                config,
                f"BASELINE={spec.name} asks for {name} ({CONTEXT[name]}), which this model and prompt do not give for an image of {n} tokens{_WHY_MISSING.get(name, '')}",
                ValueError,
            )
        if name == "grid":
            try:
                check_grids(value, n)
            except ValueError as error:
                stop_run(config, f"the patch's grid for an image of {n} tokens is wrong: {error}", ValueError)
        if name == "vision" and value.features.shape[0] != n:
            stop_run(config, f"the patch's vision context has {value.features.shape[0]} rows for an image of {n} tokens", ValueError)
        given[name] = value
    return given


def _call(config: PruneConfig, spec: Method, tokens: torch.Tensor, k: int, context: dict) -> Kept:
    """One image ``(N, d)`` (or a selector's batch ``(B, N, d)``) through ``spec``; a plugin's
    answer is checked before anything uses it."""
    # A schedule's own options (``select.stages``'s) are not the function's.
    options = {name: value for name, value in config.options.items() if name in spec.options}
    if not spec.plugin:
        return Kept(spec.function(tokens, k, **context, **options))
    label = f"{spec.kind} plugin {spec.name} ({spec.origin})"
    # The model reads these tensors after the call; a write shows in a tensor's version counter.
    inputs = {"tokens": tokens, **{name: value for name, value in context.items() if isinstance(value, torch.Tensor)}}
    if isinstance(context.get("vision"), VisionContext):
        vision = context["vision"]
        inputs.update(
            {f"vision.{name}": getattr(vision, name) for name in VisionContext.__dataclass_fields__ if isinstance(getattr(vision, name), torch.Tensor)}
        )
    versions = {name: value._version for name, value in inputs.items()}
    try:
        answer = spec.function(tokens, k, **context, **options)
    except Exception as error:
        stop_run(config, f"{label} raised {type(error).__name__}: {error}")
    written = [name for name, value in inputs.items() if value._version != versions[name]]
    if written:
        stop_run(config, f"{label} wrote its input {' and '.join(written)} in place, which the model reads next; work on a copy (tokens.clone())")
    n = tokens.shape[-2]
    if spec.kind == "merger":
        fault = merge_fault(answer, n, k, tokens)
        if fault is None:
            return Kept(answer[1], answer[0])
    else:
        fault = kept_indices_fault(answer, n, k, tokens.device, batch=tokens.shape[0] if tokens.dim() == 3 else None, at_most=config.adaptive)
        if fault is None:
            return Kept(answer)
    stop_run(config, f"{label} {fault} (N = {n} tokens, k = {k})")


def stop_run(config: PruneConfig, message: str, error: type[Exception] = PluginFault):
    """Stop a pruned forward that cannot go on: ``error(message)`` for a setting made in code,
    ``SystemExit`` for one from the environment, since lmms-eval catches exceptions and reports
    success: only leaving the process is heard."""
    message += "; the run stops rather than prune without it" if error is not PluginFault else "; the run stops rather than prune with it"
    if config.from_environment:
        raise SystemExit(f"otprune: {message}")
    raise error(message)


def selection_clock(config: PruneConfig, images: Sequence[torch.Tensor]) -> float:
    """``time.perf_counter()``, after the GPU has finished its queued work when the selection is
    to be timed (``OTPRUNE_LOG=1``), so the vision tower's time is not counted as the selector's."""
    if config.log and images and images[0].is_cuda:
        torch.cuda.synchronize(images[0].device)
    return time.perf_counter()


def log_selection(config: PruneConfig, images: Sequence[torch.Tensor], kept: Sequence[Kept], start: float, layer: int | None = None) -> None:
    """With ``OTPRUNE_LOG=1``: one line per forward (per stage of a schedule of several, ``layer``
    its layer), each image's tokens before -> after and the selection's wall time since ``start``
    (``time.perf_counter()``). With ``OTPRUNE_OT=1`` also each
    image's exact empirical OT distance between its kept and full token sets (``nan`` when none is
    kept, and for a merger, whose tokens are no subset: not measured) and each image's redundancy
    (``near_duplicate_share`` of its full token set), measured after the timing."""
    if not config.log:
        return
    seconds = selection_clock(config, images) - start
    pairs = ", ".join(f"{t.shape[0]}->{k.indices.numel()}" for t, k in zip(images, kept))
    stage = "" if layer is None else f" at layer {layer}"
    line = f"otprune {config.method}{stage}: visual tokens {pairs}; selector {seconds * 1e3:.2f} ms"
    if config.record_ot:
        distances = [empirical_ot_distance(t, k.indices) if k.indices.numel() and k.tokens is None else math.nan for t, k in zip(images, kept)]
        line += "; ot " + ", ".join(f"{v:.6g}" for v in distances)
        line += "; redundancy " + ", ".join(f"{float(near_duplicate_share(t)):.6g}" for t in images)
    logger.info(line)


_dumped = itertools.count()


def _dump(directory: str, images: Sequence[torch.Tensor]) -> None:
    """Saves each image's tokens as ``tokens_<pid>_<n>.pt``: processes sharing a folder (one per
    GPU under accelerate) never write the same name."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for tokens in images:
        torch.save(tokens.detach().cpu(), folder / f"tokens_{os.getpid()}_{next(_dumped):06d}.pt")
