"""FitPrune (``BASELINE=FITPRUNE``; Ye et al., AAAI 2025, public code github ywh187/FitPrune) as an
outside plugin: a calibrated recipe of how many visual tokens to drop before each LLM layer
(``otprune calibrate fitprune``, ``otprune.fitprune``), applied per image by attention.

Written against the public API (``otprune.contract``, ``otprune.selectors``, the recipe reader
``otprune.fitprune``); found as the selector ``FITPRUNE = "otprune.plugins.fitprune:select_fitprune"``
(``otprune.methods.BUNDLED``), whose ``stages`` reads the recipe (``OTPRUNE_OPTIONS='{"recipe": PATH}'``).

**Calibration** (``otprune calibrate fitprune``, ``otprune.calibrate``): with the options
``statistics`` (a file) and ``layers`` (the LLM's) instead of a recipe, the schedule keeps every
token before each layer ``1 .. layers - 1``, and each stage appends to the file, per image, the
weights the fit needs of the layer before it, as one JSON line ``{"layer", "text_tokens", "cross",
"self"}``: the unpruned model's statistics, measured by the same hooks that prune.

**Choice**: at each stage the tokens kept are those of largest cross plus self weight, each the
share of its total (the weights the calibration fits on: the mean attention of the question's
tokens and of the image's tokens, at the layer before), so both count alike.
"""

from __future__ import annotations

import json

import torch

from otprune.contract import check_image_tokens
from otprune.fitprune import load_recipe, recipe_stages
from otprune.selectors import select_top_scores

__all__ = ["select_fitprune", "stages"]


@torch.no_grad()
def select_fitprune(
    tokens: torch.Tensor, k: int, *, text_attention: torch.Tensor, visual_attention: torch.Tensor, layer_index: int, statistics: str | None = None
) -> torch.Tensor:
    """The ``k`` of the image's ``(N, d)`` alive tokens of largest cross + self weight
    (``text_attention`` ``(T, N)``, ``visual_attention`` ``(N, N)``); ``(k,)`` sorted indices.
    ``statistics``: a calibration's file, to which the weights of layer ``layer_index - 1`` are appended."""
    k = check_image_tokens(tokens, k)
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens must be finite; they hold NaN or Inf")
    n = tokens.shape[0]
    if text_attention.dim() != 2 or text_attention.shape[1] != n or visual_attention.shape != (n, n):
        raise ValueError(
            f"text_attention must be (T, {n}) and visual_attention ({n}, {n}); got {tuple(text_attention.shape)} and {tuple(visual_attention.shape)}"
        )
    cross, own = text_attention.double().mean(0), visual_attention.double().mean(0)
    if statistics is not None:
        # Six significant digits: the fit reads the file back, so it fits exactly what is kept.
        weights = {name: [float(f"{v:.6g}") for v in values.tolist()] for name, values in (("cross", cross), ("self", own))}
        line = {"layer": layer_index - 1, "text_tokens": text_attention.shape[0], **weights}
        with open(statistics, "a") as file:
            file.write(json.dumps(line) + "\n")
    score = cross / cross.sum().clamp_min(1e-300) + own / own.sum().clamp_min(1e-300)
    return select_top_scores(score, k).to(tokens.device)


def stages(*, recipe: str | None = None, statistics: str | None = None, layers: int | None = None) -> tuple[tuple[int, float], ...]:
    """The recipe file's drops as a schedule (``otprune.fitprune.recipe_stages``); calibrating
    (``statistics`` and ``layers``), every token kept before each layer but the first."""
    if (recipe is None) == (statistics is None):
        raise ValueError(
            "FITPRUNE needs the option 'recipe' (a recipe file: otprune calibrate fitprune MODEL ..., then "
            "OTPRUNE_OPTIONS='{\"recipe\": \"PATH\"}'), or, to calibrate, 'statistics' and 'layers' instead; "
            f"got recipe={recipe!r}, statistics={statistics!r}"
        )
    if recipe is not None:
        loaded = load_recipe(recipe)
        return recipe_stages(loaded["drops"], loaded["visual_tokens"])
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
        raise ValueError(f"calibrating FITPRUNE needs 'layers', the LLM's decoder layers (an int >= 2); got {layers!r}")
    return tuple((layer, 1.0) for layer in range(1, layers))


select_fitprune.stages = stages
