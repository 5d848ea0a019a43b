"""The runs folder as a database (issue 11): one writer, children killed with the harness, records
that alone mark a run finished, run identity, config and path checks, the pruning check, and a
report that survives malformed files. Real processes throughout, with a stand-in lmms-eval
(tests/fixtures/fake_lmms_eval) where the real one would only add minutes."""

import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, stamp_records

from otprune import report
from otprune.harness import cli as harness_cli
from otprune.harness import config as harness_config
from otprune.harness import errors as harness_errors
from otprune.harness import plan as harness_plan
from otprune.harness import records as harness_records
from otprune.harness import run_check as harness_run_check

FAKE = ROOT / "tests" / "fixtures" / "fake_lmms_eval"
FIXTURES = ROOT / "tests" / "fixtures" / "runs" / "smoke"
TASK = "otprune_smoke_vqa"


def write_config(path: Path, **changes) -> Path:
    config = {"model_args": "device=cpu", "models": ["tiny-llava-1.5"], "methods": {"Original": {}}, "tasks": [TASK]}
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def runs_folder(tmp_path: Path) -> Path:
    """A runs folder whose tiny checkpoint counts as built (the stand-in lmms-eval never loads it)."""
    runs = tmp_path / "runs"
    (runs / "checkpoints" / "tiny-llava-1.5").mkdir(parents=True)
    (runs / "checkpoints" / "tiny-llava-1.5" / "otprune_tiny.json").write_text("{}")
    return runs


def fake_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX") and not k.startswith("OTPRUNE_")}
    return {**env, "PYTHONPATH": str(FAKE), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def harness_cmd(config: Path, runs: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "otprune", "run", str(config), "--runs-dir", str(runs), "--no-report", *extra]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def child_files(runs: Path) -> list[Path]:
    return sorted(runs.glob("*/*/*/attempts/*/child.json"))


# -- one writer, children killed with the harness ---------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_harness_is_refused_and_a_signal_stops_the_child(tmp_path, signum):
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    first = subprocess.Popen(harness_cmd(config, runs), env=fake_env(FAKE_LMMS="sleep"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (child,) = wait_for(lambda: child_files(runs), 60, "the first harness's child")
        pid = json.loads(child.read_text())["pid"]
        if signum == signal.SIGTERM:
            second = subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=60)
            assert second.returncode == 2
            assert f"another harness is writing to {runs / 'c'} (pid {first.pid}" in second.stderr
            assert child_files(runs) == [child]  # no second child on the same task
        first.send_signal(signum)
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    name = signal.Signals(signum).name
    assert first.returncode == 128 + signum, err
    assert f"stopped by {name}: 1 lmms-eval child process group(s) stopped" in err
    wait_for(lambda: not alive(pid), 15, "the child to end")
    (record,) = (runs / "c" / "tiny-llava-1.5" / "Original_1").glob("otprune_*.json")
    record = json.loads(record.read_text())
    assert record["status"] == "failed" and record["reason"] == f"stopped with the harness ({name} to the harness)"
    assert harness_records.finished_tasks(runs / "c" / "tiny-llava-1.5" / "Original_1") == set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigkill_of_the_harness_takes_its_child_along(tmp_path):
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    first = subprocess.Popen(harness_cmd(config, runs), env=fake_env(FAKE_LMMS="sleep"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (child,) = wait_for(lambda: child_files(runs), 60, "the harness's child")
        pid = json.loads(child.read_text())["pid"]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        wait_for(lambda: not alive(pid), 15, "the child to end with its harness")
    finally:
        first.kill()


def test_a_live_child_of_an_earlier_harness_is_reported_not_duplicated(tmp_path):
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    attempt = runs / "c" / "tiny-llava-1.5" / "Original_1" / "attempts" / f"20250101_000000_000000000_{TASK}"
    attempt.mkdir(parents=True)
    stale = subprocess.Popen(
        [sys.executable, "-m", "lmms_eval", "--tasks", TASK, "--output_path", str(attempt)],
        env=fake_env(FAKE_LMMS="sleep"),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        (attempt / "child.json").write_text(json.dumps({"pid": stale.pid, "pgid": stale.pid, "tasks": [TASK]}))
        rerun = subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 1, rerun.stderr
        assert f"an lmms-eval child of an earlier harness is still running: pid {stale.pid}" in rerun.stderr
        assert f"kill -- -{stale.pid}" in rerun.stderr
        assert "0 finished before, 1 still running elsewhere, 0 to run" in rerun.stdout
        assert child_files(runs) == [attempt / "child.json"]
    finally:
        os.killpg(stale.pid, signal.SIGKILL)
        stale.wait(timeout=30)
    # Once it is gone, its unrecorded results do not count: the run runs again, once.
    resumed = subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "0 finished before, 0 still running elsewhere, 1 to run" in resumed.stdout
    assert len(child_files(runs)) == 2


def test_jobs_finishing_in_the_same_second_keep_every_result(tmp_path):
    """The stand-in names its files by the second, as lmms-eval does: three runs at once in one
    method folder used to overwrite each other's results."""
    runs = runs_folder(tmp_path)
    tasks = ["otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"]
    config = write_config(tmp_path / "c.yaml", tasks=tasks)
    done = subprocess.run(harness_cmd(config, runs, "--jobs", "3"), env=fake_env(HF_TOKEN="hf_secret"), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = runs / "c" / "tiny-llava-1.5" / "Original_1"
    assert harness_records.finished_tasks(folder) == set(tasks)
    records = [json.loads(p.read_text()) for p in folder.glob("otprune_*.json")]
    assert sorted(r["finished_tasks"][0] for r in records) == sorted(tasks)
    for record in records:
        assert record["samples"] == {record["tasks"][0]: 3}  # the stand-in's 3 docs, none twice
        for name, digest in record["results"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        assert record["limit"] is None and record["otprune"]["version"] and record["otprune"]["patches"].startswith(str(ROOT))
        assert record["child_env"]["PATH"] == os.environ["PATH"] and record["child_env"]["HF_TOKEN"] == "<redacted>"
    _, csv_path, markdown = report.write_report(runs / "c", tmp_path / "out")
    assert "| tiny-llava-1.5 | Original | 9 |" in markdown


# -- the pruning check ------------------------------------------------------------------------


def test_a_pruning_run_without_the_entry_point_fails(tmp_path):
    """A broken install: lmms-eval does not load otprune's entry point, so nothing prunes."""
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml", methods={"OTPrune": {"ratios": [0.098]}})
    result = subprocess.run(harness_cmd(config, runs, "--limit", "2"), env=fake_env(FAKE_LMMS="no-plugins"), capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "FAILED after" in result.stdout and f"({harness_run_check.NO_SELECTION})" in result.stdout, result.stdout + result.stderr
    assert harness_records.finished_tasks(runs / "c_limit2" / "tiny-llava-1.5" / "OTPrune_0.098") == set()


@pytest.mark.parametrize(
    "env, log, samples, problem",
    [
        ({"BASELINE": "VTW", "LAYER_INDEX": "2"}, "otprune VTW: visual tokens 576->0, 576->0; selector 0.1 ms", 2, None),
        (
            {"BASELINE": "VTW", "LAYER_INDEX": "2"},
            "otprune VTW: visual tokens 576->0; selector 0.1 ms",
            2,
            "2 samples evaluated but only 1 images' selections logged",
        ),
        # K = 0: the no-image control keeps no visual token, before the LLM as inside it.
        ({"BASELINE": "VTW", "LAYER_INDEX": "0"}, "otprune VTW: visual tokens 576->0; selector 0.0 ms", 1, None),
        (
            {"BASELINE": "VTW", "LAYER_INDEX": "0"},
            "otprune VTW: visual tokens 576->56; selector 0.0 ms",
            1,
            "an image kept 56 of 576 visual tokens; VTW keeps none",
        ),
        ({"BASELINE": "UNIFORM", "SUBSET_RATIO": "0.25"}, "otprune UNIFORM: visual tokens 576->144; selector 0.1 ms", 1, None),
        ({"BASELINE": "FASTV", "SUBSET_RATIO": "0.25"}, "otprune FASTV: visual tokens 2144->536; selector 0.1 ms", 1, None),
        ({"BASELINE": "DPP", "SUBSET_RATIO": "0.25"}, "otprune OURS: visual tokens 576->144; selector 0.1 ms", 1, "the log shows a selection by OURS, not DPP"),
        (
            {"BASELINE": "ORIG"},
            "otprune OURS: visual tokens 576->56; selector 0.1 ms",
            1,
            "the unpruned run logged a selection by OURS: a pruning variable leaked into it",
        ),
        ({"BASELINE": "ORIG"}, "", 1, None),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, "otprune OURS: visual tokens 576->56; selector 0.1 ms; ot 0.5", 1, None),
        (
            {"BASELINE": "OURS", "SUBSET_RATIO": "0.098"},
            "otprune OURS: visual tokens 576->576; selector 0.1 ms",
            1,
            "an image kept 576 of 576 visual tokens; OURS at ratio 0.098 keeps 56",
        ),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, "loading model\nevaluating", 1, harness_run_check.NO_SELECTION),
        # A merger keeps 1 <= m <= k: POOL's largest grid that fits 153 on LLaVA-NeXT's 1560 is 152.
        ({"BASELINE": "POOL", "SUBSET_RATIO": "0.098"}, "otprune POOL: visual tokens 1560->152, 576->56; selector 0.1 ms", 1, None),
        (
            {"BASELINE": "POOL", "SUBSET_RATIO": "0.098"},
            "otprune POOL: visual tokens 1560->154; selector 0.1 ms",
            1,
            "an image kept 154 of 1560 visual tokens; POOL a merger at ratio 0.098 keeps between 1 and 153",
        ),
        (
            {"BASELINE": "POOL", "SUBSET_RATIO": "0.098"},
            "otprune POOL: visual tokens 1560->0; selector 0.1 ms",
            1,
            "an image kept 0 of 1560 visual tokens; POOL a merger at ratio 0.098 keeps between 1 and 153",
        ),
    ],
)
def test_pruning_problem(env, log, samples, problem):
    assert harness_run_check.pruning_problem(env, harness_run_check.parse_prune_log(log), samples) == problem


TASKS_OF_ONE_PROCESS = ["otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"]


def attempt_with_results_for(done: set) -> list[str]:
    """An unpruned multi-task attempt that exited 0 with a clean log, whose results files hold
    ``done``."""
    return harness_run_check.attempt_problems(
        returncode=0, tasks=TASKS_OF_ONE_PROCESS, done=done, limits={None}, limit=None, env={"BASELINE": "ORIG"}, log_text="", samples=3
    )


def test_a_multi_task_attempt_counts_only_with_a_results_file_for_every_task():
    assert attempt_with_results_for(set(TASKS_OF_ONE_PROCESS)) == []
    assert attempt_with_results_for(set()) == [f"exit code 0; no results file for {', '.join(sorted(TASKS_OF_ONE_PROCESS))}"]
    for task in TASKS_OF_ONE_PROCESS:
        assert attempt_with_results_for(set(TASKS_OF_ONE_PROCESS) - {task}) == [f"exit code 0; no results file for {task}"], task
    for kept in TASKS_OF_ONE_PROCESS:
        missing = sorted(set(TASKS_OF_ONE_PROCESS) - {kept})
        assert attempt_with_results_for({kept}) == [f"exit code 0; no results file for {', '.join(missing)}"], kept


# -- run identity -----------------------------------------------------------------------------


def test_an_edited_config_never_reuses_another_settings_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--no-report"]) == 0
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--no-report"]) == 0
    assert "1 finished before, 0 still running elsewhere, 0 to run" in capsys.readouterr().out
    write_config(config, batch_size=2)
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert f"{runs / 'c' / 'tiny-llava-1.5' / 'Original_1'} holds the results of another setting (batch_size: 1 -> 2)" in err


def test_the_setting_hash_covers_what_changes_a_result():
    config = harness_config.load_config("smoke")
    base = harness_plan.run_setting(config, "tiny-llava-1.5", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, None)
    variants = [
        ("tiny-llava-1.6", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, None),
        ("tiny-llava-1.5", "OTPrune", 0.25, {"BASELINE": "OURS", "SUBSET_RATIO": "0.25"}, None),
        ("tiny-llava-1.5", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098", "LAYER_INDEX": "1"}, None),
        ("tiny-llava-1.5", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098", "OTPRUNE_GAMMA": "0.5"}, None),
        ("tiny-llava-1.5", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, 3),
    ]
    hashes = {harness_plan.run_setting(config, *variant)["hash"] for variant in variants}
    assert len(hashes | {base["hash"]}) == len(variants) + 1
    config.model_args = "device=cpu"
    assert harness_plan.run_setting(config, "tiny-llava-1.5", "OTPrune", 0.098, {"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}, None)["hash"] != base["hash"]


def test_duplicate_ratios_and_tasks_are_planned_once(tmp_path):
    path = write_config(tmp_path / "d.yaml", methods={"OTPrune": {"ratios": [0.25, 0.250000001, 0.1]}}, tasks=[TASK, "otprune_smoke_pope", TASK])
    config = harness_config.load_config(str(path))
    runs = harness_plan.plan_runs(config, tmp_path / "runs")
    assert sorted((r.ratio, r.tasks) for r in runs) == sorted(
        [(0.1, (TASK,)), (0.1, ("otprune_smoke_pope",)), (0.25, (TASK,)), (0.25, ("otprune_smoke_pope",))]
    )
    assert any("ratios [0.25, 0.250000001, 0.1] run once each as ['0.25', '0.1']" in note for note in config.notes)


def test_k_comes_from_the_method_key_and_a_models_override(tmp_path):
    path = write_config(
        tmp_path / "k.yaml",
        models={"tiny-llava-1.5": {"VTW": {"layer_index": 3}}, "tiny-llava-1.6": {}},
        methods={"VTW": {"layer_index": 2}, "FastV": {"ratios": [0.5]}},
    )
    runs = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path)
    assert {(r.model, r.method): r.setting["layer_index"] for r in runs} == {
        ("tiny-llava-1.5", "VTW"): 3,
        ("tiny-llava-1.6", "VTW"): 2,
        ("tiny-llava-1.5", "FastV"): 2,
        ("tiny-llava-1.6", "FastV"): 2,
    }


# -- configs, paths and limits refused with a message -----------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"methods": {"OTPrune": {"ratios": [0.25], "env": {"BASELINE": "ORIG"}}}},
            "methods.OTPrune.env.BASELINE='ORIG' is not allowed: BASELINE is set by the method's name",
        ),
        ({"methods": {"OTPrune": {"ratios": [0.25], "env": {"SUBSET_RATIO": 1}}}}, "SUBSET_RATIO is set by the method's 'ratios'"),
        ({"methods": {"VTW": {"env": {"LAYER_INDEX": 2}}}}, "LAYER_INDEX is set by the method's 'layer_index' key"),
        ({"methods": {"VTW": {"env": {"LAYER_INDX": 2}}}}, "methods.VTW.env.LAYER_INDX is not allowed: a config's env may set only OTPRUNE_GAMMA"),
        ({"methods": {"Original": {"env": {"PYTHONPATH": "/tmp/evil"}}}}, "methods.Original.env.PYTHONPATH is not allowed"),
        ({"models": {"tiny-llava-1.5": {"OTPrune": {"env": {"LD_PRELOAD": "x.so"}}}}}, "models.tiny-llava-1.5.OTPrune.env.LD_PRELOAD is not allowed"),
        ({"models": {"tiny-llava-1.5": ["x"]}}, "models.tiny-llava-1.5=['x'] (list) is not allowed; allowed: a mapping method"),
        ({"methods": {"OTPrune": {"ratios": [0.25], "env": ["X"]}}}, "methods.OTPrune.env=['X'] (list) is not allowed; allowed: a mapping VARIABLE: value"),
        (
            {"methods": {"OTPrune": {"ratios": [0.25], "env": {"OTPRUNE_GAMMA": None}}}},
            "methods.OTPrune.env.OTPRUNE_GAMMA=None (null) is not allowed; allowed: a string or a number",
        ),
        (
            {"methods": {"DivPrune": {"ratios": [0.25], "env": {"OTPRUNE_GAMMA": 0.5}}}},
            "tiny-llava-1.5 DivPrune: OTPRUNE_GAMMA='0.5' does not apply to BASELINE=DIVPRUNE: it takes no option 'gamma'",
        ),
        ({"lmms_model": None}, "lmms_model=None (null) is not allowed; allowed: an lmms-eval model name"),
        ({"tasks": TASK}, f"tasks='{TASK}' (str) is not allowed; allowed: a list of task names"),
        ({"group_tasks": "yes"}, "group_tasks='yes' (str) is not allowed; allowed: true, false, or a list of lists of the config's tasks"),
        (
            {"group_tasks": [["nope"]]},
            "group_tasks=[['nope']] (list) is not allowed; allowed: true, false, or a list of lists of the config's tasks, each task in exactly one (nope: not in tasks)",
        ),
        ({"group_tasks": [[TASK], [TASK]]}, f"each task in exactly one ({TASK}: in more than one group)"),
        ({"group_tasks": []}, f"each task in exactly one ({TASK}: in no group)"),
        ({"methods": {"VTW": {"layer_index": "2"}}}, "methods.VTW.layer_index='2' (str) is not allowed; allowed: an integer >= 0"),
        ({"model_args": "device=cpu,pretrained=/elsewhere"}, "model_args='device=cpu,pretrained=/elsewhere' (str) is not allowed"),
    ],
)
def test_bad_config_is_a_message_naming_key_value_and_what_is_allowed(tmp_path, capsys, changes, message):
    runs = tmp_path / "runs"
    assert harness_cli.main([str(write_config(tmp_path / "bad.yaml", **changes)), "--runs-dir", str(runs)]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(f"models: [tiny-llava-1.5]\nmethods:\n  OTPrune: {{ratios: [0.1]}}\n  OTPrune: {{ratios: [0.2]}}\ntasks: [{TASK}]\n")
    assert harness_cli.main([str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "key 'OTPrune' is given twice (lines 3 and 4); give it once" in capsys.readouterr().err


@pytest.mark.parametrize(
    "limit, message",
    [("0", "--limit 0 is not allowed: it evaluates no sample"), ("-1", "--limit -1 is not allowed: it means every sample to lmms-eval")],
)
def test_limits_that_are_not_a_sample_count_are_refused(tmp_path, capsys, limit, message):
    runs = tmp_path / "runs"
    assert harness_cli.main([str(write_config(tmp_path / "c.yaml")), "--runs-dir", str(runs), "--limit", limit]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()


@pytest.mark.parametrize("flag", ["--jobs", "--num-processes"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_count_flag_below_one_is_refused_naming_flag_and_value(tmp_path, capsys, flag, value):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as stop:
        harness_cli.main([str(write_config(tmp_path / "c.yaml")), "--runs-dir", str(runs), flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: '{value}' is not allowed; give an integer >= 1" in capsys.readouterr().err
    assert not runs.exists()


def test_paths_that_lmms_eval_would_split_or_that_leave_the_runs_folder_are_refused(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert harness_cli.main([str(config), "--runs-dir", str(tmp_path / "a,b")]) == 2
    assert "contains a comma, which lmms-eval's --model_args would split" in capsys.readouterr().err
    dots = write_config(tmp_path / "...yaml")
    assert harness_cli.main([str(dots), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "config name '..' is not allowed as a folder name" in capsys.readouterr().err
    assert not (tmp_path / "a,b").exists() and not (tmp_path / "runs").exists()


def test_an_unwritable_runs_folder_names_the_path_and_the_fix(tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    assert harness_cli.main([str(write_config(tmp_path / "c.yaml")), "--runs-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {blocker}" in err and "choose a writable folder with --runs-dir, or fix its permissions" in err


# -- records and the report -------------------------------------------------------------------


def copy_fixture(tmp_path: Path) -> Path:
    """The shipped runs, each record stamped with this code's identity (as this harness writes them)."""
    runs = tmp_path / "smoke"
    shutil.copytree(FIXTURES, runs)
    stamp_records(runs)
    return runs


def test_only_a_record_marks_a_run_finished(tmp_path):
    runs = copy_fixture(tmp_path)
    folder = runs / "tiny-llava-1.5" / "OTPrune_0.098"
    assert harness_records.finished_tasks(folder) == {"otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"}
    (record,) = folder.glob("otprune_*.json")
    record.unlink()  # a harness killed before writing it: the child's results alone do not count
    assert list(folder.glob("attempts/*/*/*_results.json")) and harness_records.finished_tasks(folder) == set()


def test_a_results_file_changed_after_its_record_is_not_trusted(tmp_path):
    runs = copy_fixture(tmp_path)
    folder = runs / "tiny-llava-1.5" / "DivPrune_0.098"
    (results,) = folder.glob("attempts/*/*/*_results.json")
    data = json.loads(results.read_text())
    data["results"]["otprune_smoke_vqa"]["exact_match,none"] = 1.0
    results.write_text(json.dumps(data))
    assert harness_records.finished_tasks(folder) == set()
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    assert "changed since the record was written (SHA-256 differs)" in markdown
    assert {r["method"] for r in csv.DictReader(open(csv_path))} == {"Original", "OTPrune"}


def test_the_report_names_malformed_files_and_tables_the_rest(tmp_path, capsys):
    runs = copy_fixture(tmp_path)
    model = runs / "tiny-llava-1.5"
    (model / "Original_1" / "otprune_no_status.json").write_text(json.dumps({"tasks": [], "finished_tasks": []}))
    (model / "OTPrune_abc").mkdir()
    (model / "OTPrune_abc" / "otprune_x.json").write_text("{}")
    (model / "DPP_0.5").mkdir()
    (model / "DPP_0.5" / "setting.json").write_text(json.dumps({"model": "tiny-llava-1.5", "method": "DPP", "ratio": "abc"}))
    bad_results = model / "Random_0.5"
    setting = harness_plan.run_setting(
        harness_config.load_config("smoke"), "tiny-llava-1.5", "Random", 0.5, {"BASELINE": "RANDOM", "SUBSET_RATIO": "0.5"}, None
    )
    results = bad_results / "attempts" / "a" / "m" / "x_results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"results": {TASK: 5}}))
    (bad_results / "setting.json").write_text(json.dumps(setting))
    (bad_results / "otprune_a.json").write_text(
        json.dumps(
            {
                "status": "done",
                "tasks": [TASK],
                "finished_tasks": [TASK],
                "wall_s": 1,
                "results": {"attempts/a/m/x_results.json": hashlib.sha256(results.read_bytes()).hexdigest()},
            }
        )
    )
    (model / "DivPrune_0.098" / "otprune_list.json").write_text("[1, 2]")
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    skipped = markdown.split("## Skipped")[1]
    assert "`tiny-llava-1.5/Original_1/otprune_no_status.json`: malformed record: no 'status'" in skipped
    assert "`tiny-llava-1.5/OTPrune_abc`: no setting.json" in skipped
    assert "`tiny-llava-1.5/DPP_0.5/setting.json`: setting.json: ratio 'abc' is not a number in [0, 1]" in skipped
    assert f"`tiny-llava-1.5/Random_0.5/attempts/a/m/x_results.json`: results.{TASK} is 5, not a mapping of metrics" in skipped
    assert "`tiny-llava-1.5/DivPrune_0.098/otprune_list.json`: malformed record: not a JSON object but list" in skipped
    assert {r["method"] for r in csv.DictReader(open(csv_path))} == {"Original", "OTPrune", "DivPrune", "Random"}
    assert "warning: skipped" in capsys.readouterr().err


def test_a_limited_run_is_never_tabled_as_full(tmp_path):
    """A --limit 1 run's folder under another config's name: only its results file says limit 1."""
    runs = copy_fixture(tmp_path)
    folder = runs / "tiny-llava-1.5" / "Original_1"
    (results,) = folder.glob("attempts/*/*/*_results.json")
    data = json.loads(results.read_text())
    data["config"] = {"limit": 1.0}
    results.write_text(json.dumps(data))
    (record_path,) = folder.glob("otprune_*.json")
    record = json.loads(record_path.read_text())
    record["results"] = {name: hashlib.sha256(results.read_bytes()).hexdigest() for name in record["results"]}
    record_path.write_text(json.dumps(record))
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    assert "| Original (--limit 1) |" in markdown and "evaluated only N samples per task" in markdown
    rows = {r["method"]: r for r in csv.DictReader(open(csv_path))}
    assert rows["Original"]["limit"] == "1" and rows["OTPrune"]["limit"] == ""


def test_the_report_names_a_folder_it_cannot_write(tmp_path, capsys):
    runs = copy_fixture(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert report.main([str(runs), "--out", str(blocker / "out")]) == 2
    assert f"error: cannot write {blocker / 'out'}" in capsys.readouterr().err


def test_an_error_lmms_eval_logged_fails_the_attempt(tmp_path):
    """lmms-eval's llava_hf answers "" where generation raised (an out-of-memory, say), logs an ERROR
    and finishes with exit code 0 and a results file: the attempt must not count."""
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    result = subprocess.run(harness_cmd(config, runs), env=fake_env(FAKE_LMMS="oom"), capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "lmms-eval logged 1 x ERROR: Error CUDA out of memory. Tried to allocate 2.00 GiB in generating" in result.stdout
    folder = runs / "c" / "tiny-llava-1.5" / "Original_1"
    assert harness_records.finished_tasks(folder) == set()
    assert subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=180).returncode == 0
    assert harness_records.finished_tasks(folder) == {TASK}


@pytest.mark.parametrize("other", ["hash edited", "no identity"])
def test_results_of_other_code_are_run_again_unless_kept(tmp_path, other):
    """A record holds the code identity it ran with; one of other code (here its pruning code's hash
    edited, as after a change to a default; or none, an older harness's record) is not a finished
    run of this code, and where kept it is marked."""
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    first = subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = runs / "c" / "tiny-llava-1.5" / "Original_1"
    (path,) = folder.glob("otprune_*.json")
    record = json.loads(path.read_text())
    assert set(record["code"]) >= {"otprune", "code_sha256", "torch", "transformers", "lmms_eval"} and record["code"]["code_sha256"]
    if other == "hash edited":
        record["code"]["code_sha256"] = "0" * 16
    else:
        del record["code"]
    path.write_text(json.dumps(record))
    kept = subprocess.run(harness_cmd(config, runs, "--reuse-other-code"), env=fake_env(), capture_output=True, text=True, timeout=180)
    assert "1 runs, 1 finished before, 0 still running elsewhere, 0 to run" in kept.stdout, kept.stdout + kept.stderr
    _, _, markdown = report.write_report(runs / "c", tmp_path / "out")
    assert "| Original † |" in markdown and "Rows marked † hold results finished by other code" in markdown
    again = subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=180)
    assert "1 runs, 0 finished before, 0 still running elsewhere, 1 to run" in again.stdout, again.stdout + again.stderr
    assert "finished before with other code" in again.stdout
    assert len(list(folder.glob("otprune_*.json"))) == 2
    _, _, markdown = report.write_report(runs / "c", tmp_path / "out2")
    assert "| Original |" in markdown and "†" not in markdown  # the newest record of the task is tabled, this code's


def test_a_runs_folder_held_from_another_host_is_refused_until_its_lease_runs_out(tmp_path):
    """On a shared filesystem a kernel lock may hold only on one host: the lease names the other
    host's harness, which renews it while it lives; one not renewed for LEASE_S is taken over."""
    from otprune.harness.folder_lock import LEASE_S, FolderBusy, lock_runs_folder

    folder = tmp_path / "runs" / "c"
    folder.mkdir(parents=True)
    lease = {"host": "node-b", "pid": 4242, "started": "2026-12-03 01:00:00", "renewed": time.time() - 5}
    (folder / ".lease.json").write_text(json.dumps(lease))
    with pytest.raises(FolderBusy, match=r"another harness is writing to .* \(host node-b, pid 4242, started 2026-12-03 01:00:00, renewed 5 s ago\)"):
        lock_runs_folder(folder)
    (folder / ".lease.json").write_text(json.dumps({**lease, "renewed": time.time() - LEASE_S - 1}))
    held = lock_runs_folder(folder)
    assert json.loads((folder / ".lease.json").read_text())["pid"] == os.getpid()
    held.release()
    assert not (folder / ".lease.json").exists()


# The harness, renewing its lease every 0.2 s instead of every RENEW_S.
QUICK_RENEWAL = "import sys; import otprune.harness.folder_lock as f; f.RENEW_S = 0.2; from otprune.harness import cli; sys.exit(cli.main(sys.argv[1:]))"


def test_a_harness_whose_lease_is_taken_over_stops_writing_and_exits_saying_why(tmp_path):
    """Another host took the lease over (this harness stalled past LEASE_S): this one stops its
    child, writes nothing more there and exits non-zero, naming the new holder."""
    runs = runs_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    argv = [sys.executable, "-c", QUICK_RENEWAL, *harness_cmd(config, runs)[4:]]
    first = subprocess.Popen(argv, env=fake_env(FAKE_LMMS="sleep"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (child,) = wait_for(lambda: child_files(runs), 60, "the harness's child")
        pid = json.loads(child.read_text())["pid"]
        lease = runs / "c" / ".lease.json"
        taken = {"host": "node-b", "pid": 4242, "started": "2026-12-07 12:00:00", "renewed": time.time()}
        # The new holder lives and renews, as a live harness does: a renewal of the old holder that
        # raced the take-over between its read and its write is overwritten again.
        deadline = time.monotonic() + 60
        while first.poll() is None and time.monotonic() < deadline:
            lease.write_text(json.dumps(taken))
            time.sleep(0.05)
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode != 0
    assert f"error: the lease of {runs / 'c'} was taken over by another harness (host node-b, pid 4242" in err
    assert "stops submitting and writing there now" in err
    wait_for(lambda: not alive(pid), 15, "the child to end")
    # Nothing written after the take-over: no record of the stopped attempt; the new holder's lease stays.
    assert not list((runs / "c").rglob("otprune_*.json"))
    assert json.loads(lease.read_text()) == taken


def test_a_lease_of_a_dead_harness_on_this_host_is_taken_over(tmp_path):
    """A fresh lease on this host is honoured while its process lives and taken over once it has
    died, whatever its renewal time says; the new lease names this process, and goes with it."""
    from otprune.harness.folder_lock import FolderBusy, lock_runs_folder

    folder = tmp_path / "c"
    folder.mkdir()
    lease = folder / ".lease.json"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease.write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "started": "2026-12-07 10:00:00", "renewed": time.time()}))
        with pytest.raises(FolderBusy, match=rf"pid {alive.pid}\b"):
            lock_runs_folder(folder)
    finally:
        alive.kill()
        alive.wait()
    held = lock_runs_folder(folder)
    taken = json.loads(lease.read_text())
    assert (taken["host"], taken["pid"]) == (socket.gethostname(), os.getpid())
    assert time.time() - taken["renewed"] < 60
    held.release()
    assert not lease.exists()


def test_status_shows_a_local_run_running_the_next_not_started_then_failed_and_done(tmp_path):
    runs = runs_folder(tmp_path)
    tasks = ["otprune_smoke_vqa", "otprune_smoke_pope"]
    config = write_config(tmp_path / "c.yaml", tasks=tasks)

    def status() -> list[str]:
        shown = subprocess.run([sys.executable, "-m", "otprune", "status", str(runs / "c")], capture_output=True, text=True, timeout=60)
        # Non-zero where a run failed, as `otprune run` exits.
        assert shown.returncode == (1 if "failed" in shown.stdout.splitlines()[-1] else 0), shown.stderr
        return shown.stdout.splitlines()

    first = subprocess.Popen(harness_cmd(config, runs), env=fake_env(FAKE_LMMS="sleep"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (child,) = wait_for(lambda: child_files(runs), 60, "the harness's child")
        pid = json.loads(child.read_text())["pid"]
        lines = status()
        assert lines[0].startswith("running     tiny-llava-1.5/Original_1 otprune_smoke_vqa") and f"(local pid {pid}, elapsed" in lines[0]
        assert lines[1] == "not started tiny-llava-1.5/Original_1 otprune_smoke_pope" and lines[2] == "1 not started, 1 running"
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        first.kill()
    lines = status()
    assert lines[0].startswith("failed      tiny-llava-1.5/Original_1 otprune_smoke_vqa  (stopped with the harness (SIGTERM to the harness); log: ")
    assert lines[-1] == "1 failed, 1 not started"
    assert subprocess.run(harness_cmd(config, runs), env=fake_env(), capture_output=True, text=True, timeout=180).returncode == 0
    assert status()[-1] == "2 done"


PYRAMID = {"BASELINE": "PYRAMIDDROP", "SUBSET_RATIO": "0.5", "OTPRUNE_OPTIONS": '{"layers": [1, 2, 3]}'}


def stage_log(*stages: str) -> str:
    """One forward of PYRAMIDDROP at layers 1, 2, 3: each stage's ``before->after`` pairs."""
    return "".join(f"otprune PYRAMIDDROP at layer {layer}: visual tokens {pairs}; selector 0.1 ms\n" for layer, pairs in zip((1, 2, 3), stages))


FULL_FORWARD = stage_log("576->288", "288->144", "144->72")


@pytest.mark.parametrize(
    "log, samples, problem",
    [
        # Two prompts, each keeping 1/2, 1/4, 1/8 of 576 (hand-computed) at its three stages.
        (FULL_FORWARD * 2, 2, None),
        # A batch of two images: each stage's line lists both.
        (stage_log("576->288, 576->288", "288->144, 288->144", "144->72, 144->72"), 2, None),
        (
            stage_log("576->288", "288->144", "144->100"),
            1,
            "an image of 576 visual tokens kept 288 at layer 1, 144 at layer 2, 100 at layer 3; "
            "PYRAMIDDROP's schedule keeps 288 at layer 1, 144 at layer 2, 72 at layer 3",
        ),
        (
            stage_log("576->288", "288->144"),
            1,
            "an image of 576 visual tokens kept 288 at layer 1, 144 at layer 2; PYRAMIDDROP's schedule keeps 288 at layer 1, 144 at layer 2, 72 at layer 3",
        ),
        (FULL_FORWARD * 2, 3, "3 samples evaluated but only 2 images' selections logged"),
        # A one-stage line for a schedule of three: no stage logged.
        (
            "otprune PYRAMIDDROP: visual tokens 576->72; selector 0.1 ms",
            1,
            "an image of 576 visual tokens kept no stage; PYRAMIDDROP's schedule keeps 288 at layer 1, 144 at layer 2, 72 at layer 3",
        ),
    ],
)
def test_a_schedule_passes_the_run_check_only_where_each_stage_keeps_its_count(log, samples, problem):
    assert harness_run_check.pruning_problem(PYRAMID, harness_run_check.parse_prune_log(log), samples) == problem


def test_a_schedules_log_gives_each_image_its_first_and_last_count_and_every_stage():
    log = harness_run_check.parse_prune_log(FULL_FORWARD + stage_log("576->288, 576->288", "288->144, 288->144", "144->72, 144->72"))
    assert log["visual_tokens"] == [[576, 72]] * 3
    assert log["stage_tokens"] == [[[1, 288], [2, 144], [3, 72]]] * 3
    assert len(log["selector_ms"]) == 6
    assert harness_run_check.parse_prune_log("otprune OURS: visual tokens 576->56; selector 0.1 ms")["stage_tokens"] == []


# -- calibration steps ------------------------------------------------------------------------

SHIPPED_RECIPE = ROOT / "configs" / "recipes" / "fitprune_synth-llava-1.5.json"
CALIBRATION = {"method": "FitPrune", "model": "tiny-llava-1.5", "tasks": [TASK], "limit": 1, "ratio": 0.5}


def calibrated_config(path: Path, **calibration_changes) -> Path:
    return write_config(
        path,
        methods={"FitPrune": {"ratios": [0.5], "options": {"recipe": {"calibration": "half"}}}},
        calibrations={"half": {**CALIBRATION, **calibration_changes}},
    )


def test_a_calibration_step_is_planned_first_until_its_recipe_exists(tmp_path, capsys):
    config, runs = calibrated_config(tmp_path / "c.yaml"), tmp_path / "runs"
    (step,) = harness_plan.plan_calibrations(harness_config.load_config(str(config)), runs)
    recipe = step.recipe
    assert recipe.parent == runs / "c" / "calibrations" and recipe.name.startswith("half_")
    (run,) = harness_plan.plan_runs(harness_config.load_config(str(config)), runs)
    assert run.setting == {} and json.loads(run.env["OTPRUNE_OPTIONS"]) == {"recipe": str(recipe)}
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 calibration(s) first (here, one lmms-eval invocation each), then 1 runs" in out
    assert (
        f"[calibration half] otprune calibrate fitprune tiny-llava-1.5 --tasks {TASK} --limit 1 --ratio 0.5 --out {recipe} "
        f"--runs-dir {runs} --lmms-model llava --model-args device=cpu"
    ) in out
    recipe.parent.mkdir(parents=True)
    shutil.copy(SHIPPED_RECIPE, recipe)
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 runs" in out and "[calibration half]" not in out
    # An edited calibration is another recipe, calibrated again.
    (edited,) = harness_plan.plan_calibrations(harness_config.load_config(str(calibrated_config(config, limit=2))), runs)
    assert edited.recipe != recipe and not edited.recipe.exists()


def test_a_runs_setting_holds_its_calibrated_recipes_content(tmp_path):
    config, runs = calibrated_config(tmp_path / "c.yaml"), tmp_path / "runs"
    (step,) = harness_plan.plan_calibrations(harness_config.load_config(str(config)), runs)
    recipe = step.recipe
    recipe.parent.mkdir(parents=True)
    shutil.copy(SHIPPED_RECIPE, recipe)
    (run,) = harness_plan.plan_runs(harness_config.load_config(str(config)), runs)
    assert run.setting["recipe_sha256"] == hashlib.sha256(SHIPPED_RECIPE.read_bytes()).hexdigest()
    edited = json.loads(recipe.read_text())
    edited["drops"] = [100, 0, 0, 0]
    recipe.write_text(json.dumps(edited))
    (recalibrated,) = harness_plan.plan_runs(harness_config.load_config(str(config)), runs)
    assert recalibrated.setting["hash"] != run.setting["hash"] and recalibrated.env == run.env


def test_a_run_calibrates_first_then_runs_with_the_recipe_written(tmp_path, monkeypatch):
    from otprune import calibrate

    calls = []

    def write_the_shipped_recipe(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED_RECIPE, out)
        return 0

    monkeypatch.setattr(calibrate, "main", write_the_shipped_recipe)
    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    config, runs = calibrated_config(tmp_path / "c.yaml"), runs_folder(tmp_path)
    # The stand-in model gives FitPrune no attention, so the run itself fails, after its start.
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--no-report"]) == 1
    assert [argv[:2] for argv in calls] == [["fitprune", "tiny-llava-1.5"]]
    (recipe,) = (runs / "c" / "calibrations").glob("half_*.json")
    run = runs / "c" / "tiny-llava-1.5" / "FitPrune_0.5"
    assert json.loads((run / "setting.json").read_text())["recipe_sha256"] == hashlib.sha256(SHIPPED_RECIPE.read_bytes()).hexdigest()
    (log,) = run.glob("attempts/*/lmms_eval.log")
    assert f'OTPRUNE_OPTIONS={{"recipe": "{recipe}"}}' in log.read_text().splitlines()[0]


def test_a_failed_calibration_starts_no_run(tmp_path, monkeypatch, capsys):
    from otprune import calibrate

    monkeypatch.setattr(calibrate, "main", lambda argv: 1)
    config, runs = calibrated_config(tmp_path / "c.yaml"), runs_folder(tmp_path)
    assert harness_cli.main([str(config), "--runs-dir", str(runs), "--no-report"]) == 1
    assert "calibration half failed (above); no run started" in capsys.readouterr().err
    assert not (runs / "c" / "tiny-llava-1.5").exists()


@pytest.mark.parametrize(
    "methods, calibrations, message",
    [
        (
            {"FitPrune": {"ratios": [0.5], "options": {"recipe": {"calibration": "nope"}}}},
            {"half": CALIBRATION},
            "methods.FitPrune.options.recipe={'calibration': 'nope'} (dict) is not allowed; allowed: a file named from the config's folder, "
            "or {calibration: NAME} of calibrations: half",
        ),
        (
            {"Original": {}},
            {"half": {**CALIBRATION, "model": "tiny-llava-1.6"}},
            "calibrations.half.model='tiny-llava-1.6' (str) is not allowed; allowed: a model of the config's models: tiny-llava-1.5",
        ),
        (
            {"Original": {}},
            {"half": {k: v for k, v in CALIBRATION.items() if k != "ratio"}},
            "calibrations.half budget=[] (list) is not allowed; allowed: exactly one of tflop (a number > 0) and ratio (a number in (0, 1))",
        ),
        ({"Original": {}}, {"half": {**CALIBRATION, "ratio": 1.5}}, "calibrations.half.ratio=1.5 (float) is not allowed; allowed: the budget as a share"),
        ({"Original": {}}, {"half": {**CALIBRATION, "method": "OTPrune"}}, "calibrations.half.method='OTPrune' (str) is not allowed; allowed: one of FitPrune"),
        (
            {"Original": {}},
            {"half": {**CALIBRATION, "limits": 2}},
            "calibrations.half has unknown key(s) limits; allowed: limit, method, model, ratio, tasks, tflop",
        ),
        ({"Original": {}}, {"half": {k: v for k, v in CALIBRATION.items() if k != "tasks"}}, "calibrations.half has no 'tasks'; give a list of task names"),
        (
            {"FitPrune": {"ratios": [0.5], "models": ["tiny-llava-1.6"], "options": {"recipe": {"calibration": "half"}}}},
            {"half": CALIBRATION},
            "methods.FitPrune.models=['tiny-llava-1.6'] (list) is not allowed; allowed: models of the config's models: tiny-llava-1.5",
        ),
    ],
)
def test_a_bad_calibration_is_refused_naming_key_value_and_what_is_allowed(tmp_path, capsys, methods, calibrations, message):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "bad.yaml", methods=methods, calibrations=calibrations)
    assert harness_cli.main([str(config), "--runs-dir", str(runs)]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()


def test_a_calibration_of_another_model_is_refused_for_a_models_run(tmp_path):
    config = write_config(
        tmp_path / "other.yaml",
        models=["tiny-llava-1.5", "tiny-llava-1.6"],
        methods={"FitPrune": {"ratios": [0.5], "options": {"recipe": {"calibration": "half"}}}},
        calibrations={"half": CALIBRATION},
    )
    with pytest.raises(harness_errors.ConfigError, match=r"tiny-llava-1.6 FitPrune names calibration 'half', made for tiny-llava-1.5"):
        harness_config.load_config(str(config))


@pytest.mark.slow
def test_a_config_calibrates_fitprune_on_the_trained_model_then_runs_it_with_the_recipe(tmp_path):
    """End to end, real lmms-eval: the calibration step writes a recipe meeting its budget, and the
    FitPrune run applies it (its run check verifies every stage's count)."""
    task = "otprune_synth_yesno"
    config = write_config(
        tmp_path / "e2e.yaml",
        model_args="device=cpu,device_map=auto",
        models=["synth-llava-1.5"],
        methods={"FitPrune": {"ratios": [0.5], "options": {"recipe": {"calibration": "half"}}}},
        calibrations={"half": {"method": "FitPrune", "model": "synth-llava-1.5", "tasks": [task], "limit": 1, "ratio": 0.5}},
        tasks=[task],
    )
    runs = tmp_path / "runs"
    done = subprocess.run(harness_cmd(config, runs, "--limit", "1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (recipe_file,) = (runs / "e2e" / "calibrations").glob("half_*.json")
    recipe = json.loads(recipe_file.read_text())
    assert recipe["tflop"] <= recipe["budget"]["tflop"] == pytest.approx(0.5 * recipe["budget"]["unpruned_tflop"])
    run = runs / "e2e_limit1" / "synth-llava-1.5" / "FitPrune_0.5"
    assert json.loads((run / "setting.json").read_text())["recipe_sha256"] == hashlib.sha256(recipe_file.read_bytes()).hexdigest()
    assert harness_records.finished_tasks(run) == {task}
