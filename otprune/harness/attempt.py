"""One attempt of a run: lmms-eval started in a fresh attempt folder, waited for, checked
(otprune.harness.run_check) and recorded. The same code runs under every executor: in a thread of
the harness (local) or inside a Slurm job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from otprune.harness.catalogue import MODELS
from otprune.harness.checkpoints import TOKENIZER_ONLY, llm_shape
from otprune.harness.config import Config
from otprune.harness.files import read_results, sha256, write_atomically
from otprune.harness.plan import Run, attempt_name, child_env, command, redacted
from otprune.harness.processes import Children, slurm_job_id
from otprune.harness.records import record_path, recorded_limit
from otprune.harness.run_check import attempt_problems, parse_prune_log

_TOKENIZER_LOCK = threading.Lock()


def text_tokens(pretrained: str, sample_files: dict[str, Path]) -> dict[str, float]:
    """Mean text tokens of each task's prompts (the samples' ``input``) under the model's tokenizer."""
    if not sample_files:
        return {}
    try:
        # transformers' lazy imports are not thread-safe (--jobs > 1).
        with _TOKENIZER_LOCK:
            from transformers import AutoTokenizer

            config_logger = logging.getLogger("transformers.configuration_utils")
            config_logger.addFilter(TOKENIZER_ONLY)
            try:
                tokenizer = AutoTokenizer.from_pretrained(pretrained)
            finally:
                config_logger.removeFilter(TOKENIZER_ONLY)
    except (OSError, ValueError, ImportError):
        return {}
    means = {}
    for task, path in sample_files.items():
        counts = [len(tokenizer(json.loads(line)["input"], add_special_tokens=False).input_ids) for line in path.read_text().splitlines() if line.strip()]
        if counts:
            means[task] = sum(counts) / len(counts)
    return means


@dataclass(frozen=True)
class Attempt:
    """One lmms-eval invocation of a planned run: all an executor carries to where it runs
    (picklable). ``otprune``: the child's otprune and code identity (code_identity.otprune_copy)."""

    config: Config
    run: Run
    pretrained: str
    num_processes: int
    jobs: int
    limit: int | None
    otprune: dict
    executor: str = "local"
    # The planned run's tasks, of which ``run.tasks`` are those still to do: a job is filed under them.
    planned_tasks: tuple = ()


def execute(attempt: Attempt, children: Children) -> dict | None:
    """Run lmms-eval once in a fresh attempt folder; write the record (atomically, beside the
    attempts) and return it. ``None`` when ``children`` was stopping and nothing started."""
    config, run, pretrained = attempt.config, attempt.run, attempt.pretrained
    attempt_id = attempt_name(run)
    folder = run.folder / "attempts" / attempt_id
    folder.mkdir(parents=True)
    log_path = folder / "lmms_eval.log"
    cmd = command(config, run, pretrained, attempt.num_processes, attempt.limit, folder)
    env = child_env(run, attempt.jobs)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={v}" for k, v in run.env.items()) + " " + " ".join(cmd) + "\n")
        log.flush()
        process = children.start(cmd, env, log, folder, run.tasks)
        if process is None:
            shutil.rmtree(folder)
            return None
        # wait4 gives the peak RSS of the process tree it reaped (Linux: max over waited children).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        children.finished(process)
    wall = time.perf_counter() - start
    results, done, eval_seconds, limits = {}, set(), None, set()
    for path in sorted(folder.glob("**/*_results.json")):
        data = read_results(path)
        tasks = data.get("results")
        if not isinstance(tasks, dict):
            continue
        results[str(path.relative_to(run.folder))] = sha256(path)
        done |= set(tasks) & set(run.tasks)
        limits.add(recorded_limit(data))
        try:
            eval_seconds = float(data.get("total_evaluation_time_seconds"))
        except (TypeError, ValueError):
            pass
    samples = {task: path for task in run.tasks for path in sorted(folder.glob(f"**/*_samples_{task}.jsonl"))[-1:]}
    sample_counts = {task: sum(1 for line in path.read_text().splitlines() if line.strip()) for task, path in samples.items()}
    log_text = log_path.read_text(errors="replace")
    log = parse_prune_log(log_text)
    if children.stopping.is_set() and process.returncode != 0:
        reason = f"stopped with the harness ({children.stop_reason})"
    else:
        problems = attempt_problems(
            returncode=process.returncode,
            tasks=run.tasks,
            done=done,
            limits=limits,
            limit=attempt.limit,
            env=run.env,
            log_text=log_text,
            samples=sum(sample_counts.values()),
        )
        reason = "; ".join(problems) or None
    record = {
        "model": run.model,
        "flops_model": MODELS[run.model].flops_model,
        "tiny": MODELS[run.model].tiny,
        "trained": MODELS[run.model].trained,
        # The LLM that ran, for the report's FLOPs of the tiny checkpoint itself.
        "llm_shape": llm_shape(Path(pretrained)) if MODELS[run.model].tiny else None,
        "method": run.method,
        "ratio": run.ratio,
        "env": run.env,
        "setting": run.setting,
        "tasks": list(run.tasks),
        "benchmarks": [config.catalogue[task]["benchmark"] for task in run.tasks],
        "finished_tasks": sorted(done) if reason is None else [],
        "status": "done" if reason is None else "failed",
        "reason": reason,
        "returncode": process.returncode,
        "limit": attempt.limit,
        "results": results,
        "wall_s": round(wall, 2),
        "eval_s": eval_seconds,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "num_processes": attempt.num_processes,
        "parallel_jobs": attempt.jobs,
        "executor": attempt.executor,
        "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
        "samples": sample_counts,
        "text_tokens": text_tokens(pretrained, samples) if reason is None else {},
        "log": str(log_path.relative_to(run.folder)),
        "otprune": attempt.otprune,
        "code": attempt.otprune.get("code"),
        "child_env": redacted(env),
        "command": cmd,
        # Per task where the attempt ran one (lmms-eval interleaves the requests of several).
        "tokens_by_task": {run.tasks[0]: log["visual_tokens"]} if len(run.tasks) == 1 else {},
        **log,
    }
    write_atomically(record_path(run.folder, attempt_id), json.dumps(record, indent=1) + "\n")
    return record
