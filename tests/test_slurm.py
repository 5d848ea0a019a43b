"""The Slurm executor: the job parameters (no cluster), and on a real Slurm (scripts/slurm_cluster.sh
starts a single-node one on localhost) a pruned run's scores equal to the local executor's (the slow
tier: the whole synth default's), a cancelled job resubmitted and finished with every sample
recorded once, a failing job reported with its log, and ``otprune status`` following jobs from
queued to done.

The cluster tests skip where no Slurm answers, except where REQUIRE_SLURM=1 (CI): there
they fail."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_harness_runs import fake_env, runs_folder, wait_for

from otprune.harness import cli as harness_cli
from otprune.harness.config import load_config
from otprune.harness.errors import ConfigError
from otprune.harness.executors.slurm import SlurmOptions, slurm_parameters
from otprune.harness.plan import plan_runs

ROOT = Path(__file__).resolve().parents[1]


# -- the job parameters, no cluster ------------------------------------------------------------


def sbatch_text(parameters: dict, jobs: int, folder: Path) -> str:
    """The sbatch script submitit writes for an array of ``jobs`` with ``parameters``."""
    submitit = pytest.importorskip("submitit")
    parameters = {k: v for k, v in parameters.items()}
    return submitit.slurm.slurm._make_sbatch_string(command="python -m job", folder=folder, map_count=jobs, **parameters)


def test_a_gpu_run_asks_one_gpu_per_lmms_eval_process_and_caps_the_array(tmp_path):
    options = SlurmOptions(partition="gpu", time=90, mem=64, account="lab", qos="high", max_parallel=3, setup="module load cuda\nsource venv/bin/activate")
    text = sbatch_text(slurm_parameters(options, num_processes=2, job_name="otprune-paper"), 10, tmp_path)
    for line in (
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --array=0-9%3",
        "#SBATCH --time=90",
        "#SBATCH --mem=64GB",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --job-name=otprune-paper",
    ):
        assert line in text.splitlines(), (line, text)
    setup = text.split("# setup\n")[1].splitlines()[:2]
    assert setup == ["module load cuda", "source venv/bin/activate"]


def test_a_cpu_run_asks_no_gpu_and_an_explicit_count_wins(tmp_path):
    assert "gpus-per-node" not in sbatch_text(slurm_parameters(SlurmOptions(), 1, "x", on_gpus=False), 2, tmp_path)
    assert "#SBATCH --gpus-per-node=4" in sbatch_text(slurm_parameters(SlurmOptions(gpus_per_job=4), 2, "x"), 2, tmp_path)
    with pytest.raises(ConfigError, match="1 GPUs per job .* is fewer than the 2 lmms-eval processes"):
        slurm_parameters(SlurmOptions(gpus_per_job=1), 2, "x")


def test_the_config_block_sets_the_executor_and_a_flag_wins(tmp_path):
    path = tmp_path / "c.yaml"
    spec = yaml.safe_load((ROOT / "configs" / "synth.yaml").read_text())
    spec["executor"] = {"name": "slurm", "partition": "a100", "time": 30, "max_parallel": 4}
    path.write_text(yaml.safe_dump(spec))
    config = load_config(str(path))
    args = harness_cli.parse_args([str(path), "--slurm-time", "45"])
    assert harness_cli.slurm_options(config, args) == SlurmOptions(partition="a100", time=45, max_parallel=4)
    spec["executor"] = {"name": "pbs"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"executor.name='pbs' \(str\) is not allowed; allowed: one of local, slurm"):
        load_config(str(path))
    spec["executor"] = {"name": "slurm", "gpus": 2}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="executor has unknown key 'gpus'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--executor", "slurm", "--slurm-time", "0"], "--slurm-time 0 is not allowed; allowed: an integer >= 1"),
        (["--executor", "slurm", "--slurm-partition", " "], "--slurm-partition ' ' is not allowed; allowed: a non-empty partition"),
        (["--executor", "slurm", "--jobs", "2"], "--slurm-max-parallel caps the jobs at once"),
        (
            ["--executor", "slurm", "--slurm-gpus-per-job", "1", "--num-processes", "2"],
            "1 GPUs per job (--slurm-gpus-per-job, or the config's executor.gpus_per_job) is fewer than the 2 lmms-eval processes",
        ),
        (["--slurm-partition", "gpu", "--wait"], "--slurm-partition, --wait only apply with --executor slurm (the executor here: local)"),
    ],
)
def test_bad_slurm_flags_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    assert harness_cli.main(["synth", *argv, "--runs-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# -- a real Slurm ------------------------------------------------------------------------------


def slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return done.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in done.stdout.splitlines())


@pytest.fixture(scope="module")
def cluster():
    if not slurm_answers():
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail("no Slurm answers: bash scripts/slurm_cluster.sh start")
        pytest.skip("no Slurm answers here (bash scripts/slurm_cluster.sh start, as root, starts one)")
    pytest.importorskip("submitit")


def otprune(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otprune", *args], capture_output=True, text=True, timeout=timeout, env=env)


def scores(table: Path) -> list[dict]:
    """Table 1's rows without what a machine's speed changes."""
    rows = list(csv.DictReader(table.open()))
    return [{k: v for k, v in row.items() if not k.startswith(("latency", "wall", "peak"))} for row in rows]


@pytest.mark.slow
def test_the_synth_default_on_slurm_scores_as_the_local_executor(cluster, tmp_path):
    slurm = otprune("run", "synth", "--limit", "3", "--executor", "slurm", "--wait", "--runs-dir", str(tmp_path / "slurm"))
    assert slurm.returncode == 0, slurm.stdout[-3000:] + slurm.stderr[-3000:]
    local = otprune("run", "synth", "--limit", "3", "--jobs", "2", "--runs-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    planned = len(plan_runs(load_config("synth"), tmp_path))
    on_slurm = scores(tmp_path / "slurm" / "synth_limit3" / "table1.csv")
    assert len(on_slurm) == planned and on_slurm == scores(tmp_path / "local" / "synth_limit3" / "table1.csv")
    records = [json.loads(p.read_text()) for p in (tmp_path / "slurm" / "synth_limit3").glob("*/*/otprune_*.json")]
    assert len(records) == planned and all(r["executor"] == "slurm" and r["slurm_job_id"] for r in records)


def test_a_pruned_run_on_slurm_scores_as_the_local_executor(cluster, tmp_path):
    """The fast tier's Slurm = local: one pruned run of the unchanged lmms-eval (tiny LLaVA-1.5,
    OTPrune at 0.098, two smoke tasks, --limit 2) on each executor; the slow tier runs the whole
    synth default the same way."""
    config = tmp_path / "one.yaml"
    spec = {
        "model_args": "device=cpu,device_map=auto",
        "models": ["tiny-llava-1.5"],
        "methods": {"OTPrune": {"ratios": [0.098]}},
        "tasks": ["otprune_smoke_vqa", "otprune_smoke_pope"],
        "group_tasks": True,
    }
    config.write_text(yaml.safe_dump(spec))
    slurm = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--wait", "--runs-dir", str(tmp_path / "slurm"))
    assert slurm.returncode == 0, slurm.stdout[-3000:] + slurm.stderr[-3000:]
    local = otprune("run", str(config), "--limit", "2", "--runs-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    on_slurm = scores(tmp_path / "slurm" / "one_limit2" / "table1.csv")
    assert [row["method"] for row in on_slurm] == ["OTPrune"]
    assert on_slurm == scores(tmp_path / "local" / "one_limit2" / "table1.csv")
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "slurm" / "one_limit2").glob("*/*/otprune_*.json")]
    assert record["executor"] == "slurm" and record["slurm_job_id"] and record["status"] == "done"
    assert record["visual_tokens"] and all(pair == [576, 56] for pair in record["visual_tokens"])


def tiny_runs(tmp_path: Path, tasks: list[str]) -> tuple[Path, Path]:
    """A config of two tasks (two jobs) on tiny-llava-1.5, and a runs folder whose checkpoint counts
    as built: the stand-in never loads it; the real lmms-eval fails to (a bad model path)."""
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({"model_args": "device=cpu", "models": ["tiny-llava-1.5"], "methods": {"OTPrune": {"ratios": [0.25]}}, "tasks": tasks}))
    return config, runs_folder(tmp_path)


def states(runs_dir: Path) -> dict[str, str]:
    shown = otprune("status", str(runs_dir), timeout=120)
    assert shown.returncode == (1 if "failed" in shown.stdout.splitlines()[-1] else 0), shown.stderr
    return {line.split()[2]: line.split()[0] for line in shown.stdout.splitlines()[:-1]}


def test_a_cancelled_job_is_resubmitted_and_every_sample_recorded_once(cluster, tmp_path):
    tasks = ["otprune_smoke_vqa", "otprune_smoke_pope"]
    config, runs = tiny_runs(tmp_path, tasks)
    label = runs / "two_limit2"
    # One job at a time, each sleeping in the stand-in: the first runs while the second is queued.
    submitted = otprune(
        "run", str(config), "--limit", "2", "--executor", "slurm", "--slurm-max-parallel", "1", "--runs-dir", str(runs), env=fake_env(FAKE_LMMS="sleep")
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert submitted.stdout.count("submitted ") == 2
    wait_for(lambda: sorted(states(label).values()) == ["queued", "running"], 60, "one job running, one queued")
    again = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--runs-dir", str(runs), env=fake_env())
    assert again.returncode == 0 and again.stdout.count("not submitting it again") == 2 and "submitted " not in again.stdout, again.stdout
    job_ids = [json.loads(p.read_text())["job_id"] for p in label.glob("*/*/job_*.json")]
    subprocess.run(["scancel", *job_ids], check=True, timeout=60)
    wait_for(lambda: set(states(label).values()) == {"failed"}, 90, "both jobs to end as failed")
    finished = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--wait", "--no-report", "--runs-dir", str(runs), env=fake_env())
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert set(states(label).values()) == {"done"}
    folder = label / "tiny-llava-1.5" / "OTPrune_0.25"
    done = [r for r in map(json.loads, (p.read_text() for p in folder.glob("otprune_*.json"))) if r["status"] == "done"]
    assert sorted(task for r in done for task in r["finished_tasks"]) == sorted(tasks)
    assert all(r["samples"] == {r["tasks"][0]: 2} and len(r["visual_tokens"]) == 2 for r in done)


def test_a_failing_job_is_reported_failed_with_its_log(cluster, tmp_path):
    config, runs = tiny_runs(tmp_path, ["otprune_smoke_vqa"])
    failed = otprune("run", str(config), "--limit", "1", "--executor", "slurm", "--wait", "--no-report", "--runs-dir", str(runs))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    line = next(line for line in failed.stdout.splitlines() if " FAILED: " in line)
    log = Path(line.rsplit("; log: ", 1)[1])
    assert "no results file for otprune_smoke_vqa" in line and log.is_file() and log.name == "lmms_eval.log"
    assert "Traceback" in log.read_text() or "Error" in log.read_text()
    shown = otprune("status", str(runs / "two_limit1"), timeout=120)
    assert shown.returncode == 1 and shown.stdout.startswith("failed ") and f"log: {log}" in shown.stdout


def test_a_requeued_job_runs_its_attempt_again_and_finishes(cluster, tmp_path):
    """What Slurm does to a preempted job (PreemptMode=REQUEUE), done by hand: the running job is
    requeued under its id, starts again, and the run finishes once."""
    config, runs = tiny_runs(tmp_path, ["otprune_smoke_vqa"])
    label = runs / "two_limit2"
    env = fake_env(FAKE_LMMS="sleep-once", FAKE_LMMS_MARKER=str(tmp_path / "slept"))
    submitted = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--runs-dir", str(runs), env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for(lambda: (tmp_path / "slept").exists() and set(states(label).values()) == {"running"}, 60, "the job to run")
    (job,) = [json.loads(p.read_text())["job_id"] for p in label.glob("*/*/job_*.json")]
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    wait_for(lambda: set(states(label).values()) == {"done"}, 180, "the requeued job to finish")
    folder = label / "tiny-llava-1.5" / "OTPrune_0.25"
    records = [json.loads(p.read_text()) for p in folder.glob("otprune_*.json")]
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == 1 and done[0]["slurm_job_id"] == job and done[0]["samples"] == {"otprune_smoke_vqa": 2}


def test_another_users_job_in_a_shared_runs_folder_is_not_taken_for_ended(cluster, tmp_path):
    """A runs folder shared by two users: the job one of them submitted is asked for by its id, so
    the other sees it queued or running, and does not submit it again."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("submitting as another user needs root and runuser")
    config, runs = tiny_runs(tmp_path, ["otprune_smoke_vqa"])
    label = runs / "two_limit2"
    submitted = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--runs-dir", str(runs), env=fake_env(FAKE_LMMS="sleep"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (path,) = label.glob("*/*/job_*.json")
    submission = json.loads(path.read_text())
    subprocess.run(["scancel", submission["job_id"]], check=True, timeout=60)
    # The other user's job, standing in for the submission the folder records.
    theirs = subprocess.run(
        ["runuser", "-u", "nobody", "--", "sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    try:
        path.write_text(json.dumps({**submission, "job_id": theirs}))
        assert set(states(label).values()) <= {"queued", "running"}, states(label)
        again = otprune("run", str(config), "--limit", "2", "--executor", "slurm", "--runs-dir", str(runs), env=fake_env())
        assert again.returncode == 0 and f"Slurm job {theirs}" in again.stdout and "submitted " not in again.stdout, again.stdout + again.stderr
    finally:
        subprocess.run(["scancel", theirs], timeout=60)
