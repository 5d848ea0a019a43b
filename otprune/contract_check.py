"""The contract battery: synthetic checks of any selector or merger against ``otprune.contract``.

``run_battery(method)`` calls a :class:`otprune.methods.Method`'s function on seeded random tokens
(``N = 64`` as one 8 x 8 patch grid, ``d = 32``, budget ``k = 16``) and returns one
:class:`CheckResult` per check, validated with ``kept_indices_fault`` / ``merge_fault``. The
context a method asks for is made up here: ``text`` ``(5, d)`` random, ``grid``
``(PatchGrid(0, 8, 8),)``, ``attention`` ``(N,)``, ``text_attention`` ``(T, N)`` and ``visual_attention`` ``(N, N)`` softmaxes of random logits, ``layer_index`` 2;
``vision`` a :class:`otprune.contract.VisionContext` made as the contract defines it from seeded
random queries and keys of a [CLS] and the N patches (``VISION_HEADS`` heads over ``VISION_WIDTH``
= ``d`` channels; two blocks, one for the per-head fields and one for the full-width ones), its
``features`` the tokens themselves (float32) and ``cls_feature`` a random ``(d,)``; ``adaptive``
``False`` (the budget ``k``) but in the ``adaptive`` check.

Checks (``CHECKS``):

- ``basic``: one float32 image gives a valid answer, and the tokens are left as they were.
- ``batch``: a selector with ``accepts_batches`` answers a ``(3, N, d)`` batch with ``(3, k)``
  indices, each row the image's own single-image answer. Skipped for the others, for mergers,
  and for methods asking for per-image context (``text``, ``attention``, ``grid``), which are
  called one image at a time.
- ``dtypes``: float16, bfloat16, float32 and float64 tokens each give a valid answer (a merger's
  merged tokens keep the input dtype).
- ``extreme-scales``: float32 tokens times 1e20 and times 1e-20 give valid answers; whether the
  picks equal the unscaled ones is reported, never failed.
- ``k-bounds``: k = 1 and k = N give valid answers; a selector at k = N keeps every index.
- ``determinism``: two calls on the same input give identical answers.
- ``device``: the answer is on the device of the tokens (skipped for CUDA without CUDA).
- ``no-grad``: tokens that require a gradient give a valid answer that carries none.
- ``nan-refused``: tokens with one NaN entry are refused with a ``ValueError`` (or ``TypeError``);
  an answer is a failure ("accepted NaN"), and so is any other exception, which refuses NaN only
  by accident.
- ``schedule``: a selector that names several stages (``select.stages``) makes a valid schedule
  (``otprune.schedule.check_stages``) from the options given (``SUBSET_RATIO`` 0.5 where it takes
  one); skipped, naming what it lacks, when it needs options none of which were given (FITPRUNE's
  recipe).
- ``adaptive``: a method asking for ``adaptive`` gets ``adaptive=True`` and ``k = N`` and must
  answer validly with a count of its choice, ``1 <= m <= N`` (a selector ``(m,)`` indices); the
  counts of three images are reported. Skipped for the others.
- ``host-sync`` (CUDA only): synchronisations of one warmed-up call counted with
  ``torch.cuda.set_sync_debug_mode("warn")``; more than one (the built-ins' budget: their
  finiteness check) fails.

An unexpected exception inside a check is that check's failure, naming the exception; the
battery itself never raises for what the method does.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from otprune.contract import PER_IMAGE_CONTEXT, PatchGrid, VisionContext, kept_indices_fault, merge_fault
from otprune.schedule import check_stages

__all__ = ["BUDGET", "CHECKS", "DIM", "GRID", "HOST_SYNC_BUDGET", "N_TOKENS", "CheckResult", "run_battery", "synthetic_vision"]

GRID = PatchGrid(0, 8, 8)
N_TOKENS = GRID.size
DIM = 32
BUDGET = 16
TEXT_TOKENS = 5
LAYER_INDEX = 2
BATCH = 3
SCALES = (1e20, 1e-20)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HOST_SYNC_BUDGET = 1
VISION_HEADS = 4
VISION_WIDTH = DIM
CHECKS = (
    "basic",
    "batch",
    "dtypes",
    "extreme-scales",
    "k-bounds",
    "determinism",
    "device",
    "no-grad",
    "nan-refused",
    "adaptive",
    "host-sync",
    "schedule",
)
SCHEDULE_RATIO = 0.5
_DETAIL_LIMIT = 300


@dataclass(frozen=True)
class CheckResult:
    """One check: ``status`` ``"pass"``, ``"fail"`` or ``"skip"``; ``detail`` the fault, the reason
    for skipping, or what was seen."""

    name: str
    status: str
    detail: str = ""


class _Fault(Exception):
    """A check's failure, raised inside the check and turned into its result."""


class _Skip(Exception):
    """A check that does not apply, with why."""


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _tokens(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(..., N)``: ``softmax(q_cls . k / sqrt(width))`` over [CLS] and patches, [CLS] column dropped;
    ``q``, ``k`` ``(..., N + 1, width)`` with [CLS] first."""
    logits = (k @ q[..., 0, :, None])[..., 0] / q.shape[-1] ** 0.5
    return torch.softmax(logits, dim=-1)[..., 1:]


def synthetic_vision(features: torch.Tensor, seed: int = 20, heads: int = VISION_HEADS, width: int = VISION_WIDTH) -> VisionContext:
    """A :class:`VisionContext` for ``features`` ``(N, C_v)`` made as the contract defines it from
    seeded random queries and keys ``(N + 1, width)`` ([CLS] first) of two blocks: the block
    producing the features gives ``head_attention`` (per head of ``width / heads`` channels) and
    ``head_keys`` (mean over heads); the next block gives ``cls_attention`` (one head over the full
    width) and ``keys``. ``cls_feature`` is random ``(C_v,)``. All float32, on the CPU."""
    n, c_v = features.shape
    head_dim = width // heads
    q_feature, k_feature, q_next, k_next = (_tokens(seed + i, (n + 1, width)) for i in range(4))
    per_head_q = q_feature.view(n + 1, heads, head_dim).transpose(0, 1)
    per_head_k = k_feature.view(n + 1, heads, head_dim).transpose(0, 1)
    return VisionContext(
        features=features.detach().float().cpu(),
        cls_attention=_cls_attention(q_next, k_next),
        keys=k_next[1:],
        head_attention=_cls_attention(per_head_q, per_head_k),
        head_keys=per_head_k[:, 1:].mean(0),
        cls_feature=_tokens(seed + 4, (c_v,)),
    )


def _vision_on(vision: VisionContext, device: torch.device) -> VisionContext:
    moved = {name: getattr(vision, name).to(device) for name in ("features", "cls_attention", "keys", "head_attention", "head_keys", "cls_feature")}
    return VisionContext(**moved)


class _Battery:
    def __init__(self, method, device: torch.device, options: dict):
        self.method = method
        self.device = device
        # The function's options go to every call; its schedule's only to ``stages``.
        self.options = {name: value for name, value in options.items() if name in method.options}
        self.stage_options = {name: value for name, value in options.items() if name in method.stage_options}
        self.merger = method.kind == "merger"
        self.image = _tokens(0, (N_TOKENS, DIM)).to(device)
        # Made once in float32 on the host, then cast: the same context whatever the dtype.
        self.text = _tokens(1, (TEXT_TOKENS, DIM))
        self.attention = torch.softmax(_tokens(2, (N_TOKENS,)), dim=0)
        self.text_attention = torch.softmax(_tokens(3, (TEXT_TOKENS, N_TOKENS)), dim=1)
        self.visual_attention = torch.softmax(_tokens(4, (N_TOKENS, N_TOKENS)), dim=1)
        # Before the projector the tokens are the tower's features; after it, other vectors.
        features = self.image.cpu() if method.before_projector else _tokens(5, (N_TOKENS, DIM))
        self.vision = synthetic_vision(features)

    # -- calling and validating ---------------------------------------------------------------

    def context(self, tokens: torch.Tensor) -> dict:
        given = {}
        for name in self.method.context:
            if name == "text":
                given[name] = self.text.to(device=tokens.device, dtype=tokens.dtype)
            elif name in ("attention", "text_attention", "visual_attention"):
                given[name] = getattr(self, name).to(device=tokens.device, dtype=tokens.dtype)
            elif name == "grid":
                given[name] = (GRID,)
            elif name == "layer_index":
                given[name] = LAYER_INDEX
            elif name == "vision":
                given[name] = _vision_on(self.vision, tokens.device)
            elif name == "adaptive":
                given[name] = False
        return given

    def call(self, tokens: torch.Tensor, k: int = BUDGET, **overrides):
        return self.method.function(tokens, k, **{**self.context(tokens), **overrides}, **self.options)

    def fault(self, answer, tokens: torch.Tensor, k: int, batch: int | None = None) -> str | None:
        n = tokens.shape[-2]
        if self.merger:
            return merge_fault(answer, n, k, tokens.detach())
        return kept_indices_fault(answer, n, k, tokens.device, batch=batch)

    def valid(self, tokens: torch.Tensor, k: int = BUDGET, label: str = ""):
        """The answer for ``tokens``, or a ``_Fault`` saying what is wrong with it."""
        prefix = f"{label}: " if label else ""
        try:
            answer = self.call(tokens, k)
        except Exception as error:
            raise _Fault(f"{prefix}raised {_describe(error)}") from None
        fault = self.fault(answer, tokens, k)
        if fault is not None:
            raise _Fault(prefix + fault)
        return answer

    def picks(self, answer) -> torch.Tensor:
        return answer[1] if self.merger else answer

    def same(self, a, b) -> bool:
        if self.merger:
            return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        return torch.equal(a, b)

    # -- the checks -------------------------------------------------------------------------

    def basic(self) -> str:
        tokens = self.image.clone()
        answer = self.valid(tokens)
        if not torch.equal(tokens, self.image):
            raise _Fault("modified the tokens in place")
        if self.merger:
            return f"{answer[0].shape[0]} merged tokens at positions {answer[1].tolist()}"
        return f"kept {answer.tolist()}"

    def batch(self) -> str:
        if self.merger:
            raise _Skip("a merger is called one image at a time")
        if not self.method.accepts_batches:
            raise _Skip("called one image at a time (no accepts_batches = True)")
        asked = [name for name in self.method.context if name in PER_IMAGE_CONTEXT]
        if asked:
            raise _Skip(f"asks for per-image context ({', '.join(asked)}): called one image at a time")
        images = torch.stack([self.image, *(_tokens(10 + i, (N_TOKENS, DIM)).to(self.device) for i in range(BATCH - 1))])
        try:
            answer = self.call(images)
        except Exception as error:
            raise _Fault(f"({BATCH}, {N_TOKENS}, {DIM}) batch raised {_describe(error)}") from None
        fault = kept_indices_fault(answer, N_TOKENS, BUDGET, images.device, batch=BATCH)
        if fault is not None:
            raise _Fault(f"({BATCH}, {N_TOKENS}, {DIM}) batch: {fault}")
        for i in range(BATCH):
            single = self.valid(images[i].clone(), label=f"image {i} alone")
            if not torch.equal(answer[i], single):
                raise _Fault(f"image {i}'s row of the batch answer {answer[i].tolist()} differs from its own answer {single.tolist()}")
        return f"({BATCH}, {BUDGET}) answer, each row its image's own"

    def dtypes(self) -> str:
        faults = []
        for dtype in DTYPES:
            name = str(dtype).removeprefix("torch.")
            try:
                self.valid(self.image.to(dtype), label=name)
            except _Fault as fault:
                faults.append(str(fault))
        if faults:
            raise _Fault("; ".join(faults))
        return ", ".join(str(dtype).removeprefix("torch.") for dtype in DTYPES)

    def extreme_scales(self) -> str:
        base = self.picks(self.valid(self.image))
        faults, seen = [], []
        for scale in SCALES:
            try:
                answer = self.valid(self.image * scale, label=f"tokens x {scale:g}")
            except _Fault as fault:
                faults.append(str(fault))
                continue
            same = torch.equal(self.picks(answer).cpu(), base.cpu())
            seen.append(f"x {scale:g}: {'same' if same else 'different'} picks")
        if faults:
            raise _Fault("; ".join(faults))
        return "; ".join(seen) + " (for information)"

    def k_bounds(self) -> str:
        self.valid(self.image, 1, label="k = 1")
        answer = self.valid(self.image, N_TOKENS, label=f"k = N = {N_TOKENS}")
        if self.merger:
            return f"k = N gave {answer[0].shape[0]} merged tokens"
        if not torch.equal(answer.cpu(), torch.arange(N_TOKENS)):
            raise _Fault(f"k = N = {N_TOKENS} did not keep every index: {answer.tolist()}")
        return "k = N keeps every index"

    def determinism(self) -> str:
        first = self.valid(self.image, label="first call")
        second = self.valid(self.image, label="second call")
        if not self.same(first, second):
            raise _Fault("two calls on the same input gave different answers")
        return "identical answers"

    def device_check(self) -> str:
        answer = self.valid(self.image)
        return f"answer on {self.picks(answer).device}"

    def no_grad(self) -> str:
        tokens = self.image.clone().requires_grad_(True)
        self.valid(tokens, label="tokens requiring grad")
        return "answer carries no gradient"

    def nan_refused(self) -> str:
        tokens = self.image.clone()
        tokens[N_TOKENS // 2, DIM // 2] = float("nan")
        try:
            self.call(tokens)
        except (ValueError, TypeError) as error:
            return f"refused with {_describe(error)}"
        except Exception as error:
            raise _Fault(f"raised {_describe(error)}: refuse NaN or Inf tokens on purpose, with a ValueError") from None
        raise _Fault("accepted NaN: returned an answer for tokens holding a NaN")

    def adaptive(self) -> str:
        if "adaptive" not in self.method.context:
            raise _Skip("does not ask for adaptive: runs need a ratio")
        counts = []
        for seed in (0, 10, 11):
            tokens = self.image if seed == 0 else _tokens(seed, (N_TOKENS, DIM)).to(self.device)
            if "vision" in self.method.context and seed:
                features = tokens.cpu() if self.method.before_projector else _tokens(5 + seed, (N_TOKENS, DIM))
                vision = {"vision": _vision_on(synthetic_vision(features, seed=20 + 10 * seed), tokens.device)}
            else:
                vision = {}
            try:
                answer = self.call(tokens.clone(), N_TOKENS, adaptive=True, **vision)
            except Exception as error:
                raise _Fault(f"adaptive=True, k = N = {N_TOKENS}, image {seed}: raised {_describe(error)}") from None
            if self.merger:
                fault = merge_fault(answer, N_TOKENS, N_TOKENS, tokens)
                count = answer[0].shape[0] if fault is None else None
            else:
                shape_ok = isinstance(answer, torch.Tensor) and answer.dim() == 1 and 1 <= answer.shape[0] <= N_TOKENS
                count = answer.shape[0] if shape_ok else None
                fault = (
                    kept_indices_fault(answer, N_TOKENS, count, tokens.device)
                    if shape_ok
                    else f"returned {tuple(answer.shape) if isinstance(answer, torch.Tensor) else type(answer).__name__}, not (m,) with 1 <= m <= N = {N_TOKENS}"
                )
            if fault is not None:
                raise _Fault(f"adaptive=True, image {seed}: {fault}")
            counts.append(count)
        return f"adaptive counts {counts} of N = {N_TOKENS}"

    def host_sync(self) -> str:
        tokens = self.image
        self.valid(tokens, label="warm-up call")
        torch.cuda.synchronize(self.device)
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                answer = self.call(tokens)
            except Exception as error:
                raise _Fault(f"raised {_describe(error)}") from None
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        fault = self.fault(answer, tokens, BUDGET)
        if fault is not None:
            raise _Fault(fault)
        count = sum("synchroniz" in str(warning.message) for warning in caught)
        text = f"{count} host synchronisation{'' if count == 1 else 's'} in one call (budget {HOST_SYNC_BUDGET})"
        if count > HOST_SYNC_BUDGET:
            raise _Fault(text)
        return text

    def schedule(self) -> str:
        stages = self.method.stages
        if stages is None:
            raise _Skip("no schedule of its own: one stage (LAYER_INDEX, SUBSET_RATIO)")
        given = dict(self.stage_options)
        if "ratio" in inspect.signature(stages).parameters:
            given["ratio"] = SCHEDULE_RATIO
        try:
            made = check_stages(stages(**given), self.method.name)
        except Exception as error:
            if not self.stage_options:
                raise _Skip(f"not made without its options (give them with --options): {_describe(error)}") from None
            raise _Fault(f"no schedule from {given}: {_describe(error)}") from None
        return ", ".join(f"{stage.kept:.3g} kept from layer {stage.layer}" for stage in made)


def _resolve_device(device) -> tuple[torch.device, str | None]:
    """The device the checks run on, and why CUDA checks skip (``None``: they run)."""
    wanted = torch.device(device)
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            return torch.device("cpu"), "no CUDA (cuda requested; the other checks ran on the CPU)"
        if wanted.index is None:
            wanted = torch.device("cuda", torch.cuda.current_device())
        return wanted, None
    if wanted.type != "cpu":
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    return wanted, "no CUDA: runs on CUDA only (--device cuda)"


def run_battery(method, device="cpu", options: dict | None = None) -> list[CheckResult]:
    """Every check of ``CHECKS`` on ``method`` (an ``otprune.methods.Method`` of kind selector or
    merger), on ``device`` (``"cpu"`` or ``"cuda"``; CUDA requested without CUDA runs on the CPU
    and skips ``device`` and ``host-sync``). ``options``: keyword options passed on every call,
    which must cover the method's required ones."""
    if method.kind not in ("selector", "merger") or method.function is None:
        raise ValueError(f"{method.name} acts inside the LLM and has no standalone function to check")
    options = dict(options or {})
    unknown = sorted(set(options) - set(method.all_options))
    if unknown:
        raise ValueError(f"{method.name} takes no option {', '.join(unknown)}; its options: {', '.join(method.all_options) or 'none'}")
    missing = [name for name in method.required if name not in options]
    if missing:
        raise ValueError(f"{method.name} needs the option(s) {', '.join(missing)}, which have no default")
    run_on, cuda_skip = _resolve_device(device)
    battery = _Battery(method, run_on, options)
    steps: dict[str, Callable[[], str]] = {
        "basic": battery.basic,
        "batch": battery.batch,
        "dtypes": battery.dtypes,
        "extreme-scales": battery.extreme_scales,
        "k-bounds": battery.k_bounds,
        "determinism": battery.determinism,
        "device": battery.device_check,
        "no-grad": battery.no_grad,
        "nan-refused": battery.nan_refused,
        "adaptive": battery.adaptive,
        "host-sync": battery.host_sync,
        "schedule": battery.schedule,
    }
    results = []
    for name in CHECKS:
        if name == "host-sync" and cuda_skip is not None:
            results.append(CheckResult(name, "skip", cuda_skip))
            continue
        if name == "device" and cuda_skip is not None and torch.device(device).type == "cuda":
            results.append(CheckResult(name, "skip", cuda_skip))
            continue
        try:
            results.append(CheckResult(name, "pass", steps[name]()))
        except _Skip as skip:
            results.append(CheckResult(name, "skip", str(skip)))
        except _Fault as fault:
            results.append(CheckResult(name, "fail", str(fault)))
        except Exception as error:  # the battery's own step around the call went wrong
            results.append(CheckResult(name, "fail", f"raised {_describe(error)}"))
    return results
