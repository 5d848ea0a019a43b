"""Run every (model, method, ratio, task) of an experiment config through lmms-eval, resumably.

    otprune run [CONFIG] [--num-processes N] [--jobs N] [--limit N] [--runs-dir DIR] [--dry-run] [--no-report]

CONFIG is a name in configs/ (``synth``, ``smoke``, ``paper_table1``) or a path to a YAML file;
without it, ``paper_table1`` runs when a GPU and the Hugging Face hub (or a local cache) are there,
else ``synth`` (the tiny LLaVA trained on the synthetic benchmark, on CPU). The runs folder is a
small database with one writer:

- ``RUNS/<config>[_limitN]/.lock``: held by the one harness writing there; a second invocation on
  the same folder is refused.
- ``RUNS/<config>/<model>/<method>_<ratio>/setting.json``: the run's identity (model, model args,
  method, ratio, K, selector options, limit, with its hash). A folder holding another setting (an
  edited config) is refused, never reused.
- ``.../attempts/<stamp>_<tasks>/``: one lmms-eval child per attempt, in its own output folder and
  process group (``child.json`` names it); killed with the harness (SIGINT, SIGTERM; on Linux also
  when the harness is SIGKILLed). A child still alive from an earlier harness is reported at start-up
  and its run is not started a second time.
- ``.../otprune_<stamp>_<tasks>.json``: the harness's record of an attempt, written atomically; the
  only thing that marks a task finished (``status: done``). It carries the results files' SHA-256,
  the limit, the child's full environment (secrets redacted), which otprune copy the child imports,
  and what the report needs (tokens before/after per image, selector time, each generate call's
  timing line from otprune.sample_timer, wall time, peak memory).

After a pruning run the harness checks the child's OTPRUNE_LOG lines: every image must show the
method's selection with ``budget(ratio, N)`` kept (VTW: none); otherwise the attempt is FAILED with
the reason. Failed tasks run again on the next invocation; finished ones never do. The report
(otprune.report) runs at the end.

Where things are: the configs (``configs/``, with the embedded tasks' data) come from the installed
package (a wheel carries them as ``otprune/configs``) or, in a source checkout, from the checkout's
``configs/``; the tiny checkpoints are built by the checkout's ``scripts/build_tiny_llava.py``, so
configs of tiny models need a checkout. Runs go to the checkout's ``runs/``, or ``./runs`` when
otprune is installed from a wheel.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from otprune import stack
from otprune.prune_config import config_from_env, default_layer_index
from otprune.selectors import budget
from otprune.sample_timer import TIMING_PREFIX

PACKAGE = Path(__file__).resolve().parent
# The source checkout otprune runs from (an editable install), or None for an installed wheel.
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None
# The folder holding configs/: the task catalogue's include paths and the embedded tasks' data files
# are relative to it, and lmms-eval runs in it.
ROOT = PACKAGE if (PACKAGE / "configs").is_dir() else CHECKOUT or PACKAGE
CONFIGS = ROOT / "configs"
TINY_BUILDER = "scripts/build_tiny_llava.py"
WEIGHTS = "model.safetensors"
DEFAULT_RUNS = CHECKOUT / "runs" if CHECKOUT else Path("runs")

# Display name (the paper's) -> BASELINE value of the patch.
METHODS = {
    "Original": "ORIG",
    "OTPrune": "OURS",
    "DivPrune": "DIVPRUNE",
    "FastV": "FASTV",
    "VTW": "VTW",
    "DPP": "DPP",
    "Random": "RANDOM",
    "Uniform": "UNIFORM",
    "TrimTokenator": "TRIM",
    "STP": "STP",
}
# Methods that keep no ratio: the full model, and VTW (drops every visual token at layer K; at K = 0
# the LLM reads the text alone, the no-image control).
RATIO_FREE = {"Original": 1.0, "VTW": 0.0}


@dataclass(frozen=True)
class ModelSpec:
    """``flops_model``: the real LLM shape (otprune.measures.MODELS) of the TFLOP column;
    ``tiny``: the build_tiny_llava.py variant when the checkpoint is built here; ``trained``: its
    weights were trained (on the synthetic benchmark), so its scores mean something."""

    flops_model: str
    tiny: str | None = None
    trained: bool = False


MODELS = {
    "liuhaotian/llava-v1.5-7b": ModelSpec("llava-1.5-7b"),
    "liuhaotian/llava-v1.5-13b": ModelSpec("llava-1.5-13b"),
    "liuhaotian/llava-v1.6-vicuna-7b": ModelSpec("llava-1.6-7b"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelSpec("qwen2.5-vl-7b"),
    "Qwen/Qwen3-VL-8B-Instruct": ModelSpec("qwen3-vl-8b"),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ModelSpec("llava-onevision-7b"),
    "tiny-llava-1.5": ModelSpec("llava-1.5-7b", tiny="llava-1.5"),
    "tiny-llava-1.6": ModelSpec("llava-1.6-7b", tiny="llava-1.6"),
    "synth-llava-1.5": ModelSpec("llava-1.5-7b", tiny="synth-llava-1.5", trained=True),
}
CONFIG_KEYS = {"lmms_model", "model_args", "models", "methods", "tasks", "batch_size", "num_processes", "group_tasks"}
METHOD_KEYS = {"ratios", "layer_index", "env"}
OVERRIDE_KEYS = {"layer_index", "env"}
# Variables the harness derives from the method: a config setting them would run one method under
# another's label.
METHOD_OWNED = {
    "BASELINE": "the method's name",
    "SUBSET_RATIO": "the method's 'ratios'",
    "LAYER_INDEX": "the method's 'layer_index' key",
    "OTPRUNE_LOG": "the harness (always 1: the pruning check reads it)",
}
# What a config's env may set: selector options, and variables that change no code the child loads.
# Anything else (PYTHONPATH, LD_PRELOAD, ...) could run foreign code inside the child.
OPTION_VARIABLES = ("OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_STP_ALPHA", "OTPRUNE_TRIM_KEEP_RATIO", "OTPRUNE_GREEDY", "OTPRUNE_OT")
HARMLESS_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUBLAS_WORKSPACE_CONFIG",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
ALLOWED_ENV = OPTION_VARIABLES + HARMLESS_VARIABLES
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A progress bar may share the line (it ends in a carriage return, not a newline): found anywhere.
TIMING_LINE = re.compile(re.escape(TIMING_PREFIX) + r"(\{[^{}\n]*\})")
LOG_LINE = re.compile(r"otprune (\w+): visual tokens ([\d\->, ]+); selector ([\d.]+) ms(?:; ot ([^\n]+))?")
NO_SELECTION = "no selection logged: is otprune installed in this environment? (pip install -e . in it)"


class ConfigError(ValueError):
    """A config (or command line) that cannot run; raised before any run starts."""


@dataclass(frozen=True)
class Run:
    model: str
    method: str
    ratio: float
    env: dict
    tasks: tuple[str, ...]
    folder: Path
    setting: dict = field(default_factory=dict)


@dataclass
class Config:
    name: str
    lmms_model: str
    model_args: str
    models: dict
    methods: dict
    tasks: list
    batch_size: int = 1
    num_processes: int = 1
    group_tasks: bool = False
    catalogue: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class MissingResource(ConfigError):
    """A file of the project that this otprune installation lacks."""


def config_file(name: str) -> Path:
    """``configs/<name>``; a ``MissingResource`` naming where it was looked for when it is not there."""
    path = CONFIGS / name
    if not path.is_file():
        raise MissingResource(
            f"{path} is missing: this otprune ({PACKAGE}) was installed without the project's configs; "
            "install it from the project's wheel or sdist, or from a source checkout (pip install -e CHECKOUT)"
        )
    return path


def load_catalogue() -> dict:
    """``{task: spec}`` from configs/tasks.yaml (paper and local tasks together)."""
    data = yaml.safe_load(config_file("tasks.yaml").read_text())
    return {**data["paper"], **data["local"]}


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = CONFIGS / f"{name_or_path}.yaml"
    if not candidate.exists():
        # An installation without its configs: name that, rather than an empty list of configs.
        config_file("tasks.yaml")
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in ("tasks", "paper_results"))
        raise ConfigError(f"no config {name_or_path!r}; allowed: {', '.join(known)} or a path to a .yaml file")
    return candidate


def _names(values) -> str:
    return ", ".join(sorted(values))


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); give it once")
        except TypeError:
            raise _DuplicateKey(f"key {key!r} on line {line} is not a name") from None
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _describe_type(value) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Errors that name the config, the key path, the value and what is allowed."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, value, allowed: str):
        raise ConfigError(f"config {self.path.name}: {key}={value!r} ({_describe_type(value)}) is not allowed; allowed: {allowed}")

    def mapping(self, value, key: str, allowed: str, empty_ok: bool = True) -> dict:
        """A mapping, or ``{}`` for a missing/empty value when ``empty_ok``."""
        if value is None and empty_ok:
            return {}
        if not isinstance(value, dict):
            self.fail(key, value, allowed)
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            self.fail(f"{key} key", bad[0], "names (strings)")
        return value

    def names(self, value, key: str, allowed: str) -> list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.fail(key, value, allowed)
        return value

    def layer_index(self, value, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(key, value, "an integer >= 0 (the decoder layer K the method prunes before)")
        return value

    def env(self, value, key: str) -> dict:
        env = self.mapping(value, key, "a mapping VARIABLE: value")
        for name, setting in env.items():
            if name in METHOD_OWNED:
                raise ConfigError(
                    f"config {self.path.name}: {key}.{name}={setting!r} is not allowed: {name} is set by {METHOD_OWNED[name]}"
                )
            if name not in ALLOWED_ENV:
                raise ConfigError(
                    f"config {self.path.name}: {key}.{name} is not allowed: a config's env may set only {', '.join(ALLOWED_ENV)}"
                )
            if isinstance(setting, bool) or not isinstance(setting, (str, int, float)):
                self.fail(f"{key}.{name}", setting, "a string or a number")
        return {name: str(setting) for name, setting in env.items()}


def load_config(name_or_path: str) -> Config:
    """Read and check a config: every unknown or ill-typed model, method, task, key or variable is a
    ``ConfigError`` naming it; duplicate ratios (equal as the child sees them) and tasks are merged."""
    path = config_path(name_or_path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    check = _Checker(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with keys: {_names(CONFIG_KEYS)}")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"config {path.name}: unknown key(s) {_names(map(str, unknown))}; allowed: {_names(CONFIG_KEYS)}")
    for key in ("models", "methods", "tasks"):
        if not data.get(key):
            raise ConfigError(f"config {path.name}: '{key}' is missing or empty")
    notes = []
    catalogue = load_catalogue()
    models = {}
    for model, overrides in _as_mapping(data["models"], "models", check).items():
        if model not in MODELS:
            raise ConfigError(f"config {path.name}: unknown model {model!r}; allowed: {_names(MODELS)}")
        per_method = check.mapping(overrides, f"models.{model}", "a mapping method: {layer_index: K, env: {...}}")
        models[model] = {}
        for method, spec in per_method.items():
            if method not in METHODS:
                raise ConfigError(f"config {path.name}: model {model!r} overrides unknown method {method!r}; allowed: {_names(METHODS)}")
            spec = check.mapping(spec, f"models.{model}.{method}", f"a mapping with keys {_names(OVERRIDE_KEYS)}")
            _check_keys(spec, OVERRIDE_KEYS, f"models.{model}.{method}", path)
            models[model][method] = _method_settings(spec, f"models.{model}.{method}", check)
    methods = {}
    for method, spec in _as_mapping(data["methods"], "methods", check).items():
        if method not in METHODS:
            raise ConfigError(f"config {path.name}: unknown method {method!r}; allowed: {_names(METHODS)}")
        spec = check.mapping(spec, f"methods.{method}", f"a mapping with keys {_names(METHOD_KEYS)}")
        extra = set(spec) - METHOD_KEYS
        if extra:
            raise ConfigError(f"config {path.name}: method {method!r} has unknown key(s) {_names(map(str, extra))}; allowed: {_names(METHOD_KEYS)}")
        if method in RATIO_FREE and "ratios" in spec:
            raise ConfigError(f"config {path.name}: method {method!r} takes no ratios")
        ratios = spec.get("ratios", [])
        if not isinstance(ratios, list) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios
        ):
            raise ConfigError(f"config {path.name}: method {method!r} ratios={ratios!r}; allowed: a list of numbers in (0, 1]")
        if method not in RATIO_FREE and not ratios:
            raise ConfigError(f"config {path.name}: method {method!r} needs 'ratios', a list of numbers in (0, 1]")
        merged = list(dict.fromkeys(float(ratio_label(r)) for r in ratios))
        if len(merged) < len(ratios):
            notes.append(f"method {method}: ratios {ratios} run once each as {[ratio_label(r) for r in merged]} (the child sees them as equal)")
        methods[method] = {"ratios": merged, **_method_settings(spec, f"methods.{method}", check)}
    tasks = check.names(data["tasks"], "tasks", "a list of task names from configs/tasks.yaml")
    for task in tasks:
        if task not in catalogue:
            raise ConfigError(f"config {path.name}: unknown task {task!r}; allowed (configs/tasks.yaml): {_names(catalogue)}")
    if len(set(tasks)) < len(tasks):
        notes.append(f"tasks listed more than once run once: {', '.join(dict.fromkeys(t for t in tasks if tasks.count(t) > 1))}")
    lmms_model = data.get("lmms_model", "llava")
    if not isinstance(lmms_model, str) or not SAFE_NAME.fullmatch(lmms_model):
        check.fail("lmms_model", lmms_model, "an lmms-eval model name such as 'llava'")
    model_args = data.get("model_args", "")
    if not isinstance(model_args, str) or any("=" not in item for item in model_args.split(",") if item) or "pretrained=" in model_args:
        check.fail("model_args", model_args, "a string of comma-separated key=value pairs without pretrained= (the harness sets it)")
    group_tasks = data.get("group_tasks", False)
    if not isinstance(group_tasks, bool):
        check.fail("group_tasks", group_tasks, "true or false")
    config = Config(
        name=path.stem,
        lmms_model=lmms_model,
        model_args=model_args,
        models=models,
        methods=methods,
        tasks=list(dict.fromkeys(tasks)),
        batch_size=_positive_int(data.get("batch_size", 1), "batch_size", check),
        num_processes=_positive_int(data.get("num_processes", 1), "num_processes", check),
        group_tasks=group_tasks,
        catalogue=catalogue,
        notes=notes,
    )
    for model, overrides in models.items():
        for method, spec in methods.items():
            env = run_env(method, spec["ratios"][0] if spec["ratios"] else RATIO_FREE[method], spec, overrides.get(method, {}))
            try:
                config_from_env(env)
            except ValueError as error:
                raise ConfigError(f"config {path.name}: {model} {method}: {error}") from None
    return config


def _check_keys(spec: dict, allowed: set, key: str, path: Path) -> None:
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"config {path.name}: {key} has unknown key(s) {_names(map(str, extra))}; allowed: {_names(allowed)}")


def _method_settings(spec: dict, key: str, check: _Checker) -> dict:
    settings = {"env": check.env(spec.get("env"), f"{key}.env")}
    if "layer_index" in spec:
        settings["layer_index"] = check.layer_index(spec["layer_index"], f"{key}.layer_index")
    return settings


def _as_mapping(value, key: str, check: _Checker) -> dict:
    if isinstance(value, list):
        check.names(value, key, "a list of names or a mapping")
        if len(set(value)) < len(value):
            check.fail(key, value, "each name once")
        return {name: {} for name in value}
    return check.mapping(value, key, "a list of names or a mapping", empty_ok=False)


def _positive_int(value, key: str, check: _Checker) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        check.fail(key, value, "an integer >= 1")
    return value


def run_env(method: str, ratio: float, method_spec: dict, model_override: dict) -> dict:
    """The pruning variables of one run, as strings (the patch reads them in every process): the
    method's, then the model's override of it."""
    env = {"BASELINE": METHODS[method]}
    if method not in RATIO_FREE:
        env["SUBSET_RATIO"] = ratio_label(ratio)
    layer_index = model_override.get("layer_index", method_spec.get("layer_index"))
    if layer_index is not None:
        env["LAYER_INDEX"] = str(layer_index)
    env.update({**method_spec.get("env", {}), **model_override.get("env", {})})
    return env


def ratio_label(ratio: float) -> str:
    return f"{ratio:g}"


def model_label(model: str) -> str:
    return model.split("/")[-1]


def task_key(tasks) -> str:
    """A file-name part naming a run's tasks (a hash of them when there are too many to list)."""
    joined = "+".join(tasks)
    return joined if len(joined) <= 80 else f"{len(tasks)}tasks_{hashlib.sha256(joined.encode()).hexdigest()[:8]}"


def run_setting(config: Config, model: str, method: str, ratio: float, env: dict, limit: int | None) -> dict:
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
    return {**setting, "hash": hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]}


def plan_runs(config: Config, runs_root: Path, label: str | None = None, limit: int | None = None) -> list[Run]:
    """Every run of ``config`` in order: model, method, ratio, then task (or the tasks together),
    under ``runs_root/<label>`` (default: the config's name)."""
    runs = []
    for model, overrides in config.models.items():
        for method, spec in config.methods.items():
            ratios = [RATIO_FREE[method]] if method in RATIO_FREE else spec["ratios"]
            for ratio in ratios:
                env = run_env(method, ratio, spec, overrides.get(method, {}))
                folder = runs_root / (label or config.name) / model_label(model) / f"{method}_{ratio_label(ratio)}"
                setting = run_setting(config, model, method, ratio, env, limit)
                groups = [tuple(config.tasks)] if config.group_tasks else [(task,) for task in config.tasks]
                runs += [Run(model, method, ratio, env, tasks, folder, setting) for tasks in groups]
    return runs


def check_paths(runs_root: Path, label: str, runs: list[Run]) -> None:
    """The runs folder reaches lmms-eval's comma-separated --model_args (the tiny checkpoints live in
    it), and every planned folder must stay inside it."""
    if "," in str(runs_root.resolve()):
        raise ConfigError(
            f"--runs-dir {runs_root.resolve()} contains a comma, which lmms-eval's --model_args would split; choose a path without one"
        )
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
            raise ConfigError(
                f"{run.folder} holds runs without a setting.json (an older harness or a copied folder); "
                "move it away to run this setting there"
            )
        return
    recorded = read_results(manifest)
    if recorded.get("hash") != run.setting["hash"]:
        changes = [
            f"{key}: {recorded.get(key)!r} -> {run.setting[key]!r}" for key in run.setting if key != "hash" and recorded.get(key) != run.setting[key]
        ]
        raise ConfigError(
            f"{run.folder} holds the results of another setting ({'; '.join(changes) or 'unreadable setting.json'}); "
            "give the edited config a new name, or move that folder away"
        )


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part (a crash leaves a hidden .tmp)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_results(path: Path) -> dict:
    """A JSON object written by a run (lmms-eval's results, a setting, a child's pid), or ``{}``
    when it is unreadable, cut short by a crash, or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# field -> (allowed types, required) of a record; the report and the resume logic rely on these.
RECORD_FIELDS = {
    "status": (str, True),
    "tasks": (list, True),
    "finished_tasks": (list, True),
    "results": (dict, True),
    "wall_s": ((int, float), True),
    "eval_s": ((int, float, type(None)), False),
    "peak_rss_mb": ((int, float), False),
    "samples": (dict, False),
    "text_tokens": (dict, False),
    "visual_tokens": (list, False),
    "selector_ms": (list, False),
    "timing": (list, False),
    "method": (str, False),
    "ratio": ((int, float), False),
    "benchmarks": (list, False),
    "ot_distance": (list, False),
}


def check_record(record) -> None:
    """Raise ``ValueError`` naming the first field a harness record lacks or has of the wrong type."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {_describe_type(record)}")
    for name, (types, required) in RECORD_FIELDS.items():
        if name not in record:
            if required:
                raise ValueError(f"no '{name}' (not a record of this harness)")
            continue
        if isinstance(record[name], bool) or not isinstance(record[name], types):
            raise ValueError(f"'{name}' is {record[name]!r}, not {getattr(types, '__name__', 'a number')}")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in record.get("visual_tokens", [])):
        raise ValueError("'visual_tokens' is not a list of [before, after] integer pairs")
    if not all(isinstance(v, (int, float)) for v in record.get("selector_ms", [])):
        raise ValueError("'selector_ms' is not a list of numbers")
    if not all(isinstance(v, str) for v in record.get("benchmarks", [])):
        raise ValueError("'benchmarks' is not a list of names")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.get("ot_distance", [])):
        raise ValueError("'ot_distance' is not a list of numbers")
    if not all(isinstance(v, dict) for v in record.get("timing", [])):
        raise ValueError("'timing' is not a list of per-call timing objects")
    for name in ("samples", "text_tokens"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.get(name, {}).values()):
            raise ValueError(f"'{name}' is not a mapping task: number")


def load_records(folder: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """``(records, skipped)``: the folder's harness records that can be trusted, and every other one
    with why not (unreadable, malformed, a results file missing or changed since the record)."""
    records, skipped = [], []
    for path in sorted(folder.glob("otprune_*.json")):
        try:
            record = json.loads(path.read_text())
            check_record(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            skipped.append((path, f"malformed record: {error}"))
            continue
        if record["status"] == "done":
            problem = _results_problem(folder, record["results"])
            if problem:
                skipped.append((path, problem))
                continue
        records.append((path, record))
    return records, skipped


def _results_problem(folder: Path, results: dict) -> str | None:
    if not results:
        return "a finished record names no results file"
    for name, digest in results.items():
        path = folder / str(name)
        if not path.resolve().is_relative_to(folder.resolve()):
            return f"results file {name} lies outside the run folder"
        if not path.is_file():
            return f"results file {path} is missing"
        if sha256(path) != digest:
            return f"results file {path} changed since the record was written (SHA-256 differs)"
    return None


def finished_tasks(folder: Path) -> set[str]:
    """Tasks a trusted ``done`` record in ``folder`` holds: the only proof that a run finished."""
    records, _ = load_records(folder)
    return {task for _, record in records if record["status"] == "done" for task in record["finished_tasks"]}


def parse_prune_log(text: str) -> dict:
    """Per-image ``[before, after]`` visual tokens, per-call selector ms and, where OTPRUNE_OT=1
    recorded them, per-image OT distances (kept vs full set) from OTPRUNE_LOG lines; ``timing``:
    each ``generate`` call's record (``otprune.sample_timer``) from its timing line."""
    tokens, selector_ms, ot, methods = [], [], [], []
    timing = [json.loads(match.group(1)) for match in TIMING_LINE.finditer(text)]
    for match in LOG_LINE.finditer(text):
        methods.append(match.group(1))
        for pair in match.group(2).split(","):
            before, after = pair.strip().split("->")
            tokens.append([int(before), int(after)])
        selector_ms.append(float(match.group(3)))
        if match.group(4):
            ot += [float(v) for v in match.group(4).split(",")]
    return {"visual_tokens": tokens, "selector_ms": selector_ms, "ot_distance": ot, "logged_methods": sorted(set(methods)), "timing": timing}


def pruning_problem(env: dict, log: dict, samples: int) -> str | None:
    """Why the child's log does not show the run's method pruning every sample to its budget
    (``None`` when it does). ``log``: :func:`parse_prune_log`'s; ``samples``: samples evaluated."""
    config = config_from_env(env)
    if not config.enabled:
        if log["visual_tokens"]:
            return f"the unpruned run logged a selection by {', '.join(log['logged_methods'])}: a pruning variable leaked into it"
        return None
    if not log["visual_tokens"]:
        return NO_SELECTION
    others = [m for m in log["logged_methods"] if m != config.method]
    if others:
        return f"the log shows a selection by {', '.join(others)}, not {config.method}"
    for before, after in log["visual_tokens"]:
        expected = 0 if config.method == "VTW" else budget(config.ratio, before)
        if after != expected:
            rule = "keeps none" if config.method == "VTW" else f"at ratio {config.ratio:g} keeps {expected}"
            return f"an image kept {after} of {before} visual tokens; {config.method} {rule}"
    if len(log["visual_tokens"]) < samples:
        return f"{samples} samples evaluated but only {len(log['visual_tokens'])} images' selections logged"
    return None


# -- prerequisites --------------------------------------------------------------------------


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_model(model_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}").is_dir()


def prerequisites(config: Config, num_processes: int) -> tuple[list[str], list[str]]:
    """``(missing, warnings)``: what stops the config from running, and what only degrades it."""
    missing = [f"a known break: {b}" for b in stack.known_breaks()]
    warnings = []
    for module, what in (("lmms_eval", "lmms-eval"), ("llava", "llava-torch (pip install --no-deps llava-torch==1.2.2.post1)")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{what} is not installed (bash scripts/install.sh --llava)")
    tiny = [m for m in config.models if MODELS[m].tiny is not None]
    if tiny and (CHECKOUT is None or not (CHECKOUT / TINY_BUILDER).is_file()):
        missing.append(f"{', '.join(tiny)} are built by {TINY_BUILDER}, which only a source checkout has (pip install -e CLONE)")
    elif tiny:
        missing += layer_problems(config, tiny)
    real = [m for m in config.models if MODELS[m].tiny is None]
    if real:
        gpus = gpu_count()
        if gpus == 0:
            missing.append(f"no CUDA GPU: {', '.join(real)} need one (about 16 GB for a 7B model, 28 GB for 13B, in fp16)")
        elif gpus < num_processes:
            missing.append(f"--num-processes {num_processes} but only {gpus} GPU(s)")
        if not hub_reachable():
            uncached = [m for m in real if not cached_model(m)]
            if uncached:
                missing.append(
                    f"the Hugging Face hub is unreachable and {', '.join(uncached)} is not in the local cache; "
                    "the datasets (lmms-lab/*) must be cached too"
                )
            else:
                warnings.append("hub unreachable: using cached models; every dataset must be in the local cache too")
    needs = {need for task in config.tasks for need in config.catalogue[task].get("needs", [])}
    if "java" in needs and shutil.which("java") is None:
        missing.append("java is not on PATH: the captioning metrics (pycocoevalcap's PTB tokenizer) need it")
    if "judge" in needs and not os.environ.get("OPENAI_API_KEY"):
        warnings.append("OPENAI_API_KEY is not set: mmbench_en_dev's GPT answer matching falls back to lmms-eval's default")
    if num_processes > 1 and shutil.which("accelerate") is None:
        missing.append("--num-processes > 1 needs accelerate on PATH")
    return missing, warnings


def layer_problems(config: Config, tiny: list[str]) -> list[str]:
    """Methods whose K is beyond a tiny checkpoint's LLM (its shape is known before it is built):
    the patch would refuse them at the first sample of every run."""
    problems = []
    for model in tiny:
        layers = tiny_llm_shape(MODELS[model].tiny)["layers"]
        for method, spec in config.methods.items():
            k = config.models[model].get(method, {}).get("layer_index", spec.get("layer_index", default_layer_index(METHODS[method])))
            if k >= layers:
                problems.append(
                    f"{method}'s layer_index {k} is beyond {model}'s LLM, which has {layers} layers (0 .. {layers - 1}); "
                    f"give it a smaller layer_index for this model (models: {{{model}: {{{method}: {{layer_index: K}}}}}})"
                )
    return problems


def default_config() -> tuple[str, str]:
    """``paper_table1`` with a GPU and the hub (or a cache), else ``synth`` (the tiny LLaVA trained
    on the synthetic benchmark); and why."""
    gpus = gpu_count()
    if gpus == 0:
        return "synth", "no GPU"
    if not hub_reachable() and not all(cached_model(m) for m in MODELS if MODELS[m].tiny is None):
        return "synth", "no hub access and no local cache of the models"
    return "paper_table1", f"{gpus} GPU(s) and the models available"


# -- the runs folder ------------------------------------------------------------------------


class FolderBusy(RuntimeError):
    """Another harness holds the runs folder."""


def lock_runs_folder(folder: Path):
    """Hold ``folder/.lock`` for this process's life (the kernel drops it however the process ends);
    returns the open lock file. Raises ``FolderBusy`` naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderBusy(
            f"another harness is writing to {folder} ({holder}); wait for it to finish or stop it, then run again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    return handle


def attempt_name(run: Run) -> str:
    return time.strftime("%Y%m%d_%H%M%S") + f"_{time.time_ns() % 1_000_000_000:09d}_{task_key(run.tasks)}"


def record_path(run_folder: Path, attempt: str) -> Path:
    return run_folder / f"otprune_{attempt}.json"


def _group_alive(child: dict) -> bool:
    """Whether the child's process group still has a process (and its leader, if any, is that child)."""
    try:
        os.killpg(int(child["pgid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, TypeError, ValueError):
        return False
    try:
        cmdline = Path(f"/proc/{int(child['pgid'])}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return any(part.endswith(b"lmms_eval") for part in cmdline)


def stale_children(runs_label_dir: Path) -> list[dict]:
    """lmms-eval children of earlier harnesses still running: an attempt folder with a ``child.json``
    whose process group lives and that has no record (the harness died before writing it)."""
    stale = []
    for path in sorted(runs_label_dir.glob("*/*/attempts/*/child.json")):
        attempt = path.parent
        run_folder = attempt.parent.parent
        if record_path(run_folder, attempt.name).exists():
            continue
        child = read_results(path)
        if child and _group_alive(child):
            stale.append({**child, "folder": str(run_folder), "attempt": str(attempt)})
    return stale


# -- running --------------------------------------------------------------------------------


def checkpoint(model: str, runs_root: Path) -> str:
    """What lmms-eval loads: the hub id, or the tiny checkpoint built once under RUNS/checkpoints
    (under a lock: harnesses of other configs share it). A trained checkpoint is copied again when
    the shipped weights changed (a retraining) since the copy was made."""
    spec = MODELS[model]
    if spec.tiny is None:
        return model
    folder = runs_root / "checkpoints" / model
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = spec.trained and (
            not (folder / WEIGHTS).is_file() or sha256(folder / WEIGHTS) != trained_weights_sha256(model)
        )
        if stale or not (folder / "otprune_tiny.json").exists():
            tiny_builder().build(folder, spec.tiny)
    return str(folder.resolve())


def trained_weights_sha256(model: str) -> str:
    """The SHA-256 of a trained model's shipped weights: part of its runs' setting, so that results
    of an earlier training never pass for the current checkpoint's."""
    return sha256(tiny_builder().TRAINED[MODELS[model].tiny] / WEIGHTS)


def tiny_llm_shape(variant: str) -> dict:
    """``{layers, hidden, ffn}`` of the LLM build_tiny_llava.py gives ``variant``: a trained variant's
    shipped config.json, the random variants' fixed shape."""
    builder = tiny_builder()
    if variant in builder.TRAINED:
        shape = llm_shape(builder.TRAINED[variant])
        if shape is None:
            raise MissingResource(f"{builder.TRAINED[variant] / 'config.json'} is missing or names no LLM shape")
        return shape
    return {"layers": builder.TEXT_LAYERS, "hidden": builder.TEXT_HIDDEN, "ffn": builder.TEXT_FFN}


def llm_shape(folder: Path) -> dict | None:
    """``{layers, hidden, ffn}`` of the LLM in a checkpoint folder's config.json (its
    ``text_config`` where it has one); ``None`` when there is no readable config."""
    config = read_results(Path(folder) / "config.json")
    text = config.get("text_config") or config
    try:
        return {"layers": int(text["num_hidden_layers"]), "hidden": int(text["hidden_size"]), "ffn": int(text["intermediate_size"])}
    except (KeyError, TypeError, ValueError):
        return None


class _DropMessages(logging.Filter):
    """Drops the log records whose message holds ``fragment``."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# transformers' advice to install torchvision when it falls back to the PIL image processor:
# scripts/install.sh removes a torchvision that cannot load against the installed torch on purpose,
# and the PIL processor is the one the tiny checkpoints are built with, so the advice is wrong here.
_TORCHVISION_HINT = _DropMessages("requires torchvision (not installed)")
# transformers' warning that a checkpoint's model type (``llava_llama``, which only LLaVA's own code
# registers) is read into a generic config: loading just the tokenizer reads the config, but no
# model is built from it here, so there is nothing to check.
_TOKENIZER_ONLY = _DropMessages("to instantiate a model of type ``")


def quiet_torchvision_hint() -> None:
    """Silence only that advice, in this process (the tiny builds and tokenizers run here)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_HINT)


@functools.cache
def tiny_builder():
    """The checkout's scripts/build_tiny_llava.py as a module (a script, not part of the package)."""
    if CHECKOUT is None or not (CHECKOUT / TINY_BUILDER).is_file():
        raise MissingResource(
            f"the tiny checkpoints are built by {TINY_BUILDER} of otprune's source checkout, which this otprune "
            f"({PACKAGE}) is not installed from: run configs of tiny models from a clone (pip install -e CLONE)"
        )
    spec = importlib.util.spec_from_file_location("build_tiny_llava", CHECKOUT / TINY_BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(config: Config, run: Run, pretrained: str, num_processes: int, limit: int | None, output: Path) -> list[str]:
    include = sorted({config.catalogue[t]["include_path"] for t in run.tasks if "include_path" in config.catalogue[t]})
    model_args = ",".join(a for a in (f"pretrained={pretrained}", config.model_args) if a)
    if num_processes > 1:
        launcher = ["accelerate", "launch", f"--num_processes={num_processes}", "-m", "lmms_eval"]
    else:
        launcher = [sys.executable, "-m", "lmms_eval"]
    args = [
        "--model", config.lmms_model,
        "--model_args", model_args,
        "--tasks", ",".join(run.tasks),
        "--batch_size", str(config.batch_size),
        "--output_path", str(output.resolve()),
        "--log_samples",
    ]
    for path in include:
        args += ["--include_path", str(ROOT / path)]
    if limit is not None:
        args += ["--limit", str(limit)]
    return launcher + args


def child_env(run: Run, jobs: int) -> dict:
    # Only the config decides the pruning: the caller's own pruning variables do not leak in.
    env = {k: v for k, v in os.environ.items() if k not in METHOD_OWNED and not k.startswith("OTPRUNE_")}
    env.update(run.env)
    env["OTPRUNE_LOG"] = "1"
    # From a checkout, the package comes from it whatever is pip-installed; otprune.patches only through
    # an installed distribution's mapping (patches/ is not inside otprune/): the start-up probe says which.
    if CHECKOUT is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p)
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


_PROBE = """
import importlib.metadata as md, importlib.util, json
eps = [e.value for e in md.entry_points(group="lmms_eval.models") if e.name == "otprune"]
def origin(name):
    try:
        spec = importlib.util.find_spec(name)
    except ImportError as error:
        return "not importable: %s" % error
    return spec.origin if spec else None
try:
    version = md.version("otprune")
except md.PackageNotFoundError:
    version = None
print(json.dumps({"entry_point": eps[0] if eps else None, "otprune": origin("otprune"),
                  "patches": origin("otprune.patches"), "version": version}))
"""


def otprune_copy(env: dict) -> dict:
    """Which otprune a child started with ``env`` imports, its version and entry point, and the
    checkout's commit (``+dirty`` with uncommitted changes; None when not run from a checkout)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, IndexError, json.JSONDecodeError):
        info = {"entry_point": None, "otprune": None, "patches": None, "version": None}
    info["checkout_commit"] = None
    if CHECKOUT is not None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=30).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=CHECKOUT, capture_output=True, text=True, timeout=30).stdout.strip()
            info["checkout_commit"] = (commit + ("+dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def describe_copy(info: dict) -> list[str]:
    """What to tell the user about the otprune a child imports (warnings first)."""
    lines = []
    install = f"pip install -e {CHECKOUT} with {sys.executable}" if CHECKOUT else f"install otprune for {sys.executable}"
    patches = info.get("patches") or ""
    if not info.get("entry_point"):
        lines.append(f"warning: no otprune distribution is installed for {sys.executable}, so lmms-eval will not load its "
                     f"entry point and pruning runs will fail their check; {install}")
    elif not patches.endswith(".py"):
        lines.append(f"warning: otprune.patches is not importable by {sys.executable} (otprune comes from {info.get('otprune')}), "
                     f"so lmms-eval cannot load the pruning entry point and pruning runs will fail their check; {install}")
    elif not patches.startswith(str(CHECKOUT or PACKAGE)):
        lines.append(f"warning: the child imports otprune.patches from {patches}, not from this otprune ({CHECKOUT or PACKAGE})")
    lines.append(f"otprune in the child: {info.get('otprune')} (version {info.get('version')}, checkout {info.get('checkout_commit')})")
    return lines


# Sets the child's parent-death signal, then becomes the command: a harness killed with SIGKILL
# takes its children along (Linux; elsewhere the start-up check reports them).
_EXEC_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Children:
    """The live lmms-eval children of this harness, each the leader of its own process group."""

    def __init__(self):
        self._lock = threading.Lock()
        self._groups: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.stop_signal = 0

    def start(self, cmd: list[str], env: dict, log, attempt: Path, tasks) -> subprocess.Popen | None:
        """Start ``cmd`` in a new session; ``None`` once the harness is stopping."""
        launcher = [sys.executable, "-c", _EXEC_WITH_PARENT, str(os.getpid())] if sys.platform.startswith("linux") else []
        with self._lock:
            if self.stopping.is_set():
                return None
            process = subprocess.Popen(launcher + cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._groups[process.pid] = process
        write_atomically(attempt / "child.json", json.dumps({"pid": process.pid, "pgid": process.pid, "tasks": list(tasks), "cmd": cmd}) + "\n")
        return process

    def finished(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._groups.pop(process.pid, None)

    def stop(self, reason: str, grace: float = 10.0) -> int:
        """Stop every child's process group (SIGTERM, SIGKILL after ``grace`` s); returns how many."""
        with self._lock:
            self.stopping.set()
            self.stop_reason = reason
            groups = list(self._groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_exists(g) for g in groups):
            time.sleep(0.1)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        return len(groups)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class Session:
    """What every run of one invocation shares."""

    num_processes: int
    jobs: int
    limit: int | None
    otprune: dict
    children: Children = field(default_factory=Children)


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
            config_logger.addFilter(_TOKENIZER_ONLY)
            try:
                tokenizer = AutoTokenizer.from_pretrained(pretrained)
            finally:
                config_logger.removeFilter(_TOKENIZER_ONLY)
    except (OSError, ValueError, ImportError):
        return {}
    means = {}
    for task, path in sample_files.items():
        counts = [
            len(tokenizer(json.loads(line)["input"], add_special_tokens=False).input_ids)
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        if counts:
            means[task] = sum(counts) / len(counts)
    return means


def recorded_limit(data: dict):
    """The ``--limit`` a results file says lmms-eval ran with: ``None`` for a full run (it writes
    null or -1), else the number of samples per task (a fraction of the task when < 1)."""
    config = data.get("config")
    value = config.get("limit") if isinstance(config, dict) else None
    if value is None or value == -1:
        return None
    return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else value


def execute(config: Config, run: Run, pretrained: str, session: Session) -> dict | None:
    """Run lmms-eval once in a fresh attempt folder; write the record (atomically, beside the
    attempts) and return it. ``None`` when the harness was stopping and nothing started."""
    attempt_id = attempt_name(run)
    attempt = run.folder / "attempts" / attempt_id
    attempt.mkdir(parents=True)
    log_path = attempt / "lmms_eval.log"
    cmd = command(config, run, pretrained, session.num_processes, session.limit, attempt)
    env = child_env(run, session.jobs)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={v}" for k, v in run.env.items()) + " " + " ".join(cmd) + "\n")
        log.flush()
        process = session.children.start(cmd, env, log, attempt, run.tasks)
        if process is None:
            shutil.rmtree(attempt)
            return None
        # wait4 gives the peak RSS of the process tree it reaped (Linux: max over waited children).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        session.children.finished(process)
    wall = time.perf_counter() - start
    results, done, eval_seconds, limits = {}, set(), None, set()
    for path in sorted(attempt.glob("**/*_results.json")):
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
    samples = {task: path for task in run.tasks for path in sorted(attempt.glob(f"**/*_samples_{task}.jsonl"))[-1:]}
    sample_counts = {task: sum(1 for line in path.read_text().splitlines() if line.strip()) for task, path in samples.items()}
    log = parse_prune_log(log_path.read_text(errors="replace"))
    reason = None
    if session.children.stopping.is_set() and process.returncode != 0:
        reason = f"stopped with the harness ({session.children.stop_reason})"
    elif not set(run.tasks) <= done:
        reason = f"exit code {process.returncode}; no results file for {', '.join(sorted(set(run.tasks) - done))}"
    elif limits != {session.limit}:
        reason = f"the results file says limit {sorted(map(str, limits))}, the harness asked for {session.limit}"
    else:
        reason = pruning_problem(run.env, log, sum(sample_counts.values()))
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
        "limit": session.limit,
        "results": results,
        "wall_s": round(wall, 2),
        "eval_s": eval_seconds,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "num_processes": session.num_processes,
        "parallel_jobs": session.jobs,
        "samples": sample_counts,
        "text_tokens": text_tokens(pretrained, samples) if reason is None else {},
        "log": str(log_path.relative_to(run.folder)),
        "otprune": session.otprune,
        "child_env": redacted(env),
        "command": cmd,
        **log,
    }
    write_atomically(record_path(run.folder, attempt_id), json.dumps(record, indent=1) + "\n")
    return record


def describe(run: Run) -> str:
    return f"{model_label(run.model)} {run.method} {ratio_label(run.ratio)} {','.join(run.tasks)}"


def log_tail(run: Run, record: dict, lines: int = 15) -> str:
    text = (run.folder / record["log"]).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


class Stopped(Exception):
    """SIGINT or SIGTERM reached the harness."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        meaning = "evaluates no sample" if limit == 0 else "means every sample to lmms-eval"
        raise ConfigError(f"--limit {limit} is not allowed: it {meaning}; give N >= 1 samples per task, or omit --limit for a full run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="otprune run", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a name in configs/ or a .yaml path (default: see above)")
    parser.add_argument("--num-processes", type=int, help="lmms-eval processes per run, one per GPU (accelerate launch)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU only; timings then share the cores)")
    parser.add_argument("--limit", type=int, help="samples per task (lmms-eval --limit), for a quick look; goes to RUNS/<config>_limitN")
    parser.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help=f"where <config>/... go (default: {DEFAULT_RUNS})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)
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
        runs = list({(r.folder, r.tasks): r for r in plan_runs(config, runs_root, label, args.limit)}.values())
        check_paths(runs_root, label, runs)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in config.notes:
        print(f"note: {note}")
    num_processes = args.num_processes or config.num_processes
    if num_processes < 1 or args.jobs < 1:
        print("error: --num-processes and --jobs must be >= 1", file=sys.stderr)
        return 2
    missing, warnings = prerequisites(config, num_processes)
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
        pending = pending_runs(runs)
        print(f"{label}: {len(runs)} runs, {len(runs) - len(pending)} finished before, {len(pending)} to run -> {label_dir}")
        for i, run in enumerate(pending, 1):
            pretrained = model_label(run.model) if MODELS[run.model].tiny else run.model
            cmd = command(config, run, pretrained, num_processes, args.limit, run.folder / "attempts" / "<stamp>")
            print(f"[{i}/{len(pending)}] {' '.join(f'{k}={v}' for k, v in run.env.items())} {' '.join(cmd)}")
        return 0
    try:
        lock = lock_runs_folder(label_dir)
    except FolderBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write to {error.filename or label_dir}: {error.strerror}; "
              "choose a writable folder with --runs-dir, or fix its permissions", file=sys.stderr)
        return 2
    try:
        return _run_locked(config, runs, label, label_dir, runs_root, num_processes, args)
    except OSError as error:
        print(f"error: {error.filename or label_dir}: {error.strerror}; check that the runs folder is writable "
              "and has free space, then run the same command again (finished runs are kept)", file=sys.stderr)
        return 2
    finally:
        lock.close()


def pending_runs(runs: list[Run], busy: set = frozenset()) -> list[Run]:
    """The runs (each with only its unfinished tasks) still to do, but those a live child is doing."""
    pending = []
    for run in runs:
        if (run.folder, run.tasks) in busy:
            continue
        todo = tuple(t for t in run.tasks if t not in finished_tasks(run.folder))
        if todo:
            pending.append(Run(run.model, run.method, run.ratio, run.env, todo, run.folder, run.setting))
    return pending


def _run_locked(config: Config, runs: list[Run], label: str, label_dir: Path, runs_root: Path, num_processes: int, args) -> int:
    stale = stale_children(label_dir)
    for child in stale:
        print(f"error: an lmms-eval child of an earlier harness is still running: pid {child['pid']} on "
              f"{child['folder']} ({', '.join(child.get('tasks', []))}); not starting that run again. "
              f"Stop it with `kill -- -{child['pgid']}`, then run again", file=sys.stderr)
    busy = {
        (run.folder, run.tasks)
        for run in runs
        for child in stale
        if Path(child["folder"]).resolve() == run.folder.resolve() and set(child.get("tasks", [])) & set(run.tasks)
    }
    try:
        for run in runs:
            check_setting(run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pending = pending_runs(runs, busy)
    print(f"{label}: {len(runs)} runs, {len(runs) - len(pending) - len(busy)} finished before, {len(busy)} still running elsewhere, "
          f"{len(pending)} to run -> {label_dir}")
    for run in pending:
        run.folder.mkdir(parents=True, exist_ok=True)
        if not (run.folder / "setting.json").exists():
            write_atomically(run.folder / "setting.json", json.dumps(run.setting, indent=1) + "\n")
    failed = []
    if pending:
        pretrained = {model: checkpoint(model, runs_root) for model in {r.model for r in pending}}
        session = Session(num_processes, args.jobs, args.limit, otprune_copy(child_env(pending[0], args.jobs)))
        for line in describe_copy(session.otprune):
            print(line)
        failed = _run_all(config, pending, pretrained, session)
        if failed is None:
            return 128 + session.children.stop_signal
    if failed:
        print(f"{len(failed)} run(s) failed; run the same command again to retry them (finished runs are kept).")
    if not args.no_report:
        from otprune import report

        report.main([str(label_dir)])
    return 1 if failed or stale else 0


def _run_all(config: Config, pending: list[Run], pretrained: dict, session: Session) -> list[Run] | None:
    """Run ``pending`` ``session.jobs`` at a time; the failed runs, or ``None`` when a signal stopped
    the harness (its children are then stopped too, and their attempts recorded as failed)."""
    failed = []

    def one(index: int, run: Run) -> None:
        if session.jobs == 1:
            print(f"[{index}/{len(pending)}] {describe(run)} ...", end=" ", flush=True)
        try:
            record = execute(config, run, pretrained[run.model], session)
        except OSError as error:
            print(f"FAILED: {error.filename or run.folder}: {error.strerror}; check that the runs folder is writable "
                  "and has free space", flush=True)
            failed.append(run)
            return
        if record is None:
            return
        outcome = f"done in {record['wall_s']:.1f} s" if record["status"] == "done" else (
            f"FAILED after {record['wall_s']:.1f} s ({record['reason']}); log: {run.folder / record['log']}"
        )
        prefix = "" if session.jobs == 1 else f"[{index}/{len(pending)}] {describe(run)} ... "
        print(prefix + outcome, flush=True)
        if record["status"] != "done":
            print(log_tail(run, record), flush=True)
            failed.append(run)

    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    pool = ThreadPoolExecutor(max_workers=session.jobs)
    try:
        futures = [pool.submit(one, index, run) for index, run in enumerate(pending, 1)]
        for future in futures:
            future.result()
    except Stopped as stop:
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        stopped = session.children.stop(f"{stop.args[0]} to the harness")
        pool.shutdown(wait=True, cancel_futures=True)
        print(f"\nstopped by {stop.args[0]}: {stopped} lmms-eval child process group(s) stopped; finished runs are kept. "
              "Run the same command again to resume.", file=sys.stderr, flush=True)
        session.children.stop_signal = stop.signum
        return None
    finally:
        pool.shutdown(wait=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return failed


if __name__ == "__main__":
    sys.exit(main())
