"""``otprune calibrate fitprune``: bad input refused naming the value (exit 2), the statistics file
read back per image, and, on the tiny trained LLaVA, a recipe that meets its budget and that an
unchanged lmms-eval run applies stage by stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otprune import calibrate
from otprune.harness.run_check import parse_prune_log, pruning_problem
from otprune.measures import ModelShape, staged_prefill_flops

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["fitprune", "synth-llava-1.5", "--tasks", "otprune_synth_yesno", "--limit", "2", "--ratio", "0.5"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({0: "fastv"}, "no calibration for method 'fastv'"),
        ({1: "gpt-5"}, "unknown model 'gpt-5'"),
        ({3: "otprune_synth_nope"}, "unknown task(s) otprune_synth_nope"),
        ({5: "0"}, "--limit 0 is not allowed"),
        ({7: "1.5"}, "--ratio 1.5 is not allowed"),
    ],
)
def test_bad_input_is_refused_naming_the_value(change, words, capsys):
    argv = [change.get(i, value) for i, value in enumerate(GOOD)]
    assert calibrate.main(argv) == 2
    assert words in capsys.readouterr().err


def statistics_lines(layers_per_image: list[list[int]]) -> list[str]:
    return [json.dumps({"layer": layer, "text_tokens": 7, "cross": [0.5, 0.5], "self": [0.25, 0.75]}) for layers in layers_per_image for layer in layers]


def test_statistics_are_read_back_per_image_in_layer_order():
    statistics = calibrate.build_statistics(statistics_lines([[0, 1, 2], [0, 1, 2]]), layers=4)
    assert statistics["visual_tokens"] == 2 and len(statistics["samples"]) == 2
    assert statistics["samples"][1] == {"text_tokens": 7, "cross": [[0.5, 0.5]] * 3, "self": [[0.25, 0.75]] * 3}
    # Two images of one prompt interleave their layers: refused, not mixed up.
    with pytest.raises(calibrate.CalibrationError, match="out of order"):
        calibrate.build_statistics(statistics_lines([[0, 0, 1, 1]]), layers=3)
    with pytest.raises(calibrate.CalibrationError, match="fewer than the 3 layers"):
        calibrate.build_statistics(statistics_lines([[0, 1, 2], [0, 1]]), layers=4)


def recomputed_tflop(recipe: dict) -> float:
    """The recipe's TFLOP from its own counts: each layer's kept tokens, mean over its prompts."""
    shape = ModelShape(**recipe["llm_shape"])
    left, stages = recipe["visual_tokens"], []
    for layer, count in enumerate(recipe["drops"]):
        if count:
            left -= count
            stages.append((layer + 1, left))
    samples = recipe["statistics"]["samples"]
    return sum(staged_prefill_flops(s["text_tokens"], recipe["visual_tokens"], stages, shape) for s in samples) / len(samples) / 1e12


@pytest.mark.slow
def test_a_calibrated_recipe_meets_its_budget_and_an_unchanged_lmms_eval_run_applies_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    out = tmp_path / "recipe.json"
    argv = ["fitprune", "synth-llava-1.5", "--tasks", "otprune_synth_yesno,otprune_synth_count", "--limit", "2", "--ratio", "0.5"]
    assert calibrate.main([*argv, "--out", str(out), "--runs-dir", str(runs)]) == 0
    recipe = json.loads(out.read_text())
    target = recipe["budget"]["tflop"]
    assert recipe["kind"] == "otprune fitprune recipe" and recipe["model"] == "synth-llava-1.5"
    assert len(recipe["statistics"]["samples"]) == 4 and any(recipe["drops"])
    assert target == pytest.approx(0.5 * recipe["budget"]["unpruned_tflop"])
    assert recipe["tflop"] <= target and recipe["tflop"] == pytest.approx(recomputed_tflop(recipe), rel=1e-12)
    assert f"<= budget {target:.6g} TFLOP" in capsys.readouterr().out
    # A budget below what dropping all it may reaches: refused naming it, no recipe written.
    with pytest.raises(calibrate.CalibrationError, match="the budget 1e-09 TFLOP"):
        calibrate.write_recipe(recipe["statistics"], ModelShape(**recipe["llm_shape"]), 1e-9 * 1e12, {}, tmp_path / "none.json")
    assert not (tmp_path / "none.json").exists()

    env = {
        **os.environ,
        "BASELINE": "FITPRUNE",
        "OTPRUNE_OPTIONS": json.dumps({"recipe": str(out)}),
        "OTPRUNE_LOG": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "llava",
        "--model_args",
        f"pretrained={runs / 'checkpoints' / 'synth-llava-1.5'},device=cpu,device_map=auto",
    ]
    command += ["--tasks", "otprune_synth_count", "--limit", "2", "--batch_size", "1", "--include_path", str(ROOT / "configs" / "otprune_synth")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    log = parse_prune_log(result.stdout + result.stderr)
    kept, stages = recipe["visual_tokens"], []
    for layer, count in enumerate(recipe["drops"]):
        if count:
            kept -= count
            stages.append([layer + 1, kept])
    assert log["stage_tokens"] == [stages, stages], (result.stdout + result.stderr)[-3000:]
    assert pruning_problem({k: env[k] for k in ("BASELINE", "OTPRUNE_OPTIONS")}, log, 2) is None
