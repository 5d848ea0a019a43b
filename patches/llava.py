"""The original LLaVA (``llava-torch``): prune inside ``prepare_inputs_labels_for_multimodal``.

LLaVA's own method still builds the spliced sequence, so every model variant it handles (1.5,
1.6 anyres with unpadding and newline vectors, any padding side) is handled the same way here.
To learn where each image's tokens landed, the call passes, in place of the labels, each input
position's index: the output then holds, per position, the input token it came from, or
``IGNORE_INDEX`` where a visual token (or padding) sits. The caller's labels are mapped back
through those indices afterwards.

``LAYER_INDEX = 0``: the visual tokens not kept are removed from the sequence here (VTW keeps
none: the LLM gets the prompt without its image); the kept ones keep their order, the sequence
is re-padded on the model's padding side and positions are renumbered, as LLaVA numbers any
sequence. ``K > 0``: the sequence is left whole and the positions of its visual tokens are
handed to the layer hooks (``layers.py``).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from otprune.config import PruneConfig
from otprune.prune import select_per_image

from .layers import PrefillState, attach_state
from .splice import IGNORE_INDEX, question_positions, repad

IMAGE_TOKEN_INDEX = -200

# The modules of llava-torch 1.2.2 that define a causal LM (imported one by one: the package's
# own __init__ swallows import errors).
_LANGUAGE_MODELS = {
    "llava.model.language_model.llava_llama": "LlavaLlamaForCausalLM",
    "llava.model.language_model.llava_mistral": "LlavaMistralForCausalLM",
    "llava.model.language_model.llava_mpt": "LlavaMptForCausalLM",
}


def install_cache_keyword() -> list[str]:
    """Let the original LLaVA's causal LMs take transformers 5.24's ``cache=``; the classes patched.

    transformers 5.24 renamed the key-value cache argument ``past_key_values`` to ``cache``, and
    its ``generate`` passes ``cache=`` to ``forward``. llava-torch's ``forward`` names only
    ``past_key_values`` (and ends in a ``TypeError``), so every original-LLaVA run, unpruned
    included, broke. The wrapper hands ``cache`` on under the old name, which LLaVA's own
    ``prepare_inputs_labels_for_multimodal`` also reads (a cache means a decode step) and which
    transformers still accepts, deprecated, from LLaVA's call of its parent. Older transformers
    never pass ``cache``, so there the wrapper changes nothing.
    """
    patched = []
    for module_name, class_name in _LANGUAGE_MODELS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if getattr(cls.forward, "otprune_cache_keyword", False):
            patched.append(class_name)
            continue
        cls.forward = _forward_taking_cache(cls.forward)
        patched.append(class_name)
    return patched


def _forward_taking_cache(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, cache=None, **kwargs):
        if cache is not None:
            if kwargs.get("past_key_values") is not None:
                raise TypeError("LLaVA's forward got both cache= and past_key_values=; pass one of them")
            kwargs["past_key_values"] = cache
        return forward(self, *args, **kwargs)

    # What transformers reads of forward's signature must show ``cache`` too (wraps copies the old one).
    signature = inspect.signature(forward)
    cache = inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), cache])
    wrapper.otprune_cache_keyword = True
    return wrapper


def install() -> bool:
    """Replace ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal``; False if no LLaVA."""
    try:
        from llava.model.llava_arch import LlavaMetaForCausalLM
    except ImportError:
        return False
    install_cache_keyword()
    original = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal
    if getattr(original, "otprune_original", None) is not None:
        return True

    @functools.wraps(original)
    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        from . import active_config, check_model

        config = active_config(self)
        check_model(self, config)
        prefill = images is not None and input_ids is not None and input_ids.shape[1] > 1
        if not config.enabled or not prefill or self.get_vision_tower() is None:
            # A new prompt without images ends the previous prompt's pruning; a decode step
            # (one new token) keeps it, so layer hooks still cut the mask columns they dropped.
            if prefill or (input_ids is not None and input_ids.shape[1] > 1):
                _set_state(self, config, None)
            return original(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        return _prepare_pruned(
            original, self, config, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
        )

    prepare_inputs_labels_for_multimodal.otprune_original = original
    LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
    return True


def decoder(model):
    """The decoder stack (``.layers``, ``.norm``) of an original-LLaVA model."""
    return model.get_model()


def vision_modules(model) -> tuple:
    """The modules the image passes first and last before the LLM (vision tower, projector), for timing."""
    return model.get_model().get_vision_tower(), model.get_model().mm_projector


def _set_state(model, config: PruneConfig, state: PrefillState | None) -> None:
    attach_state(model, config, decoder(model), state)


def _visual_spans(visual: torch.Tensor, sources: torch.Tensor, input_ids: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's ``(start, end)`` in one output row; adjacent images share a run, split evenly."""
    positions = visual.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    spans = []
    for start, end in runs:
        before = int(sources[start - 1]) if start > 0 and sources[start - 1] >= 0 else -1
        after = int(sources[end]) if end < len(sources) and sources[end] >= 0 else len(input_ids)
        n_images = max(1, int((input_ids[before + 1 : after] == IMAGE_TOKEN_INDEX).sum()))
        if (end - start) % n_images:
            raise ValueError(
                f"{n_images} adjacent images share {end - start} visual tokens that do not split evenly; "
                "put text (e.g. a newline) between <image> placeholders"
            )
        size = (end - start) // n_images
        spans += [(s, s + size) for s in range(start, end, size)]
    return spans


def _prepare_pruned(
    original, model, config, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
):
    batch, length = input_ids.shape
    mask_in = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    markers = torch.arange(length, device=input_ids.device).expand(batch, length).clone()
    _, positions, mask_out, past_key_values, embeds, sources = original(
        model, input_ids, position_ids, mask_in, past_key_values, markers, images, image_sizes
    )
    valid = mask_out.bool()
    visual = valid & (sources == IGNORE_INDEX)
    spans, text_after = [], []
    for b in range(batch):
        row_spans = _visual_spans(visual[b], sources[b], input_ids[b])
        spans.append(row_spans)
        text_after.append(question_positions(row_spans, valid[b] & ~visual[b]))

    def restore_labels(kept_sources: torch.Tensor) -> torch.Tensor | None:
        if labels is None:
            return None
        mapped = labels.gather(1, kept_sources.clamp_min(0))
        return mapped.masked_fill(kept_sources < 0, IGNORE_INDEX)

    def caller_mask(mask: torch.Tensor):
        return None if attention_mask is None else mask.to(attention_mask.dtype)

    if config.layer_index > 0:
        _set_state(model, config, PrefillState(spans=spans, valid=valid, text_after=text_after))
        return None, (None if position_ids is None else positions), caller_mask(mask_out), past_key_values, embeds, restore_labels(sources)

    images_tokens = [embeds[b, s:e] for b in range(batch) for s, e in spans[b]]
    questions = [embeds[b, idx] for b in range(batch) for idx in text_after[b]] if config.method == "TRIM" else None
    chosen = iter(select_per_image(config, images_tokens, questions))
    keep = valid & ~visual
    for b in range(batch):
        for start, _ in spans[b]:
            keep[b, start + next(chosen)] = True
    side = getattr(model.config, "tokenizer_padding_side", "right")
    new_mask, new_embeds, new_sources = repad(keep, side, (embeds, 0), (sources, IGNORE_INDEX))
    new_positions = None
    if position_ids is not None:
        new_positions = (new_mask.long().cumsum(1) - 1).clamp_min(0).masked_fill(~new_mask, 0).to(positions.dtype)
    return None, new_positions, caller_mask(new_mask), past_key_values, new_embeds, restore_labels(new_sources)
