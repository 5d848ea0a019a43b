"""The code identity a record carries: derived from what a run loads, so that editing any of it
(the patch, a scorer, a task's hooks or data) makes the harness run again, and nothing else does."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otprune.harness import loaded_code
from otprune.harness.code_identity import task_folders

# What a run loads, executed for real: lmms-eval's entry point (and what it calls), each bundled
# plugin as otprune.methods loads it, and each task folder's hook files as lmms-eval imports them.
LOAD_AS_A_RUN_DOES = """
import importlib.util, json, pathlib, sys
from importlib import metadata
import otprune.methods
otprune.methods.plugin_entry_points()
from otprune.patches import lmms_eval_plugin
lmms_eval_plugin()
for name in otprune.methods.BUNDLED:
    otprune.methods.get_method(name)
for i, path in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"task_hooks_{i}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
roots = [pathlib.Path(importlib.util.find_spec(p).submodule_search_locations[0]) for p in ("otprune", "otprune.patches")]
print(json.dumps(sorted(name for name, module in sys.modules.items()
                        if name.startswith("otprune") and any(pathlib.Path(getattr(module, "__file__", None) or "/").is_relative_to(r) for r in roots))))
"""


def hook_files():
    return [path for folder in task_folders() for path in sorted(folder.glob("*.py"))]


def test_every_otprune_module_a_run_loads_is_in_the_identity():
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AS_A_RUN_DOES, *map(str, hook_files())], capture_output=True, text=True, timeout=300, env={**os.environ, "BASELINE": "ORIG"}
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {"otprune.patches.hf", "otprune.benchmark_metrics", "otprune.synthetic_benchmark", "otprune.plugins.pool"} <= loaded
    found = set(loaded_code.loaded_modules(hook_files()))
    assert loaded <= found, f"loaded by a run but not in the identity: {sorted(loaded - found)}"
    # Modules no run loads stay out: the analyses and the harness itself.
    assert not {name for name in found if name.startswith(("otprune.analysis", "otprune.harness", "otprune.report"))}


@pytest.fixture
def copy_of_the_code(tmp_path, monkeypatch):
    """otprune, its patches and the task folders copied to ``tmp_path``; the identity read there."""
    real = loaded_code._package_folders()
    copies = {}
    for name, folder in real.items():
        copies[name] = tmp_path / name
        shutil.copytree(folder, copies[name], ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(loaded_code, "_package_folders", lambda: copies)
    tasks = []
    for folder in task_folders():
        tasks.append(tmp_path / "tasks" / folder.name)
        shutil.copytree(folder, tasks[-1], ignore=shutil.ignore_patterns("__pycache__"))
    return copies["otprune"], tasks


def edit(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "change",
    ["yes_no_f1 scores recall", "draw draws one object", "a task's hook file", "a task's data", "a task's yaml", "the patch", "a bundled plugin"],
)
def test_editing_what_a_run_loads_changes_the_identity(copy_of_the_code, change):
    package, tasks = copy_of_the_code
    synth = next(folder for folder in tasks if folder.name == "otprune_synth")
    before = loaded_code.code_sha256(tasks)
    if change == "yes_no_f1 scores recall":
        edit(package / "benchmark_metrics.py", "def yes_no_f1", "def _unused():\n    return 0\n\n\ndef yes_no_f1")
    elif change == "draw draws one object":
        edit(package / "synthetic_benchmark.py", "def draw(", "def _unused():\n    return 0\n\n\ndef draw(")
    elif change == "a task's hook file":
        (synth / "utils.py").write_text((synth / "utils.py").read_text() + "\n# edited\n")
    elif change == "a task's data":
        data = sorted((synth / "data").rglob("*.jsonl"))[0]
        data.write_text(data.read_text().replace("a", "b", 1))
    elif change == "a task's yaml":
        yaml_file = sorted(synth.glob("otprune_synth_*.yaml"))[0]
        yaml_file.write_text(yaml_file.read_text() + "\n")
    elif change == "the patch":
        edit(package.parent / "otprune.patches" / "splice.py", "def repad(", "def _unused():\n    return 0\n\n\ndef repad(")
    else:
        edit(package / "plugins" / "pool.py", "import torch", "import torch  # edited")
    assert loaded_code.code_sha256(tasks) != before


def test_what_no_run_loads_leaves_the_identity_alone(copy_of_the_code):
    package, tasks = copy_of_the_code
    before = loaded_code.code_sha256(tasks)
    for path in (package / "report.py", package / "analysis" / "regimes.py", package / "harness" / "cli.py"):
        path.write_text(path.read_text() + "\n# edited\n")
    # Python's byte-code cache, which lmms-eval writes beside a task's hooks when it imports them.
    cache = tasks[0] / "__pycache__"
    cache.mkdir()
    (cache / "utils.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert loaded_code.code_sha256(tasks) == before
