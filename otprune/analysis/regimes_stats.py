"""The regimes' comparisons, each with its uncertainty (``analysis.uncertainty``): every score's
bootstrap interval over its questions; OTPrune − DivPrune per level with the paired interval (the
same questions resampled for both), and a **crossover** only where that interval excludes 0 on
both sides of a change of sign; per level, Spearman's rho across methods between mean OT distance
and score with its exact permutation p-value and n (the paper's hypothesis predicts rho < 0)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from otprune.analysis.regimes import OURS, THEIRS, Regimes
from otprune.analysis.uncertainty import Interval, RankCorrelation, difference_interval, score_interval, spearman_test

__all__ = ["Crossover", "LevelRho", "crossovers", "level_rhos", "score_intervals"]


def score_intervals(regimes: Regimes) -> dict[tuple, Interval]:
    """(model, method, ratio, kind, level) -> the score recomputed from its questions, with its
    interval; only where the run logged its questions."""
    found = {}
    for key, items in regimes.questions.items():
        metric, scale = regimes.metrics[key[3]]
        found[key] = score_interval(metric, list(items.values()), scale)
    return found


@dataclass(frozen=True)
class Crossover:
    """``ours`` − ``theirs`` along measured redundancy for one (model, ratio, kind): ``steps``
    (level, near-duplicate share, paired difference ``Interval``), most redundant first, over the
    measured levels where both logged their questions; ``missing`` the measured levels where one
    of them did not."""

    model: str
    ratio: float
    kind: str
    steps: tuple
    missing: tuple = ()
    ours: str = OURS
    theirs: str = THEIRS

    def signs(self) -> list[int]:
        """Per step, +1 or -1 where the interval excludes 0, else 0 (no difference shown)."""
        return [difference.sign() for _, _, difference in self.steps]

    @property
    def unresolved(self) -> list[str]:
        """The levels whose interval includes 0."""
        return [level for (level, _, _), sign in zip(self.steps, self.signs()) if sign == 0]

    @property
    def crossings(self) -> list[tuple[str, str]]:
        """(more redundant level, less redundant level) around each change of sign between levels
        whose intervals exclude 0; unresolved levels in between are skipped (they are neither side)."""
        led = [(level, sign) for (level, _, _), sign in zip(self.steps, self.signs()) if sign]
        return [(a, b) for (a, sa), (b, sb) in itertools.pairwise(led) if sa != sb]

    @property
    def leader(self) -> str | None:
        """The method ahead wherever an interval excludes 0, when there is no crossing and one is."""
        signs = {s for s in self.signs() if s}
        return None if len(signs) != 1 else (self.ours if signs == {1} else self.theirs)

    def describe(self) -> str:
        share = {level: s for level, s, _ in self.steps}

        def at(level):
            return f"{level} ({100 * share[level]:.1f} %)"

        if not self.steps:
            return f"no measured level with the questions of both {self.ours} and {self.theirs} (none at {', '.join(self.missing)})"
        parts = ", ".join(f"{d.value:+.1f} [{d.low:+.1f}, {d.high:+.1f}] at {at(level)}" for level, _, d in self.steps)
        text = f"{self.ours} − {self.theirs}: {parts}"
        crossings = self.crossings
        if crossings:
            sides = {level: sign for (level, _, _), sign in zip(self.steps, self.signs())}
            names = []
            for a, b in crossings:
                first, second = (self.ours, self.theirs) if sides[a] > 0 else (self.theirs, self.ours)
                names.append(f"between {at(a)} and {at(b)} ({first} ahead on the more redundant side, {second} on the less)")
            verdict = ("crosses " if len(crossings) == 1 else f"crosses {len(crossings)} times: ") + "; ".join(names)
        elif self.leader is None:
            verdict = "no crossover: no difference shown at any level (every interval includes 0)"
        else:
            where = "the only level" if len(self.steps) == 1 else "every level" if not self.unresolved else "every level whose interval excludes 0"
            verdict = f"no crossover: {self.leader} ahead at {where}"
        unresolved = self.unresolved
        if unresolved and len(unresolved) < len(self.steps):
            verdict += f"; no difference shown at {', '.join(at(level) for level in unresolved)}"
        if self.missing:
            verdict += f"; no questions of both at {', '.join(self.missing)}"
        return f"{text} → {verdict}"


def crossovers(regimes: Regimes, ours: str = OURS, theirs: str = THEIRS) -> list[Crossover]:
    """Per model, ratio both methods ran at, and kind: ``ours`` − ``theirs`` over the measured
    levels, paired over the questions both answered."""
    found = []
    for model in regimes.models():
        rows = set(regimes.rows(model))
        for ratio in regimes.pruned_ratios(model):
            if (ours, ratio) not in rows or (theirs, ratio) not in rows:
                continue
            for kind in regimes.kinds(model):
                steps, missing = [], []
                for level in regimes.measured_levels(model):
                    a = regimes.questions.get((model, ours, ratio, kind, level))
                    b = regimes.questions.get((model, theirs, ratio, kind, level))
                    if not a or not b or not set(a) & set(b):
                        missing.append(level)
                        continue
                    metric, scale = regimes.metrics[kind]
                    steps.append((level, regimes.share(model, level), difference_interval(metric, a, b, scale)))
                if steps or missing:
                    found.append(Crossover(model, ratio, kind, tuple(steps), tuple(missing), ours, theirs))
    return found


@dataclass(frozen=True)
class LevelRho:
    """Spearman's rho across ``methods`` between mean OT distance and score at one level, ratio and
    kind, with its exact permutation p-value (``nan`` when fewer than 3 methods or a side is
    constant)."""

    model: str
    level: str
    ratio: float
    kind: str
    methods: tuple
    correlation: RankCorrelation

    @property
    def rho(self) -> float:
        return self.correlation.rho

    @property
    def p(self) -> float:
        return self.correlation.p


def level_rhos(regimes: Regimes) -> list[LevelRho]:
    """One per (model, level with OT distances, pruned ratio, kind)."""
    found = []
    for model in regimes.models():
        for level in regimes.levels(model):
            for ratio in regimes.pruned_ratios(model):
                methods = [m for m, r in regimes.rows(model) if r == ratio and (model, m, r, level) in regimes.ot]
                if not methods:
                    continue
                for kind in regimes.kinds(model):
                    pairs = [(m, regimes.ot[(model, m, ratio, level)][0], regimes.score(model, m, ratio, kind, level)) for m in methods]
                    pairs = [p for p in pairs if p[2] is not None]
                    correlation = spearman_test([p[1] for p in pairs], [p[2] for p in pairs])
                    found.append(LevelRho(model, level, ratio, kind, tuple(p[0] for p in pairs), correlation))
    return found
