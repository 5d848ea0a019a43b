"""``otprune run``: every (model, method, ratio, task) of an experiment config through lmms-eval,
resumably, on this machine or on a Slurm cluster.

    otprune run [CONFIG] [--num-processes N] [--jobs N] [--limit N] [--runs-dir DIR] [--dry-run]
                [--no-report] [--executor local|slurm] [--slurm-... ] [--wait] [--reuse-other-code]

CONFIG is a name in configs/ (``synth``, ``smoke``, ``paper_table1``) or a path to a YAML file;
without it, ``paper_table1`` runs when a GPU and the Hugging Face hub (or a local cache) are there,
else ``synth`` (the tiny LLaVA trained on the synthetic benchmark, on CPU). The runs folder is a
small database with one writer (otprune.harness.folder_lock), laid out as:

- ``RUNS/<config>[_limitN]/<model>/<method>_<ratio>/setting.json``: the run's identity (model, model
  args, method, ratio, K, selector options, limit, with its hash). A folder holding another setting
  (an edited config) is refused, never reused.
- ``.../attempts/<stamp>_<tasks>/``: one lmms-eval child per attempt, in its own output folder and
  process group (``child.json`` names it and its host).
- ``.../otprune_<stamp>_<tasks>.json``: the record of an attempt (otprune.harness.records), written
  atomically by whoever executed it; the only thing that marks a task finished. It holds the code
  identity (otprune.harness.code_identity): a finished record of other code is run again, unless
  ``--reuse-other-code`` keeps it (the report marks it).
- ``.../job_<tasks>.json``: the last Slurm submission of the run's tasks (``--executor slurm``).

Failed tasks run again on the next invocation; finished ones never do; a task whose job Slurm still
holds is not submitted again. The report (otprune.report) runs at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from otprune import stack
from otprune.harness.attempt import Attempt
from otprune.harness.catalogue import MODELS
from otprune.harness.checkpoints import checkpoint, checkpoint_path, quiet_torchvision_hint
from otprune.harness.code_identity import describe_copy, otprune_copy
from otprune.harness.config import EXECUTORS, Config, load_config
from otprune.harness.errors import ConfigError
from otprune.harness.executors.local import run_local
from otprune.harness.executors.slurm import SlurmOptions, SubmissionFailed, active_job, recorded_job_ids, run_slurm, scheduler_jobs, slurm_parameters
from otprune.harness.files import LeaseLost, write_atomically
from otprune.harness.folder_lock import FolderBusy, lock_runs_folder
from otprune.harness.plan import Calibration, Run, check_paths, check_setting, child_env, command, pending_runs, plan_calibrations, plan_runs
from otprune.harness.prerequisites import default_config, prerequisites
from otprune.harness.processes import stale_children
from otprune.harness.records import finished_tasks
from otprune.harness.resources import DEFAULT_RUNS

SLURM_FLAGS = {  # flag -> (executor-block key, type, help)
    "--slurm-partition": ("partition", str, "the partition the jobs run in"),
    "--slurm-gpus-per-job": ("gpus_per_job", int, "GPUs per job (default: --num-processes, one per lmms-eval process)"),
    "--slurm-time": ("time", int, "each job's time limit in minutes (default 240)"),
    "--slurm-mem": ("mem", int, "each job's memory in GB (default: the partition's)"),
    "--slurm-account": ("account", str, "the account the jobs are charged to"),
    "--slurm-qos": ("qos", str, "the jobs' QOS"),
    "--slurm-max-parallel": ("max_parallel", int, "jobs of the array running at once (default 8)"),
    "--slurm-setup": ("setup", str, "shell lines each job runs first (module load ..., source venv/bin/activate)"),
}


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        meaning = "evaluates no sample" if limit == 0 else "means every sample to lmms-eval"
        raise ConfigError(f"--limit {limit} is not allowed: it {meaning}; give N >= 1 samples per task, or omit --limit for a full run")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag with the message)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give an integer >= 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otprune run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a name in configs/ or a .yaml path (default: see above)")
    parser.add_argument("--num-processes", type=positive_int, help="lmms-eval processes per run, one per GPU (accelerate launch)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs at once (local executor, CPU only; timings then share the cores)")
    parser.add_argument("--limit", type=int, help="samples per task (lmms-eval --limit), for a quick look; goes to RUNS/<config>_limitN")
    parser.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help=f"where <config>/... go (default: {DEFAULT_RUNS})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, its size and the commands; run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--executor", choices=EXECUTORS, help="where runs happen (default: the config's executor block, else local)")
    for flag, (key, kind, text) in SLURM_FLAGS.items():
        parser.add_argument(flag, dest=f"slurm_{key}", type=kind, help=text)
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then print the table (default: submit and return)")
    parser.add_argument(
        "--reuse-other-code", action="store_true", help="count runs finished by other code (otprune or library versions) as finished; the table marks them"
    )
    return parser.parse_args(argv)


def slurm_options(config: Config, args) -> SlurmOptions:
    """The config's executor block, each key overridden by its flag."""
    settings = {k: v for k, v in config.executor.items() if k != "name"}
    settings.update({key: getattr(args, f"slurm_{key}") for key, _, _ in SLURM_FLAGS.values() if getattr(args, f"slurm_{key}") is not None})
    for key in ("time", "mem", "max_parallel"):
        if key in settings and settings[key] < 1:
            raise ConfigError(f"--slurm-{key.replace('_', '-')} {settings[key]} is not allowed; allowed: an integer >= 1")
    if settings.get("gpus_per_job", 0) < 0:
        raise ConfigError(f"--slurm-gpus-per-job {settings['gpus_per_job']} is not allowed; allowed: an integer >= 0")
    for key in ("partition", "account", "qos", "setup"):
        if key in settings and not settings[key].strip():
            raise ConfigError(f"--slurm-{key} {settings[key]!r} is not allowed; allowed: a non-empty {key}")
    return SlurmOptions(**settings)


def plan_size(runs: list[Run], pending: list[Run], limit: int | None, calibrations: list[Calibration] = ()) -> list[str]:
    """The plan's size: calibrations to run first, runs and jobs, and the rough A100-hours per model
    (catalogue.ModelSpec)."""
    first = f"{len(calibrations)} calibration(s) first (here, one lmms-eval invocation each), then " if calibrations else ""
    lines = [
        f"plan: {first}{len(runs)} runs (model x method x ratio x task group), {len(pending)} to run: "
        f"{len(pending)} lmms-eval invocations, or {len(pending)} Slurm jobs with --executor slurm"
    ]
    for model in dict.fromkeys(run.model for run in pending):
        tasks = sum(len(run.tasks) for run in pending if run.model == model)
        hours = MODELS[model].a100_hours
        if hours is None:
            estimate = "CPU, minutes"
        elif limit is not None:
            estimate = f"--limit {limit}: a small fraction of {hours * tasks:.0f} A100-hours"
        else:
            estimate = f"about {hours * tasks:.0f} A100-hours (a rough estimate, not measured)"
        lines.append(f"  {model}: {tasks} benchmark runs, {estimate}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_torchvision_hint()
    print(stack.summary_here())
    name = args.config
    if name is None:
        name, why = default_config()
        print(f"config: {name} ({why}); pass a config name to choose")
    try:
        check_limit(args.limit)
        config = load_config(name)
        # Runs cut short by --limit go to their own folder, so they never pass for finished full runs.
        label = config.name + (f"_limit{args.limit}" if args.limit else "")
        runs_root = Path(args.runs_dir)
        calibrations = [step for step in plan_calibrations(config, runs_root) if not step.recipe.exists()]
        runs = planned_runs(config, runs_root, label, args.limit)
        check_paths(runs_root, label, runs)
        executor = args.executor or config.executor.get("name", "local")
        options = slurm_options(config, args) if executor == "slurm" else None
        if executor != "slurm":
            given = [flag for flag, (key, _, _) in SLURM_FLAGS.items() if getattr(args, f"slurm_{key}") is not None] + (["--wait"] if args.wait else [])
            if given:
                raise ConfigError(f"{', '.join(given)} only apply with --executor slurm (the executor here: {executor})")
        else:
            on_gpus = any(MODELS[run.model].tiny is None for run in runs)
            slurm_parameters(options, args.num_processes or config.num_processes, "check", on_gpus)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in config.notes:
        print(f"note: {note}")
    num_processes = config.num_processes if args.num_processes is None else args.num_processes
    if executor == "slurm" and args.jobs > 1:
        print("error: --jobs is the local executor's; with --executor slurm, --slurm-max-parallel caps the jobs at once", file=sys.stderr)
        return 2
    missing, warnings = prerequisites(config, num_processes, on_cluster=executor == "slurm")
    for warning in warnings:
        print(f"warning: {warning}")
    if missing:
        print(f"{'note' if args.dry_run else 'error'}: config {config.name} cannot run here; missing:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        if not args.dry_run:
            return 2
    label_dir = runs_root / label
    if args.dry_run:
        pending = pending_runs(runs, code=None if args.reuse_other_code else otprune_copy(child_env(runs[0], args.jobs)).get("code"))
        print(f"{label}: {len(runs)} runs, {len(runs) - len(pending)} finished before, {len(pending)} to run -> {label_dir}")
        for line in plan_size(runs, pending, args.limit, calibrations):
            print(line)
        for step in calibrations:
            print(f"[calibration {step.name}] {step.shell()}")
        for i, run in enumerate(pending, 1):
            cmd = command(config, run, checkpoint_path(run.model, runs_root), num_processes, args.limit, run.folder / "attempts" / "<stamp>")
            print(f"[{i}/{len(pending)}] {' '.join(f'{k}={v}' for k, v in run.env.items())} {' '.join(cmd)}")
        return 0
    try:
        lock = lock_runs_folder(label_dir)
    except FolderBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"error: cannot write to {error.filename or label_dir}: {error.strerror}; choose a writable folder with --runs-dir, or fix its permissions",
            file=sys.stderr,
        )
        return 2
    try:
        if calibrations:
            if not calibrate(calibrations):
                return 1
            runs = planned_runs(config, runs_root, label, args.limit)
        return _run_locked(config, runs, label_dir, runs_root, num_processes, executor, options, args)
    except ConfigError as error:  # a calibrated recipe the runs cannot use
        print(f"error: {error}", file=sys.stderr)
        return 2
    except LeaseLost as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"error: {error.filename or label_dir}: {error.strerror}; check that the runs folder is writable "
            "and has free space, then run the same command again (finished runs are kept)",
            file=sys.stderr,
        )
        return 2
    finally:
        lock.release()


def planned_runs(config: Config, runs_root: Path, label: str, limit: int | None) -> list[Run]:
    """The config's runs, each (folder, tasks) once."""
    return list({(r.folder, r.tasks): r for r in plan_runs(config, runs_root, label, limit)}.values())


def calibrate(steps: list[Calibration]) -> bool:
    """Run each calibration step here (``otprune calibrate``); whether all wrote their recipe."""
    from otprune import calibrate as calibration

    for step in steps:
        print(f"calibration {step.name}: {step.shell()}", flush=True)
        if calibration.main(list(step.args)) != 0:
            print(f"error: calibration {step.name} failed (above); no run started", file=sys.stderr)
            return False
    return True


def busy_runs(runs: list[Run], label_dir: Path, executor: str) -> tuple[set, bool]:
    """``(busy, stale)``: the runs a live child of an earlier harness (this host) or a Slurm job
    still queued or running is doing, which are not started again; ``stale``: whether a local child
    of an earlier harness was found (an error: its harness died). Raises ``RuntimeError`` when
    Slurm jobs were submitted here and ``squeue`` does not answer."""
    stale = stale_children(label_dir)
    for child in stale:
        print(
            f"error: an lmms-eval child of an earlier harness is still running: pid {child['pid']} on "
            f"{child['folder']} ({', '.join(child.get('tasks', []))}); not starting that run again. "
            f"Stop it with `kill -- -{child['pgid']}`, then run again",
            file=sys.stderr,
        )
    busy = {
        (run.folder, run.tasks)
        for run in runs
        for child in stale
        if Path(child["folder"]).resolve() == run.folder.resolve() and set(child.get("tasks", [])) & set(run.tasks)
    }
    if executor == "slurm" or any(any(run.folder.glob("job_*.json")) for run in runs):
        # Without the scheduler's answer a queued run would be submitted twice: stop instead.
        jobs = scheduler_jobs(recorded_job_ids({run.folder for run in runs}))
        for run in runs:
            job = active_job(run.folder, run.tasks, jobs)
            if job:
                print(
                    f"note: Slurm job {job['job_id']} ({job['state']}, {job['elapsed']}) is doing {run.folder} "
                    f"({', '.join(run.tasks)}); not submitting it again"
                )
                busy.add((run.folder, run.tasks))
    return busy, bool(stale)


def _run_locked(config: Config, runs: list[Run], label_dir: Path, runs_root: Path, num_processes: int, executor: str, options, args) -> int:
    label = label_dir.name
    try:
        busy, stale = busy_runs(runs, label_dir, executor)
    except RuntimeError as error:
        print(
            f"error: cannot ask Slurm which of this folder's jobs are still queued or running ({error}); "
            "nothing was started, so that none runs twice: run again where squeue answers",
            file=sys.stderr,
        )
        return 2
    try:
        for run in runs:
            check_setting(run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    copy = otprune_copy(child_env(runs[0], args.jobs))
    code = None if args.reuse_other_code else copy.get("code")
    pending = pending_runs(runs, busy, code)
    other = [run for run in pending if set(run.tasks) & finished_tasks(run.folder)]
    print(
        f"{label}: {len(runs)} runs, {len(runs) - len(pending) - len(busy)} finished before, {len(busy)} still running elsewhere, "
        f"{len(pending)} to run -> {label_dir}"
    )
    if other:
        print(
            f"note: {len(other)} of them finished before with other code (otprune or library versions) and run again; "
            "--reuse-other-code keeps such results (marked in the table)"
        )
    write_atomically(
        label_dir / "plan.json",
        json.dumps(
            [
                {"folder": str(run.folder.relative_to(label_dir)), "tasks": list(run.tasks), "model": run.model, "method": run.method, "ratio": run.ratio}
                for run in runs
            ],
            indent=1,
        )
        + "\n",
    )
    for run in pending:
        run.folder.mkdir(parents=True, exist_ok=True)
        if not (run.folder / "setting.json").exists():
            write_atomically(run.folder / "setting.json", json.dumps(run.setting, indent=1) + "\n")
    failed = []
    if pending:
        pretrained = {model: checkpoint(model, runs_root) for model in {r.model for r in pending}}
        for line in describe_copy(copy):
            print(line)
        planned = {(run.folder, task): run.tasks for run in runs for task in run.tasks}
        attempts = [
            Attempt(config, run, pretrained[run.model], num_processes, args.jobs, args.limit, copy, executor, planned[run.folder, run.tasks[0]])
            for run in pending
        ]
        if executor == "slurm":
            try:
                outcome = run_slurm(attempts, options, label_dir / "slurm", args.wait)
            except SubmissionFailed as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            if not args.wait:
                return 0
        else:
            outcome = run_local(attempts, args.jobs)
        if outcome.stopped_by:
            return 128 + outcome.stopped_by
        failed = outcome.failed
    if failed:
        print(f"{len(failed)} run(s) failed; run the same command again to retry them (finished runs are kept).")
    if not args.no_report:
        from otprune import report

        report.main([str(label_dir)], code=copy.get("code"))
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main())
