"""The evaluation harness: config checks, the report (on recorded runs and on the paper's own
numbers) and the embedded default end to end through the real lmms-eval CLI, offline, on CPU."""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, this_code

from otprune import report
from otprune.harness import attempt as harness_attempt
from otprune.harness import catalogue as harness_catalogue
from otprune.harness import checkpoints as harness_checkpoints
from otprune.harness import cli as harness_cli
from otprune.harness import config as harness_config
from otprune.harness import errors as harness_errors
from otprune.harness import plan as harness_plan
from otprune.harness import prerequisites as harness_prerequisites
from otprune.harness import resources as harness_resources
from otprune.harness import run_check as harness_run_check
from otprune.measures import ModelShape, prefill_flops, pruned_prefill_flops
from otprune.sample_timer import timing_line

FIXTURES = ROOT / "tests" / "fixtures" / "runs" / "smoke"
PAPER = yaml.safe_load((ROOT / "configs" / "paper_results.yaml").read_text())
CATALOGUE = harness_resources.load_catalogue()


def write_config(path: Path, **changes) -> Path:
    config = {
        "model_args": "device=cpu,device_map=auto",
        "models": {"tiny-llava-1.5": {}},
        "methods": {
            "Original": {},
            "OTPrune": {"ratios": [0.098], "env": {"OTPRUNE_OT": 1}},
            "DivPrune": {"ratios": [0.098], "env": {"OTPRUNE_OT": 1}},
        },
        "tasks": ["otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"],
        "group_tasks": True,
    }
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["synth", "smoke", "paper_table1", "regimes"])
def test_shipped_configs_load(name):
    config = harness_config.load_config(name)
    runs = harness_plan.plan_runs(config, Path("runs"))
    assert {r.method for r in runs} >= {"Original", "OTPrune", "DivPrune", "FastV", "VTW"}
    fastv = next(r for r in runs if r.method == "FastV")
    assert fastv.env == {"BASELINE": "FASTV", "SUBSET_RATIO": "0.098", "LAYER_INDEX": "2"}


def test_synth_config_runs_every_method_at_two_ratios_with_vtw_as_the_no_image_control():
    config = harness_config.load_config("synth")
    runs = harness_plan.plan_runs(config, Path("runs"))
    assert config.models == {"synth-llava-1.5": {}} and config.task_groups == [tuple(config.tasks)] and config.batch_size == 1
    assert config.tasks == [f"otprune_synth_{level}{kind}" for level in ("", "clutter_") for kind in ("yesno", "attribute", "count")]
    assert sorted((r.method, r.ratio) for r in runs) == sorted(
        [("Original", 1.0), ("VTW", 0.0)]
        + [(m, r) for m in ("OTPrune", "DivPrune", "DPP", "Random", "Uniform", "CDPruner", "POOL", "FastV") for r in (0.098, 0.25)]
    )
    assert next(r for r in runs if r.method == "VTW").env == {"BASELINE": "VTW", "LAYER_INDEX": "0"}
    # The K = 0 selectors log each image's OT distance for the hypothesis analysis.
    assert next(r for r in runs if r.method == "Uniform").env == {"BASELINE": "UNIFORM", "SUBSET_RATIO": "0.098", "OTPRUNE_OT": "1"}


def test_regimes_config_runs_each_level_in_a_process_of_its_own():
    """Each run's tasks are one background level's, so its logged OT distances and redundancies
    belong to that level; every method and ratio is asked every (kind, level)."""
    from otprune import synthetic_benchmark as bench

    config = harness_config.load_config("regimes")
    runs = harness_plan.plan_runs(config, Path("runs"))
    kinds = ("presence", "attribute", "count")
    assert config.task_groups == [tuple(bench.task_name(k, level) for k in kinds) for level in bench.LEVELS]
    settings = {(r.method, r.ratio) for r in runs}
    assert len(runs) == len(settings) * len(bench.LEVELS) == 18 * 4
    for method, ratio in settings:
        asked = [bench.task_level(config.catalogue[t]["benchmark"]) for r in runs if (r.method, r.ratio) == (method, ratio) for t in r.tasks]
        assert sorted(asked) == sorted((k, level) for k in kinds for level in bench.LEVELS)
    for run in runs:
        assert len({bench.task_level(config.catalogue[t]["benchmark"])[1] for t in run.tasks}) == 1


def test_group_tasks_lists_run_each_list_in_one_process(tmp_path):
    tasks = ["otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"]
    path = write_config(tmp_path / "g.yaml", group_tasks=[[tasks[2]], tasks[:2]])
    runs = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path)
    assert [r.tasks for r in runs if r.method == "OTPrune"] == [(tasks[2],), tuple(tasks[:2])]
    path = write_config(tmp_path / "h.yaml", group_tasks=False)
    assert [r.tasks for r in harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path) if r.method == "OTPrune"] == [(t,) for t in tasks]


def test_without_a_gpu_the_default_config_is_synth(monkeypatch):
    monkeypatch.setattr(harness_prerequisites, "gpu_count", lambda: 0)
    assert harness_prerequisites.default_config() == ("synth", "no GPU")


def test_a_layer_index_beyond_the_trained_checkpoints_llm_is_missing_before_any_run(tmp_path):
    layers = json.loads((ROOT / "configs" / "otprune_synth" / "synth-llava-1.5" / "config.json").read_text())["num_hidden_layers"]
    path = write_config(
        tmp_path / "deep.yaml", models={"synth-llava-1.5": {}}, methods={"FastV": {"ratios": [0.5], "layer_index": layers}, "VTW": {"layer_index": 0}}
    )
    missing, _ = harness_prerequisites.prerequisites(harness_config.load_config(str(path)), 1)
    assert [m for m in missing if "layer_index" in m] == [
        f"FastV's layer_index {layers} is beyond synth-llava-1.5's LLM, which has {layers} layers (0 .. {layers - 1}); "
        "give it a smaller layer_index for this model (models: {synth-llava-1.5: {FastV: {layer_index: K}}})"
    ]


def test_a_retrained_checkpoint_is_copied_again_and_changes_the_runs_setting(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    builder = harness_checkpoints.tiny_builder()
    shutil.copytree(builder.TRAINED["synth-llava-1.5"], shipped)
    monkeypatch.setitem(builder.TRAINED, "synth-llava-1.5", shipped)
    config = harness_config.load_config("synth")
    env = {"BASELINE": "VTW", "LAYER_INDEX": "0"}
    before = harness_plan.run_setting(config, "synth-llava-1.5", "VTW", 0.0, env, None)
    copy = Path(harness_checkpoints.checkpoint("synth-llava-1.5", tmp_path / "runs"))
    assert (copy / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    with open(shipped / "model.safetensors", "ab") as weights:
        weights.write(b"retrained")
    assert Path(harness_checkpoints.checkpoint("synth-llava-1.5", tmp_path / "runs")) == copy
    assert (copy / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert harness_plan.run_setting(config, "synth-llava-1.5", "VTW", 0.0, env, None)["hash"] != before["hash"]


def test_prompt_lengths_under_a_llava_checkpoints_tokenizer_come_without_a_model_type_warning(tmp_path, capfd):
    from tokenizers import Tokenizer

    prompt = "How many circles are there?\nAnswer the question using a single word or phrase."
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"input": prompt}) + "\n")
    folder = harness_checkpoints.checkpoint("synth-llava-1.5", tmp_path / "runs")
    expected = len(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids)
    capfd.readouterr()
    assert harness_attempt.text_tokens(folder, {"otprune_synth_count": samples}) == {"otprune_synth_count": expected}
    assert "to instantiate a model of type" not in capfd.readouterr().err


@pytest.mark.parametrize(
    "model, caller, config_env, jobs, expected",
    [
        ("synth-llava-1.5", None, {}, 1, "1"),  # a tiny model: one thread
        ("synth-llava-1.5", "2", {}, 1, "2"),  # the caller's setting wins
        ("synth-llava-1.5", None, {"OMP_NUM_THREADS": "2"}, 1, "2"),  # and so does the config's
        ("liuhaotian/llava-v1.5-7b", None, {}, 1, None),  # a real model: torch's own default
        ("liuhaotian/llava-v1.5-7b", None, {}, 2, str(max(1, (os.cpu_count() or 1) // 2))),  # the cores shared by the jobs
    ],
)
def test_child_threads(monkeypatch, model, caller, config_env, jobs, expected):
    if caller is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", caller)
    run = harness_plan.Run(model, "Original", 1.0, {"BASELINE": "ORIG", **config_env}, ("otprune_synth_yesno",), Path("unused"))
    assert harness_plan.child_env(run, jobs).get("OMP_NUM_THREADS") == expected


def test_paper_config_plans_every_model_method_task():
    config = harness_config.load_config("paper_table1")
    runs = harness_plan.plan_runs(config, Path("runs"))
    # FitPrune on LLaVA-1.5-7B alone, PruMerge and DivPrune* on LLaVA-1.5, M3 on its checkpoint: the paper's rows.
    assert len(runs) == 3 * 5 * 11 + 11 + 2 * 2 * 11 + 11
    assert {r.model for r in runs if r.method == "FitPrune"} == {"liuhaotian/llava-v1.5-7b"}
    assert {r.model for r in runs if r.method in ("PruMerge", "DivPrune*")} == {"liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b"}
    assert {(r.model, r.method) for r in runs if r.model == "mu-cai/llava-v1.5-7b-m3"} == {("mu-cai/llava-v1.5-7b-m3", "M3")}
    vtw = {r.model: r.env["LAYER_INDEX"] for r in runs if r.method == "VTW"}
    assert vtw == {"liuhaotian/llava-v1.5-7b": "4", "liuhaotian/llava-v1.5-13b": "4", "liuhaotian/llava-v1.6-vicuna-7b": "3"}
    assert str(runs[0].folder) == "runs/paper_table1/llava-v1.5-7b/Original_1"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"methods": {"Original": {}, "SuperPrune": {"ratios": [0.1]}}}, r"unknown method 'SuperPrune'; allowed: .*OTPrune"),
        ({"models": {"llava-v9-70b": {}}}, r"unknown model 'llava-v9-70b'; allowed: .*liuhaotian/llava-v1.5-7b"),
        ({"tasks": ["gqa", "vqav9"]}, r"unknown task 'vqav9'; allowed \(configs/tasks.yaml\): .*coco2017_cap_val"),
        ({"methods": {"OTPrune": {"ratios": [1.5]}}}, r"method .OTPrune. ratios=\[1.5\]; allowed: a list of numbers in \(0, 1\]"),
        ({"batch_sise": 1}, r"unknown key\(s\) batch_sise"),
    ],
)
def test_bad_config_fails_before_any_run(tmp_path, capsys, changes, message):
    path = write_config(tmp_path / "bad.yaml", **changes)
    runs_dir = tmp_path / "runs"
    assert harness_cli.main([str(path), "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not runs_dir.exists()


def test_unknown_config_name_lists_the_shipped_ones(capsys):
    assert harness_cli.main(["no_such_config"]) == 2
    assert (
        "no config 'no_such_config'; allowed: llava_onevision_7b, paper_table1, qwen2_5_vl_7b, qwen3_vl_8b, regimes, smoke, synth, synth_schedules"
        in capsys.readouterr().err
    )


def test_an_unknown_method_lists_every_method_uniform_included(tmp_path):
    path = write_config(tmp_path / "m.yaml", methods={"Uniformly": {"ratios": [0.1]}})
    with pytest.raises(
        harness_errors.ConfigError,
        match=re.escape(
            "unknown method 'Uniformly'; allowed: CDPruner, DPP, DivPrune, DivPrune*, FIRST, FITPRUNE, FastV, FasterVLM, LAST, M3, OTPrune, Original, "
            "POOL, PYRAMIDDROP, PruMerge, PruMerge+, Random, STP, TrimTokenator, Uniform, VTW, VisionZip"
        ),
    ):
        harness_config.load_config(str(path))


def test_prune_log_parsing():
    text = (
        "x\notprune OURS: visual tokens 576->56; selector 12.50 ms; ot 6.25\n"
        "otprune OURS: visual tokens 2144->210, 600->59; selector 3.00 ms; ot 1.5, 2; redundancy 0.5, 0.25\n"
        "50%|##  | 1/2\r" + timing_line({"generated_tokens": 3, "prefill_ms": 4.5}) + "\n"
    )
    assert harness_run_check.parse_prune_log(text) == {
        "visual_tokens": [[576, 56], [2144, 210], [600, 59]],
        "stage_tokens": [],
        "selector_ms": [12.5, 3.0],
        "ot_distance": [6.25, 1.5, 2.0],
        "near_duplicate_share": [0.5, 0.25],
        "logged_methods": ["OURS"],
        "timing": [{"generated_tokens": 3, "prefill_ms": 4.5}],
    }


# -- the report -----------------------------------------------------------------------------


def test_ties_share_the_average_rank():
    assert report.average_ranks({"a": [1.0, 5.0], "b": [1.0, 3.0], "c": [0.0, 4.0]}) == {"a": 1.25, "b": 2.25, "c": 2.5}


def test_report_on_recorded_runs(tmp_path):
    md_path, csv_path, markdown = report.write_report(FIXTURES, tmp_path)
    assert "random weights: their scores are meaningless" in markdown
    rows = {(r["model"], r["method"]): r for r in csv.DictReader(open(csv_path))}
    assert float(rows["tiny-llava-1.5", "OTPrune"]["visual_tokens_before"]) == 576
    assert float(rows["tiny-llava-1.5", "OTPrune"]["visual_tokens_after"]) == 56
    assert float(rows["tiny-llava-1.5", "DivPrune"]["visual_tokens_after"]) == 56
    assert float(rows["tiny-llava-1.5", "Original"]["visual_tokens_after"]) == 576
    # FLOPs for the LLaVA-1.5-7B LLM at the measured counts and the prompts' mean text tokens.
    record = json.loads(next((FIXTURES / "tiny-llava-1.5" / "OTPrune_0.098").glob("otprune_*.json")).read_text())
    texts = record["text_tokens"].values()
    pruned = sum(pruned_prefill_flops(round(t), 576, 0.098) for t in texts)
    full = sum(prefill_flops(round(t) + 576) for t in texts)
    assert float(rows["tiny-llava-1.5", "OTPrune"]["tflop_pct"]) == pytest.approx(100 * pruned / full)
    # The fixture's records carry no code identity (an older harness's): marked as other code's.
    assert "| OTPrune 0.098 † | 576 → 56 |" in markdown and "Rows marked † hold results finished by other code" in markdown
    # The test line names what it compares: the ratio, and the metrics its benchmarks pool.
    assert (
        "Wilcoxon signed-rank, OTPrune > DivPrune at ratio 0.098 (one-sided, on the relative improvement (OTPrune − DivPrune) / DivPrune of each of" in markdown
    )
    assert "pooling CIDEr, EM, F1)" in markdown


def test_report_skips_a_file_a_crash_cut_short(tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES, runs)
    broken = runs / "tiny-llava-1.5" / "DivPrune_0.098" / "otprune_cut_short.json"
    broken.write_text('{"status": "done", "visual_tok')
    _, csv_path, _ = report.write_report(runs, tmp_path / "out")
    err = capsys.readouterr().err
    assert f"skipped {broken}: malformed record" in err
    rows = {(r["model"], r["method"]): r for r in csv.DictReader(open(csv_path))}
    assert float(rows["tiny-llava-1.5", "DivPrune"]["visual_tokens_after"]) == 56


def write_run(folder: Path, model: str, method: str, ratio: float, method_spec: dict, results: dict, **record) -> Path:
    """A run folder as the harness leaves it: setting.json, one attempt's results file, and a done
    record naming that file's SHA-256. Returns the results file."""
    config = harness_config.Config("t", "llava", "", {}, {}, [])
    env = harness_config.run_env(method, ratio, method_spec, {})  # as the harness records it, BASELINE included
    setting = harness_plan.run_setting(config, model, method, ratio, env, None)
    results_file = folder / "attempts" / "a" / "model" / "20250101_000000_results.json"
    results_file.parent.mkdir(parents=True)
    results_file.write_text(json.dumps(results))
    (folder / "setting.json").write_text(json.dumps(setting))
    tasks = list(results.get("results", {})) if isinstance(results.get("results"), dict) else []
    record = {
        "model": model,
        "method": method,
        "ratio": ratio,
        "env": env,
        "status": "done",
        "tasks": tasks,
        "finished_tasks": tasks,
        "results": {"attempts/a/model/20250101_000000_results.json": hashlib.sha256(results_file.read_bytes()).hexdigest()},
        "samples": {},
        "eval_s": None,
        "peak_rss_mb": 0,
        "wall_s": 0,
        "visual_tokens": [],
        "selector_ms": [],
        "text_tokens": {},
        "code": this_code(),
        **record,
    }
    (folder / "otprune_a.json").write_text(json.dumps(record))
    return results_file


def test_each_score_stands_under_its_own_benchmarks_header(tmp_path):
    """Distinct scores per benchmark and method, read back cell by cell under the header that names
    their benchmark, in the Markdown table and the CSV, whatever order the columns come in."""
    metric = {
        "otprune_smoke_vqa": ("exact_match,none", 100, "VQA"),
        "otprune_smoke_pope": ("yes_no_f1,none", 100, "YesNo"),
        "otprune_smoke_caption": ("cider,none", 1, "Caption"),
    }
    raw = {
        ("Original", 1.0, "Original"): {"otprune_smoke_vqa": 0.1125, "otprune_smoke_pope": 0.2250, "otprune_smoke_caption": 0.3375},
        ("OTPrune", 0.098, "OTPrune 0.098"): {"otprune_smoke_vqa": 0.4500, "otprune_smoke_pope": 0.5625, "otprune_smoke_caption": 0.6750},
        ("DivPrune", 0.098, "DivPrune 0.098"): {"otprune_smoke_vqa": 0.7875, "otprune_smoke_pope": 0.9000, "otprune_smoke_caption": 1.0125},
    }
    runs = tmp_path / "runs"
    for (method, ratio, _), by_task in raw.items():
        results = {"results": {task: {metric[task][0]: value} for task, value in by_task.items()}}
        kept = 576 if method == "Original" else 56
        write_run(
            runs / "tiny-llava-1.5" / f"{method}_{ratio:g}",
            "tiny-llava-1.5",
            method,
            ratio,
            {},
            results,
            visual_tokens=[[576, kept]],
            text_tokens={t: 20 for t in metric},
        )
    _, csv_path, markdown = report.write_report(runs, tmp_path / "out")
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 : start + 2 + len(raw)]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    csv_rows = {r["method"]: r for r in csv.DictReader(open(csv_path))}
    for (method, _, row_label), by_task in raw.items():
        for task, value in by_task.items():
            _, scale, benchmark = metric[task]
            (column,) = [h for h in header if h.startswith(f"{benchmark} (")]
            assert float(table[row_label][column]) == pytest.approx(value * scale, abs=0.006), (row_label, column)
            assert float(csv_rows[method][benchmark]) == pytest.approx(value * scale), (method, benchmark)


def test_report_of_the_trained_model_uses_its_own_llm_shape_and_calls_its_scores_meaningful(tmp_path):
    shape = {"layers": 3, "hidden": 48, "ffn": 96}
    results = {"results": {"otprune_synth_count": {"exact_match,none": 0.5}}}
    runs = tmp_path / "synth" / "synth-llava-1.5"
    for method, ratio, spec, after in (("Original", 1.0, {}, 576), ("Uniform", 0.25, {}, 144), ("VTW", 0.0, {"layer_index": 0}, 0)):
        write_run(
            runs / f"{method}_{ratio:g}",
            "synth-llava-1.5",
            method,
            ratio,
            spec,
            results,
            visual_tokens=[[576, after]] if method != "Original" else [],
            text_tokens={"otprune_synth_count": 20},
            llm_shape=shape,
        )
    _, csv_path, markdown = report.write_report(tmp_path / "synth", tmp_path)
    assert "random weights" not in markdown
    assert "trained on the synthetic benchmark" in markdown and "3 layers of width 48, FFN 96" in markdown
    rows = [r for r in csv.DictReader(open(csv_path))]
    assert [r["method"] for r in rows] == ["Original", "VTW", "Uniform"]
    assert "| VTW K=0 (no visual tokens) | 576 → 0 |" in markdown
    own = ModelShape(hidden=48, ffn=96, layers=3)
    for row, kept in zip(rows, (576, 0, 144)):
        assert float(row["tiny_llm_mflop"]) == pytest.approx(prefill_flops(20 + kept, own) / 1e6)
        assert float(row["tflop"]) == pytest.approx(prefill_flops(20 + kept) / 1e12)


def paper_runs(root: Path, model: str, model_id: str) -> Path:
    """Results files holding the paper's numbers, one run folder per method, as the harness writes them."""
    bench = {spec["benchmark"]: (task, spec) for task, spec in CATALOGUE.items()}
    folder = root / "paper" / harness_catalogue.model_label(model_id)
    settings = {"Original": (1, {}), "VTW": (0, {"layer_index": 4}), "FastV": (0.098, {"layer_index": 2}), "DivPrune": (0.098, {}), "OTPrune": (0.098, {})}
    for method, (ratio, env) in settings.items():
        run = folder / f"{method}_{ratio:g}"
        results = {
            task: {spec["metric"]: score / spec["scale"]}
            for name, score in zip(PAPER["benchmarks"], PAPER["models"][model][method]["scores"])
            for task, spec in [bench[name]]
        }
        tokens = [[576, 56]] if method in ("DivPrune", "OTPrune") else []
        write_run(run, model_id, method, ratio, env, {"results": results}, visual_tokens=tokens)
    return root / "paper"


def test_paper_numbers_give_the_published_ranks(tmp_path):
    runs_dir = paper_runs(tmp_path, "llava-1.5-7b", "liuhaotian/llava-v1.5-7b")
    _, csv_path, markdown = report.write_report(runs_dir, tmp_path)
    rows = {r["method"]: r for r in csv.DictReader(open(csv_path))}
    assert {m: round(float(rows[m]["one_shot_rank"]), 2) for m in report.ONE_SHOT} == {"VTW": 3.41, "FastV": 3.59, "DivPrune": 1.64, "OTPrune": 1.36}
    # Every cell equals the paper's: differences are zero.
    assert all(float(rows["OTPrune"][f"{b}_diff"]) == pytest.approx(0, abs=1e-9) for b in PAPER["benchmarks"])
    # TFLOP from 576 -> 56 tokens and the paper's text tokens per benchmark: the paper's column.
    assert float(rows["Original"]["tflop"]) == pytest.approx(3.228, abs=5e-4)
    assert float(rows["OTPrune"]["tflop"]) == pytest.approx(0.512, abs=5e-4)
    assert float(rows["VTW"]["tflop"]) == pytest.approx(0.603, abs=5e-4)
    # Every published rank of every model block comes out of the same function.
    for model, block in PAPER["models"].items():
        pruned = {n: r["scores"] for n, r in block.items() if n != "Original"}
        avg = report.average_ranks(pruned)
        one = report.average_ranks({n: s for n, s in pruned.items() if n in PAPER["one_shot_methods"]})
        for name, row in block.items():
            if "avg_rank" in row:
                assert round(avg[name], 2) == row["avg_rank"], (model, name)
            if "one_shot_rank" in row:
                assert round(one[name], 2) == row["one_shot_rank"], (model, name)
    assert "paper's p" in markdown


def test_wilcoxon_from_the_paper_numbers_is_shown_beside_0028():
    lines = "\n".join(report.paper_check(PAPER))
    # Recorded, not tuned: per model 0.1602 (1.5-7B), 0.0269 (1.5-13B), 0.0137 (1.6-7B); pooled 0.0012.
    assert "| llava-1.5-7b | 11 | 0.1602 | 0.028 |" in lines
    assert "| llava-1.5-13b | 11 | 0.0269 | 0.028 |" in lines
    assert "| llava-1.6-7b | 11 | 0.0137 | 0.028 |" in lines
    assert "| all three models pooled | 33 | 0.0012 | 0.028 |" in lines


def test_tflop_takes_each_benchmarks_own_images(tmp_path):
    """Two benchmarks of a resolution-dependent model, each with its own token counts: the TFLOP
    column is the mean over benchmarks of each one's own prefill, never one benchmark's text with
    the other's images."""
    from otprune.measures import MODELS as SHAPES

    results = {"results": {"otprune_synth_count": {"exact_match,none": 0.5}, "otprune_synth_yesno": {"yes_no_f1,none": 0.5}}}
    tokens = {"otprune_synth_count": [[576, 56]], "otprune_synth_yesno": [[2880, 282]]}
    text = {"otprune_synth_count": 20, "otprune_synth_yesno": 30}
    write_run(
        tmp_path / "r" / "llava-v1.6-vicuna-7b" / "OTPrune_0.098",
        "liuhaotian/llava-v1.6-vicuna-7b",
        "OTPrune",
        0.098,
        {},
        results,
        visual_tokens=tokens["otprune_synth_count"] + tokens["otprune_synth_yesno"],
        tokens_by_task=tokens,
        text_tokens=text,
    )
    _, csv_path, _ = report.write_report(tmp_path / "r", tmp_path / "out")
    (row,) = csv.DictReader(open(csv_path))
    shape = SHAPES["llava-1.6-7b"]
    by_hand = (prefill_flops(20 + 56, shape) + prefill_flops(30 + 282, shape)) / 2
    assert float(row["tflop"]) == pytest.approx(by_hand / 1e12)


def test_the_papers_numbers_stand_only_beside_runs_of_its_setting(tmp_path):
    """OTPrune at 0.25 (or FastV at another ratio) is not the paper's 0.098 row: no difference shown."""
    model_id = "liuhaotian/llava-v1.5-7b"
    results = {"results": {"pope": {"pope_f1_score,none": 0.8}}}
    for ratio in (0.098, 0.25):
        write_run(tmp_path / "r" / "llava-v1.5-7b" / f"OTPrune_{ratio:g}", model_id, "OTPrune", ratio, {}, results, visual_tokens=[[576, 56]])
    _, csv_path, markdown = report.write_report(tmp_path / "r", tmp_path / "out")
    rows = {r["ratio"]: r for r in csv.DictReader(open(csv_path))}
    published = PAPER["models"]["llava-1.5-7b"]["OTPrune"]["scores"][PAPER["benchmarks"].index("POPE")]
    assert float(rows["0.098"]["POPE_paper"]) == published and float(rows["0.098"]["POPE_diff"]) == pytest.approx(80 - published)
    assert rows["0.25"]["POPE_paper"] == "" and rows["0.25"]["POPE_diff"] == "" and rows["0.25"]["paper_tflop"] == ""
    assert "| OTPrune 0.25 | 576 → 56 |" in markdown


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_embedded_default_end_to_end_and_resume(tmp_path):
    pytest.importorskip("lmms_eval")
    pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")
    config = write_config(tmp_path / "smoke_ci.yaml")
    runs_dir = tmp_path / "runs"
    # run_otprune.sh's python3 is this interpreter, the one otprune is installed for.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": path}
    cmd = ["bash", str(ROOT / "run_otprune.sh"), str(config), "--runs-dir", str(runs_dir), "--limit", "3"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[1/3] tiny-llava-1.5 Original 1" in first.stdout and "done in" in first.stdout
    for method in ("Original_1", "OTPrune_0.098", "DivPrune_0.098"):
        results = list((runs_dir / "smoke_ci_limit3" / "tiny-llava-1.5" / method).glob("**/*_results.json"))
        assert len(results) == 1
        assert set(json.loads(results[0].read_text())["results"]) == {"otprune_smoke_vqa", "otprune_smoke_pope", "otprune_smoke_caption"}
    table = (runs_dir / "smoke_ci_limit3" / "table1.md").read_text()
    assert "| OTPrune 0.098 (--limit 3) | 576 → 56 |" in table and "| DivPrune 0.098 (--limit 3) | 576 → 56 |" in table
    assert "| Original (--limit 3) | 576 → 576* |" in table
    rows = {r["method"]: r for r in csv.DictReader(open(runs_dir / "smoke_ci_limit3" / "table1.csv"))}
    # Every sample's generate call is timed, the unpruned run's too (its patch is off: timing only).
    for method in ("Original_1", "OTPrune_0.098", "DivPrune_0.098"):
        (record,) = [json.loads(p.read_text()) for p in (runs_dir / "smoke_ci_limit3" / "tiny-llava-1.5" / method).glob("otprune_*.json")]
        assert len(record["timing"]) == sum(record["samples"].values()) == 9, method
        assert all(t["generated_tokens"] >= 1 and t["prefill_ms"] > 0 for t in record["timing"])
        assert all((t["selection_ms"] > 0) == (method != "Original_1") for t in record["timing"])
    assert 12 < float(rows["OTPrune"]["tflop_pct"]) < 16
    assert float(rows["Original"]["tflop_pct"]) == pytest.approx(100)
    files = sorted(p.relative_to(runs_dir) for p in runs_dir.glob("smoke_ci_limit3/*/*/**/*") if p.is_file())
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 runs, 3 finished before, 0 still running elsewhere, 0 to run" in second.stdout
    assert sorted(p.relative_to(runs_dir) for p in runs_dir.glob("smoke_ci_limit3/*/*/**/*") if p.is_file()) == files
    # The hypothesis analysis (paper Fig. 2) runs on these results end to end.
    from otprune.analysis import hypothesis

    points, skipped = hypothesis.load_points(runs_dir / "smoke_ci_limit3")
    assert skipped == []
    assert {p.method for p in points} == {"OTPrune", "DivPrune"}
    assert all(p.images == 9 and p.pooled and p.ot_distance > 0 for p in points)  # 3 tasks x 3 samples
    # Each pruned image's measured redundancy, logged with its OT distance, lies in [0, 1].
    for method in ("OTPrune_0.098", "DivPrune_0.098"):
        (record,) = [json.loads(p.read_text()) for p in (runs_dir / "smoke_ci_limit3" / "tiny-llava-1.5" / method).glob("otprune_*.json")]
        assert len(record["near_duplicate_share"]) == 9 and all(0 <= v <= 1 for v in record["near_duplicate_share"]), method


@pytest.mark.parametrize("ratios", [0.1, ["0.1"], [0], [1.5]])
def test_bad_ratios_fail_before_any_run(tmp_path, ratios):
    path = write_config(tmp_path / "bad.yaml", methods={"OTPrune": {"ratios": ratios}})
    with pytest.raises(harness_errors.ConfigError, match=r"method 'OTPrune' ratios=.*allowed: a list of numbers in \(0, 1\]"):
        harness_config.load_config(str(path))


def test_the_dry_run_prints_the_plans_size_and_gpu_hours_per_model(capsys):
    assert harness_cli.main(["paper_table1", "--dry-run", "--runs-dir", "/nonexistent/runs"]) == 0
    out = capsys.readouterr().out
    assert (
        "plan: 1 calibration(s) first (here, one lmms-eval invocation each), then 231 runs (model x method x ratio x task group), "
        "231 to run: 231 lmms-eval invocations, or 231 Slurm jobs" in out
    )
    # 5 methods x 11 benchmarks per model, FitPrune's 11 on 1.5-7B alone, PruMerge's and DivPrune*'s
    # on LLaVA-1.5 and M3's on its checkpoint, at the catalogue's rough hours per benchmark (0.9, 1.8, 2.7, 0.9).
    assert "liuhaotian/llava-v1.5-7b: 88 benchmark runs, about 79 A100-hours" in out
    assert "liuhaotian/llava-v1.5-13b: 77 benchmark runs, about 139 A100-hours" in out
    assert "liuhaotian/llava-v1.6-vicuna-7b: 55 benchmark runs, about 148 A100-hours" in out
    assert "mu-cai/llava-v1.5-7b-m3: 11 benchmark runs, about 10 A100-hours" in out
    assert out.count("] BASELINE=") == 231
    # The adaptive runs leave SUBSET_RATIO out; M3 is POOL at its 36-token scale.
    assert out.count("] BASELINE=PRUMERGE ") == out.count("] BASELINE=DIVPRUNE_ADAPTIVE ") == 22
    assert out.count("] BASELINE=POOL SUBSET_RATIO=0.0625 ") == 11
    # FitPrune's recipe is calibrated first, at the paper's 0.513 TFLOP, into the runs folder.
    (step,) = harness_plan.plan_calibrations(harness_config.load_config("paper_table1"), Path("/nonexistent/runs"))
    recipe = step.recipe
    assert recipe.parent == Path("/nonexistent/runs/paper_table1/calibrations")
    assert (
        "[calibration fitprune_llava-v1.5-7b] otprune calibrate fitprune liuhaotian/llava-v1.5-7b --tasks gqa,pope --limit 16 --tflop 0.513 "
        f"--out {recipe} --runs-dir /nonexistent/runs --lmms-model llava --model-args device_map=auto" in out
    )
    assert out.count(f'"recipe": "{recipe}"') == 11


def test_the_tflop_of_a_schedule_counts_each_stages_logged_tokens(tmp_path):
    """PyramidDrop at layers 1, 2, 3 keeping 288, 144, 72 of 576: each layer's prefill at the count
    it held, summed by hand, in the paper LLM's TFLOP and the tiny LLM's own MFLOP."""
    shape = {"layers": 4, "hidden": 48, "ffn": 96}
    results = {"results": {"otprune_synth_count": {"exact_match,none": 0.5}}}
    runs = tmp_path / "synth" / "synth-llava-1.5"
    common = {"text_tokens": {"otprune_synth_count": 20}, "llm_shape": shape}
    write_run(runs / "Original_1", "synth-llava-1.5", "Original", 1.0, {}, results, **common)
    write_run(
        runs / "PyramidDrop_0.5",
        "synth-llava-1.5",
        "PyramidDrop",
        0.5,
        {"options": {"layers": [1, 2, 3]}},
        results,
        visual_tokens=[[576, 72]],
        stage_tokens=[[[1, 288], [2, 144], [3, 72]]],
        **common,
    )
    _, csv_path, _ = report.write_report(tmp_path / "synth", tmp_path)
    row = next(r for r in csv.DictReader(open(csv_path)) if r["method"] == "PyramidDrop")
    held = [596, 308, 164, 92]  # 20 text tokens + the visual tokens each layer holds
    own = ModelShape(hidden=48, ffn=96, layers=4)
    assert float(row["tiny_llm_mflop"]) == pytest.approx(sum(prefill_flops(n, own) for n in held) / 4 / 1e6)
    paper_llm = (sum(prefill_flops(n) for n in held[:3]) + 29 * prefill_flops(held[3])) / 32
    assert float(row["tflop"]) == pytest.approx(paper_llm / 1e12)


def test_a_recipe_is_named_from_its_configs_folder_and_its_content_is_part_of_the_setting(tmp_path):
    recipe = tmp_path / "recipes" / "r.json"
    recipe.parent.mkdir()
    recipe.write_text(json.dumps({"kind": "otprune fitprune recipe", "visual_tokens": 576, "drops": [100, 0, 0, 0]}))
    path = write_config(tmp_path / "c.yaml", methods={"FitPrune": {"ratios": [0.5], "options": {"recipe": "recipes/r.json"}}})
    (run,) = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path / "runs")
    assert json.loads(run.env["OTPRUNE_OPTIONS"]) == {"recipe": str(recipe.resolve())}
    assert run.setting["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    # The same file name with other drops: another setting, so its runs run again.
    recipe.write_text(json.dumps({"kind": "otprune fitprune recipe", "visual_tokens": 576, "drops": [200, 0, 0, 0]}))
    (edited,) = harness_plan.plan_runs(harness_config.load_config(str(path)), tmp_path / "runs")
    assert edited.setting["hash"] != run.setting["hash"] and edited.env == run.env


def test_the_schedules_config_runs_the_unpruned_model_pyramiddrop_and_its_calibrated_fitprune():
    from otprune.fitprune import load_recipe

    runs = harness_plan.plan_runs(harness_config.load_config("synth_schedules"), Path("runs"))
    assert [(r.method, r.ratio) for r in runs] == [("Original", 1.0), ("PyramidDrop", 0.5), ("FitPrune", 0.5)]
    recipe = load_recipe(json.loads(runs[2].env["OTPRUNE_OPTIONS"])["recipe"])
    assert recipe["model"] == "synth-llava-1.5" and recipe["tflop"] <= recipe["budget"]["tflop"]
    assert recipe["budget"]["tflop"] == pytest.approx(0.5 * recipe["budget"]["unpruned_tflop"])
