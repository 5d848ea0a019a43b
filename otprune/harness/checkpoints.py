"""The tiny checkpoints the harness builds (or copies, when trained) under the runs folder, and the
shape of their LLMs, known before they are built."""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
from pathlib import Path

from otprune.harness import resources
from otprune.harness.catalogue import MODELS
from otprune.harness.errors import MissingResource
from otprune.harness.files import read_results, sha256
from otprune.harness.resources import TINY_BUILDER, WEIGHTS


def checkpoint(model: str, runs_root: Path) -> str:
    """What lmms-eval loads: the hub id, or the tiny checkpoint built once under RUNS/checkpoints
    (under a lock: harnesses of other configs share it). A trained checkpoint is copied again when
    the shipped weights changed (a retraining) since the copy was made."""
    spec = MODELS[model]
    if spec.tiny is None:
        return model
    folder = Path(checkpoint_path(model, runs_root))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = spec.trained and (not (folder / WEIGHTS).is_file() or sha256(folder / WEIGHTS) != trained_weights_sha256(model))
        if stale or not (folder / "otprune_tiny.json").exists():
            tiny_builder().build(folder, spec.tiny)
    return str(folder)


def checkpoint_path(model: str, runs_root: Path) -> str:
    """What lmms-eval is given as ``pretrained=`` for ``model``, without building anything: the hub
    id, or the absolute path of its tiny checkpoint under RUNS/checkpoints."""
    return model if MODELS[model].tiny is None else str((runs_root / "checkpoints" / model).resolve())


def trained_weights_sha256(model: str) -> str:
    """The SHA-256 of a trained model's shipped weights: part of its runs' setting, so that results
    of an earlier training never pass for the current checkpoint's."""
    return sha256(tiny_builder().TRAINED[MODELS[model].tiny] / WEIGHTS)


def tiny_llm_shape(variant: str) -> dict:
    """``{layers, hidden, ffn}`` of the LLM build_tiny_llava.py gives ``variant``: a trained variant's
    shipped config.json, the random variants' fixed shape."""
    builder = tiny_builder()
    if variant in builder.TRAINED:
        shape = llm_shape(builder.TRAINED[variant])
        if shape is None:
            raise MissingResource(f"{builder.TRAINED[variant] / 'config.json'} is missing or names no LLM shape")
        return shape
    return {"layers": builder.TEXT_LAYERS, "hidden": builder.TEXT_HIDDEN, "ffn": builder.TEXT_FFN}


def llm_shape(folder: Path) -> dict | None:
    """``{layers, hidden, ffn}`` of the LLM in a checkpoint folder's config.json (its
    ``text_config`` where it has one); ``None`` when there is no readable config."""
    config = read_results(Path(folder) / "config.json")
    text = config.get("text_config") or config
    try:
        return {"layers": int(text["num_hidden_layers"]), "hidden": int(text["hidden_size"]), "ffn": int(text["intermediate_size"])}
    except (KeyError, TypeError, ValueError):
        return None


class DropMessages(logging.Filter):
    """Drops the log records whose message holds ``fragment``."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# transformers' advice to install torchvision when it falls back to the PIL image processor:
# scripts/install.sh removes a torchvision that cannot load against the installed torch on purpose,
# and the PIL processor is the one the tiny checkpoints are built with, so the advice is wrong here.
TORCHVISION_HINT = DropMessages("requires torchvision (not installed)")
# transformers' warning that a checkpoint's model type (``llava_llama``, which only LLaVA's own code
# registers) is read into a generic config: loading just the tokenizer reads the config, but no
# model is built from it here, so there is nothing to check.
TOKENIZER_ONLY = DropMessages("to instantiate a model of type ``")


def quiet_torchvision_hint() -> None:
    """Silence only that advice, in this process (the tiny builds and tokenizers run here)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(TORCHVISION_HINT)


@functools.cache
def tiny_builder():
    """The checkout's scripts/build_tiny_llava.py as a module (a script, not part of the package)."""
    checkout = resources.CHECKOUT
    if checkout is None or not (checkout / TINY_BUILDER).is_file():
        raise MissingResource(
            f"the tiny checkpoints are built by {TINY_BUILDER} of otprune's source checkout, which this otprune "
            f"({resources.PACKAGE}) is not installed from: run configs of tiny models from a clone (pip install -e CLONE)"
        )
    spec = importlib.util.spec_from_file_location("build_tiny_llava", checkout / TINY_BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
