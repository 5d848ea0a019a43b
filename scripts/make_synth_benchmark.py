"""Write the synthetic benchmark's held-out questions and their lmms-eval tasks (configs/otprune_synth).

    python scripts/make_synth_benchmark.py [OUT_DIR] [--per-kind N]   # default: configs/otprune_synth

One JSON-lines file per kind (presence, attribute, count, spatial, caption) and background level:
``data/<kind>.jsonl`` on the plain background, ``data/<level>/<kind>.jsonl`` on the others, each
level asking the same questions of the same scenes (``synthetic_benchmark.level_rows``). Each row
holds its scene and background, so no image is written: the tasks draw it. Each level other than
plain gets one task per kind in ``levels/``, the plain task with its data file swapped. The output
is committed; re-running with the same arguments rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from otprune.synthetic_benchmark import LEVELS, level_rows, question_rows, task_name

PER_KIND = 40
ROOT = Path(__file__).resolve().parent.parent


def data_file(kind: str, level: str) -> Path:
    """Where ``kind``'s rows on ``level`` backgrounds live, relative to the task folder (a yaml names
    its data file relative to its own folder, where lmms-eval reads it whatever the working directory)."""
    return Path("data") / ("" if level == "plain" else level) / f"{kind}.jsonl"


def level_task(kind: str, level: str) -> str:
    """The yaml of ``task_name(kind, level)`` for a level other than plain."""
    plain = task_name(kind, "plain")
    return (
        f"# Written by scripts/make_synth_benchmark.py: {plain}'s questions on {level} backgrounds.\n"
        f"include: ../{plain}.yaml\n"
        f"task: {task_name(kind, level)}\n"
        "dataset_kwargs:\n"
        f"  data_files: ../{data_file(kind, level).as_posix()}\n"
    )


def write(out_dir: Path, per_kind: int = PER_KIND) -> None:
    rows = question_rows(per_kind)
    for level in LEVELS:
        for kind, items in level_rows(rows, level).items():
            path = out_dir / data_file(kind, level)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in items))
            if level != "plain":
                task = out_dir / "levels" / f"{task_name(kind, level)}.yaml"
                task.parent.mkdir(parents=True, exist_ok=True)
                task.write_text(level_task(kind, level))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(ROOT / "configs" / "otprune_synth"))
    parser.add_argument("--per-kind", type=int, default=PER_KIND, help="questions per kind")
    args = parser.parse_args(argv)
    write(Path(args.out_dir), args.per_kind)


if __name__ == "__main__":
    main()
