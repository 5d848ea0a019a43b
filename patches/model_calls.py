"""What the transformers-native wrappers (``hf``: LLaVA, LLaVA-NeXT; ``vlm``: Qwen-VL, OneVision)
share about the calls they wrap: the classes wrapped once, a call's arguments by name, the padding
``generate`` implies, and a pruned ``generate``'s output given the caller's whole prompt back."""

from __future__ import annotations

import inspect

import torch

from .splice import padding_mask

__all__ = ["as_keywords", "generation_padding", "with_full_prompt", "wrap_model_classes"]


def wrap_model_classes(names, wrap) -> bool:
    """Replace ``forward`` and ``generate`` of transformers' classes ``names`` (those this version
    has) by ``wrap(original, generating)``, once; False without transformers."""
    try:
        import transformers
    except ImportError:
        return False
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is None or getattr(cls.forward, "otprune_original", None) is not None:
            continue
        cls.forward = wrap(cls.forward, generating=False)
        cls.generate = wrap(cls.generate, generating=True)
    return True


def as_keywords(signature: inspect.Signature, model, args, kwargs) -> dict:
    """Every argument by name (``generate`` calls its first one ``inputs``: that is ``input_ids``)."""
    bound = signature.bind_partial(model, *args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        parameter = signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif name != next(iter(signature.parameters)):
            named[name] = value
    if "inputs" in named and "input_ids" not in named:
        named["input_ids"] = named.pop("inputs")
    return named


def generation_padding(model, kwargs: dict) -> torch.Tensor:
    """``(B, L)`` non-padding positions of a ``generate`` call: the caller's mask, else where
    ``generate`` itself would find padding (its pad token, given or from the generation config).

    The wrappers hand this mask on explicitly: once pruning has cut and re-padded the prompt,
    ``generate`` could no longer infer it.
    """
    config = kwargs.get("generation_config") or model.generation_config
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return padding_mask(kwargs["input_ids"], kwargs.get("attention_mask"), pad, eos)


def with_full_prompt(output, input_ids: torch.Tensor, pruned_length: int):
    """Put the caller's prompt back in front of the generated tokens (callers strip it by length);
    with several sequences per prompt (``num_return_sequences``), in front of each."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences = torch.cat([prompt, sequences[:, pruned_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return sequences
    output.sequences = sequences
    return output
