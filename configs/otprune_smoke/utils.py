"""The embedded benchmark's lmms-eval hooks: images from this folder, scores in the paper's units.

Scores are fractions here (exact match and F1 in [0, 1], CIDEr as pycocoevalcap gives it); the
report scales them like the paper's columns (EM and F1 in %).
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

DATA = Path(__file__).resolve().parent / "data"
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def doc_to_visual(doc):
    with Image.open(DATA / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def caption_prompt(doc, lmms_eval_specific_kwargs=None):
    return CAPTION_PROMPT


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: the usual VQA answer normalisation, minus articles."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(word for word in words if word not in ("a", "an", "the"))


def exact_match_results(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}


def yes_no_results(doc, results):
    words = normalise(results[0]).split()
    prediction = words[0] if words and words[0] in ("yes", "no") else "other"
    return {"yes_no_f1": {"prediction": prediction, "answer": doc["answer"]}}


def yes_no_f1(items) -> float:
    """F1 with "yes" as the positive class; an answer that is neither yes nor no counts as "no"."""
    true_pos = sum(1 for item in items if item["prediction"] == "yes" and item["answer"] == "yes")
    predicted = sum(1 for item in items if item["prediction"] == "yes")
    actual = sum(1 for item in items if item["answer"] == "yes")
    return 2 * true_pos / (predicted + actual) if predicted + actual else 0.0


def caption_results(doc, results):
    return {"cider": {"id": doc["question_id"], "prediction": results[0], "references": list(doc["answer"])}}


def cider(items) -> float:
    """Corpus CIDEr-D (pycocoevalcap) on normalised words; no PTB tokenizer, so no Java."""
    from pycocoevalcap.cider.cider import Cider

    references = {item["id"]: [normalise(ref) for ref in item["references"]] for item in items}
    predictions = {item["id"]: [normalise(item["prediction"]) or "empty"] for item in items}
    score, _ = Cider().compute_score(references, predictions)
    return float(score)
