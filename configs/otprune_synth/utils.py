"""The synthetic benchmark's lmms-eval hooks: images drawn from each row's scene on its background, scores from
``otprune.benchmark_metrics`` (fractions; the report scales them to the paper's units)."""

from __future__ import annotations

from otprune.benchmark_metrics import cider, exact_match_results, yes_no_f1, yes_no_results  # noqa: F401 (yaml hooks)
from otprune.synthetic_benchmark import background_from_dict, draw, scene_from_dict


def doc_to_visual(doc):
    return [draw(scene_from_dict(doc["scene"]), background_from_dict(doc.get("background")))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The row's question is the whole prompt after the image (the short-answer instruction included)."""
    return doc["question"]


def caption_results(doc, results):
    return {"cider": {"id": doc["question_id"], "prediction": results[0], "references": [doc["answer"]]}}
