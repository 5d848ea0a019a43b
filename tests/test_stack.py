"""The installed stack against the lock, the bounds and the known breaks (``otprune doctor``)."""

import os
import subprocess
import sys

import pytest

from otprune import stack

LMMS = {"lmms-eval": "0.7.3"}


def test_filelock_4_3_under_lmms_eval_0_7_3_is_a_known_break_with_its_fix():
    [problem] = stack.known_breaks({**LMMS, "filelock": "4.3.1"})
    assert "filelock 4.3.1" in problem and "pip install 'filelock<4.3'" in problem
    assert stack.known_breaks({**LMMS, "filelock": "4.2.12"}) == []
    assert stack.known_breaks({"filelock": "4.3.1"}) == []  # no lmms-eval: nothing breaks
    assert stack.known_breaks({"lmms-eval": "0.7.4", "filelock": "4.3.1"}) == []


def pyproject_bounds(extras) -> dict:
    """pyproject.toml's own requirements for ``extras`` (read from the file, not from metadata)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((stack.LOCKS.parent / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [t for e in extras for t in project["optional-dependencies"][e]]
    return {stack.normalise(Requirement(t).name): Requirement(t).specifier for t in texts}


def test_every_lock_is_complete_exact_and_consistent_with_pyproject():
    """Each lock pins every package once, exactly, and its pins satisfy pyproject's bounds."""
    for environment in stack.ENVIRONMENTS:
        path = stack.lock_path(environment)
        bounds = pyproject_bounds(stack.lock_extras(path))
        assert set(bounds) - {"triton"} <= set(stack.read_lock(path)), f"{path} lacks a requirement"
        lines = [line for line in path.read_text().splitlines() if line[:1].isalnum()]
        assert all(line.count("==") == 1 for line in lines), path
        pins = stack.read_lock(path)
        assert len(pins) == len(lines), f"{path}: a package pinned twice"
        assert pins["torch"].endswith("+cpu")
        for name, version in pins.items():
            if name in bounds:
                assert bounds[name].contains(version.split("+")[0], prereleases=True), f"{path}: {name}=={version} outside {bounds[name]}"
        assert stack.known_breaks(pins) == [], path
    assert "torchvision" not in stack.read_lock(stack.lock_path("llava"))  # a CUDA wheel beside CPU torch
    assert {"torchvision", "qwen-vl-utils", "llava-torch"} <= set(stack.read_lock(stack.lock_path("vlm")))


def test_inspect_reports_what_differs_from_the_lock_and_what_leaves_the_tested_range():
    pins = stack.read_lock(stack.lock_path("llava"))
    installed = {**pins, "transformers": "5.16.0", "filelock": "4.3.1", "pyyaml": "5.0"}
    del installed["scipy"]
    found = stack.inspect("llava", installed)
    rows = {r.name: r for r in found.rows}
    assert rows["transformers"].status == "outside the tested range <6,>=5.17"
    assert rows["scipy"].status == "missing"
    assert rows["pyyaml"].status == "differs from the lock"
    assert rows["lmms-eval"].status == "ok"
    assert rows["llava-torch"].status == "ok"  # installed without pins: named, but unbounded
    assert len(found.problems) == 4  # the break (filelock), transformers, filelock outside <4.3, scipy
    line = stack.summary(found)
    assert line.startswith(f"stack: {len(pins) - 4}/{len(pins)} packages as locks/llava.txt")
    assert "4 problem(s)" in line and "pip install 'filelock<4.3'" in line


def test_the_installed_environment_is_recognised_from_what_install_sh_added():
    assert stack.installed_environment({"torch": "2"}) == "base"
    assert stack.installed_environment({**LMMS}) == "llava"
    assert stack.installed_environment({**LMMS, "pytest": "9"}) == "test"
    assert stack.installed_environment({**LMMS, "torchvision": "0.28", "qwen-vl-utils": "0.0.14"}) == "vlm"
    with pytest.raises(ValueError, match="no lock 'gpu'; allowed: base, llava, test, vlm"):
        stack.lock_path("gpu")


def test_lmms_eval_entry_point_stops_on_a_known_break_before_any_model(monkeypatch):
    """lmms-eval only warns about an entry point's exception: a break must leave as SystemExit."""
    import otprune.patches as patches

    monkeypatch.setattr(stack, "KNOWN_BREAKS", (stack.KnownBreak("packaging", ">=0", "torch", ">=0", "a test break", "pip install nothing"),))
    with pytest.raises(SystemExit, match="known break.*a test break; fix: pip install nothing"):
        patches.lmms_eval_plugin()


def test_doctor_passes_the_locked_test_environment_and_fails_a_known_break(tmp_path):
    """The tests run where install.sh --test installed the lock (.ci/run): doctor finds it whole
    (exit 0). The same interpreter with a filelock 4.3 shadowing the installed one: exit 1, the fix named."""
    out = subprocess.run([sys.executable, "-m", "otprune", "doctor", "--lock", "test"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| transformers |" in out.stdout and "lmms-eval entry point: ok" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("stack: ")
    shadow = tmp_path / "filelock-4.3.1.dist-info"
    shadow.mkdir()
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: filelock\nVersion: 4.3.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    broken = subprocess.run([sys.executable, "-m", "otprune", "doctor", "--summary"], capture_output=True, text=True, env=env)
    assert broken.returncode == 1
    assert "filelock 4.3.1 with lmms-eval 0.7.3" in broken.stdout and "pip install 'filelock<4.3'" in broken.stdout


def test_the_gpu_machines_wheels_are_named_by_the_vlm_lock():
    """fetch_gpu_wheels.sh downloads each wheel at locks/vlm.txt's version: each must be there."""
    names = [line.strip() for line in (stack.LOCKS.parent / "scripts" / "gpu_wheels.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert not [n for n in names if stack.normalise(n) not in stack.read_lock(stack.lock_path("vlm"))]


def test_harness_refuses_a_known_break_before_any_run(monkeypatch, tmp_path, capsys):
    pytest.importorskip("lmms_eval")
    from otprune.harness import cli as harness_cli

    monkeypatch.setattr(stack, "KNOWN_BREAKS", (stack.KnownBreak("packaging", ">=0", "torch", ">=0", "a test break", "pip install nothing"),))
    assert harness_cli.main(["synth", "--runs-dir", str(tmp_path / "runs")]) == 2
    out = capsys.readouterr()
    assert out.out.startswith("stack: ") and "a test break" in out.out.splitlines()[0]
    assert "a known break: packaging" in out.err and "fix: pip install nothing" in out.err
    assert not (tmp_path / "runs").exists()
