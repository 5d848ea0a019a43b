"""The Slurm executor: each attempt is one Slurm job, all of one invocation an array capped at
``max_parallel`` running at once, submitted with submitit. The job runs the attempt's
``execute`` on the node (the same command, environment, checks and record as a local run) and
writes its record beside the run on the shared filesystem; the harness never reads results from
the scheduler, only whether a job is still queued or running.

Two things submitit does not do here, and why: a job's state comes from ``squeue``, not
submitit's ``sacct`` watcher, which needs Slurm's accounting database (many clusters have it; a
single-node cluster without slurmdbd does not) and which would say nothing the record does not;
and each submission is written to ``job_<tasks>.json`` in the run folder, so that a later
``otprune run`` or ``otprune status`` from any host knows which job is doing what.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from otprune.harness.attempt import Attempt, execute
from otprune.harness.catalogue import MODELS
from otprune.harness.code_identity import otprune_copy
from otprune.harness.errors import ConfigError
from otprune.harness.executors import Outcome
from otprune.harness.files import read_results, write_atomically
from otprune.harness.plan import Run, child_env, describe, task_key
from otprune.harness.processes import Children

ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT")
POLL_S = 10.0


class SubmissionFailed(RuntimeError):
    """Slurm refused the submission (a partition, account, GPU or memory request it cannot meet)."""


@dataclass(frozen=True)
class SlurmOptions:
    """What the jobs ask of Slurm. ``gpus_per_job``: None = one per lmms-eval process."""

    partition: str | None = None
    gpus_per_job: int | None = None
    time: int = 240
    mem: int | None = None
    account: str | None = None
    qos: str | None = None
    max_parallel: int = 8
    setup: str | None = None


def slurm_parameters(options: SlurmOptions, num_processes: int, job_name: str, on_gpus: bool = True) -> dict:
    """submitit.SlurmExecutor parameters of the jobs. What is left out is the cluster's default
    (CPUs, and memory when not given). ``on_gpus``: False for the tiny models, which run on CPUs
    and by default ask for no GPU."""
    gpus = (num_processes if on_gpus else 0) if options.gpus_per_job is None else options.gpus_per_job
    if 0 < gpus < num_processes:
        raise ConfigError(
            f"{gpus} GPUs per job (--slurm-gpus-per-job, or the config's executor.gpus_per_job) is fewer than the "
            f"{num_processes} lmms-eval processes of a run (--num-processes; one GPU each); allowed: 0 or at least {num_processes}"
        )
    parameters = {"job_name": job_name, "time": options.time, "array_parallelism": options.max_parallel, "stderr_to_stdout": True}
    if gpus:
        parameters["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos"):
        if getattr(options, key):
            parameters[key] = getattr(options, key)
    if options.mem:
        parameters["mem"] = f"{options.mem}GB"
    if options.setup:
        parameters["setup"] = [line for line in options.setup.splitlines() if line.strip()]
    return parameters


def job_path(folder: Path, tasks) -> Path:
    """The last submission of a run folder's ``tasks``: job id, when, the Slurm log folder."""
    return folder / f"job_{task_key(tasks)}.json"


class SlurmAttempt:
    """The callable a job runs. submitit requeues it where Slurm preempts it (``checkpoint``: the
    same attempt in a fresh attempt folder); a job out of time is not requeued, since it would only
    start from scratch: it ends failed, and the next ``otprune run`` resubmits it."""

    def __init__(self, attempt: Attempt):
        self.attempt = attempt

    def __call__(self) -> str:
        # The node's own view of the code (its setup lines may activate another environment).
        attempt = self.attempt
        attempt = dataclasses.replace(attempt, otprune=otprune_copy(child_env(attempt.run, attempt.jobs)))
        record = execute(attempt, Children("slurm"))
        return record["status"] if record else "not started"

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmAttempt(self.attempt))


def recorded_job_ids(folders) -> list[str]:
    """The job ids the submissions in run ``folders`` recorded (``job_*.json``)."""
    return sorted({str(read_results(path).get("job_id")) for folder in folders for path in Path(folder).glob("job_*.json")} - {"None"})


def scheduler_jobs(job_ids) -> dict[str, dict]:
    """Of ``job_ids`` (the ones this runs folder recorded), those Slurm still holds: ``{job id:
    {state, elapsed}}`` (array tasks as ``A_i``). Asked by id, not by user: in a shared runs folder
    another user's job is still running, not ended."""
    ids = sorted({str(job_id) for job_id in job_ids})
    if not ids:
        return {}
    if shutil.which("squeue") is None:
        raise RuntimeError("squeue is not on PATH: the Slurm client is not installed here")
    done = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%M"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        # squeue refuses a list of which Slurm holds none any more: all of them have ended.
        if "Invalid job id" in done.stderr:
            return {}
        raise RuntimeError(f"squeue failed: {done.stderr.strip() or done.returncode}")
    jobs = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jobs[parts[0]] = {"state": parts[1], "elapsed": parts[2]}
    return jobs


def active_job(folder: Path, tasks, jobs: dict[str, dict]) -> dict | None:
    """The last submission of a run folder's ``tasks`` when Slurm still holds it queued or running
    (``jobs``: :func:`scheduler_jobs`), with its state."""
    submission = read_results(job_path(folder, tasks))
    state = jobs.get(str(submission.get("job_id")))
    if state and state["state"] in ACTIVE:
        return {**submission, **state}
    return None


def submit(attempts: list[Attempt], options: SlurmOptions, folder: Path) -> dict[str, str]:
    """Submit ``attempts`` as one array; returns ``{job id: what it runs}``."""
    import submitit

    # max_num_timeout=0: a run that outlives --slurm-time would only start from scratch again;
    # preemption still requeues it (submitit's checkpoint, unlimited).
    executor = submitit.SlurmExecutor(folder=folder / "%j", python=shlex.quote(sys.executable), max_num_timeout=0)
    on_gpus = any(MODELS[attempt.run.model].tiny is None for attempt in attempts)
    executor.update_parameters(**slurm_parameters(options, attempts[0].num_processes, f"otprune-{folder.parent.name}", on_gpus))
    try:
        with executor.batch():
            jobs = [executor.submit(SlurmAttempt(attempt)) for attempt in attempts]
    except submitit.core.utils.FailedJobError as error:
        raise SubmissionFailed(f"sbatch refused the jobs: {str(error).strip()}") from None
    submitted = {}
    for attempt, job in zip(attempts, jobs):
        run = attempt.run
        write_atomically(
            job_path(run.folder, attempt.planned_tasks or run.tasks),
            json.dumps(
                {
                    "job_id": job.job_id,
                    "executor": "slurm",
                    "tasks": list(run.tasks),
                    "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "submitted_at": time.time(),
                    "slurm_log": str(job.paths.folder),
                    "options": options.__dict__,
                }
            )
            + "\n",
        )
        submitted[job.job_id] = describe(run)
    return submitted


def job_end(run: Run, job_id: str) -> dict | None:
    """The newest record job ``job_id`` wrote for ``run`` (a requeued job writes one per start)."""
    newest = None
    for path in sorted(run.folder.glob("otprune_*.json")):
        record = read_results(path)
        if record.get("slurm_job_id") == job_id and record.get("tasks") == list(run.tasks):
            newest = record
    return newest


def run_slurm(attempts: list[Attempt], options: SlurmOptions, folder: Path, wait: bool, poll_s: float = POLL_S) -> Outcome:
    """Submit; print the job ids; with ``wait``, wait until Slurm holds none of them and report
    how each ended, from the records the jobs wrote."""
    submitted = submit(attempts, options, folder)
    for job_id, what in submitted.items():
        print(f"submitted {job_id}: {what}", flush=True)
    outcome = Outcome()
    if not wait:
        print(
            f"{len(submitted)} job(s) submitted; `otprune status {folder.parent}` shows them, `otprune run` again resubmits only what did not finish",
            flush=True,
        )
        return outcome
    last = {}
    while True:
        try:
            jobs = scheduler_jobs(submitted)
        except RuntimeError as error:
            print(f"warning: {error}; asking again in {poll_s:.0f} s", file=sys.stderr, flush=True)
            time.sleep(poll_s)
            continue
        states = {job_id: jobs[job_id]["state"] for job_id in submitted if job_id in jobs and jobs[job_id]["state"] in ACTIVE}
        for job_id, state in states.items():
            if last.get(job_id) != state:
                print(f"{job_id} {state}: {submitted[job_id]}", flush=True)
        last = states
        if not states:
            break
        time.sleep(poll_s)
    for attempt, job_id in zip(attempts, submitted):
        run = attempt.run
        record = job_end(run, job_id)
        if record and record.get("status") == "done":
            print(f"{job_id} done in {record['wall_s']:.1f} s: {describe(run)}", flush=True)
            continue
        reason = record.get("reason") if record else "the job ended without a record (cancelled, timed out, killed or its node failed)"
        log = (
            run.folder / record["log"]
            if record and record.get("log")
            else Path(read_results(job_path(run.folder, attempt.planned_tasks or run.tasks)).get("slurm_log", folder))
        )
        print(f"{job_id} FAILED: {describe(run)} ({reason}); log: {log}", flush=True)
        outcome.failed.append(attempt)
    return outcome
