"""Where the harness finds the project's files: configs (with the embedded tasks' data), the tiny
checkpoints' builder, the default runs folder.

The configs come from the installed package (a wheel carries them as ``otprune/configs``) or, in a
source checkout, from the checkout's ``configs/``; the tiny checkpoints are built by the checkout's
``scripts/build_tiny_llava.py``, so configs of tiny models need a checkout. Runs go to the
checkout's ``runs/``, or ``./runs`` when otprune is installed from a wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from otprune.harness.errors import MissingResource

PACKAGE = Path(__file__).resolve().parent.parent
# The source checkout otprune runs from (an editable install), or None for an installed wheel.
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None
# The folder holding configs/: the task catalogue's include paths and the embedded tasks' data files
# are relative to it, and lmms-eval runs in it.
ROOT = PACKAGE if (PACKAGE / "configs").is_dir() else CHECKOUT or PACKAGE
CONFIGS = ROOT / "configs"
TINY_BUILDER = "scripts/build_tiny_llava.py"
WEIGHTS = "model.safetensors"
DEFAULT_RUNS = CHECKOUT / "runs" if CHECKOUT else Path("runs")


def config_file(name: str) -> Path:
    """``configs/<name>``; a ``MissingResource`` naming where it was looked for when it is not there."""
    path = CONFIGS / name
    if not path.is_file():
        raise MissingResource(
            f"{path} is missing: this otprune ({PACKAGE}) was installed without the project's configs; "
            "install it from the project's wheel or sdist, or from a source checkout (pip install -e CHECKOUT)"
        )
    return path


def load_catalogue() -> dict:
    """``{task: spec}`` from configs/tasks.yaml (paper and local tasks together)."""
    data = yaml.safe_load(config_file("tasks.yaml").read_text())
    return {**data["paper"], **data["local"]}


def checkout_first(env: dict) -> dict:
    """``env`` with the checkout first on PYTHONPATH (from a checkout, a child imports its otprune
    whatever is pip-installed; otprune.patches only through an installed distribution's mapping,
    patches/ not being inside otprune/)."""
    if CHECKOUT is None:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p)}
