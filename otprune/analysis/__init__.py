"""The paper's analyses, re-run from one command: ``python -m otprune.analysis <name>``.

- ``table2``: the synthetic study (``otprune.analysis.table2``);
- ``ot-vs-ratio``: OT distance of each selector's kept set over keep ratios (``ot_vs_ratio``);
- ``gamma``: OTPrune's subsets over a log grid of γ (``gamma``);
- ``hypothesis``: OT distance vs score across methods, from harness results (``hypothesis``);
- ``regimes``: each method's score and OT distance against the measured redundancy of the
  synthetic benchmark's background levels, from harness results (``regimes``).

Each writes ``<name>.md`` and PNG figures into ``--out`` (default ``runs/analysis/<name>``) and
prints the Markdown. Needs matplotlib (and POT for the OT distances).
"""

from otprune.analysis.subsets import SubsetScorer, enumerate_subsets, sample_subsets, score_subsets

__all__ = ["SubsetScorer", "enumerate_subsets", "sample_subsets", "score_subsets"]
