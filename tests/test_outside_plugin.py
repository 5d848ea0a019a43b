"""An outside package's method, installed with pip, prunes unchanged lmms-eval runs; a faulty one
stops the run loudly (issue 24). Real lmms-eval on the trained synthetic LLaVA-1.5; the Qwen2.5-VL
run of the same package is the GPU check's (scripts/gpu_check.py, step vlm_lmms_eval)."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from otprune.harness.checkpoints import checkpoint
from otprune.harness.config import Config
from otprune.harness.plan import Run, child_env, command
from otprune.harness.resources import load_catalogue
from otprune.selectors import budget

EXAMPLE = ROOT / "examples" / "otprune-topnorm"
TASK = "otprune_synth_yesno"
MODEL = "synth-llava-1.5"
pytestmark = [
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import lmms_eval, llava.model.language_model.llava_llama"], capture_output=True).returncode,
        reason="needs lmms-eval and llava-torch (bash scripts/install.sh --test)",
    )
]


def pip_install(source: Path, target: Path) -> None:
    """``pip install`` into a folder of its own: the test environment itself is left as it was."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "otprune-topnorm"
    # pip builds in the source folder: a copy keeps the checkout clean.
    subprocess.run(["cp", "-r", str(EXAMPLE), str(source)], check=True)
    site = tmp_path_factory.mktemp("site")
    pip_install(source, site)
    return site


def with_site(env: dict, site: Path) -> dict:
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)}


def test_the_example_package_prunes_an_unchanged_lmms_eval_run_through_the_harness(tmp_path, example_site):
    config = {
        "lmms_model": "llava",
        "model_args": "device=cpu,device_map=auto",
        "models": [MODEL],
        "methods": {"Original": {}, "TOPNORM": {"ratios": [0.098], "options": {"largest": True}}},
        "tasks": [TASK],
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    env = with_site({k: v for k, v in os.environ.items() if not k.startswith("OTPRUNE_")}, example_site)
    done = subprocess.run(
        [sys.executable, "-m", "otprune", "run", str(path), "--runs-dir", str(runs), "--limit", "4"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["method"]: row for row in csv.DictReader(open(runs / "plugin_limit4" / "table1.csv"))}
    row = rows["TOPNORM"]
    assert float(row["visual_tokens_before"]) == 576
    assert float(row["visual_tokens_after"]) == budget(0.098, 576) == 56
    assert row["SynYesNo"] not in ("", None)
    setting = json.loads(next((runs / "plugin_limit4").glob("*/TOPNORM_0.098/setting.json")).read_text())
    assert setting["env"]["OTPRUNE_OPTIONS"] == '{"largest": true}'
    assert setting["plugin"] == "otprune-topnorm 0.1.0"
    source = (example_site / "otprune_topnorm" / "__init__.py").read_bytes()
    expected = hashlib.sha256(b"__init__.py\0" + source + b"\0").hexdigest()[:16]
    assert setting["plugin_source_sha256"] == expected


def faulty_site(tmp_path: Path) -> Path:
    """A plugin package that returns its picks in descending order (unsorted), as pip would leave it."""
    site = tmp_path / "faulty"
    (site / "backwards_pick-0.1.dist-info").mkdir(parents=True)
    (site / "backwards_pick.py").write_text("import torch\n\ndef select(tokens, k):\n    return torch.arange(k, device=tokens.device).flip(0)\n")
    (site / "backwards_pick-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: backwards-pick\nVersion: 0.1\n")
    (site / "backwards_pick-0.1.dist-info" / "entry_points.txt").write_text("[otprune.selectors]\nBACKWARDS = backwards_pick:select\n")
    return site


def test_a_faulty_plugin_stops_the_unchanged_lmms_eval_cli_with_a_non_zero_exit(tmp_path):
    catalogue = load_catalogue()
    config = Config("faulty", "llava", "device=cpu,device_map=auto", {}, {}, [TASK], catalogue=catalogue)
    pruning = {"BASELINE": "backwards", "SUBSET_RATIO": "0.098"}
    run = Run(MODEL, "BACKWARDS", 0.098, pruning, (TASK,), tmp_path / "out")
    pretrained = checkpoint(MODEL, tmp_path / "runs")
    argv = command(config, run, pretrained, 1, 1, tmp_path / "out")
    assert argv[1:3] == ["-m", "lmms_eval"]
    done = subprocess.run(argv, env=with_site(child_env(run, 1), faulty_site(tmp_path)), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "selector plugin BACKWARDS (backwards-pick 0.1) returned indices that are not sorted ascending" in output, output[-3000:]
    assert not list((tmp_path / "out").glob("**/*_results.json"))
