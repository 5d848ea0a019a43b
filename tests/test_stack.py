"""The installed stack against the lock, the bounds and the known breaks (``otprune doctor``)."""

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


def test_every_lock_is_complete_exact_and_consistent_with_pyproject():
    """Each lock pins every package once, exactly, and its pins satisfy otprune's own bounds."""
    for environment in stack.ENVIRONMENTS:
        path = stack.lock_path(environment)
        bounds = stack.declared_bounds(stack.lock_extras(path))
        lines = [line for line in path.read_text().splitlines() if line[:1].isalnum()]
        assert all(line.count("==") == 1 for line in lines), path
        pins = stack.read_lock(path)
        assert len(pins) == len(lines), f"{path}: a package pinned twice"
        assert pins["torch"].endswith("+cpu")
        for name, version in pins.items():
            if bounds.get(name):
                assert stack._within(version.split("+")[0], bounds[name]), f"{path}: {name}=={version} outside {bounds[name]}"
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


def test_doctor_runs_and_its_exit_status_follows_the_problems():
    """In the test environment (installed from the lock by .ci/run): every row, the entry point and
    the device, exit 0 exactly when the summary names no problem."""
    out = subprocess.run([sys.executable, "-m", "otprune", "doctor"], capture_output=True, text=True)
    assert "| transformers |" in out.stdout and "lmms-eval entry point: ok" in out.stdout, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("stack: ")
    assert out.returncode == (0 if "no known break, all in the tested range" in last else 1), out.stdout


def test_the_gpu_machines_wheels_are_named_by_the_vlm_lock():
    """fetch_gpu_wheels.sh downloads each wheel at locks/vlm.txt's version: each must be there."""
    names = [line.strip() for line in (stack.LOCKS.parent / "scripts" / "gpu_wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(names) == 24
    assert not [n for n in names if stack.normalise(n) not in stack.read_lock(stack.lock_path("vlm"))]
