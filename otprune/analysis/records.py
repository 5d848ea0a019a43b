"""The one reading of a run folder's harness records, shared by the report and every analysis: for
each task, the newest trusted record that finished it, and nothing else.

A task run again (after a change of code, a ``--reuse`` decision) leaves two finished records in its
run folder; the older one's scores, OT distances and near-duplicate shares belong to code that no
longer runs, and mixing them with the newer one's gives numbers no run produced. Records are
ordered by their file name, which starts with the attempt's start time (``harness.plan.attempt_name``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from otprune.harness.catalogue import ADAPTIVE
from otprune.harness.files import read_results
from otprune.harness.records import load_records

__all__ = ["Current", "RunFolder", "newest_per_task", "question_items", "read_run_folder", "table_scores"]


@dataclass(frozen=True)
class Current:
    """A finished record that is the newest for ``tasks`` (a subset of its ``finished_tasks``)."""

    path: Path
    record: dict
    tasks: tuple[str, ...]

    def benchmarks(self) -> list[str]:
        """The report's column names of ``tasks`` (the record's ``benchmarks`` follow its ``tasks``)."""
        names = dict(zip(self.record.get("tasks", []), self.record.get("benchmarks", [])))
        return [names[task] for task in self.tasks if task in names]


def newest_per_task(records: list[tuple[Path, dict]]) -> list[Current]:
    """The records (``load_records``' trusted ones, oldest first) that are the newest finished one
    of at least one task, each with those tasks; every other record is left out."""
    newest = {}
    for path, record in records:
        if record["status"] == "done":
            newest.update(dict.fromkeys(record["finished_tasks"], path))
    current = []
    for path, record in records:
        tasks = tuple(task for task in record["finished_tasks"] if newest.get(task) == path)
        if record["status"] == "done" and tasks:
            current.append(Current(path, record, tasks))
    return current


@dataclass(frozen=True)
class RunFolder:
    """One ``<model>/<method>_<ratio>/`` folder: its ``setting.json`` (the resolved setting: method,
    ratio, layer_index K...; ``None`` when unreadable), the ``current`` records, ``trusted`` (every
    trusted record, failed and superseded ones too: what the run cost), and ``skipped`` records with
    why."""

    folder: Path
    setting: dict | None
    current: list[Current]
    trusted: list[tuple[Path, dict]]
    skipped: list[tuple[Path, str]]

    @property
    def layer_index(self) -> int | None:
        """K, the LLM layer the method prunes at, from the resolved setting (a method left at its
        default K has it there, not in its env); 0 for the unpruned model; ``None`` when the setting
        is missing or names no valid K."""
        if not self.setting:
            return None
        layer = self.setting.get("layer_index", 0)
        if layer is None:
            return 0
        return layer if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 else None


def read_run_folder(folder: Path) -> RunFolder:
    records, skipped = load_records(folder)
    manifest = folder / "setting.json"
    setting = read_results(manifest) if manifest.is_file() else None
    return RunFolder(folder, setting or None, newest_per_task(records), records, skipped)


def question_items(current: Current, task: str, metric: str) -> dict[int, object]:
    """``{doc_id: item}`` of ``task`` from the samples file lmms-eval logged beside the record's
    results file (``--log_samples``): ``item`` the value its ``process_results`` returned under
    ``metric`` (``"yes_no_f1"``: a ``{"prediction", "answer"}`` pair; ``"exact_match"``: 0 or 1).
    Empty when no samples file holds the task."""
    folder = current.path.parent
    files = sorted(path for name in current.record["results"] for path in (folder / name).parent.glob(f"*_samples_{task}.jsonl"))
    if not files:
        return {}
    items = {}
    for line in files[-1].read_text().splitlines():
        if line.strip():
            sample = json.loads(line)
            items[int(sample["doc_id"])] = sample[metric]
    return items


def table_scores(table: Path) -> dict[tuple[str, str, float], dict[str, float]]:
    """(model, method, ratio) -> benchmark -> score, from the report's ``table1.csv`` (which it wrote
    from the same records, ``newest_per_task``); ``model`` the run folder's checkpoint, as the
    analyses name it. Adaptive rows are left out: the analyses compare methods at fixed ratios."""
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    benchmarks = [name[: -len("_diff")] for name in rows[0] if name.endswith("_diff")]
    scores = {}
    for row in rows:
        if row["ratio"] == ADAPTIVE:
            continue
        cells = {b: float(row[b]) for b in benchmarks if row.get(b) not in (None, "")}
        # A finetuned checkpoint's row sits in its base model's block (``model``); a table written
        # before ``checkpoint`` was a column named the checkpoint there.
        scores[(row.get("checkpoint") or row["model"], row["method"], float(row["ratio"]))] = cells
    return scores
