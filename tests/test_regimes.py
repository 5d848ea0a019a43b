"""The regimes analysis (otprune.analysis.regimes and its stats, report and figure) on a hand-built
harness folder whose redundancy, OT distances, scores and questions are known, so every number it
reports can be checked by hand."""

import csv
import hashlib
import json

import pytest

from otprune import cli as otprune_cli
from otprune import synthetic_benchmark as bench
from otprune.analysis import __main__ as cli
from otprune.analysis import regimes, regimes_figure, regimes_report, regimes_stats
from otprune.analysis.uncertainty import Interval

# Both exact-match kinds: a score of s % is s of the QUESTIONS answered right (see answers()).
KINDS = ("attribute", "count")
QUESTIONS = 100
LEVELS = ("plain", "gradient", "texture", "clutter")
NAN = float("nan")

# (method, ratio) -> kind -> level -> score. Measured redundancy (below) orders the levels
# plain (85 %), clutter (58.3 %), texture (40 %); gradient has scores but no measurement.
SCORES = {
    ("Original", 1.0): {"attribute": dict.fromkeys(LEVELS, 95.0), "count": dict.fromkeys(LEVELS, 80.0)},
    ("VTW", 0.0): {"attribute": dict.fromkeys(LEVELS, 50.0), "count": dict.fromkeys(LEVELS, 30.0)},
    # 0.098: OTPrune behind DivPrune at the most redundant level, ahead at the least.
    ("OTPrune", 0.098): {"attribute": {"plain": 60.0, "clutter": 70.0, "texture": 80.0, "gradient": 1.0},
                         "count": {"plain": 50.0, "clutter": 60.0, "texture": 70.0, "gradient": 1.0}},
    ("DivPrune", 0.098): {"attribute": {"plain": 70.0, "clutter": 70.0, "texture": 75.0, "gradient": 99.0},
                          "count": {"plain": 55.0, "clutter": 58.0, "texture": 65.0, "gradient": 99.0}},
    ("DPP", 0.098): {"attribute": {"plain": 65.0, "clutter": 66.0, "texture": 67.0, "gradient": 1.0},
                     "count": {"plain": 40.0, "clutter": 41.0, "texture": 42.0, "gradient": 1.0}},
    # 0.25: no crossover over the measured levels (gradient, unmeasured, would make one).
    ("OTPrune", 0.25): {"attribute": {"plain": 90.0, "clutter": 90.0, "texture": 90.0, "gradient": 10.0},
                        "count": {"plain": 75.0, "clutter": 75.0, "texture": 75.0, "gradient": 99.0}},
    ("DivPrune", 0.25): {"attribute": {"plain": 85.0, "clutter": 85.0, "texture": 85.0, "gradient": 85.0},
                         "count": {"plain": 80.0, "clutter": 75.0, "texture": 78.0, "gradient": 1.0}},
    ("DPP", 0.25): {"attribute": dict.fromkeys(LEVELS, 80.0), "count": dict.fromkeys(LEVELS, 70.0)},
    ("FastV", 0.098): {"attribute": dict.fromkeys(LEVELS, 90.0), "count": dict.fromkeys(LEVELS, 60.0)},
}  # fmt: skip

# (method, ratio) -> where its right answers start (answers()): DivPrune 0.25 differs from OTPrune
# 0.25 both ways, on 25 to 45 of the 100 questions, so its 5-point gaps are within noise.
SHIFTS = {("DivPrune", 0.25): 20}

# Per-image near-duplicate shares each K=0 pruned run logs, per level (clutter: OTPrune's runs differ).
SHARES = {"plain": [0.9, 0.8], "texture": [0.5, 0.3], "clutter": [0.6, 0.5]}
OTPRUNE_CLUTTER_SHARES = [0.7, 0.6]
# (method, ratio) -> level -> per-image OT distances.
OT = {
    ("OTPrune", 0.098): {"plain": [1.0, NAN, 2.0], "clutter": [1.0], "texture": [1.0]},
    ("DivPrune", 0.098): {"plain": [3.0], "clutter": [2.0], "texture": [2.0]},
    ("DPP", 0.098): {"plain": [4.0, 6.0], "clutter": [3.0], "texture": [3.0]},
    ("OTPrune", 0.25): {level: [0.5] for level in SHARES},
    ("DivPrune", 0.25): {level: [1.0] for level in SHARES},
    ("DPP", 0.25): {level: [1.5] for level in SHARES},
}


def write_table(root, scores, model="m", kinds=KINDS, levels=LEVELS):
    columns = [bench.task_benchmark(kind, level) for kind in kinds for level in levels]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "table1.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "ratio", "limit"] + [f"{c}{s}" for c in columns for s in ("", "_paper", "_diff")] + ["avg_rank"])
        for (method, ratio), cells in scores.items():
            values = [cells[kind][level] for kind in kinds for level in levels]
            writer.writerow([model, method, ratio, ""] + [x for v in values for x in (v, "", "")] + [""])


def answers(score, shift=0):
    """{question id: exact match} of QUESTIONS questions, ``score`` of them right: ids shift ..
    shift + score - 1 (mod QUESTIONS). Two methods with the same shift differ one way only, on
    |score difference| questions; different shifts make them differ both ways."""
    right = {(shift + i) % QUESTIONS for i in range(round(score))}
    return {q: float(q in right) for q in range(QUESTIONS)}


def write_record(root, model, folder_name, attempt="1", layer_index=0, questions=None, **fields):
    """A finished harness record trusted by load_records (its results file's SHA-256 inside), the
    folder's setting.json with the resolved ``layer_index``, and, for each task of ``questions``
    (task -> {question id: exact match}), the samples file lmms-eval logs beside the results."""
    folder = root / model / folder_name
    results = folder / "attempts" / attempt / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"results": {}}))
    for task, items in (questions or {}).items():
        lines = [json.dumps({"doc_id": q, "exact_match": v}) for q, v in items.items()]
        (results.parent / f"2026_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
    tasks = [bench.task_name(*bench.task_level(b)) if bench.task_level(b) else b for b in fields.get("benchmarks", [])]
    record = {
        "status": "done", "tasks": tasks, "finished_tasks": tasks, "wall_s": 1.0, "env": {},
        "results": {f"attempts/{attempt}/results.json": hashlib.sha256(results.read_bytes()).hexdigest()}, **fields,
    }  # fmt: skip
    (folder / f"otprune_{attempt}.json").write_text(json.dumps(record))
    (folder / "setting.json").write_text(json.dumps({"method": fields.get("method"), "ratio": fields.get("ratio"), "layer_index": layer_index}))


def level_benchmarks(level):
    return [bench.task_benchmark(kind, level) for kind in KINDS]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs" / "synth"
    write_table(root, SCORES)
    every = [b for level in LEVELS for b in level_benchmarks(level)]
    # Reference rows: every level in one process, no measurements: nothing to attribute.
    write_record(root, "m", "Original_1", method="Original", ratio=1.0, benchmarks=every, env={"BASELINE": "ORIG"})
    write_record(root, "m", "VTW_0", method="VTW", ratio=0.0, benchmarks=every, env={"BASELINE": "VTW", "LAYER_INDEX": "0"})
    for (method, ratio), by_level in OT.items():
        for level, distances in by_level.items():
            shares = OTPRUNE_CLUTTER_SHARES if (method, level) == ("OTPrune", "clutter") else SHARES[level]
            env = {"SUBSET_RATIO": str(ratio), "OTPRUNE_OT": "1"}
            shift = SHIFTS.get((method, ratio), 0)
            questions = {bench.task_name(kind, level): answers(SCORES[(method, ratio)][kind][level], shift) for kind in KINDS}
            write_record(root, "m", f"{method}_{ratio}_{level}", method=method, ratio=ratio, benchmarks=level_benchmarks(level),
                         env=env, ot_distance=distances, near_duplicate_share=shares, questions=questions)  # fmt: skip
    # Pruning inside the LLM at FastV's default K (2): in its resolved setting, not in its env. Its
    # values are in another space, which would change every mean and rho if counted.
    for level in SHARES:
        write_record(root, "m", f"FastV_0.098_{level}", method="FastV", ratio=0.098, benchmarks=level_benchmarks(level), layer_index=2,
                     env={"OTPRUNE_OT": "1"}, ot_distance=[100.0], near_duplicate_share=[0.0, 0.0])  # fmt: skip
    # Two levels in one process: its values cannot be attributed (they would change plain and clutter).
    write_record(root, "m", "DPP_0.098_mixed", method="DPP", ratio=0.098, benchmarks=level_benchmarks("plain") + level_benchmarks("clutter"),
                 env={"OTPRUNE_OT": "1"}, ot_distance=[99.0], near_duplicate_share=[0.0, 0.0])  # fmt: skip
    return root


def test_redundancy_and_mean_ot_per_level(runs):
    found = regimes.load_regimes(runs)
    assert found.skipped == []
    plain, clutter, texture = (found.redundancy[("m", level)] for level in ("plain", "clutter", "texture"))
    assert plain.share == pytest.approx(0.85) and plain.runs == 6 and plain.images == 2
    # OTPrune's two clutter runs logged mean 0.65, the four others 0.55: (2 * 1.3 + 4 * 1.1) / 12 images.
    assert clutter.share == pytest.approx(7 / 12) and (clutter.low, clutter.high) == pytest.approx((0.55, 0.65))
    assert texture.share == pytest.approx(0.4)
    assert ("m", "gradient") not in found.redundancy
    # Ordered by measurement, not by the benchmark's design order; the unmeasured last.
    assert found.levels("m") == ["plain", "clutter", "texture", "gradient"]
    assert found.measured_levels("m") == ["plain", "clutter", "texture"]
    assert found.ot[("m", "OTPrune", 0.098, "plain")] == (pytest.approx(1.5), 2)  # the nan left out
    assert found.ot[("m", "DPP", 0.098, "plain")] == (pytest.approx(5.0), 2)  # not the mixed record's 99
    assert found.ot[("m", "DPP", 0.098, "clutter")][0] == pytest.approx(3.0)
    assert not any(method == "FastV" for _, method, _, _ in found.ot)
    assert found.score("m", "FastV", 0.098, "count", "texture") == 60.0  # its scores stay
    assert found.score("m", "VTW", 0.0, "attribute", "gradient") == 50.0


def test_only_the_newest_record_of_a_task_counts(tmp_path):
    """A run done again (after a change of code): its old record logged OT 0.50, the rerun 0.10.
    Its score is the rerun's; so must be its OT distance and redundancy, not a mean of both."""
    root = tmp_path / "runs" / "rerun"
    write_table(root, {("OTPrune", 0.25): {"attribute": {"plain": 70.0}}}, kinds=("attribute",), levels=("plain",))
    benchmarks = [bench.task_benchmark("attribute", "plain")]
    task = bench.task_name("attribute", "plain")
    for attempt, ot, share, score in (("20261201_000000", 0.50, 0.2, 40), ("20261202_000000", 0.10, 0.8, 70)):
        write_record(root, "m", "OTPrune_0.25", attempt=attempt, method="OTPrune", ratio=0.25, benchmarks=benchmarks,
                     ot_distance=[ot], near_duplicate_share=[share], questions={task: answers(score)})  # fmt: skip
    found = regimes.load_regimes(root)
    assert found.ot[("m", "OTPrune", 0.25, "plain")] == (pytest.approx(0.10), 1)
    assert found.redundancy[("m", "plain")].share == pytest.approx(0.8) and found.redundancy[("m", "plain")].runs == 1
    (interval,) = regimes_stats.score_intervals(found).values()
    assert interval.value == pytest.approx(70.0) and interval.questions == QUESTIONS


def test_mixed_level_and_inside_llm_records_are_reported(runs):
    found = regimes.load_regimes(runs)
    assert [(path.parent.name, reason) for path, reason in found.unattributed] == [("DPP_0.098_mixed", "tasks of levels plain, clutter together")]
    # FastV at its default K = 2 (no LAYER_INDEX in its env): inside the LLM all the same.
    assert sorted(path.parent.name for path in found.inside_llm) == ["FastV_0.098_clutter", "FastV_0.098_plain", "FastV_0.098_texture"]
    markdown = regimes_report.render(found)
    assert "1 record(s) evaluated several levels" in markdown
    assert "- `m/DPP_0.098_mixed/otprune_1.json`: tasks of levels plain, clutter together" in markdown
    assert "3 record(s) prune inside the LLM (LAYER_INDEX > 0)" in markdown


def test_score_intervals_over_the_questions(runs):
    intervals = regimes_stats.score_intervals(regimes.load_regimes(runs))
    # 60 of 100 right: the binomial 95 % range of the count is 50-70 (60 ± 1.96 * 4.9).
    sixty = intervals[("m", "OTPrune", 0.098, "attribute", "plain")]
    assert sixty.value == pytest.approx(60.0) and sixty.questions == QUESTIONS
    assert 49 <= sixty.low <= 52 and 68 <= sixty.high <= 71
    # The table's scores and the ones recomputed from the logged questions agree.
    assert intervals[("m", "DivPrune", 0.25, "count", "texture")].value == pytest.approx(78.0)


def test_crossover_only_where_the_paired_interval_excludes_zero(runs):
    found = {(c.ratio, c.kind): c for c in regimes_stats.crossovers(regimes.load_regimes(runs))}
    assert set(found) == {(r, k) for r in (0.098, 0.25) for k in KINDS}
    # 0.098: both methods right on the same questions but for the gap (one-way differences):
    # -10 and +5 are clear of 0; 0 at clutter shows no difference.
    attribute = found[(0.098, "attribute")]
    assert [(level, d.value) for level, _, d in attribute.steps] == [("plain", pytest.approx(-10.0)), ("clutter", 0.0), ("texture", pytest.approx(5.0))]
    assert attribute.signs() == [-1, 0, 1] and attribute.crossings == [("plain", "texture")] and attribute.unresolved == ["clutter"]
    assert "crosses between plain (85.0 %) and texture (40.0 %) (DivPrune ahead on the more redundant side, OTPrune on the less)" in attribute.describe()
    assert "no difference shown at clutter (58.3 %)" in attribute.describe()
    # Count: -5, +2, +5; two questions in 100 are within noise (the interval reaches 0).
    count = found[(0.098, "count")]
    assert count.signs() == [-1, 0, 1] and count.crossings == [("plain", "texture")]
    # 0.25: OTPrune 5 points ahead (attribute) or behind (count) at every level, but the two
    # differ both ways on 25-45 questions: no difference shown, no leader, no crossover.
    for kind in KINDS:
        assert found[(0.25, kind)].signs() == [0, 0, 0] and found[(0.25, kind)].leader is None
        assert found[(0.25, kind)].describe().endswith("no crossover: no difference shown at any level (every interval includes 0)")
        assert all(d.low < 0 < d.high for _, _, d in found[(0.25, kind)].steps)


def test_crossover_with_several_sign_changes_and_none_shown():
    def diff(low, high):
        return Interval((low + high) / 2, low, high, 40)

    steps = (("a", 0.9, diff(1, 3)), ("b", 0.5, diff(-3, -1)), ("c", 0.4, diff(-1, 4)), ("d", 0.3, diff(2, 5)))
    twice = regimes_stats.Crossover("m", 0.1, "count", steps)
    assert twice.crossings == [("a", "b"), ("b", "d")] and "crosses 2 times" in twice.describe()
    # The case: differences of -2.5, -2.5, +2.3 whose intervals all include 0.
    noise = regimes_stats.Crossover("m", 0.1, "count", tuple((lv, 0.5, diff(d - 8, d + 8)) for lv, d in (("a", -2.5), ("b", -2.5), ("c", 2.3))))
    assert noise.crossings == [] and noise.leader is None and "no difference shown at any level" in noise.describe()


def test_rho_per_level_with_its_exact_p(runs):
    rhos = {(r.level, r.ratio, r.kind): r for r in regimes_stats.level_rhos(regimes.load_regimes(runs))}
    # plain, 0.098, attribute: OT 1.5 / 3 / 5 (OTPrune, DivPrune, DPP), scores 60 / 70 / 65: d = 0, -1, 1.
    # Of the 3! pairings, rho is 1, 0.5, 0.5, -0.5, -0.5, -1: |rho| >= 0.5 in all six, p = 1.
    plain = rhos[("plain", 0.098, "attribute")]
    assert plain.methods == ("OTPrune", "DivPrune", "DPP") and plain.rho == pytest.approx(0.5)
    assert plain.p == pytest.approx(1.0) and plain.correlation.n == 3
    # 0.25: OT 0.5 / 1 / 1.5, attribute 90 / 85 / 80 -> rho -1, reached by 1 pairing in 6 each side: p = 2/6.
    texture = rhos[("texture", 0.25, "attribute")]
    assert texture.rho == pytest.approx(-1.0) and texture.p == pytest.approx(1 / 3)
    assert ("gradient", 0.098, "attribute") not in rhos  # no OT measured there
    # FastV (K = 2 by default) has no OT distance here: it is in no rho.
    assert not any("FastV" in r.methods for r in rhos.values())


def test_markdown_tables(runs):
    markdown = regimes_report.render(regimes.load_regimes(runs), {"SynAttr": "EM"})
    assert "| plain | 85.0 % | 2 | 6 |" in markdown
    assert "| clutter | 58.3 % (runs 55.0–65.0 %) | 2 | 6 |" in markdown
    assert "| gradient | not measured | – | 0 |" in markdown
    assert "### Scores: SynAttr (attribute, EM), 95 % interval" in markdown and "### Scores: SynCount (count), 95 % interval" in markdown
    assert "| Method | plain (85.0 %) | clutter (58.3 %) | texture (40.0 %) | gradient (not measured) |" in markdown
    # Intervals where the questions were logged (the K = 0 runs here), the bare score elsewhere.
    assert "| OTPrune 0.098 | 60 [" in markdown and "| Original | 95 | 95 | 95 | 95 |" in markdown
    assert "| OTPrune 0.098 | 1.5 | 1 | 1 | – |" in markdown  # the OT table
    assert "| plain (85.0 %) | 0.098 | +0.500 (p = 1.000, n = 3) |" in markdown  # exact: 3 methods
    assert "a crossover only where the interval excludes 0 on both sides" in markdown


def test_cli_writes_markdown_figure_and_csv(runs, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["regimes", str(runs), "--out", str(out)]) == 0
    assert (out / "regimes.md").exists() and (out / "regimes.png").stat().st_size > 0
    with (out / "regimes.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(regimes_report.CSV_FIELDS)
    row = next(r for r in rows if (r["method"], r["ratio"], r["kind"], r["level"]) == ("OTPrune", "0.098", "attribute", "plain"))
    assert float(row["redundancy"]) == pytest.approx(0.85) and float(row["score"]) == 60 and float(row["mean_ot"]) == pytest.approx(1.5)
    assert 49 <= float(row["score_low"]) <= 52 and 68 <= float(row["score_high"]) <= 71 and row["questions"] == "100"
    gradient = next(r for r in rows if (r["method"], r["kind"], r["level"]) == ("Original", "count", "gradient"))
    assert gradient["redundancy"] == "" and gradient["mean_ot"] == "" and gradient["score_low"] == "" and float(gradient["score"]) == 80
    assert len(rows) == len(SCORES) * len(KINDS) * len(LEVELS)
    # The otprune command forwards to the same entry point.
    out2 = tmp_path / "out2"
    assert otprune_cli.main(["analysis", "regimes", str(runs), "--out", str(out2)]) == 0
    assert (out2 / "regimes.md").read_text() == (out / "regimes.md").read_text()


def test_figure_with_one_level_and_one_method(tmp_path):
    root = tmp_path / "one"
    write_table(root, {("OTPrune", 0.25): {"attribute": {"plain": 70.0}}}, kinds=("attribute",), levels=("plain",))
    write_record(root, "m", "OTPrune_0.25", method="OTPrune", ratio=0.25, benchmarks=["SynYesNo"], ot_distance=[0.2], near_duplicate_share=[0.9])
    found = regimes.load_regimes(root)
    assert found.redundancy[("m", "plain")].share == pytest.approx(0.9)
    fig = regimes_figure.figure(found, {"SynYesNo": "F1"})
    fig.savefig(tmp_path / "one.png")
    assert "A crossover needs at least two levels with measured redundancy; measured: plain." in regimes_report.render(found)


def test_no_measurement_and_no_level_columns(tmp_path):
    unmeasured = tmp_path / "unmeasured"
    write_table(unmeasured, {("OTPrune", 0.25): {"attribute": {"plain": 70.0, "clutter": 60.0}}}, kinds=("attribute",), levels=("plain", "clutter"))
    found = regimes.load_regimes(unmeasured)
    markdown = regimes_report.render(found)
    assert "| plain | not measured | – | 0 |" in markdown and "measured: none" in markdown
    regimes_figure.figure(found).savefig(tmp_path / "unmeasured.png")

    other = tmp_path / "other"
    other.mkdir()
    (other / "table1.csv").write_text("model,method,ratio,GQA,GQA_paper,GQA_diff\nm,OTPrune,0.25,50,,\n")
    out = tmp_path / "out"
    assert cli.main(["regimes", str(other), "--out", str(out)]) == 0
    assert "No synthetic-benchmark level column" in (out / "regimes.md").read_text()
    assert (out / "regimes.png").exists() and (out / "regimes.csv").read_text().strip() == ",".join(regimes_report.CSV_FIELDS)


def test_regimes_needs_a_report(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="table1.csv does not exist; run the harness"):
        regimes.load_regimes(tmp_path / "empty")
    with pytest.raises(SystemExit):
        cli.main(["regimes", str(tmp_path / "empty")])
    assert "table1.csv does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_regimes_end_to_end_through_the_harness(tmp_path):
    """The CI-sized regimes run: configs/regimes.yaml cut to OTPrune and DivPrune at 0.098, two
    levels and 2 questions per task, through the harness and the unchanged lmms-eval CLI, then the
    analysis: every level's redundancy measured from the runs' own logs (each image's share in
    [0, 1], the same images for both methods), each method's OT distance per level."""
    import yaml
    from conftest import ROOT

    from otprune.harness import cli as harness_cli

    pytest.importorskip("lmms_eval")
    pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")
    config = yaml.safe_load((ROOT / "configs" / "regimes.yaml").read_text())
    config["methods"] = {name: {**config["methods"][name], "ratios": [0.098]} for name in ("OTPrune", "DivPrune")}
    config["group_tasks"] = [config["group_tasks"][0], config["group_tasks"][-1]]
    config["tasks"] = [task for group in config["group_tasks"] for task in group]
    path = tmp_path / "quick_regimes.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    assert harness_cli.main([str(path), "--runs-dir", str(runs), "--limit", "2"]) == 0
    folder = runs / "quick_regimes_limit2"
    found = regimes.load_regimes(folder)
    assert sorted(found.redundancy) == [("synth-llava-1.5", "clutter"), ("synth-llava-1.5", "plain")]
    for (_, level), measured in found.redundancy.items():
        assert measured.images == 3 * 2 and measured.runs == 2 and measured.low == measured.high, (level, measured)
        assert 0 <= measured.share <= 1
    assert {(method, level) for (_, method, _, level) in found.ot} == {(m, lv) for m in ("OTPrune", "DivPrune") for lv in ("plain", "clutter")}
    assert regimes_stats.crossovers(found)
    # The values against the runs' own lmms-eval logs, read here line by line: each attempt is one
    # level's process (its results file names its tasks); each logged image has its OT distance and
    # near-duplicate share.
    logged_as = {"OTPrune": "OURS", "DivPrune": "DIVPRUNE"}  # the BASELINE names in the log lines
    logged = {}
    for log in folder.glob("synth-llava-1.5/*/attempts/*/lmms_eval.log"):
        method = log.parts[-4].split("_")[0]
        (results,) = log.parent.rglob("*_results.json")
        level = "clutter" if any("clutter" in task for task in json.loads(results.read_text())["results"]) else "plain"
        for line in log.read_text().splitlines():
            fields = dict(part.strip().split(" ", 1) for part in line.split("; ")[2:] if " " in part.strip())
            if f"otprune {logged_as[method]}:" in line:
                entry = logged.setdefault((method, level), {"ot": [], "redundancy": []})
                entry["ot"] += [float(v) for v in fields["ot"].split(", ")]
                entry["redundancy"] += [float(v) for v in fields["redundancy"].split(", ")]
    assert sorted(logged) == sorted((m, lv) for m in ("OTPrune", "DivPrune") for lv in ("plain", "clutter"))
    for (method, level), entry in logged.items():
        assert len(entry["ot"]) == 3 * 2, (method, level)
        assert found.ot[("synth-llava-1.5", method, 0.098, level)] == (pytest.approx(sum(entry["ot"]) / 6), 6)
    for level in ("plain", "clutter"):
        shares = logged[("OTPrune", level)]["redundancy"]
        assert shares == logged[("DivPrune", level)]["redundancy"], "both methods saw the same images"
        assert found.redundancy[("synth-llava-1.5", level)].share == pytest.approx(sum(shares) / len(shares))
