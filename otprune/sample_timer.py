"""Per-sample latency of one ``generate`` call: time to first token, split into its parts, and decode.

A :class:`SampleTimer` takes marks while the call runs: CUDA events on a GPU (read once, after a
synchronize at the end, so timing never stalls the queue mid-call), ``time.perf_counter`` on a CPU.
Model-agnostic: the adapters in ``patches/`` say when the vision tower starts, when the projector
ends and when each forward ends; :func:`phase` lets the selection time itself while a timer is
active, and does nothing otherwise.

Definitions (what the report's columns mean):

- ``prefill_ms``: the call's start to the end of its first forward (time to first token);
- ``vision_ms``: vision tower + projector, summed over their calls inside the prefill;
- ``selection_ms``: the visual-token selection before the LLM (``select_per_image``); FastV/VTW
  prune inside the LLM, so theirs is part of ``llm_prefill_ms``;
- ``llm_prefill_ms``: ``prefill_ms - vision_ms - selection_ms`` (the LLM's prefill and the glue);
- ``generated_tokens``: forwards in the call, one per new token (with beams or a batch, per step);
- ``decode_ms``: end of the first forward to the call's end;
  ``decode_ms_per_token = decode_ms / (generated_tokens - 1)``, the tokens after the first
  (``None`` when only one was generated).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import statistics
import time

import torch

__all__ = ["TIMING_PREFIX", "SampleTimer", "active_timer", "phase", "running", "spread", "timing_line"]

TIMING_PREFIX = "otprune timing "

_active: contextvars.ContextVar[SampleTimer | None] = contextvars.ContextVar("otprune_timer", default=None)


class SampleTimer:
    """Marks of one ``generate`` call on ``device`` (CUDA events there, ``perf_counter`` elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.start = self._mark()
        self.first_forward_end = None
        self.forwards = 0
        self.intervals: dict[str, list[tuple]] = {"vision": [], "selection": []}
        self._open: dict[str, object] = {}

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def begin(self, name: str) -> None:
        self._open[name] = self._mark()

    def end(self, name: str) -> None:
        if name in self._open:
            self.intervals[name].append((self._open.pop(name), self._mark()))

    def forward_done(self) -> None:
        self.forwards += 1
        if self.first_forward_end is None:
            self.first_forward_end = self._mark()

    def finish(self) -> dict:
        """The call's record (see the module's definitions); ``None`` fields where nothing ran."""
        stop = self._mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.first_forward_end is None:
            return {
                "generated_tokens": 0,
                "prefill_ms": None,
                "vision_ms": None,
                "selection_ms": None,
                "llm_prefill_ms": None,
                "decode_ms": None,
                "decode_ms_per_token": None,
            }
        prefill = self._ms(self.start, self.first_forward_end)
        vision = sum(self._ms(a, b) for a, b in self.intervals["vision"])
        selection = sum(self._ms(a, b) for a, b in self.intervals["selection"])
        decode = self._ms(self.first_forward_end, stop)
        return {
            "generated_tokens": self.forwards,
            "prefill_ms": prefill,
            "vision_ms": vision,
            "selection_ms": selection,
            "llm_prefill_ms": prefill - vision - selection,
            "decode_ms": decode,
            "decode_ms_per_token": decode / (self.forwards - 1) if self.forwards > 1 else None,
        }


@contextlib.contextmanager
def active_timer(timer: SampleTimer):
    """Make ``timer`` the one :func:`phase` reports to for the duration of the block."""
    token = _active.set(timer)
    try:
        yield timer
    finally:
        _active.reset(token)


def running() -> bool:
    """Whether a timer is active (a call already being timed)."""
    return _active.get() is not None


@contextlib.contextmanager
def phase(name: str):
    """Time the block as ``name`` on the active timer; a no-op without one (timing off)."""
    timer = _active.get()
    if timer is None:
        yield
        return
    timer.begin(name)
    try:
        yield
    finally:
        timer.end(name)


def timing_line(record: dict) -> str:
    """The log line the harness parses: ``TIMING_PREFIX`` + the record as one-line JSON."""
    return TIMING_PREFIX + json.dumps(record, sort_keys=True)


def spread(values) -> tuple[float, float, float] | None:
    """``(p25, median, p75)`` of ``values`` (linear interpolation between order statistics, as
    numpy's default percentile); ``None`` when empty, ``None`` values left out."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if len(data) == 1:
        return data[0], data[0], data[0]
    p25, median, p75 = statistics.quantiles(data, n=4, method="inclusive")
    return p25, median, p75
