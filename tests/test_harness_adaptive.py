"""Issue 34's harness and report part: adaptive runs (a config ratio ``adaptive``, SUBSET_RATIO
unset), their check, their per-image counts and TFLOP in the report, the new labels and M3."""

import csv
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_harness import write_config, write_run

from otprune import report
from otprune.harness import catalogue as harness_catalogue
from otprune.harness import config as harness_config
from otprune.harness import errors as harness_errors
from otprune.harness import plan as harness_plan
from otprune.harness import run_check as harness_run_check
from otprune.measures import prefill_flops
from otprune.plugins.pool import pooled_shape
from otprune.selectors import budget

PAPER = yaml.safe_load((ROOT / "configs" / "paper_results.yaml").read_text())


# -- configs --------------------------------------------------------------------------------


def test_an_adaptive_ratio_runs_the_method_with_subset_ratio_unset(tmp_path):
    path = write_config(tmp_path / "c.yaml", methods={"PruMerge": {"ratios": ["adaptive", 0.25, "adaptive"]}})
    runs = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path / "runs")
    adaptive, fixed = runs
    assert adaptive.env == {"BASELINE": "PRUMERGE"} and fixed.env == {"BASELINE": "PRUMERGE", "SUBSET_RATIO": "0.25"}
    assert adaptive.folder.name == "PruMerge_adaptive" and adaptive.setting["ratio"] == "adaptive"
    assert harness_plan.describe(adaptive) == "tiny-llava-1.5 PruMerge adaptive otprune_smoke_vqa,otprune_smoke_pope,otprune_smoke_caption"


def test_an_adaptive_method_without_ratios_runs_adaptive(tmp_path):
    path = write_config(tmp_path / "c.yaml", methods={"DivPrune*": {}})
    (run,) = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path / "runs")
    assert (run.ratio, run.env, run.folder.name) == ("adaptive", {"BASELINE": "DIVPRUNE_ADAPTIVE"}, "DivPrune-star_adaptive")


@pytest.mark.parametrize("method, baseline", [("OTPrune", "OURS"), ("POOL", "POOL"), ("VisionZip", "VISIONZIP")])
def test_adaptive_is_refused_for_a_method_that_does_not_ask_for_it(tmp_path, method, baseline):
    path = write_config(tmp_path / "c.yaml", methods={method: {"ratios": [0.1, "adaptive"]}})
    message = f"method '{re.escape(method)}' ratio 'adaptive' is not allowed: BASELINE={baseline} does not ask for the 'adaptive' context"
    with pytest.raises(harness_errors.ConfigError, match=message):
        harness_config.load_config(str(path))


def test_a_method_that_does_not_ask_for_adaptive_still_needs_ratios(tmp_path):
    path = write_config(tmp_path / "c.yaml", methods={"OTPrune": {}})
    with pytest.raises(harness_errors.ConfigError, match=r"method 'OTPrune' needs 'ratios', a list of numbers in \(0, 1\], or 'adaptive'"):
        harness_config.load_config(str(path))


@pytest.mark.parametrize("ratios", [["Adaptive"], ["adaptive", 2], []])
def test_other_ratio_words_are_refused(tmp_path, ratios):
    path = write_config(tmp_path / "c.yaml", methods={"PruMerge": {"ratios": ratios}})
    with pytest.raises(harness_errors.ConfigError, match=r"ratios=.*allowed: a list of numbers in \(0, 1\], or 'adaptive'"):
        harness_config.load_config(str(path))


ADAPTIVE_INSIDE = """
import torch


def select(tokens, k, *, adaptive):
    return torch.arange(max(1, k // 2) if adaptive else k)
"""


@pytest.mark.parametrize("ratios", [[0.25, "adaptive"], ["adaptive", 0.25]])
def test_each_ratio_of_a_method_is_checked_not_only_its_first(tmp_path, monkeypatch, ratios):
    """An adaptive run prunes before the LLM only: at layer_index 2 its 0.25 runs, its 'adaptive'
    does not, in whichever place of the list it stands."""
    from otprune import methods

    (tmp_path / "adaptive_inside_plugin.py").write_text(ADAPTIVE_INSIDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.BUNDLED, "ADAPTINSIDE", ("selector", "adaptive_inside_plugin:select"))
    methods.get_method.cache_clear()
    try:
        path = write_config(tmp_path / "c.yaml", methods={"ADAPTINSIDE": {"ratios": ratios, "layer_index": 2}})
        with pytest.raises(harness_errors.ConfigError) as raised:
            harness_config.load_config(str(path))
        assert "tiny-llava-1.5 ADAPTINSIDE: LAYER_INDEX=2 is not allowed with BASELINE=ADAPTINSIDE and SUBSET_RATIO unset" in str(raised.value)
        path = write_config(tmp_path / "c.yaml", methods={"ADAPTINSIDE": {"ratios": [0.25], "layer_index": 2}})
        assert harness_config.load_config(str(path)).methods["ADAPTINSIDE"]["ratios"] == [0.25]
    finally:
        monkeypatch.undo()
        methods.get_method.cache_clear()


# -- labels and M3 --------------------------------------------------------------------------


def test_every_named_row_of_the_paper_is_a_label_that_runs_an_installed_method():
    """Each method row of the paper's Table 1 (its lost-name row aside) is a config label whose
    method is installed; its adaptive rows name methods that choose their own count."""
    from otprune.methods import get_method

    rows = {row for model in PAPER["models"].values() for row in model if row not in ("Original", "unnamed-finetuning")}
    for label in rows:
        spec = get_method(harness_catalogue.baseline(label))
        assert ("adaptive" in spec.context) == (PAPER["settings"].get(label, {}).get("ratio") == "adaptive"), label


def test_the_report_orders_rows_as_the_papers_table_1():
    paper_order = list(PAPER["models"]["llava-1.5-7b"])
    ours = [name for name in report.TABLE_ORDER if name in paper_order]
    assert ours == [name for name in paper_order if name in report.TABLE_ORDER] and len(ours) == len(paper_order) - 1  # the unnamed row


def test_m3_runs_pool_at_the_36_token_scale_nearest_its_rows_tflop():
    config = yaml.safe_load((ROOT / "configs" / "paper_table1.yaml").read_text())
    (ratio,) = config["methods"]["M3"]["ratios"]
    assert config["methods"]["M3"]["models"] == ["mu-cai/llava-v1.5-7b-m3"]
    kept = budget(ratio, 576)
    rows, cols = pooled_shape(24, 24, kept)
    assert (kept, rows * cols) == (36, 36)
    # The paper's text tokens per benchmark (METHOD.md), and its M3 row's TFLOP.
    text = [15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57]
    tflop = {scale: statistics.mean(prefill_flops(t + scale) for t in text) / 1e12 for scale in (1, 9, 36, 144, 576)}
    paper = PAPER["models"]["llava-1.5-7b"]["M3"]["tflop"]
    assert min(tflop, key=lambda scale: abs(tflop[scale] - paper)) == rows * cols
    assert harness_catalogue.MODELS["mu-cai/llava-v1.5-7b-m3"].flops_model == harness_catalogue.MODELS["liuhaotian/llava-v1.5-7b"].flops_model


def test_a_label_whose_method_is_not_installed_is_refused_by_name(tmp_path, monkeypatch):
    from otprune import methods

    name = "PRUMERGE"
    monkeypatch.delitem(methods.BUNDLED, name)
    methods.get_method.cache_clear()
    label = next(label for label, baseline in harness_catalogue.METHODS.items() if baseline == name)
    path = write_config(tmp_path / "c.yaml", methods={label: {"ratios": [0.1]}})
    with pytest.raises(harness_errors.ConfigError, match=f"BASELINE='{name}' is not a method"):
        harness_config.load_config(str(path))


# -- the run check --------------------------------------------------------------------------


def log_of(method: str, pairs) -> dict:
    return harness_run_check.parse_prune_log("".join(f"otprune {method}: visual tokens {before}->{after}; selector 1.0 ms\n" for before, after in pairs))


def test_an_adaptive_run_passes_when_every_image_kept_between_one_and_all():
    log = log_of("PRUMERGE", [(576, 41), (576, 1), (576, 576), (2304, 300)])
    assert log["visual_tokens"] == [[576, 41], [576, 1], [576, 576], [2304, 300]]
    assert harness_run_check.pruning_problem({"BASELINE": "PRUMERGE"}, log, 4) is None


@pytest.mark.parametrize("after", [0, 577])
def test_an_adaptive_run_fails_when_an_image_kept_none_or_more_than_it_had(after):
    log = log_of("PRUMERGE", [(576, 41), (576, after)])
    problem = harness_run_check.pruning_problem({"BASELINE": "PRUMERGE"}, log, 2)
    assert problem == f"an image kept {after} of 576 visual tokens; PRUMERGE run adaptive (SUBSET_RATIO unset) keeps between 1 and all 576"


def test_the_same_method_at_a_ratio_is_held_to_its_budget():
    """With SUBSET_RATIO set the method is no longer adaptive: more than its budget fails (the rule
    named is a selector's or a merger's, as the installed method is)."""
    log = log_of("PRUMERGE", [(576, 100)])
    problem = harness_run_check.pruning_problem({"BASELINE": "PRUMERGE", "SUBSET_RATIO": "0.098"}, log, 1)
    assert problem.startswith("an image kept 100 of 576 visual tokens; PRUMERGE ") and "ratio 0.098 keeps" in problem


# -- the report -----------------------------------------------------------------------------

TASKS = {"gqa": ("exact_match,none", 100), "pope": ("pope_f1_score,none", 100)}
TEXT = {"gqa": 30, "pope": 12}
# Known per-image kept counts of the adaptive run, per benchmark.
KEPT = {"gqa": [18, 77, 40], "pope": [25, 31]}


def results(score: float) -> dict:
    return {"results": {task: {metric: score / scale} for task, (metric, scale) in TASKS.items()}}


def write_paper_runs(root: Path) -> Path:
    """LLaVA-1.5-7B's Original, OTPrune 0.098 and PruMerge adaptive, and M3 on its checkpoint."""
    runs = root / "t"
    base = runs / "llava-v1.5-7b"
    model = "liuhaotian/llava-v1.5-7b"
    for folder, method, ratio, spec, kept in (
        ("Original_1", "Original", 1.0, {}, None),
        ("OTPrune_0.098", "OTPrune", 0.098, {}, {task: [56] * len(counts) for task, counts in KEPT.items()}),
        ("PruMerge_adaptive", "PruMerge", "adaptive", {}, KEPT),
    ):
        tokens = {task: [[576, a] for a in counts] for task, counts in (kept or {}).items()}
        write_run(
            base / folder, model, method, ratio, spec, results(50.0), text_tokens=TEXT,
            visual_tokens=[pair for pairs in tokens.values() for pair in pairs], tokens_by_task=tokens,
        )  # fmt: skip
    m3_tokens = {task: [[576, 36]] * len(counts) for task, counts in KEPT.items()}
    write_run(
        runs / "llava-v1.5-7b-m3" / "M3_0.0625", "mu-cai/llava-v1.5-7b-m3", "M3", 0.0625, {}, results(60.0), text_tokens=TEXT,
        visual_tokens=[pair for pairs in m3_tokens.values() for pair in pairs], tokens_by_task=m3_tokens,
    )  # fmt: skip
    return runs


def test_an_adaptive_rows_tokens_and_tflop_come_from_each_images_own_count(tmp_path):
    runs = write_paper_runs(tmp_path)
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    rows = {row["method"]: row for row in csv.DictReader(open(csv_path))}
    row = rows["PruMerge"]
    every = [a for counts in KEPT.values() for a in counts]
    assert (float(row["visual_tokens_after"]), int(row["visual_tokens_after_min"]), int(row["visual_tokens_after_max"])) == (
        pytest.approx(statistics.mean(every)),
        18,
        77,
    )
    # TFLOP: per benchmark the mean of each image's own prefill, then the mean over benchmarks
    # (not the FLOPs of the mean count).
    per_task = [statistics.mean(prefill_flops(TEXT[task] + a) for a in counts) for task, counts in KEPT.items()]
    assert float(row["tflop"]) == pytest.approx(statistics.mean(per_task) / 1e12)
    assert float(row["tflop"]) != pytest.approx(prefill_flops(round(statistics.mean(TEXT.values()) + statistics.mean(every))) / 1e12)
    for task, counts in KEPT.items():
        bench = {"gqa": "GQA", "pope": "POPE"}[task]
        assert (float(row[f"{bench}_tokens_after"]), int(row[f"{bench}_tokens_after_min"]), int(row[f"{bench}_tokens_after_max"])) == (
            pytest.approx(statistics.mean(counts)),
            min(counts),
            max(counts),
        )
    # The paper's PruMerge row has no TFLOP ("Variable"): compared on scores.
    assert row["paper_tflop"] == "" and row["paper_tflop_variable"] == "True" and float(row["GQA_paper"]) == 51.30
    assert f"| PruMerge adaptive | 576 → {statistics.mean(every):.1f} [18–77] | {float(row['tflop']):.3f} (" in markdown
    assert "[paper: Variable] | 50.00 (-1.30) |" in markdown
    assert f"| PruMerge adaptive | {statistics.mean(KEPT['gqa']):.1f} [18–77] | {statistics.mean(KEPT['pope']):.1f} [25–31] |" in markdown
    # Fixed counts keep the one-number cell.
    assert "| OTPrune 0.098 | 576 → 56 |" in markdown and rows["OTPrune"]["visual_tokens_after_min"] == "56"


def test_m3_stands_in_llava_1_5_7bs_block_against_the_papers_m3_row(tmp_path):
    runs = write_paper_runs(tmp_path)
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["model"], r["method"]) for r in rows] == [
        ("llava-v1.5-7b", "Original"),
        ("llava-v1.5-7b", "OTPrune"),
        ("llava-v1.5-7b", "PruMerge"),
        ("llava-v1.5-7b", "M3"),
    ]
    m3 = rows[-1]
    assert m3["checkpoint"] == "llava-v1.5-7b-m3" and float(m3["paper_tflop"]) == 0.512 and float(m3["GQA_paper"]) == 60.81
    flops = statistics.mean(prefill_flops(TEXT[task] + 36) for task in KEPT) / 1e12
    assert float(m3["tflop"]) == pytest.approx(flops)
    assert f"| M3 0.0625 (llava-v1.5-7b-m3) | 576 → 36 | {flops:.3f} (" in markdown and f"[{flops - 0.512:+.3f}]" in markdown
    # Ranked with the block's other pruned rows (M3 scores highest here).
    assert float(m3["avg_rank"]) == 1.0


def test_an_adaptive_record_is_trusted_and_an_unknown_ratio_word_is_not(tmp_path):
    from otprune.harness.records import check_record

    record = {"status": "done", "tasks": [], "finished_tasks": [], "results": {}, "wall_s": 0}
    check_record({**record, "ratio": "adaptive"})
    with pytest.raises(ValueError, match="'ratio' is 'half', not a number or 'adaptive'"):
        check_record({**record, "ratio": "half"})
    runs = write_paper_runs(tmp_path)
    setting = json.loads((runs / "llava-v1.5-7b" / "PruMerge_adaptive" / "setting.json").read_text())
    assert report.setting_problem(setting) is None and report.setting_problem({**setting, "ratio": "half"}) is not None
