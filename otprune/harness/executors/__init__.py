"""Executors: where a planned attempt's lmms-eval command runs. An executor receives the attempts
(otprune.harness.attempt.Attempt), starts each one's ``execute`` somewhere, and reports how each
ended; the command, environment, checks and records are the attempt's, whoever executes it.

- ``local`` (otprune.harness.executors.local): threads of the harness, ``--jobs`` at a time.
- ``slurm`` (otprune.harness.executors.slurm): one Slurm job per attempt, an array, via submitit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Outcome:
    """How the submitted attempts ended, as far as the executor knows when it returns.

    ``failed``: attempts whose record says failed (or that left none); ``stopped_by``: the signal
    that stopped the harness, 0 when none did."""

    failed: list = field(default_factory=list)
    stopped_by: int = 0
