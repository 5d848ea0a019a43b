"""Every pruning method by its ``BASELINE`` name: the built-ins, and the selectors and mergers that
installed packages register under the entry-point groups ``otprune.selectors`` and
``otprune.mergers`` (contracts: ``otprune.contract``).

A package registers ``NAME = "module:function"``; ``BASELINE=NAME`` (any case) then prunes with it
wherever a built-in does. Nothing is imported until a method is asked for by name, so a broken
plugin stops only the runs that use it, before any model loads: a missing module, an import
error, a name that is not a function, a signature outside the contract, or a name another method
(built-in or plugin) already has is a :class:`PluginError` naming the entry point and its package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from otprune.contract import ATTENTION_CONTEXT, CONTEXT
from otprune.selectors import SELECTORS, select_by_attention

__all__ = [
    "GROUPS",
    "LAYER_METHODS",
    "Method",
    "PluginError",
    "get_method",
    "load_function",
    "method_names",
    "plugin_entry_points",
    "plugin_source_sha256",
]

GROUPS = {"selector": "otprune.selectors", "merger": "otprune.mergers"}
# Methods that rank tokens by the LLM's own attention or drop them wholesale: they act inside it.
LAYER_METHODS = ("FASTV", "VTW")
RESERVED = ("ORIG",)
# Methods otprune ships written as plugins (otprune/plugins: the public API only), found, loaded and
# checked as entry points are; listed here rather than in pyproject.toml so that a checkout that
# was never pip-installed (PYTHONPATH=.) has them too.
BUNDLED = {
    "CDPRUNER": ("selector", "otprune.plugins.cdpruner:select_cdpruner"),
    "POOL": ("merger", "otprune.plugins.pool:merge_pool"),
    "PYRAMIDDROP": ("selector", "otprune.plugins.pyramiddrop:select_pyramiddrop"),
    "FITPRUNE": ("selector", "otprune.plugins.fitprune:select_fitprune"),
    "PRUMERGE": ("merger", "otprune.plugins.prumerge:merge_prumerge"),
    "PRUMERGE_PLUS": ("merger", "otprune.plugins.prumerge:merge_prumerge_plus"),
    "DIVPRUNE_ADAPTIVE": ("selector", "otprune.plugins.divprune_adaptive:select_divprune_adaptive"),
    "VISIONZIP": ("merger", "otprune.plugins.visionzip:merge_visionzip"),
    "FASTERVLM": ("selector", "otprune.plugins.fastervlm:select_fastervlm"),
}
BUNDLED_ORIGIN = "otprune (bundled)"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class PluginError(ValueError):
    """A plugin that cannot be used: named, with its package and what is wrong."""


@dataclass(frozen=True)
class Method:
    """One method: ``kind`` is ``"selector"``, ``"merger"`` or ``"layer"`` (FASTV, VTW: only inside
    the LLM; VTW has no function); ``context`` the context it asks for; ``options`` its function's
    options and ``required`` those without a default (its schedule's included); ``origin``
    ``"built-in"`` or where a plugin comes from; ``stages`` a selector's schedule
    (``select.stages``, ``otprune.contract``) and ``stage_options`` the options it takes;
    ``before_projector`` that it runs on the vision tower's features (``otprune.contract``);
    ``text_leaves_out`` the phrases its question leaves out (``select.text_leaves_out``, ``otprune.contract``)."""

    name: str
    kind: str
    function: Callable | None
    origin: str = "built-in"
    context: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    accepts_batches: bool = False
    stages: Callable | None = None
    stage_options: tuple[str, ...] = ()
    before_projector: bool = False
    text_leaves_out: tuple[str, ...] = ()

    @property
    def all_options(self) -> tuple[str, ...]:
        """The options of the method and of its schedule (``stages``), each once."""
        return (*self.options, *(name for name in self.stage_options if name not in self.options))

    @property
    def plugin(self) -> bool:
        return self.origin != "built-in"


def _signature_parts(function: Callable, label: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(context, options, required options)`` of a method function, or a ``PluginError``."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as error:
        raise PluginError(f"{label} has no readable signature ({error})") from None
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    shape = "function(tokens, k, *, <context>, <options>)"
    if len(positional) != 2 or any(p.default is not p.empty for p in positional):
        names = ", ".join(p.name for p in positional) or "none"
        raise PluginError(
            f"{label} has a bad signature {signature}: it must take exactly two positional parameters (tokens, k), it takes {names}; the contract is {shape}"
        )
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PluginError(
                f"{label} has a bad signature {signature}: *{p.name} / **{p.name} is not allowed; name each context "
                f"({', '.join(CONTEXT)}) and option as a keyword-only parameter: {shape}"
            )
    keywords = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    context = tuple(p.name for p in keywords if p.name in CONTEXT)
    options = tuple(p.name for p in keywords if p.name not in CONTEXT)
    required = tuple(p.name for p in keywords if p.name not in CONTEXT and p.default is p.empty)
    return context, options, required


def _builtin(name: str) -> Method:
    if name == "FASTV":
        return Method(name, "layer", select_by_attention, context=("attention",))
    if name in LAYER_METHODS:
        return Method(name, "layer", None)
    function = SELECTORS[name]
    context, options, required = _signature_parts(function.__wrapped__, f"built-in {name}")
    return Method(name, "selector", function, context=context, options=options, required=required, accepts_batches=True)


BUILTINS = (*SELECTORS, *LAYER_METHODS)


def plugin_entry_points() -> dict[str, list[tuple[str, metadata.EntryPoint]]]:
    """Every installed plugin entry point by upper-case name: ``[(kind, entry point), ...]``."""
    found: dict[str, list[tuple[str, metadata.EntryPoint]]] = {}
    for name, (kind, value) in BUNDLED.items():
        found[name] = [(kind, metadata.EntryPoint(name, value, GROUPS[kind]))]
    for kind, group in GROUPS.items():
        for entry in metadata.entry_points(group=group):
            found.setdefault(entry.name.upper(), []).append((kind, entry))
    return found


def method_names() -> tuple[str, ...]:
    """The built-in names, then every installed plugin's (no plugin is imported)."""
    return (*BUILTINS, *sorted(set(plugin_entry_points()) - set(BUILTINS) - set(RESERVED)))


def _origin(entry: metadata.EntryPoint) -> str:
    if entry.dist is not None:
        return f"{entry.dist.name} {entry.dist.version}"
    return BUNDLED_ORIGIN if BUNDLED.get(entry.name, (None, None))[1] == entry.value else entry.value


def _describe(kind: str, entry: metadata.EntryPoint) -> str:
    package = _origin(entry)
    return f"{kind} plugin {entry.name!r} = {entry.value!r} (entry point group {GROUPS[kind]}, package {package})"


@functools.cache
def get_method(name: str) -> Method:
    """The method called ``name`` (any case): a built-in, or a plugin, loaded and checked here."""
    if not isinstance(name, str):
        raise ValueError(f"a method name must be a string; got {name!r}")
    key = name.strip().upper()
    entries = plugin_entry_points().get(key, [])
    if key in BUILTINS or key in RESERVED:
        if entries:
            clashes = "; ".join(_describe(kind, entry) for kind, entry in entries)
            raise PluginError(f"{clashes}: the name {key} is a built-in method; rename the plugin")
        if key in RESERVED:
            raise ValueError(f"{key} is no pruning method (it means none)")
        return _builtin(key)
    if not entries:
        raise ValueError(f"BASELINE={name!r} is not a method; allowed: ORIG, {', '.join(method_names())}")
    if len(entries) > 1:
        clashes = "; ".join(_describe(kind, entry) for kind, entry in entries)
        raise PluginError(f"the name {key} is registered more than once: {clashes}; uninstall or rename all but one")
    kind, entry = entries[0]
    label = _describe(kind, entry)
    if not NAME_PATTERN.fullmatch(entry.name):
        raise PluginError(f"{label}: the name must be letters, digits and _, starting with a letter")
    try:
        function = entry.load()
    except Exception as error:
        raise PluginError(f"{label} cannot be loaded: {type(error).__name__}: {error}") from None
    return _checked(key, kind, function, label, origin=_origin(entry))


def load_function(spec: str, kind: str) -> Method:
    """A method from ``"module:function"`` without installing it (``otprune check-selector``)."""
    if kind not in GROUPS:
        raise ValueError(f"kind must be one of {', '.join(GROUPS)}; got {kind!r}")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r} is not module:function")
    label = f"{kind} {spec!r}"
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as error:
        raise PluginError(f"{label} cannot be loaded: {type(error).__name__}: {error}") from None
    return _checked(attribute.split(".")[-1].upper(), kind, target, label, origin=spec)


def _checked(name: str, kind: str, function, label: str, origin: str) -> Method:
    if not callable(function):
        raise PluginError(f"{label} is a {type(function).__name__}, not a function")
    context, options, required = _signature_parts(function, label)
    stages = getattr(function, "stages", None)
    stage_options: tuple[str, ...] = ()
    if stages is not None:
        if kind != "selector" or not callable(stages):
            raise PluginError(f"{label}: its stages must be a function, on a selector; got {type(stages).__name__} on a {kind}")
        stage_options, stage_required = _stage_signature(stages, label)
        required = (*required, *(r for r in stage_required if r not in required))
    before_projector = getattr(function, "before_projector", False)
    if not isinstance(before_projector, bool):
        raise PluginError(f"{label}: its before_projector must be True or False; got {before_projector!r}")
    if before_projector and stages is not None:
        raise PluginError(f"{label}: a method that runs before the projector prunes at K = 0 only; it cannot have stages")
    if "adaptive" in context and stages is not None:
        raise PluginError(
            f"{label}: it asks for adaptive (one stage, k = N, the count its own) and has stages (each stage's count set by its schedule); it cannot have both"
        )
    inside = sorted(ATTENTION_CONTEXT & set(context))
    if inside and (before_projector or "vision" in context):
        why = "runs before the projector" if before_projector else "asks for vision"
        raise PluginError(f"{label}: it {why} (LAYER_INDEX = 0 only) and asks for {', '.join(inside)} (LAYER_INDEX >= 1 only); no LAYER_INDEX gives both")
    return Method(
        name,
        kind,
        function,
        origin=origin,
        context=context,
        options=options,
        required=required,
        accepts_batches=getattr(function, "accepts_batches", False) is True,
        stages=stages,
        stage_options=stage_options,
        before_projector=before_projector,
        text_leaves_out=_text_leaves_out(function, context, label),
    )


def _text_leaves_out(function: Callable, context: tuple[str, ...], label: str) -> tuple[str, ...]:
    """A method's ``text_leaves_out`` (``()`` where it declares none), or a ``PluginError``."""
    phrases = getattr(function, "text_leaves_out", ())
    if not isinstance(phrases, tuple) or not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases):
        raise PluginError(f"{label}: its text_leaves_out must be a tuple of strings with words in them (phrases left out of its text context); got {phrases!r}")
    if phrases and not {"text", "text_attention"} & set(context):
        raise PluginError(f"{label}: its text_leaves_out {phrases!r} leaves phrases out of a question it does not ask for (no text or text_attention context)")
    return phrases


def _stage_signature(stages: Callable, label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(options, required options)`` of a schedule ``stages(*, <options>)``: keyword-only
    parameters (``ratio``: ``SUBSET_RATIO``), or a ``PluginError``."""
    signature = inspect.signature(stages)
    loose = [p.name for p in signature.parameters.values() if p.kind is not p.KEYWORD_ONLY]
    if loose:
        raise PluginError(f"{label}: its stages{signature} must take keyword-only options only (stages(*, <options>)); {', '.join(loose)} are not")
    keywords = [p for p in signature.parameters.values() if p.name != "ratio"]
    return tuple(p.name for p in keywords), tuple(p.name for p in keywords if p.default is p.empty)


def plugin_source_sha256(method: Method) -> str | None:
    """A content hash (16 hex digits) of the Python files of the top-level package (or module)
    that defines an outside plugin's function: a run's setting holds it, so that a plugin edited
    without a new version (``pip install -e``) is not taken for the one that made earlier results.
    ``None`` for the built-ins and the bundled plugins, which otprune's code identity covers."""
    if not method.plugin or method.origin == BUNDLED_ORIGIN:
        return None
    top = method.function.__module__.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        files = sorted(path for folder in spec.submodule_search_locations for path in Path(folder).rglob("*.py"))
    else:
        files = [Path(spec.origin)] if spec.origin else []
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
