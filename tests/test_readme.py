"""The README's own commands, extracted from its code blocks: each one is run here as printed, or
named with the test or CI stage that runs it, or with why nothing here can (weights to download, a
GPU). A command added to the README without one of these fails here; so does a stale entry."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

# Each README command this file does not run: where it runs instead, as "tests/<file>::<test>",
# ".ci/run: <text of the stage>", or "not run: <why>".
ELSEWHERE = {
    "bash scripts/install.sh --llava && bash run_otprune.sh": "tests/test_synth_default.py::test_original_reads_the_image_at_both_levels_and_vtw_at_k0_is_at_chance",
    'bash scripts/install.sh --test && python3 -m pytest -q -n auto -m "not slow"': '.ci/run: -m "not slow"',
    "otprune bench selectors": "not run: every shape on the GPU (the GPU check's step bench_selectors runs it there)",
    "otprune bench selectors --device cpu": "not run: ~15 min on 2 cores; its --quick form is tested",
    "otprune bench selectors --quick": "tests/test_bench.py::test_bench_selectors_quick",
    "otprune bench prefill": "not run: batch 1 and 8 on the GPU (the GPU check runs it there)",
    "otprune bench prefill --quick": "tests/test_bench.py::test_bench_prefill_quick",
    "otprune bench prefill --greedy triton": "not run: Triton needs a CUDA GPU",
    "bash scripts/fetch_gpu_wheels.sh": "not run: downloads wheels for the GPU machine",
    "bash scripts/gpu_check.sh": ".ci/run: scripts/gpu_check.sh",
    "python -m otprune.analysis table2": "not run: ~6 min on 2 cores; its --quick form is tested",
    "python -m otprune.analysis ot-vs-ratio": "tests/test_analysis.py::test_ot_vs_ratio_small_run",
    "python -m otprune.analysis gamma": "tests/test_analysis.py::test_gamma_small_run",
    "python -m otprune.analysis table2 --quick": "tests/test_analysis.py::test_table2_cli_writes_report",
    "python -m otprune.analysis hypothesis runs/synth": "tests/test_analysis.py::test_hypothesis_from_harness_results",
    "python -m otprune.analysis regimes runs/regimes": "tests/test_regimes.py::test_quick_regimes_end_to_end_through_the_harness",
    "otprune calibrate fitprune synth-llava-1.5 --limit 2 --ratio 0.5 --tasks otprune_synth_yesno,otprune_synth_attribute,otprune_synth_count,"
    "otprune_synth_clutter_yesno,otprune_synth_clutter_attribute,otprune_synth_clutter_count --out configs/recipes/fitprune_synth-llava-1.5.json": (
        "tests/test_calibrate.py::test_a_calibrated_recipe_meets_its_budget_and_an_unchanged_lmms_eval_run_applies_it"
    ),
    'otprune check-selector FITPRUNE --options \'{"recipe": "configs/recipes/fitprune_synth-llava-1.5.json"}\'': (
        "tests/test_check_selector.py::test_a_schedule_is_checked_from_the_options_given_and_skipped_naming_what_it_lacks"
    ),
    "otprune run synth_schedules": "not run: 3 runs of about a minute each on 2 cores; its plan, recipe, run check and TFLOP are tested in tests/test_harness*.py",
    "BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098 accelerate launch --num_processes=1 -m lmms_eval --model llava "
    "--model_args pretrained=liuhaotian/llava-v1.5-7b --tasks gqa,pope,mme --batch_size 1": (
        "not run: needs the 7B weights from the hub; the same unchanged lmms-eval run on the shipped checkpoint is "
        "test_the_add_your_method_commands_run_as_printed, accelerate's launch the GPU check's"
    ),
}
ADD_YOUR_METHOD = (
    "pip install ./examples/otprune-topnorm && otprune check-selector TOPNORM",
    "BASELINE=TOPNORM SUBSET_RATIO=0.098 OTPRUNE_OPTIONS='{\"largest\": true}' OTPRUNE_LOG=1 python -m lmms_eval --model llava "
    "--model_args pretrained=configs/otprune_synth/synth-llava-1.5,device=cpu,device_map=auto --include_path configs/otprune_synth "
    "--tasks otprune_synth_yesno --limit 4 --batch_size 1 --output_path runs/topnorm",
)
SLURM_TABLE = 'otprune run paper_table1 --executor slurm --slurm-partition gpu --slurm-time 240 --slurm-max-parallel 16 --slurm-setup "source $PWD/.venv/bin/activate" --wait'
RUN_HERE = {*ADD_YOUR_METHOD, SLURM_TABLE}


def code_blocks(language: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S) if lang == language]


def commands() -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined, comments cut."""
    found = []
    for block in code_blocks("bash"):
        current = ""
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).rstrip()
            if line.endswith("\\"):
                current += line[:-1].strip() + " "
                continue
            current += line.strip()
            if current:
                found.append(current)
            current = ""
    return found


def test_every_readme_command_is_run_here_or_where_it_says():
    shown = commands()
    unaccounted = [c for c in shown if c not in RUN_HERE and c not in ELSEWHERE]
    assert not unaccounted, f"README commands that no test runs (add them to this file): {unaccounted}"
    stale = [c for c in [*RUN_HERE, *ELSEWHERE] if c not in shown]
    assert not stale, f"commands listed here that the README no longer shows: {stale}"
    for command, where in ELSEWHERE.items():
        if where.startswith("tests/"):
            path, _, name = where.partition("::")
            tree = ast.parse((ROOT / path).read_text())
            assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, f"{command!r}: {where} does not exist"
        elif where.startswith(".ci/run: "):
            assert where.removeprefix(".ci/run: ") in CI.read_text(), f"{command!r}: .ci/run does not run it"
        else:
            assert where.startswith("not run: ") and len(where) > 20, f"{command!r}: say where it runs, or why it cannot"


def scratch_environment(folder: Path) -> dict:
    """A virtual environment of its own over this one's packages (a .pth file), whose ``pip``,
    ``python`` and ``otprune`` come first on PATH: a README ``pip install`` leaves this one alone."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [folder / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    # addsitedir, not a bare path: the outer site's own .pth files (an editable otprune's) count too.
    (site / "outer.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    for name, module in (("pip", "pip"), ("otprune", "otprune")):
        script = folder / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{folder / "bin" / "python"}" -m {module} "$@"\n')
        script.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k not in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX", "PYTHONPATH") and not k.startswith("OTPRUNE_")}
    # Offline: the example builds with this environment's setuptools, as pip does without an index.
    return {**keep, "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "VIRTUAL_ENV": str(folder)}


def results_of(output: Path, task: str) -> dict:
    """lmms-eval's scores for ``task`` from the one results file under ``output`` (it exits 0 on failure)."""
    (path,) = output.rglob("*_results.json")
    return json.loads(path.read_text())["results"][task]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_add_your_method_commands_run_as_printed(tmp_path):
    """The block, line by line through bash, in a copy of the checkout's files it names (pip builds
    in the example's folder), then its lmms-eval command from another folder, paths absolute."""
    here = tmp_path / "checkout"
    shutil.copytree(ROOT / "examples", here / "examples", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    shutil.copytree(ROOT / "configs" / "otprune_synth", here / "configs" / "otprune_synth", ignore=shutil.ignore_patterns("__pycache__"))
    env = scratch_environment(tmp_path / "venv")
    runs = [subprocess.run(["bash", "-c", command], cwd=here, env=env, capture_output=True, text=True, timeout=900) for command in ADD_YOUR_METHOD]
    for command, done in zip(ADD_YOUR_METHOD, runs):
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert re.search(r"\d+ passed, 0 failed", runs[0].stdout), runs[0].stdout
    done = runs[1]
    assert results_of(here / "runs" / "topnorm", "otprune_synth_yesno")["yes_no_f1,none"] >= 0
    log = done.stdout + done.stderr
    assert log.count("otprune TOPNORM: visual tokens 576->56") == 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = ADD_YOUR_METHOD[1].replace("configs/", f"{here}/configs/").replace("runs/topnorm", str(tmp_path / "out"))
    done = subprocess.run(["bash", "-c", absolute], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert (done.stdout + done.stderr).count("otprune TOPNORM: visual tokens 576->56") == 4, done.stderr[-3000:]
    assert results_of(tmp_path / "out", "otprune_synth_yesno") == results_of(here / "runs" / "topnorm", "otprune_synth_yesno")
    # The README's pip installed into the scratch environment: this one still has no TOPNORM.
    assert (
        "TOPNORM" not in subprocess.run([sys.executable, "-c", "import otprune.methods as m; print(m.method_names())"], capture_output=True, text=True).stdout
    )


def test_the_slurm_table_command_plans_as_printed(tmp_path):
    """Table 1 on a cluster needs GPUs and the hub's weights: its plan (--dry-run), here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTPRUNE_")}
    done = subprocess.run(
        ["bash", "-c", SLURM_TABLE.replace("otprune run", f"{sys.executable} -m otprune run") + f" --dry-run --runs-dir {tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "paper_table1: " in done.stdout and "pretrained=liuhaotian/llava-v1.5-7b" in done.stdout


@pytest.mark.parametrize("index", range(2))
def test_the_python_blocks_run_as_printed(index):
    (block,) = [b for i, b in enumerate(code_blocks("python")) if i == index]
    done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_dry_run_shows_the_checkpoint_path_the_run_uses(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "otprune", "run", "synth", "--dry-run", "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"pretrained={tmp_path.resolve()}/checkpoints/synth-llava-1.5," in done.stdout
