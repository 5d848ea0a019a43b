"""Where inside the LLM a method prunes, and how many visual tokens each stage keeps.

A **schedule** is one or more stages ``(layer K_i, kept fraction f_i)`` with ``1 <= K_1 < K_2 < ...``
(``K_1 = 0`` only for a one-stage schedule: pruning before the LLM). From layer ``K_i`` on, an
image of ``N`` visual tokens keeps ``k_i = budget(f_i, N)`` of them, chosen among the ``k_{i-1}``
still alive (``k_i <= k_{i-1}``: a stage never brings a token back); ``f_i = 0`` keeps none (VTW).
Every method with a ``LAYER_INDEX`` and a ``SUBSET_RATIO`` is the one-stage schedule
``((LAYER_INDEX, SUBSET_RATIO),)``; a selector that carries ``select.stages`` (a function of its
options, see ``otprune.contract``) names several.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from otprune.checks import as_int
from otprune.selectors import budget

__all__ = ["Stage", "check_stages", "stage_counts"]


class Stage(NamedTuple):
    """Prune before decoder layer ``layer``, keeping ``kept`` (a fraction of each image's
    unpruned visual tokens) from there on."""

    layer: int
    kept: float


def check_stages(stages, method: str) -> tuple[Stage, ...]:
    """``stages`` (pairs ``(layer, kept fraction)``) as checked :class:`Stage`\\ s; a ``ValueError``
    names the value and what is allowed."""
    where = f"BASELINE={method}'s schedule"
    try:
        pairs = [tuple(stage) for stage in stages]
    except TypeError:
        raise ValueError(f"{where} {stages!r} is not a sequence of (layer, kept fraction) pairs") from None
    if not pairs:
        raise ValueError(f"{where} has no stage; give at least one (layer, kept fraction) pair")
    checked = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{where}: stage {pair!r} is not a (layer, kept fraction) pair")
        layer, kept = pair
        try:
            layer = as_int(layer, "layer")
        except (TypeError, ValueError):
            raise ValueError(f"{where}: layer {layer!r} is not an integer") from None
        if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 <= kept <= 1:
            raise ValueError(f"{where}: the kept fraction at layer {layer} is {kept!r}; it must be a number in [0, 1]")
        checked.append(Stage(layer, float(kept)))
    layers = [stage.layer for stage in checked]
    if len(checked) > 1 and (layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:]))):
        raise ValueError(f"{where} prunes at layers {layers}; several stages need increasing layers >= 1 (K1 < K2 < ...)")
    if layers[0] < 0:
        raise ValueError(f"{where} prunes at layer {layers[0]}; layers are >= 0")
    return tuple(checked)


def stage_counts(stages: Sequence[Stage], n_tokens: int) -> list[int]:
    """Visual tokens an image of ``n_tokens`` keeps from each stage on: ``budget(f_i, N)``
    (none where ``f_i = 0``), never more than the stage before kept."""
    counts, alive = [], n_tokens
    for stage in stages:
        alive = min(alive, budget(stage.kept, n_tokens) if stage.kept > 0 else 0)
        counts.append(alive)
    return counts
