"""The harness's records (``otprune_*.json``): what an attempt wrote, which of them can be trusted,
and which tasks they prove finished."""

from __future__ import annotations

import json
from pathlib import Path

from otprune.harness.catalogue import ADAPTIVE
from otprune.harness.files import describe_type, sha256

# field -> (allowed types, required) of a record; the report and the resume logic rely on these.
RECORD_FIELDS = {
    "status": (str, True),
    "tasks": (list, True),
    "finished_tasks": (list, True),
    "results": (dict, True),
    "wall_s": ((int, float), True),
    "eval_s": ((int, float, type(None)), False),
    "peak_rss_mb": ((int, float), False),
    "samples": (dict, False),
    "text_tokens": (dict, False),
    "visual_tokens": (list, False),
    "stage_tokens": (list, False),
    "selector_ms": (list, False),
    "timing": (list, False),
    "method": (str, False),
    "ratio": ((int, float, str), False),
    "benchmarks": (list, False),
    "ot_distance": (list, False),
    "near_duplicate_share": (list, False),
    "tokens_by_task": (dict, False),
    "code": ((dict, type(None)), False),
}
# What makes two records' code the same (otprune.harness.code_identity writes them).
CODE_KEYS = ("code_sha256", "torch", "transformers", "lmms_eval", "llava")


def check_record(record) -> None:
    """Raise ``ValueError`` naming the first field a harness record lacks or has of the wrong type."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {describe_type(record)}")
    for name, (types, required) in RECORD_FIELDS.items():
        if name not in record:
            if required:
                raise ValueError(f"no '{name}' (not a record of this harness)")
            continue
        if isinstance(record[name], bool) or not isinstance(record[name], types):
            raise ValueError(f"'{name}' is {record[name]!r}, not {getattr(types, '__name__', 'a number')}")
    if isinstance(record.get("ratio"), str) and record["ratio"] != ADAPTIVE:
        raise ValueError(f"'ratio' is {record['ratio']!r}, not a number or {ADAPTIVE!r}")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in record.get("visual_tokens", [])):
        raise ValueError("'visual_tokens' is not a list of [before, after] integer pairs")
    if not all(isinstance(v, (int, float)) for v in record.get("selector_ms", [])):
        raise ValueError("'selector_ms' is not a list of numbers")
    if not all(isinstance(v, str) for v in record.get("benchmarks", [])):
        raise ValueError("'benchmarks' is not a list of names")
    for name in ("ot_distance", "near_duplicate_share"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.get(name, [])):
            raise ValueError(f"'{name}' is not a list of numbers")
    if not all(isinstance(v, dict) for v in record.get("timing", [])):
        raise ValueError("'timing' is not a list of per-call timing objects")
    for name in ("samples", "text_tokens"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.get(name, {}).values()):
            raise ValueError(f"'{name}' is not a mapping task: number")


def load_records(folder: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """``(records, skipped)``: the folder's harness records that can be trusted, and every other one
    with why not (unreadable, malformed, a results file missing or changed since the record)."""
    records, skipped = [], []
    for path in sorted(folder.glob("otprune_*.json")):
        try:
            record = json.loads(path.read_text())
            check_record(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            skipped.append((path, f"malformed record: {error}"))
            continue
        if record["status"] == "done":
            problem = _results_problem(folder, record["results"])
            if problem:
                skipped.append((path, problem))
                continue
        records.append((path, record))
    return records, skipped


def _results_problem(folder: Path, results: dict) -> str | None:
    if not results:
        return "a finished record names no results file"
    for name, digest in results.items():
        path = folder / str(name)
        if not path.resolve().is_relative_to(folder.resolve()):
            return f"results file {name} lies outside the run folder"
        if not path.is_file():
            return f"results file {path} is missing"
        if sha256(path) != digest:
            return f"results file {path} changed since the record was written (SHA-256 differs)"
    return None


def finished_tasks(folder: Path, code: dict | None = None) -> set[str]:
    """Tasks a trusted ``done`` record in ``folder`` holds: the only proof that a run finished.
    ``code``: only records made by this code identity (:func:`same_code`) count."""
    records, _ = load_records(folder)
    return {
        task
        for _, record in records
        if record["status"] == "done" and (code is None or same_code(record.get("code"), code))
        for task in record["finished_tasks"]
    }


def same_code(recorded: dict | None, current: dict) -> bool:
    """Whether a record's code identity is ``current``'s: the pruning code's content hash and the
    versions of the libraries that run it (a record without one is from an older harness)."""
    return isinstance(recorded, dict) and recorded.get("code_sha256") is not None and all(recorded.get(key) == current.get(key) for key in CODE_KEYS)


def record_path(run_folder: Path, attempt: str) -> Path:
    return run_folder / f"otprune_{attempt}.json"


def recorded_limit(data: dict):
    """The ``--limit`` a results file says lmms-eval ran with: ``None`` for a full run (it writes
    null or -1), else the number of samples per task (a fraction of the task when < 1)."""
    config = data.get("config")
    value = config.get("limit") if isinstance(config, dict) else None
    if value is None or value == -1:
        return None
    return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else value
