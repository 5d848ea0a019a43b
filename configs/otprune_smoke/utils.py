"""The embedded benchmark's lmms-eval hooks: images from this folder, scores from
``otprune.benchmark_metrics`` (fractions; the report scales them to the paper's units)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from otprune.benchmark_metrics import cider, exact_match_results, yes_no_f1, yes_no_results  # noqa: F401 (yaml hooks)

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


def caption_results(doc, results):
    return {"cider": {"id": doc["question_id"], "prediction": results[0], "references": list(doc["answer"])}}
