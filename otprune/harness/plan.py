"""The plan: every run of a config (model, method, ratio, tasks), its setting (identity), its
folder, the lmms-eval command and the environment it runs with. Made once, whoever executes it."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from otprune.harness import resources
from otprune.harness.catalogue import MODELS, RATIO_FREE, folder_label, model_label, ratio_label
from otprune.harness.checkpoints import trained_weights_sha256
from otprune.harness.config import CALIBRATED, FILE_OPTIONS, METHOD_OWNED, SAFE_NAME, Config, calibration_named, run_env
from otprune.harness.errors import ConfigError
from otprune.harness.files import read_results, sha256
from otprune.harness.records import finished_tasks
from otprune.methods import plugin_source_sha256
from otprune.prune_config import config_from_env

SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


@dataclass(frozen=True)
class Run:
    model: str
    method: str
    ratio: float | str  # catalogue.ADAPTIVE: the method chooses each image's count
    env: dict
    tasks: tuple[str, ...]
    folder: Path
    setting: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """A config's calibration step: ``otprune calibrate ARGS`` writes ``recipe``."""

    name: str
    recipe: Path
    args: tuple[str, ...]

    def shell(self) -> str:
        return shlex.join(["otprune", "calibrate", *self.args])


def plan_calibrations(config: Config, runs_root: Path) -> list[Calibration]:
    """Every calibration of ``config``, its recipe under ``runs_root/<config>/calibrations`` (one
    for the config's full and ``--limit`` runs alike: the calibration has its own limit), named by
    what makes it, so that an edited calibration block writes a new recipe, not reuses the old."""
    steps = []
    for name, block in config.calibrations.items():
        made_by = json.dumps({**block, "lmms_model": config.lmms_model, "model_args": config.model_args}, sort_keys=True)
        recipe = runs_root / config.name / "calibrations" / f"{name}_{hashlib.sha256(made_by.encode()).hexdigest()[:8]}.json"
        budget = "tflop" if "tflop" in block else "ratio"
        args = [CALIBRATED[block["method"]], block["model"], "--tasks", ",".join(block["tasks"]), "--limit", str(block["limit"])]
        args += [f"--{budget}", str(block[budget]), "--out", str(recipe), "--runs-dir", str(runs_root)]
        args += ["--lmms-model", config.lmms_model, "--model-args", config.model_args]
        steps.append(Calibration(name, recipe, tuple(args)))
    return steps


def task_key(tasks) -> str:
    """A file-name part naming a run's tasks (a hash of them when there are too many to list)."""
    joined = "+".join(tasks)
    return joined if len(joined) <= 80 else f"{len(tasks)}tasks_{hashlib.sha256(joined.encode()).hexdigest()[:8]}"


def run_setting(config: Config, model: str, method: str, ratio: float | str, env: dict, limit: int | None) -> dict:
    """Everything that changes a run's result but its task: its identity, with the hash of it."""
    pruning = config_from_env(env)
    setting = {
        "model": model,
        "lmms_model": config.lmms_model,
        "model_args": config.model_args,
        "batch_size": config.batch_size,
        "method": method,
        "ratio": ratio,
        "layer_index": pruning.layer_index if pruning.enabled else None,
        "env": dict(sorted(env.items())),
        "limit": limit,
    }
    if MODELS[model].trained:
        setting["weights_sha256"] = trained_weights_sha256(model)
    for name in FILE_OPTIONS:
        if pruning.enabled and name in pruning.options:
            # The file's content, not its name, decides the run: an edited recipe runs again.
            setting[f"{name}_sha256"] = sha256(Path(pruning.options[name]).expanduser())
    if pruning.enabled and pruning.spec.plugin:
        # Code outside otprune's code identity: its package, version and source are part of the setting.
        setting["plugin"] = pruning.spec.origin
        source = plugin_source_sha256(pruning.spec)
        if source is not None:
            setting["plugin_source_sha256"] = source
    return {**setting, "hash": hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]}


def plan_runs(config: Config, runs_root: Path, label: str | None = None, limit: int | None = None) -> list[Run]:
    """Every run of ``config`` in order: model, method, ratio, then task (or the tasks together),
    under ``runs_root/<label>`` (default: the config's name). A run whose calibration's recipe is
    not written yet has an empty setting."""
    recipes = {step.name: step.recipe for step in plan_calibrations(config, runs_root)}
    runs = []
    for model, overrides in config.models.items():
        for method, spec in config.methods.items():
            if model not in spec.get("models", config.models):
                continue
            ratios = [RATIO_FREE[method]] if method in RATIO_FREE else spec["ratios"]
            calibration = calibration_named(spec, overrides.get(method, {}))
            for ratio in ratios:
                env = run_env(method, ratio, spec, overrides.get(method, {}), recipes)
                folder = runs_root / (label or config.name) / model_label(model) / f"{folder_label(method)}_{ratio_label(ratio)}"
                # A run waiting for its calibration has no setting yet: it is planned again once its recipe is written.
                waiting = calibration is not None and not recipes[calibration].exists()
                try:
                    setting = {} if waiting else run_setting(config, model, method, ratio, env, limit)
                except ValueError as error:  # a calibrated recipe is read here, not when the config loads
                    raise ConfigError(f"config {config.name}: {model} {method}: {error}") from None
                runs += [Run(model, method, ratio, env, tasks, folder, setting) for tasks in config.task_groups]
    return runs


def check_paths(runs_root: Path, label: str, runs: list[Run]) -> None:
    """The runs folder reaches lmms-eval's comma-separated --model_args (the tiny checkpoints live in
    it), and every planned folder must stay inside it."""
    if "," in str(runs_root.resolve()):
        raise ConfigError(f"--runs-dir {runs_root.resolve()} contains a comma, which lmms-eval's --model_args would split; choose a path without one")
    if not SAFE_NAME.fullmatch(label) or set(label) <= {"."}:
        raise ConfigError(f"config name {label!r} is not allowed as a folder name; allowed: letters, digits, '.', '_', '-' (not starting with '.')")
    inside = (runs_root / label).resolve()
    for run in runs:
        if not run.folder.resolve().is_relative_to(inside):
            raise ConfigError(f"run folder {run.folder} would lie outside {inside}")


def check_setting(run: Run) -> None:
    """Refuse a run folder that holds another setting's results (an edited config, a copied folder)."""
    manifest = run.folder / "setting.json"
    if not manifest.exists():
        if run.folder.exists() and any(run.folder.glob("otprune_*.json")):
            raise ConfigError(f"{run.folder} holds runs without a setting.json (an older harness or a copied folder); move it away to run this setting there")
        return
    recorded = read_results(manifest)
    if recorded.get("hash") != run.setting["hash"]:
        changes = [f"{key}: {recorded.get(key)!r} -> {run.setting[key]!r}" for key in run.setting if key != "hash" and recorded.get(key) != run.setting[key]]
        raise ConfigError(
            f"{run.folder} holds the results of another setting ({'; '.join(changes) or 'unreadable setting.json'}); "
            "give the edited config a new name, or move that folder away"
        )


def command(config: Config, run: Run, pretrained: str, num_processes: int, limit: int | None, output: Path) -> list[str]:
    include = sorted({config.catalogue[t]["include_path"] for t in run.tasks if "include_path" in config.catalogue[t]})
    model_args = ",".join(a for a in (f"pretrained={pretrained}", config.model_args) if a)
    if num_processes > 1:
        launcher = ["accelerate", "launch", f"--num_processes={num_processes}", "-m", "lmms_eval"]
    else:
        launcher = [sys.executable, "-m", "lmms_eval"]
    args = [
        "--model",
        config.lmms_model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(run.tasks),
        "--batch_size",
        str(config.batch_size),
        "--output_path",
        str(output.resolve()),
        "--log_samples",
    ]
    for path in include:
        args += ["--include_path", str(resources.ROOT / path)]
    if limit is not None:
        args += ["--limit", str(limit)]
    return launcher + args


def child_env(run: Run, jobs: int) -> dict:
    # Only the config decides the pruning: the caller's own pruning variables do not leak in.
    env = {k: v for k, v in os.environ.items() if k not in METHOD_OWNED and not k.startswith("OTPRUNE_")}
    env.update(run.env)
    env["OTPRUNE_LOG"] = "1"
    env = resources.checkout_first(env)
    if "OMP_NUM_THREADS" not in env:
        # run.model may also name an lmms-eval model the harness does not list (the GPU check's VLM runs).
        known = MODELS.get(run.model)
        if known is not None and known.tiny is not None:
            # A tiny model's matrices are too small for a second thread to pay, and where another
            # process keeps a core busy, OpenMP threads spin-wait on each other: measured on 2 cores
            # with one busy, 1.6 s per sample with two threads.
            env["OMP_NUM_THREADS"] = "1"
        elif jobs > 1:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def redacted(env: dict) -> dict:
    """``env`` as recorded: every variable, the values of secret-looking ones replaced."""
    return {k: ("<redacted>" if any(m in k.upper() for m in SECRET_MARKERS) else v) for k, v in sorted(env.items())}


def attempt_name(run: Run) -> str:
    return time.strftime("%Y%m%d_%H%M%S") + f"_{time.time_ns() % 1_000_000_000:09d}_{task_key(run.tasks)}"


def describe(run: Run) -> str:
    return f"{model_label(run.model)} {run.method} {ratio_label(run.ratio)} {','.join(run.tasks)}"


def pending_runs(runs: list[Run], busy: set = frozenset(), code: dict | None = None) -> list[Run]:
    """The runs (each with only its unfinished tasks) still to do, but those a live child or a
    queued job is doing. ``code``: only records of this code identity count as finished (``None``:
    any code's)."""
    pending = []
    for run in runs:
        if (run.folder, run.tasks) in busy:
            continue
        todo = tuple(t for t in run.tasks if t not in finished_tasks(run.folder, code))
        if todo:
            pending.append(Run(run.model, run.method, run.ratio, run.env, todo, run.folder, run.setting))
    return pending
