"""Read and check an experiment config (``configs/*.yaml``): every error names the config, the key,
the value and what is allowed, before any run starts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from otprune import prune_config
from otprune.harness import resources
from otprune.harness.catalogue import ADAPTIVE, MODELS, RATIO_FREE, baseline, method_labels, ratio_label
from otprune.harness.errors import ConfigError
from otprune.harness.files import describe_type
from otprune.harness.resources import config_file, load_catalogue
from otprune.methods import get_method
from otprune.prune_config import config_from_env

CONFIG_KEYS = {"lmms_model", "model_args", "models", "methods", "tasks", "batch_size", "num_processes", "group_tasks", "executor", "calibrations"}
# The executor block: where runs happen, and the scheduler's settings (a command-line flag wins).
EXECUTORS = ("local", "slurm")
EXECUTOR_KEYS = {
    "name": "one of " + ", ".join(EXECUTORS),
    "partition": "a Slurm partition name",
    "gpus_per_job": "an integer >= 0 (default: the lmms-eval processes of a run, one GPU each)",
    "time": "minutes, an integer >= 1",
    "mem": "GB, an integer >= 1",
    "account": "a Slurm account name",
    "qos": "a Slurm QOS name",
    "max_parallel": "an integer >= 1 (jobs of the array running at once)",
    "setup": "shell lines each job runs before lmms-eval (module load ..., source venv/bin/activate)",
}
METHOD_KEYS = {"ratios", "layer_index", "env", "options", "models"}
OVERRIDE_KEYS = {"layer_index", "env", "options"}
# Variables the harness derives from the method: a config setting them would run one method under
# another's label.
METHOD_OWNED = {
    "BASELINE": "the method's name",
    "SUBSET_RATIO": "the method's 'ratios'",
    "LAYER_INDEX": "the method's 'layer_index' key",
    "OTPRUNE_LOG": "the harness (always 1: the pruning check reads it)",
    "OTPRUNE_OPTIONS": "the method's 'options'",
}
# What a config's env may set: selector options, and variables that change no code the child loads.
# Anything else (PYTHONPATH, LD_PRELOAD, ...) could run foreign code inside the child.
OPTION_VARIABLES = (*prune_config.OPTION_VARIABLES, "OTPRUNE_OT")
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
# Options that name an input file of the run (FITPRUNE's recipe): named relative to the config's
# folder, and the file's SHA-256 is part of the run's setting (otprune.harness.plan.run_setting).
FILE_OPTIONS = ("recipe",)
# A calibration step (``calibrations: {NAME: {...}}``): how a file option's file is made, by
# ``otprune calibrate``, when a method names it as ``{recipe: {calibration: NAME}}``. The harness
# runs it first when its file is missing (otprune.harness.plan.plan_calibrations).
CALIBRATED = {"FitPrune": "fitprune"}  # a method's label -> otprune calibrate's METHOD
CALIBRATION_KEYS = {
    "method": "one of " + ", ".join(CALIBRATED),
    "model": "a model of the config's models",
    "tasks": "a list of task names from configs/tasks.yaml",
    "limit": "samples of each task, an integer >= 1",
    "tflop": "the prefill budget in TFLOP, a number > 0 (give tflop or ratio)",
    "ratio": "the budget as a share of the unpruned prefill, a number in (0, 1) (give tflop or ratio)",
}
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
    # The tasks each lmms-eval process of a run evaluates together (``group_tasks``).
    task_groups: list = field(default_factory=list)
    executor: dict = field(default_factory=dict)
    # NAME -> the checked calibration block (CALIBRATION_KEYS).
    calibrations: dict = field(default_factory=dict)
    catalogue: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _task_groups(group_tasks, tasks: list, check) -> list[tuple]:
    """``group_tasks`` as the tasks of each process: false, one task each; true, all together; a
    list of task lists, those groups (every task of ``tasks`` in exactly one)."""
    if isinstance(group_tasks, bool):
        return [tuple(tasks)] if group_tasks else [(task,) for task in tasks]
    allowed = "true, false, or a list of lists of the config's tasks, each task in exactly one"
    if not isinstance(group_tasks, list) or not all(isinstance(g, list) and g and all(isinstance(t, str) for t in g) for g in group_tasks):
        check.fail("group_tasks", group_tasks, allowed)
    listed = [t for g in group_tasks for t in g]
    unknown = [t for t in listed if t not in tasks]
    twice = sorted({t for t in listed if listed.count(t) > 1})
    missing = [t for t in tasks if t not in listed]
    for problem, names in (("not in tasks", unknown), ("in more than one group", twice), ("in no group", missing)):
        if names:
            check.fail("group_tasks", group_tasks, f"{allowed} ({', '.join(names)}: {problem})")
    return [tuple(g) for g in group_tasks]


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = resources.CONFIGS / f"{name_or_path}.yaml"
    if not candidate.exists():
        # An installation without its configs: name that, rather than an empty list of configs.
        config_file("tasks.yaml")
        known = sorted(p.stem for p in resources.CONFIGS.glob("*.yaml") if p.stem not in ("tasks", "paper_results"))
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


class _Checker:
    """Errors that name the config, the key path, the value and what is allowed."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, value, allowed: str):
        raise ConfigError(f"config {self.path.name}: {key}={value!r} ({describe_type(value)}) is not allowed; allowed: {allowed}")

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
                raise ConfigError(f"config {self.path.name}: {key}.{name}={setting!r} is not allowed: {name} is set by {METHOD_OWNED[name]}")
            if name not in ALLOWED_ENV:
                raise ConfigError(f"config {self.path.name}: {key}.{name} is not allowed: a config's env may set only {', '.join(ALLOWED_ENV)}")
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
    calibrations = _calibrations(data.get("calibrations"), list(_as_mapping(data["models"], "models", check)), catalogue, check)
    models = {}
    for model, overrides in _as_mapping(data["models"], "models", check).items():
        if model not in MODELS:
            raise ConfigError(f"config {path.name}: unknown model {model!r}; allowed: {_names(MODELS)}")
        per_method = check.mapping(overrides, f"models.{model}", "a mapping method: {layer_index: K, env: {...}}")
        models[model] = {}
        for method, spec in per_method.items():
            if baseline(method) is None:
                raise ConfigError(f"config {path.name}: model {model!r} overrides unknown method {method!r}; allowed: {_names(method_labels())}")
            spec = check.mapping(spec, f"models.{model}.{method}", f"a mapping with keys {_names(OVERRIDE_KEYS)}")
            _check_keys(spec, OVERRIDE_KEYS, f"models.{model}.{method}", path)
            models[model][method] = _method_settings(spec, f"models.{model}.{method}", check, calibrations)
    methods = {}
    for method, spec in _as_mapping(data["methods"], "methods", check).items():
        if baseline(method) is None:
            raise ConfigError(f"config {path.name}: unknown method {method!r}; allowed: {_names(method_labels())}")
        spec = check.mapping(spec, f"methods.{method}", f"a mapping with keys {_names(METHOD_KEYS)}")
        extra = set(spec) - METHOD_KEYS
        if extra:
            raise ConfigError(f"config {path.name}: method {method!r} has unknown key(s) {_names(map(str, extra))}; allowed: {_names(METHOD_KEYS)}")
        if method in RATIO_FREE and "ratios" in spec:
            raise ConfigError(f"config {path.name}: method {method!r} takes no ratios")
        ratios = [] if method in RATIO_FREE else method_ratios(method, spec.get("ratios"), path)
        merged = list(dict.fromkeys(r if r == ADAPTIVE else float(ratio_label(r)) for r in ratios))
        if len(merged) < len(ratios):
            notes.append(f"method {method}: ratios {ratios} run once each as {[ratio_label(r) for r in merged]} (the child sees them as equal)")
        methods[method] = {"ratios": merged, **_method_settings(spec, f"methods.{method}", check, calibrations)}
        if "models" in spec:
            runs_on = check.names(spec["models"], f"methods.{method}.models", "a list of the config's models (default: all)")
            unknown = [m for m in runs_on if m not in models]
            if unknown:
                check.fail(f"methods.{method}.models", runs_on, f"models of the config's models: {_names(models)}")
            methods[method]["models"] = runs_on
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
    tasks = list(dict.fromkeys(tasks))
    task_groups = _task_groups(data.get("group_tasks", False), tasks, check)
    config = Config(
        name=path.stem,
        lmms_model=lmms_model,
        model_args=model_args,
        models=models,
        methods=methods,
        tasks=tasks,
        batch_size=_positive_int(data.get("batch_size", 1), "batch_size", check),
        num_processes=_positive_int(data.get("num_processes", 1), "num_processes", check),
        task_groups=task_groups,
        executor=executor_settings(data.get("executor"), check),
        calibrations=calibrations,
        catalogue=catalogue,
        notes=notes,
    )
    for model, overrides in models.items():
        for method, spec in methods.items():
            if model not in spec.get("models", models):
                continue
            calibration = calibration_named(spec, overrides.get(method, {}))
            if calibration is not None:
                if calibrations[calibration]["model"] != model:
                    raise ConfigError(
                        f"config {path.name}: {model} {method} names calibration {calibration!r}, made for {calibrations[calibration]['model']}; "
                        f"allowed: a calibration of {model} (or the method's 'models' leaving {model} out)"
                    )
                # Its recipe may not be made yet: the schedule is checked when the runs are planned with it.
                continue
            # Each ratio: an adaptive one (SUBSET_RATIO unset) is allowed where a number is not, and back.
            for ratio in spec["ratios"] or [RATIO_FREE[method]]:
                try:
                    config_from_env(run_env(method, ratio, spec, overrides.get(method, {})))
                except ValueError as error:
                    raise ConfigError(f"config {path.name}: {model} {method}: {error}") from None
    return config


RATIOS_ALLOWED = f"a list of numbers in (0, 1], or {ADAPTIVE!r} for a method that chooses each image's count itself"


def method_ratios(method: str, ratios, path: Path) -> list:
    """A method's checked ``ratios``: numbers in (0, 1] and ``adaptive``, which only a method that
    asks for the ``adaptive`` context may run at (SUBSET_RATIO unset: it chooses each image's
    count). Left out: ``[adaptive]`` for such a method; any other needs ratios."""
    if ratios is None:
        if not asks_adaptive(method, path):
            raise ConfigError(f"config {path.name}: method {method!r} needs 'ratios', {RATIOS_ALLOWED}")
        return [ADAPTIVE]
    if not isinstance(ratios, list) or not ratios or not all(r == ADAPTIVE or _is_fraction(r) for r in ratios):
        raise ConfigError(f"config {path.name}: method {method!r} ratios={ratios!r}; allowed: {RATIOS_ALLOWED}")
    if ADAPTIVE in ratios and not asks_adaptive(method, path):
        raise ConfigError(
            f"config {path.name}: method {method!r} ratio {ADAPTIVE!r} is not allowed: BASELINE={baseline(method)} does not ask for the "
            f"'adaptive' context, so it cannot choose its own count per image; allowed: numbers in (0, 1]"
        )
    return ratios


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def asks_adaptive(method: str, path: Path) -> bool:
    """Whether a config's method asks for the ``adaptive`` context (``Method.context``)."""
    try:
        return "adaptive" in get_method(baseline(method)).context
    except ValueError as error:  # not installed, or a plugin that cannot be loaded
        raise ConfigError(f"config {path.name}: method {method!r}: {error}") from None


def executor_settings(value, check: _Checker) -> dict:
    """A config's ``executor:`` block, checked: ``{}`` when absent."""
    spec = check.mapping(value, "executor", f"a mapping with keys {_names(EXECUTOR_KEYS)}")
    for key, setting in spec.items():
        if key not in EXECUTOR_KEYS:
            raise ConfigError(f"config {check.path.name}: executor has unknown key {key!r}; allowed: {_names(EXECUTOR_KEYS)}")
        if key == "name":
            if setting not in EXECUTORS:
                check.fail("executor.name", setting, EXECUTOR_KEYS[key])
        elif key in ("gpus_per_job", "time", "mem", "max_parallel"):
            low = 0 if key == "gpus_per_job" else 1
            if isinstance(setting, bool) or not isinstance(setting, int) or setting < low:
                check.fail(f"executor.{key}", setting, EXECUTOR_KEYS[key])
        elif not isinstance(setting, str) or not setting.strip():
            check.fail(f"executor.{key}", setting, EXECUTOR_KEYS[key])
    return dict(spec)


def _check_keys(spec: dict, allowed: set, key: str, path: Path) -> None:
    extra = set(spec) - allowed
    if extra:
        raise ConfigError(f"config {path.name}: {key} has unknown key(s) {_names(map(str, extra))}; allowed: {_names(allowed)}")


def _calibrations(value, model_names: list, catalogue: dict, check: _Checker) -> dict:
    """The ``calibrations:`` block, checked: NAME -> its settings."""
    blocks = check.mapping(value, "calibrations", f"a mapping NAME: {{{', '.join(CALIBRATION_KEYS)}}}")
    calibrations = {}
    for name, block in blocks.items():
        key = f"calibrations.{name}"
        if not SAFE_NAME.fullmatch(name):
            check.fail("calibrations", name, "names of letters, digits, '.', '_', '-' (the recipe's file name)")
        block = check.mapping(block, key, f"a mapping with keys {_names(CALIBRATION_KEYS)}", empty_ok=False)
        _check_keys(block, set(CALIBRATION_KEYS), key, check.path)
        for required in ("method", "model", "tasks", "limit"):
            if required not in block:
                raise ConfigError(f"config {check.path.name}: {key} has no {required!r}; give {CALIBRATION_KEYS[required]}")
        if block["method"] not in CALIBRATED:
            check.fail(f"{key}.method", block["method"], CALIBRATION_KEYS["method"])
        if block["model"] not in model_names:
            check.fail(f"{key}.model", block["model"], f"a model of the config's models: {_names(map(str, model_names))}")
        tasks = check.names(block["tasks"], f"{key}.tasks", CALIBRATION_KEYS["tasks"])
        unknown = [task for task in tasks if task not in catalogue]
        if unknown:
            check.fail(f"{key}.tasks", tasks, f"task names from configs/tasks.yaml ({', '.join(unknown)}: unknown)")
        _positive_int(block["limit"], f"{key}.limit", check)
        budgets = [b for b in ("tflop", "ratio") if b in block]
        if len(budgets) != 1:
            check.fail(f"{key} budget", budgets, "exactly one of tflop (a number > 0) and ratio (a number in (0, 1))")
        budget = block[budgets[0]]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (budget > 0 if budgets[0] == "tflop" else 0 < budget < 1):
            check.fail(f"{key}.{budgets[0]}", budget, CALIBRATION_KEYS[budgets[0]])
        calibrations[name] = dict(block)
    return calibrations


def calibration_named(method_spec: dict, model_override: dict) -> str | None:
    """The calibration whose file a run's options name (the model's override first), else ``None``."""
    options = {**method_spec.get("options", {}), **model_override.get("options", {})}
    named = [options[name]["calibration"] for name in FILE_OPTIONS if isinstance(options.get(name), dict)]
    return named[0] if named else None


def _method_settings(spec: dict, key: str, check: _Checker, calibrations: dict) -> dict:
    settings = {"env": check.env(spec.get("env"), f"{key}.env")}
    if "options" in spec:
        options = dict(check.mapping(spec["options"], f"{key}.options", "a mapping option: value (the method's keyword-only parameters)"))
        for name in FILE_OPTIONS:
            if isinstance(options.get(name), str):
                # lmms-eval runs in its attempt folder: the file is named from the config's folder, for any.
                options[name] = str((check.path.parent / options[name]).expanduser().resolve())
            elif name in options and (
                not isinstance(options[name], dict) or set(options[name]) != {"calibration"} or options[name]["calibration"] not in calibrations
            ):
                check.fail(
                    f"{key}.options.{name}",
                    options[name],
                    f"a file named from the config's folder, or {{calibration: NAME}} of calibrations: {_names(calibrations) or 'none given'}",
                )
        settings["options"] = options
        try:
            json.dumps(settings["options"], allow_nan=False)
        except (TypeError, ValueError):
            check.fail(f"{key}.options", settings["options"], "values JSON can carry: numbers, strings, booleans, lists, mappings")
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


def run_env(method: str, ratio: float | str, method_spec: dict, model_override: dict, recipes: dict | None = None) -> dict:
    """The pruning variables of one run, as strings (the patch reads them in every process): the
    method's, then the model's override of it; a file option naming a calibration becomes the
    file ``recipes`` gives it (calibration NAME -> path)."""
    env = {"BASELINE": baseline(method)}
    # An adaptive run leaves SUBSET_RATIO out of the child's environment: the method chooses each count.
    if method not in RATIO_FREE and ratio != ADAPTIVE:
        env["SUBSET_RATIO"] = ratio_label(ratio)
    layer_index = model_override.get("layer_index", method_spec.get("layer_index"))
    if layer_index is not None:
        env["LAYER_INDEX"] = str(layer_index)
    env.update({**method_spec.get("env", {}), **model_override.get("env", {})})
    options = {**method_spec.get("options", {}), **model_override.get("options", {})}
    calibration = calibration_named(method_spec, model_override)
    if calibration is not None:
        options.update({name: str(recipes[calibration]) for name in FILE_OPTIONS if isinstance(options.get(name), dict)})
    if options:
        env["OTPRUNE_OPTIONS"] = json.dumps(options, sort_keys=True)
    return env
