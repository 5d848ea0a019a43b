"""Scores of the local benchmarks, in the units of the paper's columns' source metrics.

Scores are fractions (exact match and F1 in [0, 1], CIDEr as pycocoevalcap gives it); the report
scales them like the paper's columns (EM and F1 in %).
"""

from __future__ import annotations

import re

__all__ = ["cider", "exact_match", "exact_match_results", "normalise", "yes_no_f1", "yes_no_prediction", "yes_no_results"]


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: the usual VQA answer normalisation, minus articles."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(word for word in words if word not in ("a", "an", "the"))


def exact_match(prediction: str, answer: str) -> float:
    return float(normalise(prediction) == normalise(answer))


def yes_no_prediction(text: str) -> str:
    """ "yes" or "no" when the answer starts with it, else "other"."""
    words = normalise(text).split()
    return words[0] if words and words[0] in ("yes", "no") else "other"


def exact_match_results(doc, results) -> dict:
    """lmms-eval ``process_results`` hook of a short-answer task whose row holds ``answer``."""
    return {"exact_match": exact_match(results[0], doc["answer"])}


def yes_no_results(doc, results) -> dict:
    """lmms-eval ``process_results`` hook of a yes/no task: the item ``yes_no_f1`` aggregates."""
    return {"yes_no_f1": {"prediction": yes_no_prediction(results[0]), "answer": doc["answer"]}}


def yes_no_f1(items) -> float:
    """F1 with "yes" as the positive class over ``{"prediction", "answer"}`` items; an answer that
    is neither yes nor no counts as "no"."""
    true_pos = sum(1 for item in items if item["prediction"] == "yes" and item["answer"] == "yes")
    predicted = sum(1 for item in items if item["prediction"] == "yes")
    actual = sum(1 for item in items if item["answer"] == "yes")
    return 2 * true_pos / (predicted + actual) if predicted + actual else 0.0


def cider(items) -> float:
    """Corpus CIDEr-D (pycocoevalcap) over ``{"id", "prediction", "references"}`` items, on
    normalised words; no PTB tokenizer, so no Java."""
    from pycocoevalcap.cider.cider import Cider

    references = {item["id"]: [normalise(ref) for ref in item["references"]] for item in items}
    predictions = {item["id"]: [normalise(item["prediction"]) or "empty"] for item in items}
    score, _ = Cider().compute_score(references, predictions)
    return float(score)
