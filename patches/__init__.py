"""Adapters that put otprune's selectors into LLaVA (installed as ``otprune.patches``).

Two ways in:

- zero code change: with ``BASELINE`` (and ``SUBSET_RATIO``, ``LAYER_INDEX``) set, a plain
  ``python -m lmms_eval`` prunes, because lmms-eval loads the ``lmms_eval.models`` entry point
  :func:`lmms_eval_plugin` in every process at start-up;
- one call in a script: ``model = otprune.patches.prune(model, "OURS", ratio=0.098)``.
"""

from __future__ import annotations

import logging

from otprune import stack
from otprune.prune_config import PruneConfig, check_runnable_here, config_from_env, default_layer_index

from . import generate_timing, hf, llava, vlm
from .layers import check_layer_index

__all__ = ["activate_from_env", "active_config", "lmms_eval_plugin", "prune"]

_env_config = PruneConfig()


# On import, before any checkpoint loads: lmms-eval's entry point and a script that loads a model
# after importing otprune both load LLaVA checkpoints whose tower is named inside their folder.
llava.install_tower_beside_checkpoint()


def active_config(model) -> PruneConfig:
    """The model's own setting from :func:`prune`, else the one read from the environment."""
    return getattr(model, "_otprune_config", None) or _env_config


def prune(model, method: str | None, ratio: float | None = None, layer_index: int | None = None, *, log: bool = False, **options):
    """Make ``model`` prune its visual tokens; returns the same model.

    ``model``: an original-LLaVA model (``llava-torch``) or transformers' ``LlavaForConditionalGeneration``
    / ``LlavaNextForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` /
    ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` /
    ``LlavaOnevisionForConditionalGeneration``.

    ``method``: a ``SELECTORS`` name, ``FASTV``, ``VTW``, an installed plugin's name
    (``otprune.methods``), or ``None``/``"ORIG"`` for none; ``ratio``: kept fraction per image;
    ``layer_index``: decoder layer to prune before (default 0; 2 for FASTV, 4 for VTW; VTW at 0
    gives the LLM the text alone); ``options``: the method's options (``gamma=``, ``seed=``,
    ``alpha=``, ``keep_ratio=``, a plugin's own), checked against its signature.
    """
    if layer_index is None:
        layer_index = default_layer_index(method)
    config = PruneConfig(method=method, ratio=ratio, layer_index=layer_index, options=options, log=log)
    if not _supported(model):
        raise TypeError(
            f"otprune.patches.prune does not support {type(model).__name__}; it supports the original LLaVA "
            f"(LlavaMetaForCausalLM subclasses) and transformers' {', '.join(hf.CLASS_NAMES + vlm.CLASS_NAMES)}"
        )
    if config.enabled:
        hf.check_transformers_version()
        check_runnable_here(config)
        check_model(model, config)
    if log:
        _enable_logging()
    llava.install()
    hf.install()
    vlm.install()
    if log:
        generate_timing.install()
    model._otprune_config = config
    return model


def check_model(model, config: PruneConfig) -> None:
    """Refuse a setting ``model`` cannot run (a ``LAYER_INDEX`` beyond its layers) before it runs.

    A setting from the environment stops the process (``SystemExit``): under lmms-eval, which
    catches ``Exception`` and exits 0, it would otherwise fail every sample and report success.
    """
    try:
        check_layer_index(config, len(_decoder(model).layers))
    except ValueError as error:
        if config.from_environment:
            raise SystemExit(f"otprune: {error}") from None
        raise


def activate_from_env(environ=None) -> PruneConfig:
    """Read the pruning variables and, if pruning is on, patch every supported model class."""
    global _env_config
    config = config_from_env(environ)
    # Every original-LLaVA run needs this on transformers >= 5.24, pruned or not.
    llava.install_cache_keyword()
    if config.enabled:
        hf.check_transformers_version()
        check_runnable_here(config)
        llava.install()
        hf.install()
        vlm.install()
    if config.log:
        # Unpruned runs are timed too: only the timing wrapper goes in, which leaves outputs as they are.
        generate_timing.install()
        _enable_logging()
    _env_config = config
    return config


def _is_original_llava(model) -> bool:
    return "LlavaMetaForCausalLM" in {cls.__name__ for cls in type(model).__mro__}


def _supported(model) -> bool:
    return _is_original_llava(model) or bool({cls.__name__ for cls in type(model).__mro__} & set(hf.CLASS_NAMES + vlm.CLASS_NAMES))


def _decoder(model):
    return llava.decoder(model) if _is_original_llava(model) else hf.decoder(model)


def _enable_logging() -> None:
    logger = logging.getLogger("otprune")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())


def lmms_eval_plugin() -> list:
    """Entry point of the ``lmms_eval.models`` group: activates pruning, registers no model.

    lmms-eval catches ``Exception`` from entry points and only warns, so a bad variable exits
    through ``SystemExit`` instead, before any model is loaded; so does a known break of the
    installed stack (``otprune.stack.KNOWN_BREAKS``), with its fix, instead of a run that fails.
    """
    breaks = stack.known_breaks()
    if breaks:
        raise SystemExit("otprune: a known break of the installed packages stops this run: " + "; ".join(breaks))
    try:
        activate_from_env()
    except ValueError as error:
        raise SystemExit(f"otprune: {error}") from None
    return []
