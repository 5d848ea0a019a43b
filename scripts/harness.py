"""Run every (model, method, ratio, task) of an experiment config through lmms-eval, resumably.

    python scripts/harness.py [CONFIG] [--num-processes N] [--jobs N] [--limit N] [--runs-dir DIR]
                              [--dry-run] [--no-report]

CONFIG is a name in configs/ (``smoke``, ``paper_table1``) or a path to a YAML file; without it,
``paper_table1`` runs when a GPU and the Hugging Face hub (or a local cache) are there, else
``smoke``. Each run writes to ``RUNS/<config>/<model>/<method>_<ratio>/``: lmms-eval's results
and samples, the captured output (``lmms_eval_<stamp>.log``) and the harness's own record
(``otprune_<stamp>.json``: tokens before/after per sample, selector time, wall time, peak memory).
A task counts as finished only when a results file lists it, whatever lmms-eval's exit code;
finished tasks are skipped, failed ones run again on the next invocation, and no file is ever
overwritten. The report (scripts/report.py) runs at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))

from otprune.config import config_from_env  # noqa: E402

# Display name (the paper's) -> BASELINE value of the patch.
METHODS = {
    "Original": "ORIG",
    "OTPrune": "OURS",
    "DivPrune": "DIVPRUNE",
    "FastV": "FASTV",
    "VTW": "VTW",
    "DPP": "DPP",
    "Random": "RANDOM",
    "TrimTokenator": "TRIM",
    "STP": "STP",
}
# Methods that keep no ratio: the full model, and VTW (drops every visual token at layer K).
RATIO_FREE = {"Original": 1.0, "VTW": 0.0}


@dataclass(frozen=True)
class ModelSpec:
    """``flops_model``: the real LLM shape (otprune.measures.MODELS) of the TFLOP column;
    ``tiny``: the build_tiny_llava.py variant when the checkpoint is built here."""

    flops_model: str
    tiny: str | None = None


MODELS = {
    "liuhaotian/llava-v1.5-7b": ModelSpec("llava-1.5-7b"),
    "liuhaotian/llava-v1.5-13b": ModelSpec("llava-1.5-13b"),
    "liuhaotian/llava-v1.6-vicuna-7b": ModelSpec("llava-1.6-7b"),
    "Qwen/Qwen2.5-VL-7B-Instruct": ModelSpec("qwen2.5-vl-7b"),
    "Qwen/Qwen3-VL-8B-Instruct": ModelSpec("qwen3-vl-8b"),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ModelSpec("llava-onevision-7b"),
    "tiny-llava-1.5": ModelSpec("llava-1.5-7b", tiny="llava-1.5"),
    "tiny-llava-1.6": ModelSpec("llava-1.6-7b", tiny="llava-1.6"),
}
CONFIG_KEYS = {"lmms_model", "model_args", "models", "methods", "tasks", "batch_size", "num_processes", "group_tasks"}
METHOD_KEYS = {"ratios", "env"}
LOG_LINE = re.compile(r"otprune (\w+): visual tokens ([\d\->, ]+); selector ([\d.]+) ms(?:; ot ([^\n]+))?")


class ConfigError(ValueError):
    """A config that cannot run; raised before any run starts."""


@dataclass(frozen=True)
class Run:
    model: str
    method: str
    ratio: float
    env: dict
    tasks: tuple[str, ...]
    folder: Path


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


def load_catalogue() -> dict:
    """``{task: spec}`` from configs/tasks.yaml (paper and local tasks together)."""
    data = yaml.safe_load((CONFIGS / "tasks.yaml").read_text())
    return {**data["paper"], **data["local"]}


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = CONFIGS / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in ("tasks", "paper_results"))
        raise ConfigError(f"no config {name_or_path!r}; allowed: {', '.join(known)} or a path to a .yaml file")
    return candidate


def _names(values) -> str:
    return ", ".join(sorted(values))


def load_config(name_or_path: str) -> Config:
    """Read and check a config; every unknown model, method, task or key is a ``ConfigError``."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with keys: {_names(CONFIG_KEYS)}")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise ConfigError(f"config {path.name}: unknown key(s) {_names(unknown)}; allowed: {_names(CONFIG_KEYS)}")
    for key in ("models", "methods", "tasks"):
        if not data.get(key):
            raise ConfigError(f"config {path.name}: '{key}' is missing or empty")
    catalogue = load_catalogue()
    models = {name: (overrides or {}) for name, overrides in _as_mapping(data["models"], "models", path).items()}
    for model, overrides in models.items():
        if model not in MODELS:
            raise ConfigError(f"config {path.name}: unknown model {model!r}; allowed: {_names(MODELS)}")
        for method in overrides:
            if method not in METHODS:
                raise ConfigError(f"config {path.name}: model {model!r} overrides unknown method {method!r}; allowed: {_names(METHODS)}")
    methods = {name: (spec or {}) for name, spec in _as_mapping(data["methods"], "methods", path).items()}
    for method, spec in methods.items():
        if method not in METHODS:
            raise ConfigError(f"config {path.name}: unknown method {method!r}; allowed: {_names(METHODS)}")
        extra = set(spec) - METHOD_KEYS
        if extra:
            raise ConfigError(f"config {path.name}: method {method!r} has unknown key(s) {_names(extra)}; allowed: {_names(METHOD_KEYS)}")
        if method in RATIO_FREE and "ratios" in spec:
            raise ConfigError(f"config {path.name}: method {method!r} takes no ratios")
        ratios = spec.get("ratios", [])
        if not isinstance(ratios, list) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios
        ):
            raise ConfigError(f"config {path.name}: method {method!r} ratios={ratios!r}; allowed: a list of numbers in (0, 1]")
    tasks = list(data["tasks"])
    for task in tasks:
        if task not in catalogue:
            raise ConfigError(f"config {path.name}: unknown task {task!r}; allowed (configs/tasks.yaml): {_names(catalogue)}")
    config = Config(
        name=path.stem,
        lmms_model=data.get("lmms_model", "llava"),
        model_args=data.get("model_args", ""),
        models=models,
        methods=methods,
        tasks=tasks,
        batch_size=_positive_int(data.get("batch_size", 1), "batch_size", path),
        num_processes=_positive_int(data.get("num_processes", 1), "num_processes", path),
        group_tasks=bool(data.get("group_tasks", False)),
        catalogue=catalogue,
    )
    for run in plan_runs(config, Path("runs")):
        try:
            config_from_env(run.env)
        except ValueError as error:
            raise ConfigError(f"config {path.name}: {run.model} {run.method}: {error}") from None
    return config


def _as_mapping(value, key: str, path: Path) -> dict:
    if isinstance(value, list):
        return {name: {} for name in value}
    if isinstance(value, dict):
        return value
    raise ConfigError(f"config {path.name}: '{key}' must be a list of names or a mapping")


def _positive_int(value, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config {path.name}: {key}={value!r} is not allowed; it must be an integer >= 1")
    return value


def run_env(method: str, ratio: float, method_env: dict, model_env: dict) -> dict:
    """The pruning variables of one run, as strings (the patch reads them in every process)."""
    env = {"BASELINE": METHODS[method]}
    if method not in RATIO_FREE:
        env["SUBSET_RATIO"] = f"{ratio:g}"
    env.update({key: str(value) for key, value in {**method_env, **model_env}.items()})
    return env


def ratio_label(ratio: float) -> str:
    return f"{ratio:g}"


def model_label(model: str) -> str:
    return model.split("/")[-1]


def plan_runs(config: Config, runs_root: Path, label: str | None = None) -> list[Run]:
    """Every run of ``config`` in order: model, method, ratio, then task (or the tasks together),
    under ``runs_root/<label>`` (default: the config's name)."""
    runs = []
    for model, overrides in config.models.items():
        for method, spec in config.methods.items():
            ratios = [RATIO_FREE[method]] if method in RATIO_FREE else spec.get("ratios", [])
            if not ratios:
                raise ConfigError(f"config {config.name}: method {method!r} needs 'ratios'")
            for ratio in ratios:
                env = run_env(method, ratio, spec.get("env", {}), overrides.get(method, {}))
                folder = runs_root / (label or config.name) / model_label(model) / f"{method}_{ratio_label(ratio)}"
                groups = [tuple(config.tasks)] if config.group_tasks else [(task,) for task in config.tasks]
                runs += [Run(model, method, ratio, env, tasks, folder) for tasks in groups]
    return runs


def read_results(path: Path, warn: bool = False) -> dict:
    """A JSON object written by a run (lmms-eval's results, the harness's record), or ``{}`` while
    it is still being written or after a crash cut it short (with a warning on stderr if ``warn``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if warn:
            print(f"warning: skipping unreadable {path}: {error}", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def finished_tasks(folder: Path) -> set[str]:
    """Tasks some results file in ``folder`` holds: the only proof that a run finished."""
    done = set()
    for path in folder.glob("**/*_results.json"):
        done |= set(read_results(path).get("results", {}))
    return done


def parse_prune_log(text: str) -> dict:
    """Per-image ``[before, after]`` visual tokens, per-call selector ms and, where OTPRUNE_OT=1
    recorded them, per-image OT distances (kept vs full set) from OTPRUNE_LOG lines."""
    tokens, selector_ms, ot = [], [], []
    for match in LOG_LINE.finditer(text):
        for pair in match.group(2).split(","):
            before, after = pair.strip().split("->")
            tokens.append([int(before), int(after)])
        selector_ms.append(float(match.group(3)))
        if match.group(4):
            ot += [float(v) for v in match.group(4).split(",")]
    return {"visual_tokens": tokens, "selector_ms": selector_ms, "ot_distance": ot}


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
    missing, warnings = [], []
    for module, what in (("lmms_eval", "lmms-eval"), ("llava", "llava-torch (pip install --no-deps llava-torch==1.2.2.post1)")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{what} is not installed (bash scripts/install.sh --llava)")
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


def default_config() -> tuple[str, str]:
    """``paper_table1`` with a GPU and the hub (or a cache), else ``smoke``; and why."""
    gpus = gpu_count()
    if gpus == 0:
        return "smoke", "no GPU"
    if not hub_reachable() and not all(cached_model(m) for m in MODELS if MODELS[m].tiny is None):
        return "smoke", "no hub access and no local cache of the models"
    return "paper_table1", f"{gpus} GPU(s) and the models available"


# -- running --------------------------------------------------------------------------------


def checkpoint(model: str, runs_root: Path) -> str:
    """What lmms-eval loads: the hub id, or the tiny checkpoint built once under RUNS/checkpoints."""
    spec = MODELS[model]
    if spec.tiny is None:
        return model
    folder = runs_root / "checkpoints" / model
    if not (folder / "otprune_tiny.json").exists():
        build = _load_script("build_tiny_llava").build
        build(folder, spec.tiny)
    return str(folder.resolve())


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(config: Config, run: Run, pretrained: str, num_processes: int, limit: int | None) -> list[str]:
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
        "--output_path", str(run.folder.resolve()),
        "--log_samples",
    ]
    for path in include:
        args += ["--include_path", str(ROOT / path)]
    if limit is not None:
        args += ["--limit", str(limit)]
    return launcher + args


def child_env(run: Run, jobs: int) -> dict:
    # Only the config decides the pruning: the caller's own pruning variables do not leak in.
    env = {
        k: v for k, v in os.environ.items() if k not in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX") and not k.startswith("OTPRUNE_")
    }
    env.update(run.env)
    env["OTPRUNE_LOG"] = "1"
    # The patch and the package come from this checkout, whatever is pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def text_tokens(pretrained: str, sample_files: dict[str, Path]) -> dict[str, float]:
    """Mean text tokens of each task's prompts (the samples' ``input``) under the model's tokenizer."""
    if not sample_files:
        return {}
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError):
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


def execute(config: Config, run: Run, pretrained: str, num_processes: int, jobs: int, limit: int | None) -> dict:
    """Run lmms-eval once; return (and save beside its output) what the report needs."""
    run.folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S") + f"_{time.time_ns() % 1_000_000:06d}"
    before = set(run.folder.glob("**/*_results.json"))
    log_path = run.folder / f"lmms_eval_{stamp}.log"
    cmd = command(config, run, pretrained, num_processes, limit)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(f"{k}={v}" for k, v in run.env.items()) + " " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(cmd, cwd=ROOT, env=child_env(run, jobs), stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives the peak RSS of the process tree it reaped (Linux: max over waited children).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    # With --jobs > 1, runs of other tasks may write into the same folder meanwhile: a new results
    # file is this run's only if it holds one of this run's tasks.
    new_results = []
    done = set()
    eval_seconds = None
    for path in sorted(set(run.folder.glob("**/*_results.json")) - before):
        data = read_results(path)
        if not set(data.get("results", {})) & set(run.tasks):
            continue
        new_results.append(path)
        done |= set(data["results"])
        eval_seconds = float(data.get("total_evaluation_time_seconds", 0)) or None
    samples = {}
    for path in new_results:
        prefix = path.name[: -len("results.json")]
        for task in run.tasks:
            candidate = path.parent / f"{prefix}samples_{task}.jsonl"
            if candidate.exists():
                samples[task] = candidate
    record = {
        "model": run.model,
        "flops_model": MODELS[run.model].flops_model,
        "tiny": MODELS[run.model].tiny,
        "method": run.method,
        "ratio": run.ratio,
        "env": run.env,
        "tasks": list(run.tasks),
        "benchmarks": [config.catalogue[task]["benchmark"] for task in run.tasks],
        "finished_tasks": sorted(done & set(run.tasks)),
        "status": "done" if set(run.tasks) <= done else "failed",
        "returncode": process.returncode,
        "wall_s": round(wall, 2),
        "eval_s": eval_seconds,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "num_processes": num_processes,
        "parallel_jobs": jobs,
        "samples": {task: sum(1 for line in path.read_text().splitlines() if line.strip()) for task, path in samples.items()},
        "text_tokens": text_tokens(pretrained, samples),
        "log": log_path.name,
        **parse_prune_log(log_path.read_text(errors="replace")),
    }
    (run.folder / f"otprune_{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def describe(run: Run) -> str:
    return f"{model_label(run.model)} {run.method} {ratio_label(run.ratio)} {','.join(run.tasks)}"


def log_tail(run: Run, record: dict, lines: int = 15) -> str:
    text = (run.folder / record["log"]).read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a name in configs/ or a .yaml path (default: see above)")
    parser.add_argument("--num-processes", type=int, help="lmms-eval processes per run, one per GPU (accelerate launch)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU only; timings then share the cores)")
    parser.add_argument("--limit", type=int, help="samples per task (lmms-eval --limit), for a quick look")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where runs/<config>/... go (default: runs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)

    name = args.config
    if name is None:
        name, why = default_config()
        print(f"config: {name} ({why}); pass a config name to choose")
    try:
        config = load_config(name)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    runs_root = Path(args.runs_dir)
    # Runs cut short by --limit go to their own folder, so they never pass for finished full runs.
    label = config.name + (f"_limit{args.limit}" if args.limit else "")
    runs = plan_runs(config, runs_root, label)
    pending = [r for r in runs if not set(r.tasks) <= finished_tasks(r.folder)]
    # A grouped run that partly finished reruns only its missing tasks.
    pending = [
        Run(r.model, r.method, r.ratio, r.env, tuple(t for t in r.tasks if t not in finished_tasks(r.folder)), r.folder)
        for r in pending
    ]
    print(f"{label}: {len(runs)} runs, {len(runs) - len(pending)} finished before, {len(pending)} to run -> {runs_root / label}")
    if args.dry_run:
        for i, run in enumerate(pending, 1):
            pretrained = model_label(run.model) if MODELS[run.model].tiny else run.model
            print(f"[{i}/{len(pending)}] {' '.join(f'{k}={v}' for k, v in run.env.items())} {' '.join(command(config, run, pretrained, num_processes, args.limit))}")
        return 0
    pretrained = {model: checkpoint(model, runs_root) for model in {r.model for r in pending}}
    failed = []

    def one(index_run):
        index, run = index_run
        if args.jobs == 1:
            print(f"[{index}/{len(pending)}] {describe(run)} ...", end=" ", flush=True)
        record = execute(config, run, pretrained[run.model], num_processes, args.jobs, args.limit)
        outcome = f"done in {record['wall_s']:.1f} s" if record["status"] == "done" else (
            f"FAILED after {record['wall_s']:.1f} s (exit code {record['returncode']}; no results file for "
            f"{', '.join(sorted(set(run.tasks) - set(record['finished_tasks'])))}); log: {run.folder / record['log']}"
        )
        prefix = "" if args.jobs == 1 else f"[{index}/{len(pending)}] {describe(run)} ... "
        print(prefix + outcome, flush=True)
        if record["status"] != "done":
            print(log_tail(run, record), flush=True)
            failed.append(run)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, enumerate(pending, 1)))
    if failed:
        print(f"{len(failed)} run(s) failed; run the same command again to retry them (finished runs are kept).")
    if not args.no_report:
        report = _load_script("report")
        report.main([str(runs_root / label)])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
