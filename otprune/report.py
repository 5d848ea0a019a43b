"""Turn lmms-eval results files into the paper's Table 1 (Markdown and CSV), beside the paper's numbers.

    otprune report RUNS/<config> [--out DIR]        # default DIR: RUNS/<config>

Reads every run folder ``<model>/<method>_<ratio>/`` (lmms-eval's ``*_results.json`` and the
harness's ``otprune_*.json``) and writes ``table1.md`` and ``table1.csv``:

- each benchmark in the paper's unit (configs/tasks.yaml: CIDEr, EM, Acc, P-score, F1), with its
  difference from the paper's number (configs/paper_results.yaml) where the paper has one;
- visual tokens per image before -> after and the TFLOP column, from the measured token counts
  and FastV's formula (otprune.measures) for the real LLM shape the checkpoint is or stands in for,
  each image's prefill at its own count; counts that vary per image (an adaptive method's) as
  mean [min–max], per benchmark too; the paper's adaptive rows' TFLOP is "Variable";
- Avg. rank (all pruned rows of the model) and one-shot rank (VTW, FastV, DivPrune, OTPrune only);
  ties share the average rank;
- the one-sided Wilcoxon signed-rank test that OTPrune's per-benchmark relative improvement over
  DivPrune is > 0 (scipy), beside the paper's p;
- each run's latency per ``generate`` call (OTPRUNE_LOG's timing lines, otprune.sample_timer): median
  time to first token with its p25–p75, its vision / selection / LLM-prefill parts, median decode
  time per generated token, and peak memory (the process tree's RSS; the GPU's allocated memory
  on a GPU), in Table 1's row order;
- the same ranks and test computed from the paper's own numbers, beside the published ones.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import rankdata, wilcoxon

from otprune.analysis.figures import write_pareto_figures
from otprune.analysis.records import read_run_folder
from otprune.harness.catalogue import ADAPTIVE, baseline, method_labels, model_label, ratio_label, ratio_order
from otprune.harness.catalogue import MODELS as MODEL_SPECS
from otprune.harness.checkpoints import tiny_llm_shape
from otprune.harness.code_identity import current_code
from otprune.harness.errors import MissingResource
from otprune.harness.files import read_results
from otprune.harness.records import recorded_limit, same_code
from otprune.harness.resources import config_file
from otprune.measures import MODELS, ModelShape, prefill_flops, staged_prefill_flops
from otprune.sample_timer import spread
from otprune.selectors import budget

ONE_SHOT = ("VTW", "FastV", "DivPrune", "OTPrune")
# The paper's TFLOP of its adaptive rows (configs/paper_results.yaml: tflop null).
VARIABLE = "Variable"
# The paper's Table 1 order of its rows (configs/paper_results.yaml's LLaVA-1.5-7B block), then
# the rows the paper does not have.
TABLE_ORDER = ("Original", *ONE_SHOT, "PruMerge", "DivPrune*", "FitPrune", "M3", "DPP", "Random", "Uniform")
OTHER_CODE_NOTE = (
    "Rows marked † hold results finished by other code than this otprune's (its pruning code's hash or the "
    "torch, transformers, lmms-eval or llava-torch version differ; each record names its own), kept with "
    "`otprune run --reuse-other-code`. This code: {current}."
)
LIMIT_NOTE = (
    "**Rows marked (--limit N) evaluated only N samples per task** (as their results files say): "
    "they are not full benchmarks and not comparable with the paper."
)
RANDOM_WEIGHTS_NOTE = (
    "**These checkpoints have random weights: their scores are meaningless.** The visual token "
    "counts, FLOPs and timings are real measurements of the pruning on these inputs."
)


def load_yaml(name: str) -> dict:
    return yaml.safe_load(config_file(name).read_text())


def tiny_shape(variant: str, recorded: dict | None = None) -> ModelShape:
    """The LLM of a tiny checkpoint, for the FLOPs of what actually ran: the shape its runs recorded
    (the checkpoint's config.json), else what scripts/build_tiny_llava.py gives ``variant`` now."""
    shape = recorded or tiny_llm_shape(variant)
    return ModelShape(hidden=shape["hidden"], ffn=shape["ffn"], layers=shape["layers"])


# -- pure statistics ------------------------------------------------------------------------


def average_ranks(scores: dict[str, list[float | None]]) -> dict[str, float]:
    """Per column, rank the rows (highest score = 1, ties share the average rank), then average
    each row's ranks over the columns every row has a number for."""
    names = list(scores)
    if not names:
        return {}
    columns = [j for j in range(len(scores[names[0]])) if all(scores[n][j] is not None for n in names)]
    if not columns:
        return {}
    ranks = np.array([rankdata([-scores[n][j] for n in names]) for j in columns])
    return {name: float(ranks[:, i].mean()) for i, name in enumerate(names)}


def relative_improvements(ours: list[float | None], theirs: list[float | None]) -> list[float]:
    """``(ours - theirs) / theirs`` per benchmark; skipped where either is missing or theirs is 0."""
    return [(a - b) / b for a, b in zip(ours, theirs) if a is not None and b is not None and b != 0]


def wilcoxon_greater(improvements: list[float]) -> float | None:
    """One-sided Wilcoxon signed-rank p that the improvements are > 0; None if all are zero or none."""
    if not any(x != 0 for x in improvements):
        return None
    return float(wilcoxon(improvements, alternative="greater").pvalue)


def prefill(n_text: float, before: float, after: float, layer_index: int, shape: ModelShape) -> float:
    """FastV's prefill FLOPs with ``before`` visual tokens in layers < K and ``after`` from K on."""
    per_layer_full = prefill_flops(round(n_text + before), shape) / shape.layers
    per_layer_kept = prefill_flops(round(n_text + after), shape) / shape.layers
    return layer_index * per_layer_full + (shape.layers - layer_index) * per_layer_kept


def image_prefill(run: dict, n_text: float, before: int, after: int, shape: ModelShape) -> float:
    """One image's prefill FLOPs in ``run``: at each stage's logged count for a schedule of
    several stages (``staged_prefill_flops``), else ``before`` tokens below K and ``after`` from K on."""
    stages = run.get("stages_by_tokens", {}).get(before)
    if stages:
        return staged_prefill_flops(round(n_text), before, stages, shape)
    return prefill(n_text, before, after, run["layer_index"], shape)


# -- reading runs ---------------------------------------------------------------------------


def setting_problem(setting) -> str | None:
    """Why a ``setting.json`` cannot name a table row (``None`` when it can)."""
    if not setting:
        return "unreadable or empty setting.json"
    if setting.get("model") not in MODEL_SPECS:
        return f"setting.json: model {setting.get('model')!r} is not one of {', '.join(sorted(MODEL_SPECS))}"
    if not isinstance(setting.get("method"), str) or baseline(setting["method"]) is None:
        return f"setting.json: method {setting.get('method')!r} is not one of {', '.join(sorted(method_labels()))}"
    ratio = setting.get("ratio")
    if ratio != ADAPTIVE and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        return f"setting.json: ratio {ratio!r} is not a number in [0, 1] or {ADAPTIVE!r}"
    layer = setting.get("layer_index")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        return f"setting.json: layer_index {layer!r} is not an integer >= 0"
    return None


def read_run(folder: Path, catalogue: dict, skipped: list[tuple[Path, str]]) -> dict | None:
    """One run folder: scores per task (paper units), token counts and timings, from the harness's
    trusted records and the results files they name. Whatever cannot be read goes to ``skipped``
    as ``(path, reason)``; ``None`` when nothing of the folder can be tabled."""
    manifest = folder / "setting.json"
    if not manifest.exists():
        skipped.append((folder, "no setting.json: not a run folder of this harness (or written by an older one)"))
        return None
    setting = read_results(manifest)
    problem = setting_problem(setting)
    if problem:
        skipped.append((manifest, problem))
        return None
    found = read_run_folder(folder)
    skipped += found.skipped
    records = found.trusted
    if not records:
        return None
    # Each task from its newest finished record only (a task run again, after a change of code, has two).
    newest = {task: id(current.record) for current in found.current for task in current.tasks}
    done = [current.record for current in found.current]
    scores, limits = {}, set()
    for record in done:
        for name in record["results"]:
            path = folder / name
            data = read_results(path)
            if not isinstance(data.get("results"), dict):
                skipped.append((path, "no 'results' mapping in the results file"))
                continue
            limits.add(recorded_limit(data))
            for task, values in data["results"].items():
                spec = catalogue.get(task)
                if newest.get(task) != id(record) or spec is None:
                    continue
                if not isinstance(values, dict):
                    skipped.append((path, f"results.{task} is {values!r}, not a mapping of metrics"))
                    continue
                value = values.get(spec["metric"])
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    skipped.append((path, f"results.{task}: {spec['metric']!r} is {value!r}, not a number"))
                    continue
                scores[task] = value * spec["scale"]
    tokens = [pair for r in done for pair in r.get("visual_tokens", [])]
    # A schedule's counts at each stage depend on the image's count alone: one logged image of each count says them.
    stages = {before: stage for r in done for (before, _), stage in zip(r.get("visual_tokens", []), r.get("stage_tokens", [])) if stage}
    by_task, counted = {}, set()
    for record in done:
        per_task = record.get("tokens_by_task") or (
            {record["finished_tasks"][0]: record.get("visual_tokens", [])} if len(record["finished_tasks"]) == 1 else {}
        )
        for task in (t for t in record["finished_tasks"] if newest.get(t) == id(record)):
            # An attempt of several tasks logs their images interleaved: each task gets them all.
            by_task[task] = per_task.get(task) or record.get("visual_tokens", [])
            if per_task.get(task):
                counted.add(task)
    samples = sum(sum(r.get("samples", {}).values()) for r in done)
    text = {}
    for record in done:
        text.update(record.get("text_tokens", {}))
    timing = [t for r in done for t in r.get("timing", [])]
    model = MODEL_SPECS[setting["model"]]
    return {
        # The Table 1 block: a finetuned checkpoint's rows join its base model's (M3: LLaVA-1.5-7B's).
        "model": model_label(model.finetuned_from) if model.finetuned_from else folder.parent.name,
        "checkpoint": folder.parent.name,
        "model_id": setting["model"],
        "flops_model": model.flops_model,
        "tiny": model.tiny,
        "trained": model.trained,
        "llm_shape": next((r["llm_shape"] for r in done if _is_shape(r.get("llm_shape"))), None),
        "method": setting["method"],
        "ratio": setting["ratio"] if setting["ratio"] == ADAPTIVE else float(setting["ratio"]),
        "limit": max((v for v in limits if v is not None), default=None),
        "layer_index": setting.get("layer_index") or 0,
        "scores": scores,
        "visual_tokens": tokens,
        "stages_by_tokens": stages,
        "tokens_by_task": {task: pairs for task, pairs in by_task.items() if pairs},
        # The benchmarks whose images' counts are their own (not pooled with the others of one attempt).
        "counted_tasks": counted,
        "text_tokens": text,
        "samples": samples,
        "latency": latency_summary(timing),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in done if "peak_rss_mb" in r), default=None),
        "wall_s": sum(r["wall_s"] for _, r in records),
        "failed_invocations": sum(1 for _, r in records if r["status"] != "done"),
        "codes": [r.get("code") for r in done],
    }


def _is_shape(value) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), int) and value[k] > 0 for k in ("layers", "hidden", "ffn"))


TIMING_FIELDS = ("prefill_ms", "vision_ms", "selection_ms", "llm_prefill_ms", "decode_ms_per_token", "generated_tokens")


def latency_summary(timing: list[dict]) -> dict:
    """Per field of ``TIMING_FIELDS``, ``(p25, median, p75)`` over the run's ``generate`` calls
    (``None`` where none recorded it), and the GPU's peak allocated MB (``None`` off a GPU)."""
    summary = {name: spread(t.get(name) for t in timing) for name in TIMING_FIELDS}
    summary["gpu_peak_mb"] = max((t["gpu_peak_mb"] for t in timing if t.get("gpu_peak_mb") is not None), default=None)
    return summary


def row_order(run: dict) -> tuple:
    """Table 1's order of a model's rows: the paper's (``TABLE_ORDER``), then every other method by
    name; each method's rows by ratio, ``adaptive`` last."""
    known = run["method"] in TABLE_ORDER
    return (TABLE_ORDER.index(run["method"]) if known else len(TABLE_ORDER), "" if known else run["method"], ratio_order(run["ratio"]))


def token_counts(run: dict, siblings: list[dict]) -> tuple[list[int], list[int], bool]:
    """Visual tokens per image before and after pruning; True when derived rather than logged.

    The patch logs counts wherever it prunes (OTPRUNE_LOG=1). For a run without them (the unpruned
    model, which is not patched; records made without the log) "before" is the same images' count
    from a sibling run of the same model and "after" what the method keeps (all; none for VTW;
    the budget otherwise).
    """
    if run["visual_tokens"]:
        return [b for b, _ in run["visual_tokens"]], [a for _, a in run["visual_tokens"]], False
    logged = next((s["visual_tokens"] for s in siblings if s["visual_tokens"]), [])
    return *derived_counts(run, [b for b, _ in logged]), True


def derived_counts(run: dict, before: list[int]) -> tuple[list[int], list[int]]:
    """``(before, after)``: what the run's method keeps of images of ``before`` tokens (all for
    the unpruned model, none for VTW, the budget otherwise); nothing for an adaptive run, whose
    counts only its own log says."""
    if run["ratio"] == ADAPTIVE:
        return [], []
    if run["method"] == "Original":
        return before, before
    if run["method"] == "VTW":
        return before, [0] * len(before)
    return before, [budget(run["ratio"], n) for n in before]


def task_tokens(run: dict, task: str, siblings: list[dict]) -> tuple[list[int], list[int]]:
    """One task's visual tokens per image, before and after pruning: the run's own log of that
    task, else (a run that logs none) derived as :func:`token_counts` does from a sibling's."""
    own = run.get("tokens_by_task", {}).get(task)
    if own:
        return [b for b, _ in own], [a for _, a in own]
    logged = next((s["tokens_by_task"][task] for s in siblings if s.get("tokens_by_task", {}).get(task)), [])
    return derived_counts(run, [b for b, _ in logged])


def flops_of(run: dict, tasks: list[str], catalogue: dict, shape: ModelShape, siblings: list[dict]) -> float | None:
    """Mean prefill FLOPs over benchmarks (the paper's TFLOP column), each benchmark's over its own
    images (their token counts differ: LLaVA-1.6 and the Qwen-VL families follow the resolution)."""
    per_task = []
    for task in tasks:
        n_text = run["text_tokens"].get(task, catalogue[task].get("text_tokens"))
        before, after = task_tokens(run, task, siblings)
        if n_text is None or not before:
            continue
        per_task.append(statistics.mean(image_prefill(run, n_text, b, a, shape) for b, a in zip(before, after)))
    return statistics.mean(per_task) if per_task else None


# -- the tables -----------------------------------------------------------------------------


def same_setting(published: dict | None, run: dict) -> bool:
    """Whether a run was made at the setting of the paper's row of its method: the same ratio, and
    the same K where the paper states one (``published``: paper_results.yaml's ``settings``); an
    adaptive row only with an adaptive row."""
    if not published:
        return False
    ratios = (run["ratio"], published["ratio"])
    if not (ratios[0] == ratios[1] if ADAPTIVE in ratios else math.isclose(*ratios)):
        return False
    return "layer_index" not in published or run["layer_index"] == published["layer_index"]


def count_summary(counts: list[int]) -> tuple[float, int, int] | None:
    """``(mean, min, max)`` of per-image token counts; ``None`` for none."""
    return (statistics.mean(counts), min(counts), max(counts)) if counts else None


def count_cell(counts: list[int]) -> str:
    """Per-image token counts in one cell: their mean, with the range where they vary
    (``41.3 [18–77]``: an adaptive method's, or a resolution-following model's)."""
    mean, low, high = count_summary(counts)
    return f"{mean:.0f}" if low == high else f"{mean:.1f} [{low}–{high}]"


def varies(run: dict) -> bool:
    """Whether a run's kept counts differ from image to image (every adaptive run's may)."""
    return run["ratio"] == ADAPTIVE or len({after for _, after in run["visual_tokens"]}) > 1


def fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def score_digits(unit: str) -> int:
    return 0 if unit == "P-score" else 2


def label(run: dict) -> str:
    """A row's name: method and ratio (VTW, which keeps no visual token: its K; K = 0 is the
    no-image control), the checkpoint where it is not the block's model (a finetuned one), and the
    limit when lmms-eval's results say one was used."""
    if run["method"] == "Original":
        name = "Original"
    elif run["method"] == "VTW":
        name = f"VTW K={run['layer_index']}" + (" (no visual tokens)" if run["layer_index"] == 0 else "")
    else:
        name = f"{run['method']} {ratio_label(run['ratio'])}"
    if run.get("checkpoint", run["model"]) != run["model"]:
        name += f" ({run['checkpoint']})"
    return name + (f" (--limit {run['limit']:g})" if run.get("limit") is not None else "") + (" †" if run.get("other_code") else "")


def build_table(runs: list[dict], catalogue: dict, paper: dict) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows for every model block."""
    lines, rows = [], []
    tasks = [t for t in catalogue if any(t in r["scores"] for r in runs)]
    for model in sorted({r["model"] for r in runs}):
        block = [r for r in runs if r["model"] == model]
        block.sort(key=row_order)
        flops_model = block[0]["flops_model"]
        tiny = block[0]["tiny"]
        paper_rows = paper["models"].get(flops_model, {}) if not tiny else {}
        bench_index = {b: i for i, b in enumerate(paper["benchmarks"])}
        block_tasks = [t for t in tasks if any(t in r["scores"] for r in block)]
        pruned = [r for r in block if r["method"] != "Original"]
        avg = average_ranks({label(r): [r["scores"].get(t) for t in block_tasks] for r in pruned})
        one_shot = average_ranks({label(r): [r["scores"].get(t) for t in block_tasks] for r in pruned if r["method"] in ONE_SHOT})
        shape = MODELS[flops_model]
        own_shape = tiny_shape(tiny, next((r["llm_shape"] for r in block if r["llm_shape"]), None)) if tiny else None
        title = f"## {model}"
        if tiny:
            what = (
                f"tiny model of {flops_model}'s visual geometry trained on the synthetic benchmark (configs/otprune_synth)"
                if block[0]["trained"]
                else f"tiny random-weight stand-in for {flops_model}"
            )
            title += (
                f" ({what}: TFLOP is for {flops_model}'s LLM at these token counts; Tiny LLM MFLOP for this checkpoint's "
                f"own LLM, {own_shape.layers} layers of width {own_shape.hidden}, FFN {own_shape.ffn})"
            )
        lines += [title, ""]
        header = ["Method", "Visual tokens / image", "TFLOP (%)"]
        if tiny:
            header.append("Tiny LLM MFLOP")
        header += [f"{catalogue[t]['benchmark']} ({catalogue[t]['unit']})" for t in block_tasks] + ["Avg. rank", "One-shot rank"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        full_flops = None
        siblings = [r for r in block if r["visual_tokens"]]
        for run in block:
            before, after, derived = token_counts(run, siblings)
            flops = flops_of(run, block_tasks, catalogue, shape, siblings)
            if run["method"] == "Original":
                full_flops = flops
            pct = 100 * flops / full_flops if flops is not None and full_flops else None
            tokens = f"{count_cell(before)} → {count_cell(after)}" + ("*" if derived else "") if before and after else "–"
            paper_row = paper_rows.get(run["method"]) if same_setting(paper.get("settings", {}).get(run["method"]), run) else None
            tflop = f"{fmt(flops / 1e12 if flops else None, 3)} ({fmt(pct)})"
            if paper_row and paper_row.get("tflop") and flops:
                tflop += f" [{flops / 1e12 - paper_row['tflop']:+.3f}]"
            elif paper_row and paper_row.get("category") == "adaptive":
                # The paper gives no number for an adaptive row's cost: its rows compare on scores.
                tflop += f" [paper: {VARIABLE}]"
            cells = [label(run), tokens, tflop]
            if tiny:
                tiny_flops = flops_of(run, block_tasks, catalogue, own_shape, siblings)
                cells.append(fmt(tiny_flops / 1e6 if tiny_flops else None, 1))
            after_summary = count_summary(after) or (None, None, None)
            csv_row = {
                "model": model,
                "checkpoint": run["checkpoint"],
                "method": run["method"],
                "ratio": run["ratio"],
                "limit": run["limit"],
                "visual_tokens_before": statistics.mean(before) if before else None,
                "visual_tokens_after": after_summary[0],
                "visual_tokens_after_min": after_summary[1],
                "visual_tokens_after_max": after_summary[2],
                "tokens_derived": derived,
                "tflop": flops / 1e12 if flops else None,
                "tflop_pct": pct,
                "paper_tflop": paper_row.get("tflop") if paper_row else None,
                "paper_tflop_variable": bool(paper_row) and paper_row.get("category") == "adaptive",
            }
            if tiny:
                csv_row["tiny_llm_mflop"] = tiny_flops / 1e6 if tiny_flops else None
            for task in block_tasks:
                value = run["scores"].get(task)
                bench = catalogue[task]["benchmark"]
                published = paper_row["scores"][bench_index[bench]] if paper_row and bench in bench_index else None
                cell = fmt(value, score_digits(catalogue[task]["unit"]))
                if value is not None and published is not None:
                    cell += f" ({value - published:+.{score_digits(catalogue[task]['unit'])}f})"
                cells.append(cell)
                csv_row[bench] = value
                csv_row[f"{bench}_paper"] = published
                csv_row[f"{bench}_diff"] = value - published if value is not None and published is not None else None
            cells += [fmt(avg.get(label(run))), fmt(one_shot.get(label(run)))]
            csv_row.update(avg_rank=avg.get(label(run)), one_shot_rank=one_shot.get(label(run)))
            lines.append("| " + " | ".join(cells) + " |")
            rows.append(csv_row)
        lines += varying_count_lines(block, block_tasks, catalogue, rows[-len(block) :])
        ours = next((r for r in block if r["method"] == "OTPrune"), None)
        theirs = next((r for r in block if r["method"] == "DivPrune" and ours and r["ratio"] == ours["ratio"]), None)
        if ours and theirs:
            improvements = relative_improvements([ours["scores"].get(t) for t in block_tasks], [theirs["scores"].get(t) for t in block_tasks])
            p = wilcoxon_greater(improvements)
            units = sorted({catalogue[t]["unit"] for t in block_tasks if ours["scores"].get(t) is not None and theirs["scores"].get(t) is not None})
            lines += [
                "",
                f"Wilcoxon signed-rank, OTPrune > DivPrune at ratio {ratio_label(ours['ratio'])} (one-sided, on the relative improvement "
                f"(OTPrune − DivPrune) / DivPrune of each of {len(improvements)} benchmarks with DivPrune ≠ 0, pooling {', '.join(units)}): "
                f"p = {fmt(p, 4) if p is not None else 'n/a (no nonzero difference)'}; paper: p = {paper['wilcoxon_p']}",
            ]
        lines += [""]
    return lines, rows


def varying_count_lines(block: list[dict], tasks: list[str], catalogue: dict, csv_rows: list[dict]) -> list[str]:
    """Per benchmark, the kept visual tokens per image (mean [min–max]) of the block's rows whose
    counts vary (the adaptive methods'); adds them to those rows' CSV (``<benchmark>_tokens_after``,
    ``_min``, ``_max``). The block's runs and its CSV rows are in the same order. A benchmark run
    with others in one attempt (``group_tasks``) has no counts of its own: its log interleaves the
    benchmarks' images, so only the token column's pooled mean and range hold for it."""
    shown = [(run, row) for run, row in zip(block, csv_rows) if varies(run) and run.get("counted_tasks")]
    if not shown:
        return []
    names = [catalogue[t]["benchmark"] for t in tasks]
    lines = ["", "Kept visual tokens per image, per benchmark (mean [min–max]), of the rows whose counts vary:", ""]
    lines += ["| Method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for run, row in shown:
        cells = []
        for task, name in zip(tasks, names):
            after = [a for _, a in run["tokens_by_task"].get(task, [])] if task in run.get("counted_tasks", ()) else []
            summary = count_summary(after) or (None, None, None)
            row.update({f"{name}_tokens_after": summary[0], f"{name}_tokens_after_min": summary[1], f"{name}_tokens_after_max": summary[2]})
            cells.append(count_cell(after) if after else "–")
        lines.append(f"| {label(run)} | " + " | ".join(cells) + " |")
    return lines


def efficiency_lines(runs: list[dict]) -> list[str]:
    lines = [
        "## Per-run cost",
        "",
        "Per generate call (one sample), from OTPRUNE_LOG's timing lines: median with p25–p75 in brackets. "
        "TTFT: the call's start to the end of its first forward (time to first token), split into vision "
        "(vision tower + projector), selection (before the LLM; FastV and VTW prune inside it) and LLM prefill "
        "(the rest). Decode: the time after the first token over the tokens after the first, per token. "
        "Tokens: generated per call. CUDA events on a GPU, wall clock on a CPU. Peak RSS: the run's process "
        "tree's resident memory; GPU peak: torch.cuda.max_memory_allocated (– off a GPU).",
        "",
        "| Model | Method | Samples | TTFT ms | Vision ms | Selection ms | LLM prefill ms | Decode ms/token "
        "| Tokens | Peak RSS MB | GPU peak MB | Wall s | Failed attempts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["model"], *row_order(r))):
        latency = r["latency"]
        lines.append(
            f"| {r['model']} | {label(r)} | {r['samples']} | {with_spread(latency['prefill_ms'])} "
            f"| {fmt(median_of(latency['vision_ms']), 1)} | {fmt(median_of(latency['selection_ms']), 1)} "
            f"| {fmt(median_of(latency['llm_prefill_ms']), 1)} | {with_spread(latency['decode_ms_per_token'])} "
            f"| {fmt(median_of(latency['generated_tokens']), 0)} | {fmt(r['peak_rss_mb'], 0)} "
            f"| {fmt(latency['gpu_peak_mb'], 0)} | {fmt(r['wall_s'], 1)} | {r['failed_invocations']} |"
        )
    return lines + [""]


def median_of(quartiles) -> float | None:
    return None if quartiles is None else quartiles[1]


def with_spread(quartiles, digits=1) -> str:
    """``median [p25–p75]`` of ``spread``'s triple; ``–`` when nothing was recorded."""
    if quartiles is None:
        return "–"
    p25, median, p75 = quartiles
    return f"{median:.{digits}f} [{p25:.{digits}f}–{p75:.{digits}f}]"


def paper_check(paper: dict) -> list[str]:
    """The paper's own numbers through the same rank and test functions, beside the published ones."""
    lines = [
        "## The paper's numbers through this report",
        "",
        "Ranks and Wilcoxon p computed here from configs/paper_results.yaml (Avg. rank over every row of a "
        "model's block but Original; one-shot rank over VTW, FastV, DivPrune, OTPrune).",
        "",
        "| Model | Method | Avg. rank (published) | One-shot rank (published) |",
        "|---|---|---|---|",
    ]
    pooled_ours, pooled_theirs = [], []
    tests = []
    for model, rows in paper["models"].items():
        pruned = {name: row["scores"] for name, row in rows.items() if name != "Original"}
        avg = average_ranks(pruned)
        one = average_ranks({n: s for n, s in pruned.items() if n in paper["one_shot_methods"]})
        for name in pruned:
            row = rows[name]
            published_one = fmt(row.get("one_shot_rank")) if "one_shot_rank" in row else "–"
            lines.append(f"| {model} | {name} | {fmt(avg[name])} ({fmt(row.get('avg_rank'))}) | {fmt(one.get(name))} ({published_one}) |")
        improvements = relative_improvements(rows["OTPrune"]["scores"], rows["DivPrune"]["scores"])
        tests.append((model, len(improvements), wilcoxon_greater(improvements)))
        pooled_ours += rows["OTPrune"]["scores"]
        pooled_theirs += rows["DivPrune"]["scores"]
    pooled = relative_improvements(pooled_ours, pooled_theirs)
    tests.append(("all three models pooled", len(pooled), wilcoxon_greater(pooled)))
    lines += ["", "| Wilcoxon OTPrune > DivPrune on | Benchmarks | p | paper's p |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {fmt(p, 4)} | {paper['wilcoxon_p']} |" for name, n, p in tests]
    lines += [
        "",
        "The paper does not say which benchmarks it pooled; none of these reproduces 0.028 exactly (LLaVA-1.5-13B alone comes closest).",
        "",
    ]
    return lines


def skipped_lines(skipped: list[tuple[Path, str]], runs_dir: Path) -> list[str]:
    if not skipped:
        return []
    lines = ["## Skipped", "", "Files and folders not tabled, and why:", ""]
    for path, reason in skipped:
        shown = path.relative_to(runs_dir) if path.is_relative_to(runs_dir) else path
        lines.append(f"- `{shown}`: {reason}")
    return lines + [""]


def run_folders(runs_dir: Path) -> list[Path]:
    """The ``<model>/<method>_<ratio>/`` folders of ``RUNS/<config>`` (the tiny checkpoints and the
    Slurm jobs' logs aside)."""
    return sorted(p for p in runs_dir.glob("*/*") if p.is_dir() and p.parent.name not in ("checkpoints", "slurm"))


def nested_runs(runs_dir: Path) -> dict[Path, int]:
    """``{RUNS/<config>: number of run folders}`` below ``runs_dir`` when ``runs_dir`` is their parent
    (``runs/`` instead of ``runs/smoke``): it holds no run folder itself. Empty otherwise."""
    if any((folder / "setting.json").is_file() for folder in run_folders(runs_dir)):
        return {}
    found: dict[Path, int] = {}
    for setting in sorted(runs_dir.glob("*/*/*/setting.json")):
        config_dir = setting.parent.parent.parent
        found[config_dir] = found.get(config_dir, 0) + 1
    return found


def write_report(runs_dir: Path, out_dir: Path | None = None, code: dict | None = None) -> tuple[Path, Path, str]:
    """Table 1 of ``runs_dir`` written as Markdown and CSV; ``code``: this otprune's code identity
    when the caller has it (the harness probed it already), else probed here."""
    catalogue = {**load_yaml("tasks.yaml")["paper"], **load_yaml("tasks.yaml")["local"]}
    paper = load_yaml("paper_results.yaml")
    runs, skipped = [], []
    for folder in run_folders(runs_dir):
        run = read_run(folder, catalogue, skipped)
        if run is not None:
            runs.append(run)
    lines = [f"# Table 1: {runs_dir.name}", ""]
    current = code if code is not None else current_code()
    for run in runs:
        run["other_code"] = current is not None and any(not same_code(recorded, current) for recorded in run["codes"])
    if any(r["other_code"] for r in runs):
        lines += [OTHER_CODE_NOTE.format(current=current), ""]
    if any(r["tiny"] and not r["trained"] for r in runs):
        lines += [RANDOM_WEIGHTS_NOTE, ""]
    if any(r["limit"] is not None for r in runs):
        lines += [LIMIT_NOTE, ""]
    lines += [
        "Scores in the paper's units with the difference from the paper's number in brackets where it has one; "
        "TFLOP: mean LLM prefill over the benchmarks (FastV's formula, measured visual tokens, text tokens of "
        "the prompts), % of the unpruned model, [difference from the paper]. Token counts marked * are derived "
        "(no log for that run): a sibling run's count of the same images, and what the method keeps.",
        "",
    ]
    table, rows = build_table(runs, catalogue, paper) if runs else (["No finished runs yet.", ""], [])
    lines += table + (efficiency_lines(runs) if runs else []) + paper_check(paper) + skipped_lines(skipped, runs_dir)
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    out_dir = out_dir or runs_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(lines)
    md_path, csv_path = out_dir / "table1.md", out_dir / "table1.csv"
    md_path.write_text(markdown)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(write_pareto_figures(rows, {spec["benchmark"]: spec["unit"] for spec in catalogue.values()}, out_dir), file=sys.stderr)
    return md_path, csv_path, markdown


def main(argv=None, code: dict | None = None) -> int:
    """``otprune report``; ``code``: as :func:`write_report`'s."""
    parser = argparse.ArgumentParser(prog="otprune report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="RUNS/<config>, the folder holding <model>/<method>_<ratio>/")
    parser.add_argument("--out", help="where table1.md and table1.csv go (default: runs_dir)")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"error: {runs_dir} is not a folder of runs", file=sys.stderr)
        return 2
    nested = nested_runs(runs_dir)
    if nested:
        print(f"error: {runs_dir} holds no run folders (<model>/<method>_<ratio>/ with a setting.json); these folders in it do:", file=sys.stderr)
        for folder, count in nested.items():
            print(f"  {folder}  ({count} run folder{'s' if count != 1 else ''})", file=sys.stderr)
        print(f"report one of them: otprune report {next(iter(nested))}", file=sys.stderr)
        return 2
    try:
        md_path, csv_path, markdown = write_report(runs_dir, Path(args.out) if args.out else None, code)
    except MissingResource as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {error.filename}: {error.strerror}; pass --out DIR to write the table elsewhere", file=sys.stderr)
        return 2
    print(markdown)
    print(f"written: {md_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
