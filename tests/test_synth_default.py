"""The embedded default's claim, end to end through the harness and lmms-eval on CPU: the trained
tiny LLaVA (configs/synth.yaml) reads the image, and without its visual tokens (VTW at K = 0) it
falls to chance. Chance is computed here from the tasks' own answers, not read from training.json."""

import collections
import csv
import json

import pytest
import yaml

from conftest import ROOT
from otprune import harness

DATA = ROOT / "configs" / "otprune_synth" / "data"
# Short-answer tasks scored by exact match: (report column, data file).
SHORT_ANSWER = {"SynAttr": "attribute", "SynCount": "count", "SynSpatial": "spatial"}
# The bar for a model that reads the image: yes/no F1 >= 0.9, and on every short-answer
# task a clear margin over the best constant answer.
ORIGINAL_MIN_PRESENCE_F1 = 0.9
ORIGINAL_MIN_MARGIN_OVER_CHANCE = 0.25
# Without visual tokens the model can only answer from the question: at most this far above the
# best constant answer (it may be below, answering a constant that is not the most frequent one).
VTW_MAX_ABOVE_CHANCE = 0.1


def answers(kind: str) -> list[str]:
    return [json.loads(line)["answer"] for line in (DATA / f"{kind}.jsonl").read_text().splitlines() if line.strip()]


def chance_exact_match(kind: str) -> float:
    """Exact match of always giving the most frequent answer."""
    values = answers(kind)
    return collections.Counter(values).most_common(1)[0][1] / len(values)


def chance_presence_f1() -> float:
    """F1 (positive class "yes") of always answering "yes": precision = share of yes, recall = 1."""
    values = answers("presence")
    share = values.count("yes") / len(values)
    return 2 * share / (share + 1)


def test_chance_levels_of_the_shipped_tasks():
    # 20 of the 40 presence questions are "yes"; the most frequent answers cover 9, 15 and 12 of 40.
    assert chance_presence_f1() == pytest.approx(2 / 3)
    assert [chance_exact_match(k) for k in SHORT_ANSWER.values()] == [9 / 40, 15 / 40, 12 / 40]


def test_original_reads_the_image_and_vtw_at_k0_is_at_chance(tmp_path):
    pytest.importorskip("lmms_eval")
    pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")
    config = yaml.safe_load((ROOT / "configs" / "synth.yaml").read_text())
    config["methods"] = {name: config["methods"][name] for name in ("Original", "VTW")}
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    assert harness.main([str(path), "--runs-dir", str(runs)]) == 0
    rows = {row["method"]: row for row in csv.DictReader(open(runs / "synth" / "table1.csv"))}
    vtw = rows["VTW"]
    assert float(vtw["visual_tokens_before"]) == 576 and float(vtw["visual_tokens_after"]) == 0

    def score(row, column):
        return float(row[column]) / 100  # the report gives EM and F1 in %

    scores = {m: {c: score(rows[m], c) for c in ("SynYesNo", *SHORT_ANSWER)} for m in rows}
    assert scores["Original"]["SynYesNo"] >= ORIGINAL_MIN_PRESENCE_F1, scores
    assert scores["VTW"]["SynYesNo"] <= chance_presence_f1() + VTW_MAX_ABOVE_CHANCE, scores
    for column, kind in SHORT_ANSWER.items():
        assert scores["Original"][column] >= chance_exact_match(kind) + ORIGINAL_MIN_MARGIN_OVER_CHANCE, (column, scores)
        assert scores["VTW"][column] <= chance_exact_match(kind) + VTW_MAX_ABOVE_CHANCE, (column, scores)
