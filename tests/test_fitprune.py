"""FitPrune: the recipe fit against a slow emulation of the public code's search (written here from
its description, in plain Python), the recipe as a schedule, and its use on the tiny LLaVA."""

import json
import random

import pytest
import torch

from otprune.fitprune import RECIPE_KIND, fit_recipe, load_recipe, recipe_stages, recipe_tflop
from otprune.measures import ModelShape, staged_prefill_flops
from otprune.prune_config import PruneConfig

SHAPE = ModelShape(hidden=64, ffn=128, layers=6)
N_VISUAL = 40


def statistics(seed: int, samples: int = 3) -> dict:
    """Weights in multiples of 1/1024, so every sum is exact in either implementation."""
    rng = random.Random(seed)
    rows = lambda: [[rng.randint(0, 64) / 1024 for _ in range(N_VISUAL)] for _ in range(SHAPE.layers)]  # noqa: E731
    return {"visual_tokens": N_VISUAL, "samples": [{"text_tokens": rng.randint(5, 30), "cross": rows(), "self": rows()} for _ in range(samples)]}


def emulated_search(stats: dict, target: float) -> tuple[float, list[int]]:
    d, m, layers = SHAPE.hidden, SHAPE.ffn, SHAPE.layers
    samples = stats["samples"]

    def layer_flops(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    def one_fit(alpha):
        alive = [list(range(N_VISUAL)) for _ in samples]
        spent = [0] * len(samples)
        dropped = [0] * layers
        for layer in range(layers):
            forecast = sum(spent[s] + (layers - layer) * layer_flops(x["text_tokens"] + len(alive[s])) for s, x in enumerate(samples))
            if forecast / len(samples) <= target:
                return True, [c // len(samples) for c in dropped]
            for s, x in enumerate(samples):
                before = len(alive[s])
                lowest = []
                for kind in ("cross", "self"):
                    w = x[kind][layer]
                    order = sorted(alive[s], key=lambda t: (w[t], t))
                    remaining, count = sum(w[t] for t in alive[s]), len(order) - 1
                    for i, token in enumerate(order):
                        if remaining < (1 - alpha) * sum(w):
                            count = max(i - 1, 0)
                            break
                        remaining -= w[token]
                    lowest.append(set(order[:count]))
                gone = lowest[0] & lowest[1]
                alive[s] = [t for t in alive[s] if t not in gone]
                dropped[layer] += len(gone)
                spent[s] += layer_flops(x["text_tokens"] + before)
        return False, [c // len(samples) for c in dropped]

    low, high, best = 0.0, 1.0, None
    while high - low > 0.01 + 1e-6:
        alpha = (low + high) / 2
        reached, drops = one_fit(alpha)
        kept = [N_VISUAL - sum(drops[: layer + 1]) for layer in range(layers)]
        recipe = sum(sum(layer_flops(x["text_tokens"] + ([N_VISUAL] + kept)[layer]) for layer in range(layers)) for x in samples) / len(samples)
        if reached and recipe <= target:
            high, best = alpha, (alpha, drops)
        else:
            low = alpha
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("share", [0.5, 0.7, 0.9])
def test_the_recipe_from_a_fixed_statistics_file_is_the_emulated_search(tmp_path, seed, share):
    file = tmp_path / "statistics.json"
    file.write_text(json.dumps(statistics(seed)))
    stats = json.loads(file.read_text())
    full = sum(staged_prefill_flops(x["text_tokens"], N_VISUAL, [], SHAPE) for x in stats["samples"]) / len(stats["samples"])
    alpha, drops = fit_recipe(stats, share * full, SHAPE)
    assert (alpha, drops) == emulated_search(stats, share * full)
    assert any(drops) and len(drops) == SHAPE.layers


def test_a_budget_no_recipe_reaches_is_refused():
    stats = statistics(3)
    with pytest.raises(ValueError, match="no recipe reaches"):
        fit_recipe(stats, 1.0, SHAPE)


def write_recipe(path, drops, n_visual=576):
    path.write_text(json.dumps({"kind": RECIPE_KIND, "model": "tiny", "visual_tokens": n_visual, "drops": drops}))
    return str(path)


def test_a_recipe_is_a_schedule_and_its_tflop_counts_each_stage(tmp_path):
    assert recipe_stages([0, 100, 200, 0], 576) == ((2, 476 / 576), (3, 276 / 576))
    config = PruneConfig("FITPRUNE", options={"recipe": write_recipe(tmp_path / "r.json", [0, 100, 200, 0])})
    assert config.layer_index == 2 and [s.layer for s in config.stages] == [2, 3]
    shape = ModelShape(hidden=8, ffn=16, layers=4)
    per_layer = [staged_prefill_flops(10 + n, 0, [], ModelShape(8, 16, 1)) for n in (576, 576, 476, 276)]
    assert recipe_tflop([0, 100, 200, 0], 576, [10], shape) == pytest.approx(sum(per_layer) / 1e12)


@pytest.mark.parametrize(
    "content, words",
    [(None, "is not a file"), ("{", "is not JSON"), ('{"kind": "x"}', "is not a FitPrune recipe"), ("drop-all", "at least one must stay")],
)
def test_bad_recipes_are_refused_naming_the_file(tmp_path, content, words):
    path = tmp_path / "recipe.json"
    if content == "drop-all":
        write_recipe(path, [0, 576, 0, 0])
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=words) as raised:
        PruneConfig("FITPRUNE", options={"recipe": str(path)})
    assert "recipe.json" in str(raised.value) or words == "at least one must stay"
    if content is None:
        with pytest.raises(ValueError, match="is not a file"):
            load_recipe(path)


def test_fitprune_applies_its_recipe_on_the_tiny_llava(tiny_hf_checkpoints, tmp_path):
    from test_patch_hf import inputs_for, make_image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import otprune.patches as patches

    path = tiny_hf_checkpoints["llava-hf"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    patches.hf.install()
    inputs = inputs_for(processor, ["What is in the image?"], [[make_image(500, 300, 1)]])
    length = inputs["input_ids"].shape[1]
    patches.prune(model, "FITPRUNE", recipe=write_recipe(tmp_path / "r.json", [0, 100, 200, 0]))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    text = length - 576
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [length, length, text + 476, text + 276]
