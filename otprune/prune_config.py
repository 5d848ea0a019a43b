"""What to prune, read from the environment (or given in code) and checked before any model loads.

Variables (names as in the reference code; values case-insensitive):

- ``BASELINE``: a ``SELECTORS`` name (``OURS``, ``DIVPRUNE``, ...), ``FASTV``, ``VTW``, or the
  name of an installed plugin selector or merger (``otprune.methods``); unset or ``ORIG`` means no
  pruning.
- ``SUBSET_RATIO``: kept fraction of each image's visual tokens, in (0, 1]; required with every
  method except ``VTW`` (which keeps none).
- ``LAYER_INDEX``: prune before decoder layer K >= 0 (default 0: before the LLM; 2 for ``FASTV``,
  4 for ``VTW``). ``VTW`` at K = 0 withdraws every visual token before the LLM: the no-image control.
- ``OTPRUNE_GAMMA``, ``OTPRUNE_SEED``, ``OTPRUNE_STP_ALPHA``, ``OTPRUNE_TRIM_KEEP_RATIO``,
  ``OTPRUNE_GREEDY`` (``host``, ``batched`` or ``triton``: how OURS and DPP run their greedy):
  selector options; ``OTPRUNE_OPTIONS``: any method's options as a JSON object (``{"gamma": 0.1}``),
  checked against its signature; ``OTPRUNE_LOG=1`` logs tokens before/after and the selector's time per sample,
  and each generate call's timing (``otprune.sample_timer``), with pruning on or off;
  ``OTPRUNE_OT=1`` adds each image's empirical OT distance (kept vs full set) to that line;
  ``OTPRUNE_DUMP=DIR`` saves each image's visual tokens as ``.pt``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from otprune.checks import check_unit_interval
from otprune.contract import ATTENTION_CONTEXT
from otprune.methods import Method, get_method, method_names
from otprune.schedule import Stage, check_stages
from otprune.selectors import check_gamma, check_greedy_path, check_seed

__all__ = ["OPTION_VARIABLES", "PruneConfig", "check_runnable_here", "config_from_env", "default_layer_index"]

# Defaults of K for the methods that only act inside the LLM. VTW's is a **choice**: the K the
# paper's Table 1 uses for LLaVA-1.5 (configs/paper_table1.yaml), a per-model setting there.
DEFAULT_LAYERS = {"FASTV": 2, "VTW": 4}


def default_layer_index(method: str | None) -> int:
    """``LAYER_INDEX`` when none is given: 0 (before the LLM) except for FASTV and VTW."""
    return DEFAULT_LAYERS.get(method.upper() if isinstance(method, str) else method, 0)


# OTPRUNE_* variable -> (selector option, parser)
OPTION_VARIABLES = {
    "OTPRUNE_GAMMA": ("gamma", float),
    "OTPRUNE_SEED": ("seed", int),
    "OTPRUNE_STP_ALPHA": ("alpha", float),
    "OTPRUNE_TRIM_KEEP_RATIO": ("keep_ratio", float),
    "OTPRUNE_GREEDY": ("greedy", str),
}
_FLAG_VARIABLES = ("OTPRUNE_LOG", "OTPRUNE_OT", "OTPRUNE_DUMP")
OPTIONS_VARIABLE = "OTPRUNE_OPTIONS"


def _check_greedy_path(value) -> str:
    try:
        return check_greedy_path(value)
    except (ValueError, ImportError) as error:
        raise ValueError(f"OTPRUNE_GREEDY={value!r} is not allowed: {error}") from None


_OPTION_CHECKS = {
    "gamma": lambda v: check_gamma(v, "OTPRUNE_GAMMA (gamma)"),
    "seed": lambda v: check_seed(v, "OTPRUNE_SEED (seed)"),
    "alpha": lambda v: check_unit_interval(v, "OTPRUNE_STP_ALPHA (alpha)", closed_low=True),
    "keep_ratio": lambda v: check_unit_interval(v, "OTPRUNE_TRIM_KEEP_RATIO (keep_ratio)", closed_low=False),
    "greedy": _check_greedy_path,
}


@dataclass(frozen=True)
class PruneConfig:
    """One pruning setting. ``method=None`` is the unpruned model.

    ``from_environment``: read from the environment (``config_from_env``), where a fault found while
    the model runs stops the process (``SystemExit``), since lmms-eval would swallow an exception.
    """

    method: str | None = None
    ratio: float | None = None
    layer_index: int = 0
    options: Mapping[str, object] = field(default_factory=dict)
    log: bool = False
    record_ot: bool = False
    dump_dir: str | None = None
    from_environment: bool = field(default=False, compare=False)
    # Derived in __post_init__ from the method, ratio, layer index and options.
    stages: tuple[Stage, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self):
        method = self.method.strip().upper() if isinstance(self.method, str) else self.method
        if method == "ORIG":
            method = None
        if method is not None and not isinstance(method, str):
            raise ValueError(f"BASELINE={self.method!r} is not a method; allowed: ORIG, {', '.join(method_names())}")
        object.__setattr__(self, "method", method)
        if method is None:
            return
        spec = get_method(method)
        if method != "VTW" and (spec.stages is None or "ratio" in inspect.signature(spec.stages).parameters):
            if self.ratio is None and "adaptive" not in spec.context:
                raise ValueError(f"BASELINE={method} needs SUBSET_RATIO, a number in (0, 1]; it is not set")
            # A method on the vision tower is refused at K != 0 below, with or without a ratio.
            if self.ratio is None and self.layer_index != 0 and not ("vision" in spec.context or spec.before_projector):
                raise ValueError(
                    f"LAYER_INDEX={self.layer_index} is not allowed with BASELINE={method} and SUBSET_RATIO unset: it chooses "
                    "its own count per image before the LLM (LAYER_INDEX = 0) only; set SUBSET_RATIO to prune inside it"
                )
            if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1):
                raise ValueError(f"SUBSET_RATIO={self.ratio!r} is not allowed; it must be a number in (0, 1]")
        if isinstance(self.layer_index, bool) or not isinstance(self.layer_index, int) or self.layer_index < 0:
            raise ValueError(f"LAYER_INDEX={self.layer_index!r} is not allowed; it must be an integer >= 0")
        _check_options(spec, self.options)
        stages = _stages(spec, self.ratio, self.layer_index, self.options)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "layer_index", stages[0].layer)
        if ("vision" in spec.context or spec.before_projector) and stages[0].layer != 0:
            what = "runs on the vision tower's features" if spec.before_projector else "reads the vision tower's attention (the vision context)"
            raise ValueError(f"LAYER_INDEX={stages[0].layer} is not allowed with BASELINE={method}: it {what}, before the LLM, so K must be 0")
        if ATTENTION_CONTEXT & set(spec.context) and stages[0].layer < 1:
            raise ValueError(
                f"LAYER_INDEX={self.layer_index} is not allowed with BASELINE={method}: it ranks tokens by the attention of layer K-1, so K must be >= 1"
            )

    @property
    def spec(self) -> Method:
        """The method (``otprune.methods.Method``) of a pruning setting."""
        return get_method(self.method)

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def adaptive(self) -> bool:
        """Whether the method chooses each image's count itself (it asks for ``adaptive`` and
        ``SUBSET_RATIO`` is unset): its one stage keeps up to all ``N`` tokens."""
        return self.method is not None and self.ratio is None and "adaptive" in self.spec.context


def _stages(spec: Method, ratio, layer_index: int, options: Mapping[str, object]) -> tuple[Stage, ...]:
    """The method's schedule: its own (``select.stages``; ``LAYER_INDEX`` unset, 0 or its first
    layer), else the one stage ``(LAYER_INDEX, SUBSET_RATIO)`` (VTW: none kept)."""
    if spec.stages is None:
        if spec.name == "VTW":
            return (Stage(layer_index, 0.0),)
        # An adaptive run (no ratio) leaves the count to the method: k = N, the most it may keep.
        return (Stage(layer_index, 1.0 if ratio is None else float(ratio)),)
    given = {name: options[name] for name in spec.stage_options if name in options}
    if "ratio" in inspect.signature(spec.stages).parameters:
        given["ratio"] = ratio
    try:
        raw = spec.stages(**given)
    except Exception as error:
        raise ValueError(f"BASELINE={spec.name}'s schedule cannot be made from {given}: {type(error).__name__}: {error}") from None
    stages = check_stages(raw, spec.name)
    if layer_index not in (0, stages[0].layer):
        raise ValueError(
            f"LAYER_INDEX={layer_index} is not allowed with BASELINE={spec.name}: its schedule prunes at layers "
            f"{[stage.layer for stage in stages]}; leave LAYER_INDEX unset"
        )
    return stages


def _parse_value(name: str, raw: str, kind: type):
    if kind is str:
        return raw.lower()
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not allowed; it must be {what}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name}={raw!r} is not allowed; it must be a finite number")
    return value


def config_from_env(environ: Mapping[str, str] | None = None) -> PruneConfig:
    """Read and check the pruning variables; raise ``ValueError`` naming any bad one."""
    env = os.environ if environ is None else environ
    raw_method = env.get("BASELINE", "").strip()
    method = raw_method.upper() or None
    known = (*OPTION_VARIABLES, *_FLAG_VARIABLES, OPTIONS_VARIABLE)
    unknown = sorted(name for name in env if name.startswith("OTPRUNE_") and name not in known)
    if unknown:
        raise ValueError(f"unknown variable(s) {', '.join(unknown)}; the OTPRUNE_ variables are: {', '.join(known)}")
    raw_ratio = env.get("SUBSET_RATIO", "").strip()
    ratio = _parse_value("SUBSET_RATIO", raw_ratio, float) if raw_ratio else None
    raw_layer = env.get("LAYER_INDEX", "").strip()
    layer_index = _parse_value("LAYER_INDEX", raw_layer, int) if raw_layer else default_layer_index(method)
    options = _options_json(env.get(OPTIONS_VARIABLE, ""))
    takes = () if method in (None, "ORIG") else get_method(method).all_options
    for variable, (option, kind) in OPTION_VARIABLES.items():
        if variable not in env:
            continue
        if option not in takes:
            raise ValueError(
                f"{variable}={env[variable]!r} does not apply to BASELINE={method or 'ORIG'}: it takes no option {option!r} (its options: {', '.join(takes) or 'none'})"
            )
        if option in options:
            raise ValueError(f"option {option!r} is given twice, by {variable} and by {OPTIONS_VARIABLE}; give it once")
        options[option] = _parse_value(variable, env[variable].strip(), kind)
    log, record_ot = _log_flags(env)
    if method in (None, "ORIG"):
        _check_unpruned_setting(ratio, layer_index, options)
        # The log stays on without pruning: unpruned runs are timed too (patches/generate_timing.py).
        return PruneConfig(log=log)
    return PruneConfig(
        method=method,
        ratio=ratio,
        layer_index=layer_index,
        options=options,
        log=log,
        record_ot=record_ot,
        dump_dir=env.get("OTPRUNE_DUMP") or None,
        from_environment=True,
    )


def _check_unpruned_setting(ratio, layer_index, options: Mapping) -> None:
    """No pruning (``BASELINE`` unset or ``ORIG``): a ratio or K given anyway must still be one that
    a method could take (the reference scripts set them on every run), and no option is taken."""
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"SUBSET_RATIO={ratio!r} is not allowed; it must be a number in (0, 1] (BASELINE=ORIG prunes nothing, but the value is checked)")
    if layer_index < 0:
        raise ValueError(f"LAYER_INDEX={layer_index!r} is not allowed; it must be an integer >= 0")
    if options:
        raise ValueError(f"{OPTIONS_VARIABLE} sets {', '.join(options)}, which BASELINE=ORIG does not take: it prunes nothing and has no options")


def _options_json(raw: str) -> dict:
    """``OTPRUNE_OPTIONS``: a JSON object of option values (empty: none)."""
    if not raw.strip():
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{OPTIONS_VARIABLE}={raw!r} is not allowed: it is not JSON ({error}); give an object such as '{{\"gamma\": 0.1}}'") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_VARIABLE}={raw!r} is not allowed; it must be a JSON object of option: value")
    return options


def _check_options(spec: Method, options: Mapping[str, object]) -> None:
    """Options against the method's signature (names), and the built-ins' own ranges (values)."""
    unknown = [name for name in options if name not in spec.all_options]
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} do not apply to BASELINE={spec.name}; it takes: {', '.join(spec.all_options) or 'none'}")
    missing = [name for name in spec.required if name not in options]
    if missing:
        raise ValueError(f"BASELINE={spec.name} needs option(s) {', '.join(missing)}; set them in {OPTIONS_VARIABLE} (a JSON object)")
    if not spec.plugin:
        for name, value in options.items():
            if name in _OPTION_CHECKS:
                _OPTION_CHECKS[name](value)


def _log_flags(env: Mapping[str, str]) -> tuple[bool, bool]:
    """``(log, record_ot)`` from ``OTPRUNE_LOG`` and ``OTPRUNE_OT`` (which implies the log)."""
    flags = {}
    for variable in ("OTPRUNE_LOG", "OTPRUNE_OT"):
        raw = env.get(variable, "0").strip()
        if raw not in ("0", "1", ""):
            raise ValueError(f"{variable}={raw!r} is not allowed; use 1 (on) or 0")
        flags[variable] = raw == "1"
    return flags["OTPRUNE_LOG"] or flags["OTPRUNE_OT"], flags["OTPRUNE_OT"]


def check_runnable_here(config: PruneConfig) -> None:
    """Refuse what this machine cannot do, before any model loads: ``greedy="triton"`` without a
    CUDA GPU (or Triton's interpreter, ``TRITON_INTERPRET=1``), an ``OTPRUNE_DUMP`` folder that
    cannot be written. Kept apart from parsing, which also reads settings recorded elsewhere."""
    if config.options.get("greedy") == "triton" and not _cuda_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "OTPRUNE_GREEDY='triton' is not allowed here: Triton kernels need a CUDA GPU (none is available) or TRITON_INTERPRET=1; use 'batched' or 'host'"
        )
    if config.dump_dir:
        _check_writable_folder(config.dump_dir)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_writable_folder(folder: str) -> None:
    path = Path(folder).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif existing == path:
        try:
            tempfile.TemporaryFile(dir=path).close()
        except OSError as error:
            problem = f"cannot write in it ({error.strerror})"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"cannot create it in {existing}"
    if problem:
        raise ValueError(f"OTPRUNE_DUMP={folder!r} is not allowed: {problem}; give a folder that can be written")
