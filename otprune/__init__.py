"""otprune: visual-token pruning for LLaVA by optimal-transport distribution alignment.

``otprune.selectors`` holds the selectors (OTPrune and its baselines) as plain torch functions;
``otprune.measures`` the distances, the objective and the FLOPs formula. The LLaVA / transformers
adapters live in ``otprune.patches`` and are imported only when asked for.
"""

from otprune.selectors import SELECTORS, budget, get_selector

__version__ = "0.1.0"

__all__ = ["SELECTORS", "budget", "get_selector", "__version__"]
