"""The installed package stack against the lock, the tested bounds and the known breaks.

Three sources of truth, each read, none copied here:

- the lock, ``locks/<environment>.txt`` of a source checkout (``scripts/lock.sh``): the exact
  versions CI tests;
- the bounds otprune declares (its installed metadata, i.e. pyproject's ``dependencies`` and
  extras): the range CI tests at its lowest and newest ends;
- :data:`KNOWN_BREAKS`: releases inside or outside those bounds that are known to fail a run,
  each with the command that fixes it.

``otprune doctor`` prints the whole comparison; the harness prints :func:`summary` at start-up
and refuses a known break before any run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

LOCKS = Path(__file__).resolve().parent.parent / "locks"
ENVIRONMENTS = ("base", "llava", "test", "vlm")
# Installed without its own (years-old) pins, so not among otprune's declared requirements.
LLAVA = "llava-torch"


@dataclass(frozen=True)
class KnownBreak:
    """``package`` at ``versions`` fails runs when ``with_package`` is at ``with_versions``."""

    package: str
    versions: str
    with_package: str
    with_versions: str
    why: str
    fix: str

    def applies(self, installed: dict[str, str]) -> bool:
        return _within(installed.get(self.package), self.versions) and _within(installed.get(self.with_package), self.with_versions)

    def describe(self, installed: dict[str, str]) -> str:
        return f"{self.package} {installed[self.package]} with {self.with_package} {installed[self.with_package]}: {self.why}; fix: {self.fix}"


KNOWN_BREAKS = (
    KnownBreak(
        "filelock",
        ">=4.3",
        "lmms-eval",
        "==0.7.3",
        "lmms-eval 0.7.3 imports filelock._api, which filelock 4.3 removed, so every lmms-eval run fails",
        "pip install 'filelock<4.3'",
    ),
)


@dataclass(frozen=True)
class Row:
    """One package: installed, locked and declared versions, and what is wrong, if anything."""

    name: str
    installed: str | None
    locked: str | None
    bound: str
    problem: str

    @property
    def status(self) -> str:
        if self.problem:
            return self.problem
        if self.locked and self.installed != self.locked:
            return "differs from the lock"
        return "ok"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution on the path (the first one found)."""
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalise(name), dist.version)
    return versions


def read_lock(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of a lock file's ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        if line[:1].isalnum() and "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.split()[0]
    return pins


def known_breaks(installed: dict[str, str] | None = None) -> list[str]:
    """Each known break that applies, with its fix; by default to this interpreter's packages
    (only the few the breaks name are looked up: lmms-eval's entry point calls this at start-up)."""
    if installed is None:
        installed = {}
        for name in {n for b in KNOWN_BREAKS for n in (b.package, b.with_package)}:
            try:
                installed[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return [b.describe(installed) for b in KNOWN_BREAKS if b.applies(installed)]


def lock_path(environment: str) -> Path:
    if environment not in ENVIRONMENTS:
        raise ValueError(f"no lock {environment!r}; allowed: {', '.join(ENVIRONMENTS)}")
    return LOCKS / f"{environment}.txt"


def installed_environment(installed: dict[str, str]) -> str:
    """Which of install.sh's environments this looks like (what it installs last decides)."""
    if "qwen-vl-utils" in installed and "torchvision" in installed:
        return "vlm"
    if "pytest" in installed and "lmms-eval" in installed:
        return "test"
    if "lmms-eval" in installed:
        return "llava"
    return "base"


def lock_extras(path: Path) -> tuple[str, ...]:
    """The extras a lock was resolved with (its first line, written by ``scripts/lock.sh``)."""
    first = path.read_text().split("\n", 1)[0]
    if not first.startswith("# extras:"):
        raise ValueError(f"{path}: the first line names no extras; regenerate it with bash scripts/lock.sh")
    return tuple(e for e in first.removeprefix("# extras:").strip().split(",") if e)


def declared_extras() -> tuple[str, ...]:
    try:
        return tuple(metadata.metadata("otprune").get_all("Provides-Extra") or ())
    except metadata.PackageNotFoundError:
        return ()


def declared_bounds(extras: tuple[str, ...] = ()) -> dict[str, str]:
    """``{normalised name: specifier}`` otprune declares with ``extras`` (same name: intersected)."""
    try:
        requirements = metadata.requires("otprune") or []
    except metadata.PackageNotFoundError:
        return {}
    bounds: dict[str, str] = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        name = normalise(requirement.name)
        bounds[name] = str(SpecifierSet(bounds.get(name, "")) & requirement.specifier)
    return bounds


def _within(version: str | None, specifier: str) -> bool:
    if version is None:
        return False
    return Version(version) in SpecifierSet(specifier, prereleases=True) if specifier else True


def _release(version: str) -> str:
    """The version without its local part (``2.13.0+cpu`` -> ``2.13.0``)."""
    return version.split("+", 1)[0]


@dataclass
class Stack:
    """The comparison ``otprune doctor`` prints."""

    environment: str
    lock_found: bool
    rows: list[Row]
    others: list[Row]  # every other locked package: installed and locked version, no bound
    breaks: list[str]

    @property
    def apart(self) -> list[Row]:
        """The packages, bounded or not, whose installed version is not the lock's."""
        return [r for r in self.rows + self.others if r.installed != r.locked]

    @property
    def problems(self) -> list[str]:
        """What makes runs fail or leaves the tested range: known breaks, untested versions."""
        untested = [f"{r.name} {r.installed}: {r.problem}" for r in self.rows if r.problem]
        return self.breaks + untested


def inspect(environment: str | None = None, installed: dict[str, str] | None = None) -> Stack:
    """Compare ``installed`` (default: this interpreter's packages) with the lock of
    ``environment`` (default: the one the installed packages look like) and the bounds."""
    installed = installed_versions() if installed is None else installed
    environment = environment or installed_environment(installed)
    path = lock_path(environment)
    locked = read_lock(path) if path.is_file() else {}
    # Without a lock (an installed wheel) the bounds of every extra are checked.
    bounds = declared_bounds(lock_extras(path) if path.is_file() else declared_extras())
    named = [n for n in bounds if n in installed or n in locked]
    for extra in (LLAVA, *(b.package for b in KNOWN_BREAKS)):
        if extra not in named and (extra in installed or extra in locked):
            named.append(extra)
    rows = []
    for name in named:
        version = installed.get(name)
        problem = ""
        if version is None:
            problem = "missing"
        elif bounds.get(name) and not _within(_release(version), bounds[name]):
            problem = f"outside the tested range {bounds[name]}"
        rows.append(Row(name, version, locked.get(name), bounds.get(name, ""), problem))
    others = [Row(n, installed.get(n), locked[n], "", "") for n in locked if n not in named]
    return Stack(environment, bool(locked), rows, others, known_breaks(installed))


def summary_here() -> str:
    """:func:`summary` of this interpreter's stack, or why it cannot be had (a diagnostic line
    must not stop a run: an edited lock or a version string packaging cannot read)."""
    try:
        return summary(inspect())
    except (ValueError, OSError) as error:
        return f"stack: unknown ({error})"


def summary(stack: Stack) -> str:
    """One line: lock agreement, untested versions, known breaks."""
    if stack.lock_found:
        total = len(stack.rows) + len(stack.others)
        apart = stack.apart
        agreement = f"{total - len(apart)}/{total} packages as locks/{stack.environment}.txt"
        if apart:
            shown = ", ".join(f"{r.name} {r.installed or 'missing'} (lock {r.locked})" for r in apart[:3])
            agreement += f"; differ: {shown}" + (f" and {len(apart) - 3} more" if len(apart) > 3 else "")
    else:
        agreement = f"no lock for {stack.environment} (not a source checkout): bounds only"
    problems = stack.problems
    verdict = f"{len(problems)} problem(s): " + "; ".join(problems) if problems else "no known break, all in the tested range"
    return f"stack: {agreement}; {verdict}"
