"""The synthetic benchmark's lmms-eval hooks: images drawn from each row's scene, scores from
``otprune.benchmark_metrics`` (fractions; the report scales them to the paper's units)."""

from __future__ import annotations

from otprune.benchmark_metrics import cider, exact_match, yes_no_f1, yes_no_prediction  # noqa: F401 (yaml hooks)
from otprune.synthetic_benchmark import draw, scene_from_dict


def doc_to_visual(doc):
    return [draw(scene_from_dict(doc["scene"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The row's question is the whole prompt after the image (the short-answer instruction included)."""
    return doc["question"]


def exact_match_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answer"])}


def yes_no_results(doc, results):
    return {"yes_no_f1": {"prediction": yes_no_prediction(results[0]), "answer": doc["answer"]}}


def caption_results(doc, results):
    return {"cider": {"id": doc["question_id"], "prediction": results[0], "references": [doc["answer"]]}}
