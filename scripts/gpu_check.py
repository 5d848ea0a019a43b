"""GPU check (issue 12): one command that proves the CUDA path and measures it, as a Markdown report.

    bash scripts/gpu_check.sh [--out FILE] [--budget SECONDS] [--steps NAME,...]   # installs .whl/ first
    python scripts/gpu_check.py [the same options]                                # when all is installed

Steps, each in its own process under its own time budget, so that one failing, crashing or
overrunning step does not stop the others and the whole check ends inside ``--budget``:

1. ``environment``: GPU, driver, Python, torch (and its CUDA), transformers, triton, accelerate,
   lmms-eval, llava-torch, torchvision, qwen-vl-utils versions;
2. ``tests``: the CUDA variants of the test suite (tests whose id names ``cuda``, and the Triton
   greedy's tests, which run compiled on a GPU) through pytest;
3. ``selectors``: ``bench_selectors`` cases N = 576, k = 64 at batch 1 and 16 and N = 2880,
   k = 320 at batch 1 and 16 (OTPrune, the per-step reference, DivPrune, the Gram floor, the fused
   Triton greedy) with the issue-6 targets;
4. ``prefill``: ``bench_prefill`` at full size (LLaVA-1.5-7B and 1.6-7B, random weights, float16),
   batch 1 and 8, ratios 0.098 and 0.25, with rooflines and targets;
5. ``lmms_eval``: the real lmms-eval CLI on random-weight LLaVA-1.5-7B checkpoints built on the
   spot (``build_llava_7b.py``; original LLaVA and llava-hf), the shipped smoke tasks with
   ``--limit``: Original, OURS, DIVPRUNE at K = 0 and OURS, FASTV at K = 2, batch 1 and 4; each
   run passes when its results file is whole and the ``OTPRUNE_LOG`` lines show every sample's
   image pruned from 576 to k tokens (none for Original);
6. ``vlm_lmms_eval``: the real lmms-eval CLI on the Qwen-VL and LLaVA-OneVision families (issue
   14) through lmms-eval's own ``qwen2_5_vl``, ``qwen3_vl``, ``qwen2_vl`` and ``llava_hf`` models, on
   tiny random-weight checkpoints built on the spot (``build_tiny_qwen.py``, processor included),
   the smoke VQA task with ``--limit``: Original, OURS at K = 0 and FASTV at K = 2, ratio 0.25,
   and PRUMERGE adaptive (SUBSET_RATIO unset); on Qwen2.5-VL also the plugins CDPRUNER, POOL,
   TOPNORM and VISIONZIP; each run passes as in step 5, except that an image's token count N_i
   follows its resolution, so each image must show N_i -> budget(0.25, N_i) (a merger: between 1
   and that; adaptive: between 1 and N_i). transformers builds these families' processors
   only with torchvision: without it the step is skipped with that reason;
7. ``accelerate``: the same as step 5 through ``accelerate launch --num_processes 2`` on the one
   GPU: both ranks must have pruned (``OTPRUNE_DUMP`` files of two processes) and the results be
   whole.

Without a GPU every step that can be reduced runs on the CPU at reduced size (fewer cases,
``REDUCED`` models, a subset of the lmms-eval runs), and the report says so; the CUDA tests and the
two-process run are skipped with the reason. The report goes to ``--out`` (default
``$OUT/gpu_check.md`` when ``OUT`` is set, else ``runs/gpu_check.md``), with the figures as JSON
beside it (``.json``), and is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT))

STEPS = ("environment", "tests", "selectors", "prefill", "lmms_eval", "vlm_lmms_eval", "accelerate")
# Seconds per step (GPU, CPU): each column adds up to that device's DEFAULT_BUDGET, and the GPU's
# fits inside the device tool's 10-minute command limit. The CPU skips the tests and the two-process
# run at once. vlm_lmms_eval runs twenty tiny-model runs, each bound by lmms-eval's start-up: on the
# GPU machine all at once on its 16 cores (60 s, its share from every other step's margin; none of
# them measured on a GPU yet), on the CPU two at a time: 12-18 s apiece, 159 s for the first
# eighteen on CI's 2 cores, where 180 s left the last two unstarted.
BUDGETS = {
    "environment": (15, 20),
    "tests": (45, 20),
    "selectors": (40, 60),
    "prefill": (120, 90),
    "lmms_eval": (210, 150),
    "vlm_lmms_eval": (60, 300),
    "accelerate": (60, 20),
}
DEFAULT_BUDGET = {"cuda": 550, "cpu": sum(cpu for _, cpu in BUDGETS.values())}
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SELECTOR_CASES = {"cuda": [(576, 64, 1), (576, 64, 16), (2880, 320, 1), (2880, 320, 16)], "cpu": [(576, 64, 1), (576, 64, 2)]}
SELECTOR_REPEATS = {"cuda": 20, "cpu": 1}
PREFILL_ARGS = {"cuda": ["--repeats", "3", "--decode-steps", "16"], "cpu": ["--quick", "--models", "1.5"]}
SMOKE_TASKS = ("otprune_smoke_vqa", "otprune_smoke_pope")
CAPTION_TASK = "otprune_smoke_caption"
RATIO = 0.098
VISUAL_TOKENS = 576  # LLaVA-1.5: (336 / 14)^2 patch tokens per image
# (BASELINE, LAYER_INDEX): Original, OURS, DIVPRUNE at K = 0; OURS, FASTV at K = 2.
METHODS = [("ORIG", 0), ("OURS", 0), ("DIVPRUNE", 0), ("OURS", 2), ("FASTV", 2)]
LMMS_MODELS = {"llava": "llava-1.5", "llava_hf": "llava-hf"}
BATCHES = (1, 4)
# The CPU's subset of the lmms-eval runs: each code path once, in about a minute on 2 cores.
CPU_RUNS = {("llava", "ORIG", 0, 1), ("llava", "OURS", 0, 4), ("llava", "FASTV", 2, 4), ("llava_hf", "OURS", 0, 1)}
CPU_SUBSET = "not run on the CPU (a subset there: each code path once); the GPU run does all"
LIMIT = {"cuda": 8, "cpu": 4}
# On the GPU: six 7B models in float16 (~15 GB each) share its memory; lmms-eval start-up is CPU-bound.
PARALLEL_RUNS = {"cuda": 6, "cpu": 2}
# Issue 14's families: each build_tiny_qwen variant and the lmms-eval model that loads it
# (lmms-eval's llava_onevision runs the LLaVA-NeXT repository's code; llava_hf loads transformers'
# LlavaOnevisionForConditionalGeneration).
VLM_FAMILIES = {"qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl", "llava-onevision": "llava_hf", "qwen2-vl": "qwen2_vl"}
VLM_RATIO = 0.25
# Original and OURS at K = 0; FASTV at K = 2 (the tiny LLMs have 4 layers); PRUMERGE adaptive (issue
# 34: the vision context on every family).
VLM_METHODS = [("ORIG", 0), ("OURS", 0), ("FASTV", 2), ("PRUMERGE", 0)]
# Methods that come by entry point (issue 24), on Qwen2.5-VL: otprune's own two plugins, and the
# outside example package, pip-installed into a folder of its own for its run.
PLUGIN_VARIANT = "qwen2.5-vl"
PLUGIN_METHODS = ["CDPRUNER", "POOL", "TOPNORM", "VISIONZIP"]
# Methods run adaptive: SUBSET_RATIO unset, each image's count the method's own.
ADAPTIVE = ("PRUMERGE",)
OUTSIDE_PLUGINS = {"TOPNORM": ROOT / "examples" / "otprune-topnorm"}
MERGERS = ("POOL", "PRUMERGE", "VISIONZIP")
# Its images range from 128 x 128 to 400 x 240 pixels, so the Qwen token counts differ per sample.
VLM_TASK = "otprune_smoke_vqa"
VLM_LIMIT = {"cuda": 4, "cpu": 2}
# Tiny models: every run at once on the GPU machine's 16 cores (lmms-eval's start-up is CPU-bound).
VLM_PARALLEL_RUNS = {"cuda": 20, "cpu": 2}
VERSIONED = ("torch", "transformers", "triton", "accelerate", "lmms_eval", "llava-torch", "torchvision", "qwen-vl-utils", "datasets", "numpy")


@dataclass
class StepResult:
    """What a step reports: PASS / FAIL / SKIP, one summary line, a Markdown body, its figures."""

    status: str
    summary: str
    body: str = ""
    figures: dict | None = None
    seconds: float = 0.0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class EchoedText(io.StringIO):
    """Keeps what is printed and passes it on to the step's log, which a step cut off at its
    budget leaves as the report's only record."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        sys.__stdout__.flush()
        return super().write(text)


def fenced(text: str) -> str:
    return "```\n" + text.rstrip() + "\n```"


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- 1. environment ---------------------------------------------------------------------------


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def step_environment(device: str, deadline: float) -> StepResult:
    import torch

    from otprune import stack

    figures = {"python": platform.python_version(), "device": device}
    figures.update({name: version_of(name) for name in VERSIONED})
    figures["torch_cuda"] = torch.version.cuda or "none (CPU build)"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        figures["gpu"] = props.name
        figures["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        figures["gpus"] = torch.cuda.device_count()
        figures["compute_capability"] = f"{props.major}.{props.minor}"
        smi = shutil.which("nvidia-smi")
        query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"] if smi else None
        figures["driver"] = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip() if query else "nvidia-smi not found"
    else:
        figures["gpu"] = "none: CPU mode, reduced sizes"
        figures["cpu_threads"] = torch.get_num_threads()
    figures["stack"] = stack.summary_here()
    figures["otprune_entry_point"] = any(e.name == "otprune" for e in importlib.metadata.entry_points(group="lmms_eval.models"))
    body = "| what | value |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in figures.items())
    summary = f"{figures['gpu']}; torch {figures['torch']} (CUDA {figures['torch_cuda']}), transformers {figures['transformers']}, triton {figures['triton']}"
    return StepResult(PASS, summary, body, figures)


# -- 2. CUDA tests ----------------------------------------------------------------------------


def junit_counts(path: Path) -> tuple[dict, list[str], list[str]]:
    """``({tests, failures, errors, skipped}, every test id, failing test ids)`` from pytest's JUnit XML."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    cases = [case for suite in suites for case in suite.iter("testcase")]
    ids = [f"{case.get('classname')}::{case.get('name')}" for case in cases]
    failing = [i for i, case in zip(ids, cases) if case.find("failure") is not None or case.find("error") is not None]
    return counts, ids, failing


def step_tests(device: str, deadline: float) -> StepResult:
    if device != "cuda":
        return StepResult(SKIP, "no CUDA device: the CUDA variants are not collected (CI's test run covers the CPU ones)")
    report = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/otprune_gpu_check")) / "cuda_tests.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        "-k",
        "cuda or greedy_triton",
        f"--junitxml={report}",
        "tests",
    ]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=max(1, deadline - time.time() - 5))
    except subprocess.TimeoutExpired as overrun:
        output = overrun.stdout.decode(errors="replace") if isinstance(overrun.stdout, bytes) else overrun.stdout or ""
        return StepResult(FAIL, "pytest ran past the step's time budget", fenced(tail(output)))
    if not report.exists():
        return StepResult(FAIL, f"pytest wrote no report (exit code {done.returncode})", fenced(tail(done.stdout + done.stderr)))
    counts, ids, failing = junit_counts(report)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    body = "`pytest -k 'cuda or greedy_triton' tests` (selectors on cuda in fp16/bf16/fp32, the Triton greedy compiled)\n\n"
    body += fenced(tail(done.stdout, 40))
    patch_tests = sum("test_patch" in i for i in ids)
    if not patch_tests:
        body += "\n\nNo patch test has a CUDA variant yet: tests/test_patch_*.py run on the CPU only."
    ok = done.returncode == 0 and counts["tests"] > 0
    return StepResult(PASS if ok else FAIL, summary, body, {**counts, "failing": failing, "patch_tests": patch_tests})


# -- 3. bench_selectors -----------------------------------------------------------------------


def step_selectors(device: str, deadline: float) -> StepResult:
    import torch

    from otprune.bench import selectors as bench_selectors

    rows = []
    for n, k, batch in SELECTOR_CASES[device]:
        rows.append(bench_selectors.measure(n, k, batch, SELECTOR_REPEATS[device], torch.device(device), seed=0))
        print(f"measured N={n} k={k} batch={batch}", flush=True)
    targets = bench_selectors.target_lines(rows, torch.device(device))
    reduced = "" if device == "cuda" else "CPU, reduced: N = 576 only, batch 1 and 2, one timed run; the GPU targets are not measured.\n\n"
    body = reduced + fenced(bench_selectors.format_table(rows)) + "\n\nTargets (issue 6):\n\n" + "\n".join(f"- {line}" for line in targets)
    met = sum(line.endswith("-> MET") for line in targets)
    missed = sum(line.endswith("-> NOT MET") for line in targets)
    first = rows[0]
    summary = f"N={first.n} k={first.k} b={first.batch}: OTPrune {first.best[0]:.3f} ms ({first.best[1]}), per-step {first.per_step:.3f} ms; targets {met} met, {missed} not met"
    return StepResult(PASS, summary, body, {"rows": [asdict(r) for r in rows], "targets": targets})


# -- 4. bench_prefill -------------------------------------------------------------------------


def step_prefill(device: str, deadline: float) -> StepResult:
    from otprune.bench import prefill as bench_prefill

    argv = ["--device", device] + PREFILL_ARGS[device]
    printed = EchoedText()
    with contextlib.redirect_stdout(printed):
        by_arch = bench_prefill.main(argv)
    text = printed.getvalue()
    figures = {
        name: [
            {
                "batch": r.config.batch,
                "method": r.config.method,
                "ratio": r.config.ratio,
                "kept": r.kept,
                "ttft_ms": r.stages["ttft"],
                "ttft_roofline_ms": r.roofline["ttft"],
                "select_ms": r.stages["select"],
                "decode_ms": r.decode_ms,
                "decode_tokens_per_s": 1e3 * r.config.batch / r.decode_ms,
                "peak_mib": r.peak_mib,
            }
            for r in results
        ]
        for name, results in by_arch.items()
    }
    lines = []
    for name, results in figures.items():
        base = {r["batch"]: r["ttft_ms"] for r in results if r["ratio"] is None}
        for r in results:
            if r["method"] == "otprune" and r["ratio"] == RATIO and r["batch"] in base:
                lines.append(f"{name} b={r['batch']}: TTFT {base[r['batch']]:.1f} -> {r['ttft_ms']:.1f} ms with OTPrune {RATIO}")
    summary = "; ".join(lines)
    body = f"`otprune bench prefill {' '.join(argv)}`\n\n" + fenced(text)
    return StepResult(PASS, summary, body, figures)


# -- 5 and 6. lmms-eval -----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRun:
    model: str  # lmms-eval --model
    baseline: str
    layer: int
    batch: int
    processes: int = 1
    ratio: float | None = RATIO  # None: adaptive, SUBSET_RATIO unset
    variant: str = ""  # the build_tiny_qwen checkpoint it runs on; "" for the LLaVA-1.5-7B ones

    @property
    def checkpoint(self) -> str:
        """The key of the checkpoint this run loads: one per lmms-eval model, or per tiny variant."""
        return self.variant or self.model

    @property
    def visual_tokens(self) -> int | None:
        """Every image's visual tokens before pruning where the model fixes them; ``None`` where
        they follow the image's resolution (Qwen-VL) or tiling (OneVision)."""
        return None if self.variant else VISUAL_TOKENS

    @property
    def name(self) -> str:
        procs = f"_{self.processes}proc" if self.processes > 1 else ""
        return f"{self.checkpoint}_{self.baseline}_K{self.layer}_b{self.batch}{procs}"

    @property
    def env(self) -> dict:
        env = {"BASELINE": self.baseline, "LAYER_INDEX": str(self.layer)}
        if self.baseline != "ORIG" and self.ratio is not None:
            env["SUBSET_RATIO"] = str(self.ratio)
        return env


def planned_runs(device: str) -> tuple[list[EvalRun], list[tuple[EvalRun, str]]]:
    """``(runs, skipped)``: every (model, method, K, batch) of the issue, less what cannot run here."""
    runs, skipped = [], []
    for model in LMMS_MODELS:
        for baseline, layer in METHODS:
            for batch in BATCHES:
                run = EvalRun(model, baseline, layer, batch)
                if model == "llava_hf" and batch > 1:
                    skipped.append((run, "lmms-eval 0.7.3's llava_hf asserts batch size 1 (both its chat and simple models)"))
                elif device == "cpu" and (model, baseline, layer, batch) not in CPU_RUNS:
                    skipped.append((run, CPU_SUBSET))
                else:
                    runs.append(run)
    return runs, skipped


def planned_vlm_runs() -> list[EvalRun]:
    """Each family's Original, OURS at K = 0 and FASTV at K = 2, and on Qwen2.5-VL each plugin at
    K = 0, batch 1, on the CPU too (tiny models: each run is about 9 s of lmms-eval start-up there)."""
    runs = [
        EvalRun(model, baseline, layer, 1, ratio=None if baseline in ADAPTIVE else VLM_RATIO, variant=variant)
        for variant, model in VLM_FAMILIES.items()
        for baseline, layer in VLM_METHODS
    ]
    plugin_model = VLM_FAMILIES[PLUGIN_VARIANT]
    return runs + [EvalRun(plugin_model, baseline, 0, 1, ratio=VLM_RATIO, variant=PLUGIN_VARIANT) for baseline in PLUGIN_METHODS]


_outside_sites: dict[str, Path] = {}
_outside_lock = threading.Lock()


def outside_site(baseline: str, work: Path) -> Path:
    """The folder where the outside package of ``baseline`` is pip-installed (once), as a user would
    install it, without touching the environment under test."""
    with _outside_lock:
        if baseline not in _outside_sites:
            source, site = work / "plugin_sources" / baseline, work / "plugin_sites" / baseline
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(site, ignore_errors=True)
            shutil.copytree(OUTSIDE_PLUGINS[baseline], source)  # pip builds in the source folder
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                 "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                check=True, capture_output=True,
            )  # fmt: skip
            _outside_sites[baseline] = site
        return _outside_sites[baseline]


def smoke_tasks() -> tuple[list[str], str]:
    """The smoke tasks to run, and a note on any left out."""
    try:
        import pycocoevalcap.cider.cider  # noqa: F401
    except ImportError:
        return list(SMOKE_TASKS), f"{CAPTION_TASK} left out: pycocoevalcap is not installed (its 104 MB wheel cannot travel to the GPU machine)"
    return [*SMOKE_TASKS, CAPTION_TASK], ""


def missing_requirements(run: EvalRun) -> str:
    """Why lmms-eval cannot run ``run`` here, or ``""``."""
    carry = "carry it: bash scripts/fetch_gpu_wheels.sh"
    needed = [("lmms_eval", "lmms-eval", carry)]
    if run.model == "llava":
        needed.append(("llava.model.language_model.llava_llama", "llava-torch", carry))
    if run.variant:
        # Its CUDA wheels do not load against a CPU torch, so it is not carried: the GPU machine has it.
        why = "transformers builds the Qwen-VL and LLaVA-OneVision processors only with it (their video processors)"
        needed.append(("torchvision", "torchvision", why))
    if run.model.startswith("qwen"):
        needed.append(("qwen_vl_utils", "qwen-vl-utils", carry))
    needed.append(("decord", "decord", carry))
    for module, what, remedy in needed:
        try:
            __import__(module)
        except Exception as error:  # a missing dependency of theirs shows as any import-time error
            return f"{what} cannot be imported ({type(error).__name__}: {error}); {remedy}"
    if not any(e.name == "otprune" for e in importlib.metadata.entry_points(group="lmms_eval.models")):
        return "otprune's lmms_eval.models entry point is not registered: pip install --no-deps -e ."
    return ""


def expected_samples(results: dict, tasks: list[str]) -> dict[str, int]:
    return {task: int(results.get("n-samples", {}).get(task, {}).get("effective", -1)) for task in tasks}


def check_results(folder: Path, tasks: list[str], limit: int) -> tuple[list[str], int]:
    """``(problems, samples)``: whether the run's results file is whole: one readable results file
    listing every task, each with ``limit`` samples (or the whole task if smaller), and a samples
    file with as many lines."""
    from otprune.harness.files import read_results

    files = sorted(folder.glob("**/*_results.json"))
    if len(files) != 1:
        return [f"{len(files)} results files (expected 1)"], 0
    data = read_results(files[0])
    problems = []
    missing = [task for task in tasks if task not in data.get("results", {})]
    if missing:
        problems.append(f"results lack {', '.join(missing)}")
    counts = expected_samples(data, tasks)
    for task, count in counts.items():
        if not 0 < count <= limit:
            problems.append(f"{task}: {count} samples (expected 1..{limit})")
        samples = files[0].parent / files[0].name.replace("_results.json", f"_samples_{task}.jsonl")
        lines = sum(1 for line in samples.read_text().splitlines() if line.strip()) if samples.exists() else 0
        if lines != count:
            problems.append(f"{task}: samples file has {lines} lines for {count} samples")
    return problems, sum(max(c, 0) for c in counts.values())


def check_tokens(run: EvalRun, visual_tokens: list[list[int]], samples: int) -> list[str]:
    """Every sample's image pruned once, from its N tokens to ``budget(ratio, N)``: N = 576 for
    LLaVA-1.5, N_i of the image's own resolution for the Qwen-VL and OneVision families (Original:
    nothing logged)."""
    from otprune.selectors import budget

    if run.baseline == "ORIG":
        return [f"{len(visual_tokens)} pruned images logged without pruning"] if visual_tokens else []
    problems = []
    if len(visual_tokens) != samples:
        problems.append(f"{len(visual_tokens)} pruned images logged for {samples} samples")

    def expected(before: int) -> list[int]:
        # A logged count below 1 is wrong in any case; budget() refuses it.
        tokens = run.visual_tokens or max(before, 1)
        return [tokens, tokens if run.ratio is None else budget(run.ratio, tokens)]

    def right(pair: list[int]) -> bool:
        tokens, kept = expected(pair[0])
        if run.baseline in MERGERS:
            # A merger may return fewer tokens than its budget (POOL, where k has no fitting grid shape).
            return pair[0] == tokens and 1 <= pair[1] <= kept
        return pair == [tokens, kept]

    wrong = [pair for pair in visual_tokens if not right(pair)]
    if wrong:
        before, after = wrong[0]
        tokens, kept = expected(before)
        rule = "between 1 and N (adaptive)" if run.ratio is None else f"to budget({run.ratio:g}, N)"
        problems.append(f"{len(wrong)} images not pruned {rule}, e.g. {before}->{after} (expected {tokens}->{kept})")
    return problems


def check_ranks(dump: Path, images: int) -> list[str]:
    """Both ranks pruned: ``OTPRUNE_DUMP`` files (``tokens_<pid>_<n>.pt``) of two processes, one per image."""
    files = list(dump.glob("tokens_*.pt"))
    pids = {path.name.split("_")[1] for path in files}
    problems = []
    if len(pids) != 2:
        problems.append(f"pruned tokens were dumped by {len(pids)} process(es), not 2")
    if len(files) != images:
        problems.append(f"{len(files)} dumped images for {images} logged")
    return problems


@dataclass(frozen=True)
class Suite:
    """What one step's lmms-eval runs share."""

    checkpoints: str  # what they run on, for the report
    tasks: list[str]
    note: str  # tasks left out, and why
    limit: int  # --limit
    parallel: int  # runs at a time
    tokens: str  # the pruning every image must show, for the report


def model_args(run: EvalRun, device: str) -> str:
    """lmms-eval's ``--model_args`` besides ``pretrained``: the check's device (and llava_hf's dtype;
    lmms-eval's Qwen models load bfloat16 whatever they are given)."""
    if device == "cuda":
        args = "device=cuda:0,device_map=cuda:0"
    else:
        # lmms-eval's Qwen models send their inputs to "cuda" under device_map=auto.
        args = "device=cpu,device_map=cpu" if run.variant else "device=cpu,device_map=auto"
    if run.model == "llava_hf":
        args += ",dtype=float16" if device == "cuda" else ",dtype=float32"
    return args


def eval_command(run: EvalRun, checkpoint: Path, suite: Suite, device: str, folder: Path) -> tuple[list[str], dict]:
    """``(command, environment)`` of one lmms-eval run: the harness's command line and child
    environment (``OTPRUNE_LOG=1``, the run's pruning variables and nobody else's)."""
    from otprune.harness.config import Config
    from otprune.harness.plan import Run, child_env
    from otprune.harness.plan import command as harness_command
    from otprune.harness.resources import load_catalogue

    config = Config("gpu_check", run.model, model_args(run, device), {}, {}, suite.tasks, batch_size=run.batch, catalogue=load_catalogue())
    plan = Run(run.model, run.baseline, run.ratio, run.env, tuple(suite.tasks), folder)
    command = harness_command(config, plan, str(checkpoint), run.processes, suite.limit, folder)
    if command[:2] == ["accelerate", "launch"] and shutil.which("accelerate") is None:
        # The launcher's console script may be off PATH where the package is installed.
        command[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
    return command, child_env(plan, suite.parallel)


def execute(run: EvalRun, checkpoint: Path, suite: Suite, device: str, work: Path, timeout: float) -> dict:
    """One lmms-eval run through the harness's command line and environment, then its checks: the
    harness's own (otprune.harness.run_check) and this check's stricter ones."""
    from otprune.harness.files import read_results
    from otprune.harness.records import recorded_limit
    from otprune.harness.run_check import attempt_problems, parse_prune_log

    folder = work / "runs" / run.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tasks, limit = suite.tasks, suite.limit
    command, env = eval_command(run, checkpoint, suite, device, folder)
    if run.baseline in OUTSIDE_PLUGINS:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(outside_site(run.baseline, work)), env.get("PYTHONPATH", "")) if p)
    if run.processes > 1:
        env["OTPRUNE_DUMP"] = str(folder / "dump")
    log = folder / "lmms_eval.log"
    start = time.time()
    record = {"run": run.name, "wall_s": None, "problems": [], "log": str(log)}
    with open(log, "w") as out:
        out.write("$ " + " ".join(f"{k}={v}" for k, v in run.env.items()) + " " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    record["wall_s"] = round(time.time() - start, 1)
    text = log.read_text(errors="replace")
    logged = parse_prune_log(text)
    problems, samples = check_results(folder, tasks, limit)
    if returncode is None:
        problems.insert(0, f"timed out after {record['wall_s']} s")
    elif returncode != 0:
        problems.insert(0, f"exit code {returncode}")
    results = [read_results(path) for path in folder.glob("**/*_results.json")]
    done = {task for data in results if isinstance(data.get("results"), dict) for task in data["results"]}
    problems += attempt_problems(
        returncode=returncode,
        tasks=tasks,
        done=done,
        limits={recorded_limit(data) for data in results},
        limit=limit,
        env=run.env,
        log_text=text,
        samples=samples,
        check_pruning=False,  # check_tokens is stricter: N itself
    )
    if samples:
        problems += check_tokens(run, logged["visual_tokens"], samples)
    if run.processes > 1:
        problems += check_ranks(folder / "dump", len(logged["visual_tokens"]))
        if "invalid device ordinal" in text:
            problems.append("a rank asked for a GPU that is not there: accelerate and lmms-eval's llava put rank r on cuda:r")
    record.update(
        samples=samples,
        images=len(logged["visual_tokens"]),
        pruned=[f"{before}->{after}" for before, after in sorted({tuple(pair) for pair in logged["visual_tokens"]})],
        selector_ms=round(statistics.median(logged["selector_ms"]), 3) if logged["selector_ms"] else None,
        problems=list(dict.fromkeys(problems)),
        status=PASS if not problems else FAIL,
    )
    if record["status"] == FAIL:
        record["log_tail"] = tail(text, 15)
    return record


def build_checkpoints(device: str, work: Path, keys: set[str]) -> dict[str, Path]:
    """``{run.checkpoint: folder}``: random-weight LLaVA-1.5-7B per lmms-eval model, a tiny
    checkpoint per Qwen-VL / OneVision variant."""
    import build_llava_7b
    import build_tiny_qwen

    size = "full" if device == "cuda" else "reduced"
    folders = {}
    for key in keys:
        if key in VLM_FAMILIES:
            folders[key] = build_tiny_qwen.build(work / f"tiny-{key}", key)
        else:
            folders[key] = build_llava_7b.build(work / f"{LMMS_MODELS[key]}-7b-{size}", LMMS_MODELS[key], size, device)
    return folders


def run_table(records: list[dict], skipped: list[tuple[EvalRun, str]]) -> str:
    lines = ["| run | status | samples | images logged | tokens per image | selector ms (median) | wall s | problems |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        kept = ", ".join(r.get("pruned", [])) or "-"
        lines.append(
            f"| {r['run']} | {r['status']} | {r.get('samples', '-')} | {r.get('images', '-')} | {kept} | "
            f"{r.get('selector_ms') or '-'} | {r['wall_s'] if r['wall_s'] is not None else '-'} | {'; '.join(r['problems']) or '-'} |"
        )
    for run, why in skipped:
        if why != CPU_SUBSET:
            lines.append(f"| {run.name} | SKIP | | | | | | {why} |")
    subset = [run.name for run, why in skipped if why == CPU_SUBSET]
    if subset:
        lines.append(f"| {len(subset)} more | SKIP | | | | | | {CPU_SUBSET}: {', '.join(subset)} |")
    text = "\n".join(lines)
    for r in records:
        if r["status"] == FAIL and r.get("log_tail"):
            text += f"\n\n{r['run']} ({r['log']}), last lines:\n\n" + fenced(r["log_tail"])
    return text


def lmms_step(device: str, deadline: float, runs: list[EvalRun], skipped: list[tuple[EvalRun, str]], what: str, suite: Suite) -> StepResult:
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/otprune_gpu_check"))
    # What a run needs follows from its checkpoint (its lmms-eval model and tiny variant).
    reasons = {key: missing_requirements(run) for key, run in {run.checkpoint: run for run in runs}.items()}
    skipped = skipped + [(run, reasons[run.checkpoint]) for run in runs if reasons[run.checkpoint]]
    runs = [run for run in runs if not reasons[run.checkpoint]]
    if not runs:
        why = "; ".join(sorted({why for _, why in skipped if why != CPU_SUBSET}))
        return StepResult(SKIP, why, run_table([], skipped))
    start = time.time()
    checkpoints = build_checkpoints(device, work, {run.checkpoint for run in runs})
    built_s = time.time() - start

    def one(run: EvalRun) -> dict:
        left = deadline - time.time() - 5
        if left < 20:
            return {"run": run.name, "status": FAIL, "wall_s": None, "problems": ["not started: the step's time budget ran out"]}
        return execute(run, checkpoints[run.checkpoint], suite, device, work, left)

    with ThreadPoolExecutor(max_workers=suite.parallel) as pool:
        records = list(pool.map(one, runs))
    failed = [r for r in records if r["status"] != PASS]
    head = (
        f"{what} on {suite.checkpoints}; tasks {', '.join(suite.tasks)}, `--limit {suite.limit}`, {suite.tokens}; "
        f"checkpoints ready in {built_s:.0f} s; {suite.parallel} runs at a time."
    )
    if suite.note:
        head += f"\n\n{suite.note}."
    summary = f"{len(records) - len(failed)}/{len(records)} runs passed, {len(skipped)} skipped"
    figures = {"runs": records, "tasks": suite.tasks, "limit": suite.limit}
    return StepResult(FAIL if failed else PASS, summary, head + "\n\n" + run_table(records, skipped), figures)


def llava_suite(device: str) -> Suite:
    from otprune.selectors import budget

    tasks, note = smoke_tasks()
    size = "full-size random-weight LLaVA-1.5-7B, float16" if device == "cuda" else "REDUCED-size random-weight LLaVA-1.5 (CPU, float32)"
    tokens = f"ratio {RATIO} ({VISUAL_TOKENS} -> {budget(RATIO, VISUAL_TOKENS)} visual tokens per image)"
    return Suite(size, tasks, note, LIMIT[device], PARALLEL_RUNS[device], tokens)


def step_lmms_eval(device: str, deadline: float) -> StepResult:
    runs, skipped = planned_runs(device)
    return lmms_step(device, deadline, runs, skipped, "The lmms-eval CLI", llava_suite(device))


def vlm_suite(device: str) -> Suite:
    models = ", ".join(f"{variant} (`--model {model}`)" for variant, model in VLM_FAMILIES.items())
    checkpoints = f"tiny random-weight checkpoints (build_tiny_qwen.py, processors included): {models}"
    tokens = f"ratio {VLM_RATIO} (every image N_i -> budget({VLM_RATIO}, N_i) visual tokens, N_i following its resolution)"
    return Suite(checkpoints, [VLM_TASK], "", VLM_LIMIT[device], VLM_PARALLEL_RUNS[device], tokens)


def step_vlm_lmms_eval(device: str, deadline: float) -> StepResult:
    return lmms_step(device, deadline, planned_vlm_runs(), [], "The lmms-eval CLI with lmms-eval's own Qwen-VL and OneVision models", vlm_suite(device))


def step_accelerate(device: str, deadline: float) -> StepResult:
    if device != "cuda":
        return StepResult(SKIP, "no CUDA device: lmms-eval's llava runs several processes only as multi-GPU, FSDP or DeepSpeed, not on CPUs")
    run = EvalRun("llava", "OURS", 0, 1, processes=2)
    what = "`accelerate launch --num_processes 2` (two processes on the one GPU)"
    return lmms_step(device, deadline, [run], [], what, llava_suite(device))


STEP_FUNCTIONS = {
    "environment": step_environment,
    "tests": step_tests,
    "selectors": step_selectors,
    "prefill": step_prefill,
    "lmms_eval": step_lmms_eval,
    "vlm_lmms_eval": step_vlm_lmms_eval,
    "accelerate": step_accelerate,
}


# -- driver -----------------------------------------------------------------------------------


def run_step_here(name: str, device: str, deadline: float, result_path: Path) -> None:
    """The child process's side: run one step, write its StepResult as JSON."""
    start = time.time()
    try:
        result = STEP_FUNCTIONS[name](device, deadline)
    except Exception as error:  # whatever a step raises becomes its FAIL line; the check goes on
        import traceback

        result = StepResult(FAIL, f"{type(error).__name__}: {str(error)[:200]}", fenced(tail(traceback.format_exc(), 30)))
    result.seconds = round(time.time() - start, 1)
    result_path.write_text(json.dumps(asdict(result)))


def run_step(name: str, device: str, budget: float, work: Path) -> StepResult:
    """Run one step in its own process group, killed with everything it started at its budget."""
    if budget < 10:
        return StepResult(SKIP, "no time left in the check's budget")
    result_path = work / f"step_{name}.json"
    log_path = work / f"step_{name}.log"
    result_path.unlink(missing_ok=True)
    deadline = time.time() + budget
    command = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--device", device, "--deadline", str(deadline), "--result", str(result_path)]
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=budget + 5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = round(time.time() - start, 1)
    if result_path.exists():
        return StepResult(**json.loads(result_path.read_text()))
    output = tail(log_path.read_text(errors="replace"))
    why = f"timed out after its {budget:.0f} s budget" if seconds >= budget else f"its process died (exit code {process.returncode})"
    return StepResult(FAIL, why, fenced(output), seconds=seconds)


def format_report(device: str, results: dict[str, StepResult], total_s: float) -> str:
    import torch

    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU only: REDUCED sizes, not the GPU figures"
    lines = [
        f"# GPU check — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Device: **{where}**. Total {total_s:.0f} s. Produced by `bash scripts/gpu_check.sh`.",
    ]
    if device != "cuda":
        lines.append("\nNo CUDA device: every step runs at reduced size on the CPU or is skipped; no figure here is a GPU figure.")
    lines += ["", "| # | step | status | seconds | summary |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {STEPS.index(name) + 1} | {name} | {r.status} | {r.seconds:.0f} | {r.summary.replace('|', '/')} |")
    for name, r in results.items():
        lines += ["", f"## {STEPS.index(name) + 1}. {name}: {r.status}", "", r.summary]
        if r.body:
            lines += ["", r.body]
    return "\n".join(lines) + "\n"


def default_report_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.md" if out else ROOT / "runs" / "gpu_check.md"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="report path (default $OUT/gpu_check.md, else runs/gpu_check.md)")
    parser.add_argument(
        "--budget", type=float, default=None, help=f"seconds for the whole check (default {DEFAULT_BUDGET['cuda']} on CUDA, {DEFAULT_BUDGET['cpu']} on the CPU)"
    )
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated steps to run, of {', '.join(STEPS)} (default all)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees one")
    parser.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or not args.steps:
        parser.error(f"--steps {','.join(args.steps)!r}: unknown {', '.join(unknown) or '(none given)'}; allowed: {', '.join(STEPS)}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds; got {args.budget}")
    if args.device is None:
        args.device = "cuda" if cuda_available() else "cpu"
    elif args.device == "cuda" and not cuda_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU")
    if args.budget is None:
        args.budget = DEFAULT_BUDGET[args.device]
    return args


def main(argv=None) -> dict[str, StepResult]:
    args = parse_args(argv)
    if args.run_step:
        run_step_here(args.run_step, args.device, args.deadline, args.result)
        return {}
    work = Path(os.environ.setdefault("GPU_CHECK_WORK", "/tmp/otprune_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    end = start + args.budget
    column = 0 if args.device == "cuda" else 1
    results = {}
    for name in args.steps:
        budget = min(BUDGETS[name][column], end - time.time())
        print(f"[gpu_check] {name} (budget {budget:.0f} s) ...", flush=True)
        results[name] = run_step(name, args.device, budget, work)
        print(f"[gpu_check] {name}: {results[name].status} in {results[name].seconds:.0f} s: {results[name].summary}", flush=True)
    report = format_report(args.device, results, time.time() - start)
    out = args.out or default_report_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    figures = {"device": args.device, "steps": {name: asdict(r) for name, r in results.items()}}
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    print(report)
    print(f"[gpu_check] report: {out}")
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.status == FAIL for r in main().values()) else 0)
