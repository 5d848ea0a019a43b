"""Times every ``generate`` of the supported classes while ``OTPRUNE_LOG=1``: one log line per call
(``otprune.sample_timer``'s record: time to first token split into vision, selection and LLM prefill,
generated tokens, decode time per token, and the GPU's peak allocated memory on a GPU).

Installed after the pruning wrappers, so the selection falls inside the timed call. Nothing here
changes what the model computes: the hooks only take marks, so an unpruned model's outputs are the
same with timing on as without it. A timed call inside another (a class whose ``generate`` was
wrapped twice) passes through, so each call is logged once.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from otprune.sample_timer import SampleTimer, active_timer, running, timing_line

from . import hf, llava, vlm

ORIGINAL_LLAVA_CLASSES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")

logger = logging.getLogger("otprune")
# By identity: functools.wraps copies a wrapper's attributes to whatever wraps it later.
_timed_functions: set = set()


def install() -> None:
    """Wrap ``generate`` of every supported class that is importable here (outermost)."""
    for cls in _classes():
        if cls.generate not in _timed_functions:
            cls.generate = _timed(cls.generate)
            _timed_functions.add(cls.generate)


def _classes() -> list[type]:
    classes = []
    for module, names in (("transformers", hf.CLASS_NAMES + vlm.CLASS_NAMES), ("llava.model", ORIGINAL_LLAVA_CLASSES)):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        classes += [c for c in (getattr(found, name, None) for name in names) if c is not None]
    return classes


def _vision_modules(model) -> tuple:
    from . import _is_original_llava

    if _is_original_llava(model):
        return llava.vision_modules(model)
    if type(model).__name__ in hf.CLASS_NAMES:
        return hf.vision_modules(model)
    return vlm.vision_modules(model)


def _timed(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        from . import active_config

        if not active_config(self).log or running():
            return original(self, *args, **kwargs)
        device = next(self.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = SampleTimer(device)
        handles = [self.register_forward_hook(lambda *_: timer.forward_done())]
        first, last = _vision_modules(self)
        if first is not None:
            handles += [first.register_forward_pre_hook(lambda *_: timer.begin("vision")), last.register_forward_hook(lambda *_: timer.end("vision"))]
        try:
            with active_timer(timer):
                output = original(self, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        record = timer.finish()
        if device.type == "cuda":
            record["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        logger.info(timing_line(record))
        return output

    return generate
