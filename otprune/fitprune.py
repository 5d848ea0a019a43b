"""FitPrune's recipe (Ye et al., AAAI 2025; public code github ywh187/FitPrune): how many visual
tokens to drop before each LLM layer, fitted to a prefill-FLOPs budget from attention statistics.

**Statistics** (a calibration's JSON, ``otprune calibrate fitprune``): per calibration sample its
text tokens and, per layer ``l`` of the unpruned model but its last (a drop after the last layer
saves nothing), each visual token's ``cross`` weight (the mean attention the question's tokens pay
it) and ``self`` weight (the mean attention the image's tokens pay it), mean over heads.

**The fit**, for a share ``alpha`` of attention a layer may lose: layer by layer, while the mean
forecast prefill FLOPs (what the layers so far cost, plus the rest at the current counts) exceed
the budget, each sample drops the visual tokens that are both among its fewest-weight ``cross``
tokens and its fewest-weight ``self`` tokens, as many of each as can go before the weight left
falls below ``(1 - alpha)`` of the layer's unpruned total (one fewer than the first count that
crosses it). The recipe drops the samples' mean count (rounded down) after layer ``l``, i.e. before
layer ``l + 1``. A binary search on ``alpha`` in ``[0, 1]`` to a width of 0.01 keeps the smallest
``alpha`` found to reach the budget.

**Choices** where this project departs from the public code: the statistics are the unpruned
model's, measured once (the public code re-runs each layer on the tokens its fit keeps), so the fit
is a function of the statistics file alone; weights are the mean over heads (the ``attention``
contexts' definition; the public code takes the maximum); FLOPs are the project's prefill formula
(``otprune.measures``); the recipe kept is the smallest ``alpha`` whose recipe itself (the mean
drops, rounded down) reaches the budget on the samples (the public code prints the last one tried,
which may not reach it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from otprune.measures import ModelShape, staged_prefill_flops

__all__ = ["SEARCH_WIDTH", "fit_recipe", "load_recipe", "recipe_stages", "recipe_tflop"]

SEARCH_WIDTH = 0.01
RECIPE_KIND = "otprune fitprune recipe"


def _drop_count(weights: torch.Tensor, total: float, alpha: float) -> int:
    """How many of the fewest-weight tokens may go before the weight left drops below
    ``(1 - alpha) * total``: one fewer than the first count that crosses it."""
    remaining = weights.sum() - torch.cat([weights.new_zeros(1), weights.sort().values.cumsum(0)[:-1]])
    crossed = (remaining < (1 - alpha) * total).nonzero()
    return max(int(crossed[0]) - 1, 0) if len(crossed) else max(len(weights) - 1, 0)


def _fit(samples: Sequence[Mapping], n_visual: int, alpha: float, target: float, shape: ModelShape) -> tuple[bool, list[int]]:
    """``(budget reached, drops after each layer)`` for one ``alpha``."""
    one_layer = ModelShape(shape.hidden, shape.ffn, 1)

    def layer_cost(n_tokens: int) -> float:
        return staged_prefill_flops(n_tokens, 0, [], one_layer)

    alive = [torch.ones(n_visual, dtype=torch.bool) for _ in samples]
    spent = [0.0] * len(samples)
    dropped = [0] * shape.layers
    for layer in range(shape.layers):
        forecast = [spent[s] + (shape.layers - layer) * layer_cost(sample["text_tokens"] + int(alive[s].sum())) for s, sample in enumerate(samples)]
        if sum(forecast) / len(samples) <= target:
            return True, [count // len(samples) for count in dropped]
        if layer == shape.layers - 1:
            # A drop after the last layer saves nothing: its statistics are never needed.
            break
        for s, sample in enumerate(samples):
            held = alive[s].nonzero()[:, 0]
            n_before = len(held)
            lowest = []
            for kind in ("cross", "self"):
                weights = torch.tensor(sample[kind][layer], dtype=torch.float64)
                count = _drop_count(weights[held], float(weights.sum()), alpha)
                lowest.append(set(held[weights[held].argsort(stable=True)[:count]].tolist()))
            both = sorted(lowest[0] & lowest[1])
            alive[s][both] = False
            dropped[layer] += len(both)
            spent[s] += layer_cost(sample["text_tokens"] + n_before)
    return False, [count // len(samples) for count in dropped]


def fit_recipe(statistics: Mapping, target_flops: float, shape: ModelShape) -> tuple[float, list[int]]:
    """``(alpha, drops after each layer)``: the binary search on ``alpha`` (see the module)."""
    samples, n_visual = statistics["samples"], statistics["visual_tokens"]
    if not samples:
        raise ValueError("the statistics hold no calibration sample; calibrate on at least one (--limit N >= 1)")
    for i, sample in enumerate(samples):
        for kind in ("cross", "self"):
            rows = sample[kind]
            if len(rows) < shape.layers - 1 or any(len(row) != n_visual for row in rows[: shape.layers - 1]):
                raise ValueError(
                    f"calibration sample {i}'s {kind!r} weights are {len(rows)} layers of {sorted({len(r) for r in rows})} tokens; "
                    f"a {shape.layers}-layer model needs {shape.layers - 1} layers of {n_visual}"
                )
    low, high, best = 0.0, 1.0, None
    while high - low > SEARCH_WIDTH + 1e-6:
        middle = (low + high) / 2
        reached, drops = _fit(samples, n_visual, middle, target_flops, shape)
        # The recipe drops the samples' mean count, rounded down: it must reach the budget itself.
        if reached and recipe_tflop(drops, n_visual, [sample["text_tokens"] for sample in samples], shape) * 1e12 <= target_flops:
            high, best = middle, (middle, drops)
        else:
            low = middle
    if best is None:
        raise ValueError(f"no recipe reaches {target_flops / 1e12:.4g} TFLOP on these statistics, even dropping by alpha = {high:g}; give a larger budget")
    return best


def recipe_stages(drops: Sequence[int], n_visual: int) -> tuple[tuple[int, float], ...]:
    """A recipe's drops after each layer as a schedule: ``(layer + 1, fraction kept from there)``."""
    stages, left = [], n_visual
    for layer, count in enumerate(drops):
        if count:
            left -= count
            if left < 1:
                raise ValueError(f"the recipe drops {sum(drops)} visual tokens of {n_visual}; at least one must stay")
            stages.append((layer + 1, left / n_visual))
    return tuple(stages)


def recipe_tflop(drops: Sequence[int], n_visual: int, text_tokens: Sequence[int], shape: ModelShape) -> float:
    """The recipe's prefill TFLOP for an image of ``n_visual`` tokens: the mean over prompts of
    ``text_tokens`` text tokens each."""
    counts, left = [], n_visual
    for layer, count in enumerate(drops):
        if count:
            left -= count
            counts.append((layer + 1, left))
    return sum(staged_prefill_flops(n_text, n_visual, counts, shape) for n_text in text_tokens) / len(text_tokens) / 1e12


def load_recipe(path) -> dict:
    """A recipe file, checked: a ``ValueError`` names what is missing or wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"FitPrune recipe {str(path)!r} is not a file; write one with `otprune calibrate fitprune MODEL ...`")
    try:
        recipe = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"FitPrune recipe {str(path)!r} is not JSON ({error})") from None
    if not isinstance(recipe, dict) or recipe.get("kind") != RECIPE_KIND:
        raise ValueError(f"{str(path)!r} is not a FitPrune recipe (its 'kind' must be {RECIPE_KIND!r})")
    drops, n_visual = recipe.get("drops"), recipe.get("visual_tokens")
    if not isinstance(n_visual, int) or n_visual < 1 or not isinstance(drops, list) or not all(isinstance(d, int) and d >= 0 for d in drops):
        raise ValueError(f"FitPrune recipe {str(path)!r}: 'drops' must be a list of counts >= 0 per layer and 'visual_tokens' an int >= 1")
    if not any(drops):
        raise ValueError(f"FitPrune recipe {str(path)!r} drops no token; calibrate it to a smaller budget")
    return recipe
