"""``otprune status RUNS_DIR``: each run's state from its records, its children and Slurm.

    otprune status runs/synth_limit3

- done: a trusted record holds every task (said when it was other code than this otprune's, which
  ``otprune run`` runs again);
- failed: the newest record's reason and log, or a Slurm job that ended without a record;
- queued / running: a Slurm job Slurm still holds (job id, elapsed), or a local lmms-eval child alive on
  this host (pid, elapsed);
- not started: planned (``plan.json``, written by ``otprune run``) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from otprune.harness.code_identity import current_code
from otprune.harness.executors.slurm import active_job, job_path, recorded_job_ids, scheduler_jobs
from otprune.harness.files import read_results
from otprune.harness.processes import stale_children
from otprune.harness.records import finished_tasks, load_records


def planned(runs_dir: Path) -> list[dict]:
    """The runs of the folder: ``plan.json``'s, else every run folder's records' task groups."""
    try:
        plan = json.loads((runs_dir / "plan.json").read_text())
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, list):
        return [{"folder": runs_dir / item["folder"], "tasks": tuple(item["tasks"])} for item in plan if isinstance(item, dict)]
    groups = {}
    for setting in sorted(runs_dir.glob("*/*/setting.json")):
        for _, record in load_records(setting.parent)[0]:
            groups[(setting.parent, tuple(record["tasks"]))] = None
    return [{"folder": folder, "tasks": tasks} for folder, tasks in groups]


QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING")


def run_state(folder: Path, tasks: tuple, jobs: dict, children: list[dict], code: dict | None) -> tuple[str, str]:
    """``(state, detail)`` of one run's task group; ``code``: this otprune's code identity (a task
    done by other code is run again by ``otprune run``, and said so here)."""
    job = active_job(folder, tasks, jobs)
    if job:
        state = "queued" if job["state"] in QUEUED else "running"
        return state, f"Slurm job {job['job_id']} {job['state']}, elapsed {job['elapsed']}"
    for child in children:
        if Path(child["folder"]).resolve() == folder.resolve() and set(child.get("tasks", [])) & set(tasks):
            started = Path(child["attempt"]) / "child.json"
            elapsed = time.time() - started.stat().st_mtime if started.exists() else 0
            return "running", f"local pid {child['pid']}, elapsed {elapsed:.0f} s"
    records = [(path, record) for path, record in load_records(folder)[0] if set(record["tasks"]) & set(tasks)] if folder.exists() else []
    done = [record for _, record in records if record["status"] == "done"]
    if set(tasks) <= {task for record in done for task in record["finished_tasks"]}:
        newest = done[-1]
        detail = f"{newest.get('wall_s', 0):.0f} s, {newest.get('executor', 'local')}" + (
            f" job {newest['slurm_job_id']}" if newest.get("slurm_job_id") else ""
        )
        if code is not None and not set(tasks) <= finished_tasks(folder, code):
            detail += "; by other code: `otprune run` runs it again (--reuse-other-code keeps it)"
        return "done", detail
    failed = [(path, record) for path, record in records if record["status"] != "done"]
    submission = read_results(job_path(folder, tasks))
    newest_failure = failed[-1][0].stat().st_mtime if failed else 0
    if submission and float(submission.get("submitted_at", 0)) > newest_failure:
        if not any(r.get("slurm_job_id") == submission.get("job_id") for _, r in records):
            return "failed", (
                f"Slurm job {submission.get('job_id')} ended without a record (cancelled, timed out or killed); log: {submission.get('slurm_log')}"
            )
    if failed:
        newest = failed[-1][1]
        return "failed", f"{newest.get('reason')}; log: {folder / str(newest.get('log'))}"
    return "not started", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="otprune status", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a config's runs folder, e.g. runs/synth")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"error: {runs_dir} is not a folder; give a config's runs folder, e.g. runs/synth", file=sys.stderr)
        return 2
    runs = planned(runs_dir)
    if not runs:
        print(f"error: {runs_dir} holds no runs of this harness (no plan.json, no run folder with records)", file=sys.stderr)
        return 2
    try:
        jobs = scheduler_jobs(recorded_job_ids(runs_dir.glob("*/*")))
    except RuntimeError as error:
        print(f"warning: {error}; Slurm jobs are shown as ended", file=sys.stderr)
        jobs = {}
    children = stale_children(runs_dir)
    code = current_code()
    counts: dict[str, int] = {}
    for item in runs:
        state, detail = run_state(item["folder"], item["tasks"], jobs, children, code)
        counts[state] = counts.get(state, 0) + 1
        name = f"{item['folder'].relative_to(runs_dir)} {','.join(item['tasks'])}"
        print(f"{state:<11} {name}" + (f"  ({detail})" if detail else ""))
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    # As `otprune run`: a failed run is an exit status a script can see.
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
