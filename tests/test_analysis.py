import math

import pytest
import torch

from otprune.analysis import SubsetScorer, enumerate_subsets, sample_subsets, score_subsets, table2
from otprune.analysis import __main__ as cli
from otprune.measures import gaussian_w2, logdet_objective, w2_trace_term


@pytest.fixture(scope="module")
def quick_table2():
    preset = cli.QUICK_TABLE2
    return table2.run_table2(seeds=preset["seeds"], samples=preset["samples"])


def test_batched_scorer_matches_measures():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(40, 12, generator=generator, dtype=torch.float64) + 0.5
    subsets = sample_subsets(40, 7, 6, generator)
    scores = score_subsets(SubsetScorer.from_tokens(tokens), subsets, gamma=0.05, chunk=4)
    for i, kept in enumerate(subsets):
        assert scores["trace"][i].item() == pytest.approx(w2_trace_term(tokens, kept).item(), rel=1e-9)
        assert scores["w2"][i].item() == pytest.approx(gaussian_w2(tokens, kept).item(), rel=1e-7, abs=1e-12)
        assert scores["logdet"][i].item() == pytest.approx(logdet_objective(tokens, kept, gamma=0.05).item(), rel=1e-9)


def test_subset_generators():
    every = enumerate_subsets(7, 3)
    assert every.shape == (math.comb(7, 3), 3)
    assert len({tuple(row) for row in every.tolist()}) == math.comb(7, 3)
    drawn = sample_subsets(50, 10, 1000, torch.Generator().manual_seed(0), chunk=300)
    assert drawn.shape == (1000, 10)
    assert all(len(set(row)) == 10 for row in drawn.tolist())


def test_quick_table2_shape_and_sanity(quick_table2):
    assert [(r.n, r.d, r.k) for r in quick_table2] == list(table2.CONFIGS)
    for result in quick_table2:
        if result.exhaustive:
            assert result.population == math.comb(result.n, result.k)
        else:
            assert math.comb(result.n, result.k) > 10**6
            assert result.population == cli.QUICK_TABLE2["samples"]
        assert set(result.metrics) == set(table2.OBJECTIVES)
        for by_method in result.metrics.values():
            assert set(by_method) == set(table2.METHODS)
            for values in by_method.values():
                assert all(len(v) == result.seeds for v in values.values())
                assert all(0 <= w <= 100 for w in values["win"])
                assert all(0 < o <= 100 + 1e-9 for o in values["opt"])
                assert all(-1e-9 <= r <= 100 + 1e-9 for r in values["range"])
    assert quick_table2[0].exhaustive


def test_quick_table2_otprune_wins_on_trace_objective(quick_table2):
    for result in quick_table2:
        trace = result.metrics["trace"]
        ours = sum(trace["OTPrune"]["win"]) / result.seeds
        for rival in ("DivPrune", "Random"):
            assert ours > sum(trace[rival]["win"]) / result.seeds, (result.n, result.d, result.k, rival)


def test_table2_cli_writes_report(tmp_path, capsys):
    assert cli.main(["table2", "--quick", "--seeds", "1", "--samples", "200", "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "table2.md").read_text()
    assert "| 1000, 256, 100 | Monte-Carlo 200 subsets | OTPrune |" in markdown
    assert "94.56" in markdown and markdown.strip() in capsys.readouterr().out
    assert (tmp_path / "table2.png").stat().st_size > 0


def test_ot_vs_ratio_small_run(tmp_path):
    out = tmp_path / "ot"
    args = ["ot-vs-ratio", "--n", "48", "--d", "32", "--images", "1", "--ratios", "0.1,0.5", "--out", str(out)]
    assert cli.main(args) == 0
    markdown = (out / "ot_vs_ratio.md").read_text()
    for name in ("OURS", "DIVPRUNE", "TRIM", "STP", "RANDOM"):
        assert f"| {name} |" in markdown
    assert (out / "ot_vs_ratio.png").stat().st_size > 0


def test_ot_vs_ratio_reads_token_dir(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for i in range(2):
        torch.save(torch.randn(30, 16, generator=torch.Generator().manual_seed(i)), tokens / f"img{i}.pt")
    out = tmp_path / "out"
    args = ["ot-vs-ratio", "--tokens", str(tokens), "--ratios", "0.2", "--selectors", "ours,random", "--out", str(out)]
    assert cli.main(args) == 0
    assert "2 tensor(s)" in (out / "ot_vs_ratio.md").read_text()


def test_gamma_small_run(tmp_path):
    args = ["gamma", "--shape", "clustered:60:32:6", "--gammas", "1e-7,1e-2,1e2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    markdown = (tmp_path / "gamma.md").read_text()
    assert "## clustered N=60 d=32 k=6" in markdown
    # At γ = 1e-7 the float64 greedy is in its first-order regime: the top-k of diag(L).
    assert markdown.split("| 1e-07 |")[1].split("|")[2].strip() == "1.000"
    assert (tmp_path / "gamma.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["table2", "--seeds", "0"], "--seeds must be an integer >= 1; got '0'"),
        (["table2", "--samples", "many"], "--samples must be an integer >= 1; got 'many'"),
        (["ot-vs-ratio", "--ratios", "0.1,1.5"], "--ratios values must be in (0, 1]; got '0.1,1.5'"),
        (["ot-vs-ratio", "--selectors", "ours,bogus"], "unknown BOGUS; allowed: OURS"),
        (["gamma", "--shape", "blobs:10:4:2"], "KIND clustered or gaussian; got 'blobs:10:4:2'"),
        (["gamma", "--gammas", "0,1"], "--gammas values must be finite and > 0; got '0,1'"),
    ],
)
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def write_harness_runs(root, rows, layer_index=0, attempt="1"):
    """A minimal harness folder: table1.csv, and per (model, method, ratio) and benchmark a run
    folder with its setting.json (the resolved ``layer_index``), a results file and the harness
    record (``otprune_<attempt>.json``) naming its SHA-256."""
    import csv
    import hashlib
    import json

    root.mkdir(parents=True, exist_ok=True)
    with (root / "table1.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "ratio", "GQA", "GQA_paper", "GQA_diff", "POPE", "POPE_paper", "POPE_diff"])
        for model, method, ratio, _, gqa, pope in rows:
            writer.writerow([model, method, ratio, gqa, "", "", pope, "", ""])
    for model, method, ratio, ot, _, _ in rows:
        for benchmark in ("GQA", "POPE"):
            folder = root / model / f"{method}_{ratio}_{benchmark}"
            results = folder / f"attempt_{attempt}" / "results.json"
            results.parent.mkdir(parents=True)
            results.write_text(json.dumps({"results": {benchmark.lower(): {}}}))
            record = {
                "model": model, "method": method, "ratio": ratio, "status": "done", "tasks": [benchmark.lower()],
                "finished_tasks": [benchmark.lower()], "wall_s": 1.0, "benchmarks": [benchmark], "ot_distance": ot, "env": {},
                "results": {f"attempt_{attempt}/results.json": hashlib.sha256(results.read_bytes()).hexdigest()},
            }  # fmt: skip
            (folder / f"otprune_{attempt}.json").write_text(json.dumps(record))
            (folder / "setting.json").write_text(json.dumps({"method": method, "ratio": ratio, "layer_index": layer_index}))


def brute_force_p(x, y):
    """Two-sided p of Spearman's rho over every pairing, counted one by one."""
    import itertools

    from scipy.stats import spearmanr

    observed = spearmanr(x, y).statistic
    rhos = [spearmanr(x, list(p)).statistic for p in itertools.permutations(y)]
    tail = min(sum(r >= observed - 1e-12 for r in rhos), sum(r <= observed + 1e-12 for r in rhos))
    return min(1.0, 2 * tail / len(rhos))


def test_spearman_with_its_exact_p_and_degenerate_inputs():
    from scipy.stats import spearmanr

    from otprune.analysis.uncertainty import RankCorrelation, spearman_test

    # Perfectly monotone, n = 4: 1 pairing of 24 each side, p = 2/24.
    assert spearman_test([1, 2, 3, 4], [10, 20, 30, 40]) == RankCorrelation(pytest.approx(1.0), pytest.approx(1 / 12), 4)
    assert spearman_test([1, 2, 3, 4], [4, 3, 2, 1]).rho == pytest.approx(-1.0)
    assert spearman_test([1, 2, 2, 3], [1, 2, 3, 4]).rho == pytest.approx(0.9486832980505138)
    # By hand: ranks of y are 2, 1, 4, 3, 5, rank differences -1, 1, -1, 1, 0, so rho = 1 - 6 * 4 /
    # (5 * 24) = 0.8 (Pearson's r: 0.73). rho >= 0.8 means a sum of squared rank differences <= 4:
    # the identity, 4 adjacent swaps, 3 pairs of disjoint adjacent swaps: 8 of 120, p = 16/120.
    test = spearman_test([1, 2, 3, 4, 5], [2, 1, 4, 3, 50])
    assert test.rho == pytest.approx(0.8) and test.p == pytest.approx(16 / 120) and test.n == 5
    for x, y in [([0.3, 0.1, 0.2, 0.5, 0.4, 0.9], [60, 50, 70, 40, 45, 80]), ([1, 2, 3, 4, 5, 6, 7], [3, 1, 2, 7, 5, 6, 4])]:
        assert spearman_test(x, y).p == pytest.approx(brute_force_p(x, y))
    assert spearman_test([1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(9))).exact
    # Past 9 values, random pairings: 10 monotone values, reached by 1 pairing in 10! each side.
    many = spearman_test(range(10), [3 * v for v in range(10)])
    assert not many.exact and many.rho == pytest.approx(1.0) and many.p < 1e-4
    # Away from the tails, the random pairings' p and the t approximation's (scipy) agree closely.
    x, y = list(range(12)), [5, 1, 7, 3, 2, 9, 11, 4, 6, 12, 8, 10]
    assert spearman_test(x, y).p == pytest.approx(spearmanr(x, y).pvalue, abs=0.02)
    assert math.isnan(spearman_test([1, 2, 3], [5, 5, 5]).rho) and math.isnan(spearman_test([1, 2], [1, 2]).p)
    with pytest.raises(ValueError, match="x and y must pair up; got 3 and 2 values"):
        spearman_test([1, 2, 3], [1, 2])


def test_score_intervals_against_hand_computed_bounds():
    from otprune.analysis.uncertainty import Interval, difference_interval, score_interval

    # Every answer the same: nothing varies under resampling.
    assert score_interval("exact_match", [1.0] * 40) == Interval(100.0, 100.0, 100.0, 40)
    pairs = [{"prediction": p, "answer": a} for p, a in [("yes", "yes")] * 15 + [("no", "yes")] * 5 + [("no", "no")] * 20]
    f1 = score_interval("yes_no_f1", pairs)
    # F1 of yes: 2 * 15 / (15 + 20) = 85.7; some resamples lose a miss or gain one.
    assert f1.value == pytest.approx(600 / 7) and f1.low < f1.value < f1.high <= 100
    # Paired: two methods that answered alike differ by exactly 0 on every resample; unpaired
    # resampling would scatter the difference.
    answers = {q: float(q % 3 == 0) for q in range(30)}
    assert difference_interval("exact_match", answers, dict(answers)) == Interval(0.0, 0.0, 0.0, 30)
    # One-way: ours right on 6 more of 40 questions. The count of those in a resample is about
    # Binomial(40, 0.15): 95 % of its mass between 2 and 10, so 5-25 points.
    ours = {q: float(q < 26) for q in range(40)}
    theirs = {q: float(q < 20) for q in range(40)}
    gap = difference_interval("exact_match", ours, theirs)
    assert gap.value == pytest.approx(15.0) and 2.5 <= gap.low <= 7.5 and 22.5 <= gap.high <= 27.5 and gap.sign() == 1
    with pytest.raises(ValueError, match="metric 'cider' has no per-question score here; allowed: yes_no_f1, exact_match"):
        score_interval("cider", [0.5])


def test_hypothesis_from_harness_results(tmp_path):
    from otprune.analysis import hypothesis

    runs = tmp_path / "runs" / "demo"
    write_harness_runs(
        runs,
        [
            ("m", "OTPrune", 0.098, [1.0, 2.0], 60.0, 80.0),
            ("m", "DivPrune", 0.098, [3.0, float("nan")], 55.0, 85.0),
            ("m", "DPP", 0.098, [4.0], 50.0, 70.0),
        ],
    )
    points, skipped = hypothesis.load_points(runs)
    assert skipped == []
    gqa = {p.method: p for p in points if p.benchmark == "GQA"}
    assert gqa["OTPrune"].ot_distance == pytest.approx(1.5) and gqa["DivPrune"].images == 1
    markdown = hypothesis.render(points, runs, skipped)
    # Lower OT, higher GQA score throughout: rho -1, 1 pairing of 6 each side, p = 2/6.
    assert "| m | GQA | 3 | -1.000 | 0.333 |" in markdown
    assert "| m | POPE | 3 | -0.500 | 1.000 |" in markdown
    out = tmp_path / "out"
    assert cli.main(["hypothesis", str(runs), "--out", str(out)]) == 0
    assert (out / "hypothesis.md").exists() and (out / "hypothesis.png").exists()


def test_hypothesis_counts_the_newest_record_and_k_from_the_setting(tmp_path):
    """A rerun's record replaces the old one's OT distances (0.50 then 0.10: 0.10, not their mean);
    FastV left at its default K = 2 (in its setting.json, not its env) is inside the LLM: no point."""
    from otprune.analysis import hypothesis

    runs = tmp_path / "runs" / "demo"
    rows = [("m", "OTPrune", 0.098, [0.50], 60.0, 80.0), ("m", "DivPrune", 0.098, [3.0], 55.0, 85.0)]
    write_harness_runs(runs, rows, attempt="20261201_000000")
    write_harness_runs(runs, [("m", "OTPrune", 0.098, [0.10], 60.0, 80.0)], attempt="20261202_000000")
    write_harness_runs(runs / "fastv", [("m", "FastV", 0.098, [100.0], 70.0, 90.0)], layer_index=2)
    for folder in (runs / "fastv" / "m").iterdir():
        folder.rename(runs / "m" / folder.name)
    points, _ = hypothesis.load_points(runs)
    gqa = {p.method: p for p in points if p.benchmark == "GQA"}
    assert gqa["OTPrune"].ot_distance == pytest.approx(0.10) and gqa["OTPrune"].images == 1
    assert "FastV" not in gqa


def test_hypothesis_leaves_out_records_it_cannot_trust_and_says_why(tmp_path):
    """A results file edited after its run, or a record with a malformed OT field, gives no point;
    the analysis names each such record and the reason."""
    import json

    from otprune.analysis import hypothesis

    runs = tmp_path / "runs" / "demo"
    write_harness_runs(runs, [("m", "OTPrune", 0.098, [1.0], 60.0, 80.0), ("m", "DivPrune", 0.098, [3.0], 55.0, 85.0), ("m", "DPP", 0.098, [4.0], 50.0, 70.0)])
    (runs / "m" / "DPP_0.098_GQA" / "attempt_1" / "results.json").write_text('{"results": {"gqa": {"exact_match": 99}}}')
    record_path = runs / "m" / "DivPrune_0.098_POPE" / "otprune_1.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "ot_distance": ["3.0"]}))
    points, skipped = hypothesis.load_points(runs)
    assert {(p.method, p.benchmark) for p in points} == {("OTPrune", "GQA"), ("OTPrune", "POPE"), ("DivPrune", "GQA"), ("DPP", "POPE")}
    reasons = {path.parent.name: reason for path, reason in skipped}
    assert reasons.keys() == {"DPP_0.098_GQA", "DivPrune_0.098_POPE"}
    assert "changed since the record was written" in reasons["DPP_0.098_GQA"]
    assert reasons["DivPrune_0.098_POPE"] == "malformed record: 'ot_distance' is not a list of numbers"
    markdown = hypothesis.render(points, runs, skipped)
    assert "- `m/DPP_0.098_GQA/otprune_1.json`: results file" in markdown


def test_hypothesis_needs_a_report(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["hypothesis", str(tmp_path / "empty")])
    assert "table1.csv does not exist" in capsys.readouterr().err
