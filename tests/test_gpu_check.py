"""The GPU check's checks and report (scripts/gpu_check.py); CI runs its whole CPU mode in .ci/run.

Each check is held against hand-made evidence whose verdict is known; the report is held against
the figures the step computed and returned.
"""

import json
import logging
import sys
import time

import pytest
import torch
from conftest import ROOT, load_script

from otprune.bench import prefill as bench_prefill
from otprune.bench import selectors as bench_selectors
from otprune.prune_config import PruneConfig
from otprune.selection import Kept, log_selection, select_per_image


@pytest.fixture(scope="module")
def check():
    return load_script("gpu_check")


def test_plan_covers_the_issue_runs_and_says_why_any_is_skipped(check):
    runs, skipped = check.planned_runs("cuda")
    names = {run.name for run in runs}
    # llava: 5 methods x batch 1, 4; llava_hf: 5 methods x batch 1 (lmms-eval's llava_hf takes batch 1 only).
    assert len(runs) == 15 and len(skipped) == 5
    assert {"llava_ORIG_K0_b4", "llava_DIVPRUNE_K0_b1", "llava_OURS_K2_b4", "llava_FASTV_K2_b1", "llava_hf_FASTV_K2_b1"} <= names
    assert all(run.model == "llava_hf" and run.batch == 4 and "batch size 1" in why for run, why in skipped)
    cpu_runs, cpu_skipped = check.planned_runs("cpu")
    assert {r.name for r in cpu_runs} == {"llava_ORIG_K0_b1", "llava_OURS_K0_b4", "llava_FASTV_K2_b4", "llava_hf_OURS_K0_b1"}
    assert len(cpu_runs) + len(cpu_skipped) == 20


def test_run_environment_sets_the_pruning_variables(check):
    assert check.EvalRun("llava", "ORIG", 0, 1).env == {"BASELINE": "ORIG", "LAYER_INDEX": "0"}
    assert check.EvalRun("llava", "FASTV", 2, 4).env == {"BASELINE": "FASTV", "LAYER_INDEX": "2", "SUBSET_RATIO": "0.098"}


def test_token_check_wants_every_sample_pruned_576_to_56(check):
    ours = check.EvalRun("llava", "OURS", 0, 4)
    assert check.check_tokens(ours, [[576, 56]] * 8, 8) == []
    assert check.check_tokens(ours, [[576, 56]] * 7, 8) == ["7 pruned images logged for 8 samples"]
    assert check.check_tokens(ours, [[576, 56]] * 7 + [[576, 141]], 8) == ["1 images not pruned to budget(0.098, N), e.g. 576->141 (expected 576->56)"]
    assert check.check_tokens(ours, [[576, 56]] * 7 + [[600, 59]], 8) == ["1 images not pruned to budget(0.098, N), e.g. 600->59 (expected 576->56)"]
    original = check.EvalRun("llava", "ORIG", 0, 1)
    assert check.check_tokens(original, [], 8) == []
    assert check.check_tokens(original, [[576, 56]], 8) == ["1 pruned images logged without pruning"]


def test_a_merger_may_keep_fewer_than_its_budget_but_never_more_or_none(check):
    pool = check.EvalRun("qwen2_5_vl", "POOL", 0, 1, ratio=0.25, variant="qwen2.5-vl")
    assert check.check_tokens(pool, [[212, 53], [212, 52]], 2) == []
    assert check.check_tokens(pool, [[212, 54]], 1) == ["1 images not pruned to budget(0.25, N), e.g. 212->54 (expected 212->53)"]
    assert check.check_tokens(pool, [[212, 0]], 1) == ["1 images not pruned to budget(0.25, N), e.g. 212->0 (expected 212->53)"]


def write_run(folder, tasks, effective, sample_lines):
    folder.mkdir(parents=True)
    results = {"results": {t: {} for t in tasks}, "n-samples": {t: {"effective": n} for t, n in zip(tasks, effective)}, "config": {"limit": 4}}
    (folder / "20260101_results.json").write_text(json.dumps(results))
    for task, lines in zip(tasks, sample_lines):
        (folder / f"20260101_samples_{task}.jsonl").write_text("{}\n" * lines)


def test_results_check_wants_one_whole_results_file(check, tmp_path):
    tasks = ["otprune_smoke_vqa", "otprune_smoke_pope"]
    write_run(tmp_path / "whole", tasks, [4, 4], [4, 4])
    assert check.check_results(tmp_path / "whole", tasks, 4) == ([], 8)
    write_run(tmp_path / "short", tasks, [4, 4], [4, 3])
    problems, _ = check.check_results(tmp_path / "short", tasks, 4)
    assert problems == ["otprune_smoke_pope: samples file has 3 lines for 4 samples"]
    write_run(tmp_path / "missing", tasks[:1], [4], [4])
    problems, _ = check.check_results(tmp_path / "missing", tasks, 4)
    assert problems[0] == "results lack otprune_smoke_pope"
    (tmp_path / "none").mkdir()
    assert check.check_results(tmp_path / "none", tasks, 4) == (["0 results files (expected 1)"], 0)


def test_rank_check_wants_two_processes_that_dumped_every_image(check, tmp_path):
    for pid, n in ((101, 0), (101, 1), (202, 0)):
        (tmp_path / f"tokens_{pid}_{n:06d}.pt").touch()
    assert check.check_ranks(tmp_path, 3) == []
    assert check.check_ranks(tmp_path, 4) == ["3 dumped images for 4 logged"]
    (tmp_path / "tokens_202_000000.pt").unlink()
    assert check.check_ranks(tmp_path, 2) == ["pruned tokens were dumped by 1 process(es), not 2"]


# -- step vlm_lmms_eval (issue 14): lmms-eval's own Qwen-VL and OneVision models ---------------

VLM_MODELS = {"qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl", "llava-onevision": "llava_hf", "qwen2-vl": "qwen2_vl"}


def test_vlm_plan_runs_each_family_unpruned_at_k0_and_at_k2_and_the_plugins_on_qwen2_5(check):
    runs = check.planned_vlm_runs()
    assert {(run.variant, run.model, run.baseline, run.layer, run.batch) for run in runs} == {
        (variant, model, baseline, layer, 1)
        for variant, model in VLM_MODELS.items()
        for baseline, layer in (("ORIG", 0), ("OURS", 0), ("FASTV", 2), ("PRUMERGE", 0))
    } | {("qwen2.5-vl", "qwen2_5_vl", baseline, 0, 1) for baseline in ("CDPRUNER", "POOL", "TOPNORM", "VISIONZIP")}
    assert len({run.name for run in runs}) == 20
    assert {run.variant for run in runs if run.env == {"BASELINE": "PRUMERGE", "LAYER_INDEX": "0"}} == set(VLM_MODELS)
    fastv = next(run for run in runs if run.variant == "qwen3-vl" and run.baseline == "FASTV")
    assert fastv.env == {"BASELINE": "FASTV", "LAYER_INDEX": "2", "SUBSET_RATIO": "0.25"}


@pytest.mark.parametrize("variant", VLM_MODELS)
def test_vlm_command_is_the_unchanged_lmms_eval_cli_with_the_pruning_variables(check, tmp_path, variant, monkeypatch):
    # Unset, as on CI: the harness then chooses the children's thread count for models it may not list.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = check.EvalRun(VLM_MODELS[variant], "FASTV", 2, 1, ratio=0.25, variant=variant)
    suite = check.vlm_suite("cuda")
    command, env = check.eval_command(run, tmp_path / "ckpt", suite, "cuda", tmp_path / "out")
    model_args = f"pretrained={tmp_path / 'ckpt'},device=cuda:0,device_map=cuda:0" + (",dtype=float16" if variant == "llava-onevision" else "")
    assert command == [
        sys.executable, "-m", "lmms_eval", "--model", VLM_MODELS[variant], "--model_args", model_args,
        "--tasks", "otprune_smoke_vqa", "--batch_size", "1", "--output_path", str((tmp_path / "out").resolve()), "--log_samples",
        "--include_path", str(ROOT / "configs" / "otprune_smoke"), "--limit", "4",
    ]  # fmt: skip
    assert (env["BASELINE"], env["SUBSET_RATIO"], env["LAYER_INDEX"], env["OTPRUNE_LOG"]) == ("FASTV", "0.25", "2", "1")
    cpu_command, _ = check.eval_command(run, tmp_path / "ckpt", check.vlm_suite("cpu"), "cpu", tmp_path / "out")
    # lmms-eval's Qwen models move their inputs to "cuda" under device_map=auto.
    assert "device=cpu,device_map=cpu" in cpu_command[cpu_command.index("--model_args") + 1]


def test_lmms_eval_knows_the_vlm_model_names():
    """lmms-eval 0.7.3 registers each name, and its llava_hf loads a transformers OneVision checkpoint."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("decord")
    from lmms_eval.models import AVAILABLE_MODELS
    from lmms_eval.models.simple.llava_hf import model_map
    from transformers import LlavaOnevisionForConditionalGeneration

    assert set(VLM_MODELS.values()) <= set(AVAILABLE_MODELS)
    assert model_map["llava_onevision"] is LlavaOnevisionForConditionalGeneration


def test_vlm_token_check_wants_each_image_at_the_budget_of_its_own_count(check):
    """Qwen's N_i follows the image: each is held to round-half-up(0.25 N_i), worked out by hand."""
    ours = check.EvalRun("qwen2_5_vl", "OURS", 0, 1, ratio=0.25, variant="qwen2.5-vl")
    by_hand = [[256, 64], [270, 68], [25, 6], [90, 23]]  # 67.5 -> 68 and 22.5 -> 23: half up, not to even
    assert check.check_tokens(ours, by_hand, 4) == []
    assert check.check_tokens(ours, by_hand[:3] + [[90, 22]], 4) == ["1 images not pruned to budget(0.25, N), e.g. 90->22 (expected 90->23)"]
    assert check.check_tokens(ours, by_hand + [[16, 4]], 4) == ["5 pruned images logged for 4 samples"]
    original = check.EvalRun("qwen2_5_vl", "ORIG", 0, 1, ratio=0.25, variant="qwen2.5-vl")
    assert check.check_tokens(original, [], 4) == []


def selection_log(caplog, method: str, pairs: list[tuple[int, int]]) -> str:
    """What the patch logs with OTPRUNE_LOG=1 for images of ``pairs`` (before, after) tokens."""
    config = PruneConfig(method=method, ratio=0.25, layer_index=2 if method == "FASTV" else 0, log=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="otprune"):
        for before, after in pairs:
            log_selection(config, [torch.zeros(before, 2)], [Kept(torch.arange(after))], time.perf_counter())
    return "\n".join(record.getMessage() for record in caplog.records) + "\n"


@pytest.mark.parametrize(
    "pairs, problems",
    [
        ([(256, 64), (270, 68), (25, 6), (90, 23)], []),
        ([(256, 64), (270, 67), (25, 6), (90, 23)], ["1 images not pruned to budget(0.25, N), e.g. 270->67 (expected 270->68)"]),
        ([(256, 64), (270, 68), (25, 6)], ["3 pruned images logged for 4 samples"]),
    ],
)
def test_a_vlm_run_is_judged_by_its_results_and_its_selection_log(check, tmp_path, monkeypatch, caplog, pairs, problems):
    """``execute`` end to end with a stand-in for lmms-eval that leaves canned results and prints the
    patch's own log lines: the verdict follows the logged counts against the hand-worked budgets."""
    tasks = [check.VLM_TASK]
    canned = tmp_path / "canned"
    write_run(canned, tasks, [4], [4])
    log = tmp_path / "selection.log"
    log.write_text(selection_log(caplog, "FASTV", pairs))
    run = check.EvalRun("qwen2_5_vl", "FASTV", 2, 1, ratio=0.25, variant="qwen2.5-vl")
    work = tmp_path / "work"
    folder = work / "runs" / run.name

    def stand_in(run, checkpoint, suite, device, out):
        assert out == folder
        return ["sh", "-c", f'cp -r "{canned}/." "{out}" && cat "{log}"'], {"PATH": "/usr/bin:/bin"}

    monkeypatch.setattr(check, "eval_command", stand_in)
    record = check.execute(run, tmp_path / "ckpt", check.Suite("tiny checkpoints", tasks, "", 4, 1, ""), "cpu", work, 30)
    assert record["problems"] == problems
    assert record["status"] == ("FAIL" if problems else "PASS")
    assert record["samples"] == 4 and record["images"] == len(pairs)


def test_vlm_step_is_skipped_without_torchvision_and_the_report_lists_it(check, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError

    def no_build(*args):
        raise AssertionError("nothing is built when every run is skipped")

    monkeypatch.setattr(check, "build_checkpoints", no_build)
    result = check.step_vlm_lmms_eval("cuda", time.time() + 60)
    assert result.status == "SKIP"
    assert result.summary.startswith("torchvision cannot be imported") and "processors only with it" in result.summary
    assert result.body.count("| SKIP |") == len(check.planned_vlm_runs()) == 20
    assert check.STEPS.index("lmms_eval") < check.STEPS.index("vlm_lmms_eval") < check.STEPS.index("accelerate")
    assert "vlm_lmms_eval" in check.parse_args([]).steps
    report = check.format_report("cpu", {"vlm_lmms_eval": result}, 1.0)
    assert f"| 6 | vlm_lmms_eval | SKIP | 0 | {result.summary} |" in report
    assert "## 6. vlm_lmms_eval: SKIP" in report


def test_lmms_eval_errors_are_found_through_its_colours():
    from otprune.harness.run_check import logged_errors

    line = "\x1b[32m2026-11-21 20:51:41\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | \x1b[36mlmms_eval.models.chat.llava_hf\x1b[0m:generate_until:108 - \x1b[31m\x1b[1mError boom in generating\x1b[0m"
    info = "\x1b[32m2026-11-21\x1b[0m | \x1b[1mINFO    \x1b[0m | lmms_eval - fine"
    assert logged_errors(f"{line}\n{info}\n{line}") == {"Error boom in generating": 2}


def test_junit_counts_and_failing_ids(check, tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_selectors" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_selectors" name="test_b[cuda]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_selectors" name="test_c[cuda]"><skipped/></testcase>'
        '<testcase classname="tests.test_greedy_triton" name="test_d"/>'
        "</testsuite></testsuites>"
    )
    counts, ids, failing = check.junit_counts(xml)
    assert counts == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1}
    assert ids[-1] == "tests.test_greedy_triton::test_d" and len(ids) == 4
    assert failing == ["tests.test_selectors::test_b[cuda]"]


def test_report_carries_the_figures_the_steps_computed(check, tmp_path, monkeypatch):
    """The CPU mode's environment and selector steps, in this process with a small selector case:
    the report's table and summary hold the measured medians, and its versions are torch's own."""
    monkeypatch.setattr(bench_selectors, "D", 64)
    monkeypatch.setattr(check, "SELECTOR_CASES", {"cpu": [(96, 12, 1), (96, 12, 2)]})
    results = {name: check.STEP_FUNCTIONS[name]("cpu", 0.0) for name in ("environment", "selectors")}
    report = check.format_report("cpu", results, 1.0)
    assert results["environment"].figures["torch"] == torch.__version__
    assert f"| torch | {torch.__version__} |" in report
    rows = results["selectors"].figures["rows"]
    assert [(r["n"], r["k"], r["batch"]) for r in rows] == [(96, 12, 1), (96, 12, 2)]
    for row in rows:
        assert f"| {row['otprune']:>10.3f} " in report and f" {row['per_step']:>11.3f} {row['per_step'] / row['otprune']:>6.1f}x | " in report
    assert f"OTPrune {rows[0]['otprune']:.3f} ms (default), per-step {rows[0]['per_step']:.3f} ms" in report
    assert "| 1 | environment | PASS |" in report and "| 3 | selectors | PASS |" in report
    assert "no figure here is a GPU figure" in report


@pytest.mark.parametrize(
    "step_body, why",
    [("sys.exit(3)", "its process died (exit code 3)"), ("time.sleep(120)", "timed out after its 10 s budget")],
)
def test_a_step_that_dies_or_overruns_is_reported_as_failed(check, tmp_path, monkeypatch, step_body, why):
    """The driver runs each step as ``python <this script> --run-step ...``: a stand-in script that
    dies, or sleeps past the budget (and is killed), must come back as FAIL with the reason."""
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(f"import sys, time\n{step_body}\n")
    monkeypatch.setattr(check, "__file__", str(stand_in))
    result = check.run_step("selectors", "cpu", 10, tmp_path)
    assert (result.status, result.summary) == ("FAIL", why)


@pytest.mark.parametrize("column, device", [(0, "cuda"), (1, "cpu")])
def test_every_step_gets_its_whole_budget_inside_the_checks(check, column, device):
    """The driver gives a step min(its budget, time left): step budgets above the total would cut the last ones."""
    assert set(check.BUDGETS) == set(check.STEPS)
    assert sum(budgets[column] for budgets in check.BUDGETS.values()) <= check.DEFAULT_BUDGET[device]


def test_a_step_without_time_left_is_skipped(check, tmp_path):
    assert check.run_step("selectors", "cpu", 5, tmp_path).status == "SKIP"


@pytest.mark.parametrize("bad", [["--steps", "gpu"], ["--budget", "0"], ["--steps", ""]])
def test_bad_options_are_refused(check, bad):
    with pytest.raises(SystemExit):
        check.parse_args(bad)


def test_selection_accepts_tokens_that_require_grad():
    """Found by the check's lmms-eval step: lmms-eval's llava_hf calls generate outside no_grad."""
    tokens = torch.randn(40, 16, requires_grad=True)
    config = PruneConfig(method="OURS", ratio=0.25)
    assert torch.equal(select_per_image(config, [tokens])[0].indices, select_per_image(config, [tokens.detach()])[0].indices)


def test_bench_prefill_judges_each_model_at_its_own_batch_when_run_alone():
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(["--models", "1.7"])
    assert bench_prefill.parse_args(["--models", "1.6"]).models == ["1.6"]

    def result(method, ratio, ttft):
        stages = {"vision": 0.0, "select": 0.0, "prefill": ttft, "ttft": ttft}
        return bench_prefill.Result(bench_prefill.Config(method, ratio, 1), 1, 1, stages, dict(stages), 1.0, None)

    lines = bench_prefill.target_lines({"llava-1.6 (reduced)": [result("none", None, 8.0), result("otprune", 0.098, 2.0)]}, gpu=True)
    assert lines[0].startswith("llava-1.6 (reduced) batch 1: TTFT >= 3x lower at ratio 0.098 (OTPrune): 4.00x -> MET")
