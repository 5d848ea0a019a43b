"""Sequence surgery shared by the adapters: where each image's tokens are, which positions are
padding, which text an image's question is (less the phrases its method leaves out), and re-padding.

Every family finds its images' spans the same way (:func:`visual_spans`): from the visual
positions of each row and each image's feature count, in order. Every family finds its padding
the same way (:func:`padding_mask`, :func:`padding_side`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch

from otprune.prune_config import PruneConfig
from otprune.selection import stop_run

IGNORE_INDEX = -100
# What a phrase may follow inside a prompt: its tokens differ after each (SentencePiece, BPE).
_PHRASE_LEADS = ("", " ", "\n")


def visual_spans(visual: torch.Tensor, counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Each image's ``(row, start, end)`` in a ``(B, L)`` batch, from its feature count.

    ``visual``: ``(B, L)`` bool, the positions that hold visual tokens (placeholders); ``counts``:
    each image's number of visual tokens, images in batch order (row by row, left to right). The
    images take the visual positions in that order, ``counts[i]`` each, so adjacent images (no
    text between their placeholders), images at either end and several per row are one case.
    Raises ``ValueError`` where the positions and the counts disagree: a different total, or an
    image whose positions are not one consecutive run within one row.
    """
    rows, columns = visual.nonzero(as_tuple=True)
    total = sum(int(n) for n in counts)
    if rows.numel() != total:
        raise ValueError(f"the prompts hold {rows.numel()} visual positions but the images have {total} visual tokens ({list(counts)})")
    rows, columns = rows.tolist(), columns.tolist()
    spans, offset = [], 0
    for image, n in enumerate(counts):
        n = int(n)
        if n == 0:
            raise ValueError(f"image {image} has no visual tokens")
        row, start = rows[offset], columns[offset]
        if rows[offset + n - 1] != row or columns[offset + n - 1] != start + n - 1:
            raise ValueError(f"image {image} needs {n} consecutive visual positions in one row from row {row}, position {start}")
        spans.append((row, start, start + n))
        offset += n
    return spans


def spans_by_row(spans: Iterable[tuple[int, int, int]], batch: int) -> list[list[tuple[int, int]]]:
    """``(row, start, end)`` spans as ``spans[b]``: row b's ``(start, end)``, in order."""
    result: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for row, start, end in sorted(spans):
        result[row].append((start, end))
    return result


def padding_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None = None,
    eos_token_ids: Iterable[int] = (),
) -> torch.Tensor:
    """``(B, L)`` bool, True where a token is not padding.

    The caller's ``attention_mask`` where there is one. Without one, the rule of transformers'
    ``generate``: positions holding ``pad_token_id`` are padding, unless no pad token is set,
    none is in the input, or the pad token is also an end-of-sequence token (then nothing is).
    ``generate`` callers pass the pad token; ``forward`` callers pass none (the model attends to
    every position of a mask-less input, so it has no padding).
    """
    if attention_mask is not None:
        return attention_mask.to(input_ids.device).bool()
    every = torch.ones_like(input_ids, dtype=torch.bool)
    if pad_token_id is None or int(pad_token_id) in {int(e) for e in eos_token_ids}:
        return every
    pads = input_ids == int(pad_token_id)
    return ~pads if bool(pads.any()) else every


def padding_side(valid: torch.Tensor, default: str = "right") -> str:
    """Which side a ``(B, L)`` non-padding mask pads on: ``"left"``, ``"right"``, or ``default``
    where no row is padded. Raises ``ValueError`` on a mask that pads both sides or has holes
    (a row whose valid positions are not one run against one end)."""
    if bool(valid.all()):
        return default
    lengths = valid.sum(1, keepdim=True)
    positions = torch.arange(valid.shape[1], device=valid.device)
    if bool((valid == (positions >= valid.shape[1] - lengths)).all()):
        return "left"
    if bool((valid == (positions < lengths)).all()):
        return "right"
    raise ValueError(
        "the attention mask (or the pad tokens) puts padding on both sides of the batch or inside a prompt; pad every prompt on one side, left or right"
    )


def check_prunable_images(kwargs: dict, visual_keys: Sequence[str]) -> None:
    """Raise ``ValueError`` where a pruned call gives its images in a form the patch cannot prune:
    pixels without ``input_ids`` (whose placeholders show where each image's tokens go), or
    features the model would insert unseen (``mm_encoder_outputs``)."""
    has_pixels = any(kwargs.get(key) is not None for key in visual_keys)
    if has_pixels and kwargs.get("input_ids") is None or kwargs.get("mm_encoder_outputs"):
        raise ValueError(
            f"with pruning on, give the images as {' or '.join(visual_keys)} together with input_ids (the placeholders "
            "show where each image's tokens go); inputs_embeds or mm_encoder_outputs would go in unpruned"
        )


def question_positions(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(T,)`` long: the positions of a prompt's question, the ``text`` context of each of its images.

    ``visual``, ``valid``: ``(L,)`` bool, one prompt's visual and non-padding positions. The
    question is the text after the prompt's last image, the same for every image of the prompt
    (METHOD.md, TRIM: **choice**), so that an image followed by another gets the question and not
    the separator between them; a prompt ending with an image has its text before the first one.
    """
    text = valid & ~visual
    at = visual.nonzero().flatten()
    if at.numel() == 0:
        return text.nonzero().flatten()
    after = text[int(at[-1]) + 1 :].nonzero().flatten() + int(at[-1]) + 1
    return after if after.numel() else text[: int(at[0])].nonzero().flatten()


def leave_out(question_ids: torch.Tensor, positions: torch.Tensor, phrases_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``positions`` ``(T,)`` of a question without those where any of ``phrases_ids`` (each a
    non-empty run of token ids) occurs in ``question_ids`` ``(T,)``, the token ids at ``positions``.

    Every occurrence of every phrase goes. A question none of them occurs in is left whole; so is
    one they would leave empty, since a method's ``text`` holds at least one token.
    """
    if not phrases_ids:
        return positions
    ids = question_ids.tolist()
    dropped = [False] * len(ids)
    for phrase in map(list, phrases_ids):
        for start in range(len(ids) - len(phrase) + 1):
            if ids[start : start + len(phrase)] == phrase:
                dropped[start : start + len(phrase)] = [True] * len(phrase)
    if all(dropped) or not any(dropped):
        return positions
    return positions[~torch.tensor(dropped, device=positions.device)]


def phrase_variants(tokenizer, phrase: str) -> tuple[tuple[int, ...], ...]:
    """The runs of token ids ``phrase`` may take inside a prompt, as ``tokenizer`` writes it.

    A tokenizer writes a phrase differently at the start of a text, after a space and after a
    newline (SentencePiece's word-start marker, BPE's leading-space tokens): each is the phrase
    tokenised after that lead, less the lead's own tokens. A phrase that starts with whitespace is
    also tried without it, since the token before may have absorbed it (``"?\\n"`` is one token to
    some BPEs), which leaves that token in the question.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    variants = set()
    for text in dict.fromkeys((phrase, phrase.lstrip())):
        for lead in _PHRASE_LEADS:
            lead_ids, ids = encode(lead), encode(lead + text)
            if ids[: len(lead_ids)] == lead_ids and len(ids) > len(lead_ids):
                variants.add(tuple(ids[len(lead_ids) :]))
    return tuple(sorted(variants))


@functools.lru_cache(maxsize=8)
def _phrases_ids(checkpoint: str, phrases: tuple[str, ...], use_fast: bool) -> tuple[tuple[int, ...], ...]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=use_fast)
    return tuple(variant for phrase in phrases for variant in phrase_variants(tokenizer, phrase))


def left_out_ids(model, config: PruneConfig, use_fast: bool = True) -> tuple[tuple[int, ...], ...]:
    """The runs of token ids the active method leaves out of its question
    (``text_leaves_out``, ``otprune.contract``): ``()`` where it declares none, else every
    :func:`phrase_variants` of each phrase under the tokenizer of ``model``'s checkpoint
    (``config._name_or_path``; ``use_fast`` as the family's own loader asks), loaded once.

    A tokenizer that cannot be loaded stops the run: pruning with the whole question would give the
    method another text than the one it declares, unseen.
    """
    phrases = config.spec.text_leaves_out
    if not phrases:
        return ()
    checkpoint = getattr(model.config, "_name_or_path", "")
    try:
        return _phrases_ids(checkpoint, phrases, use_fast)
    except Exception as error:
        stop_run(
            config,
            f"BASELINE={config.spec.name} leaves {phrases!r} out of its question, which needs the model's tokenizer; "
            f"it cannot be loaded from the checkpoint {checkpoint!r} ({type(error).__name__}: {error})",
            ValueError,
        )


def repad(keep: torch.Tensor, side: str, *columns: tuple[torch.Tensor, object]):
    """Keep the ``keep`` ``(B, L)`` positions of each row and pad rows to one length on ``side``.

    ``columns``: ``(tensor, fill)`` pairs of shape ``(B, L, ...)``. Returns the new boolean
    attention mask followed by each tensor cut and padded with its ``fill``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right'; got {side!r}")
    batch = keep.shape[0]
    length = int(keep.sum(1).max())
    mask = torch.zeros(batch, length, dtype=torch.bool, device=keep.device)
    outputs = [t.new_full((batch, length, *t.shape[2:]), fill) for t, fill in columns]
    for b in range(batch):
        idx = keep[b].nonzero().flatten()
        target = slice(length - idx.numel(), length) if side == "left" else slice(0, idx.numel())
        mask[b, target] = True
        for out, (t, _) in zip(outputs, columns):
            out[b, target] = t[b, idx.to(t.device)]
    return (mask, *outputs)
