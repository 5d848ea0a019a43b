"""otprune: visual-token pruning for LLaVA by optimal-transport distribution alignment.

``otprune.selectors`` holds the selectors (OTPrune and its baselines) as plain torch functions;
``otprune.measures`` the distances, the objective and the FLOPs formula. The LLaVA / transformers
adapters live in ``otprune.patches`` and are imported only when asked for.

The package's names are loaded on first use, so that importing one module (the synthetic
benchmark, say) loads no other: the shipped checkpoint's training records the modules it imports
as inputs of its weights (``scripts/train_tiny_llava.py``).
"""

import importlib

__version__ = "0.1.0"

__all__ = ["SELECTORS", "budget", "get_selector", "__version__"]


def __getattr__(name: str):
    if name in ("SELECTORS", "budget", "get_selector"):
        return getattr(importlib.import_module("otprune.selectors"), name)
    try:
        return importlib.import_module(f"otprune.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"otprune.{name}":
            raise
        raise AttributeError(f"module 'otprune' has no attribute {name!r}") from None
