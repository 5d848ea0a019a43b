"""Write the synthetic benchmark's held-out questions for its lmms-eval tasks (configs/otprune_synth).

    python scripts/make_synth_benchmark.py [OUT_DIR] [--per-kind N]   # default: configs/otprune_synth/data

One JSON-lines file per kind (presence, attribute, count, spatial, caption); each row holds its
scene, so no image is written: the tasks draw it. The output is committed; re-running with the same
arguments rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from otprune.synthetic_benchmark import question_rows

PER_KIND = 40


def write(out_dir: Path, per_kind: int = PER_KIND) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, rows in question_rows(per_kind).items():
        with open(out_dir / f"{kind}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent.parent / "configs" / "otprune_synth" / "data"
    parser.add_argument("out_dir", nargs="?", default=str(default))
    parser.add_argument("--per-kind", type=int, default=PER_KIND, help="questions per kind")
    args = parser.parse_args(argv)
    write(Path(args.out_dir), args.per_kind)


if __name__ == "__main__":
    main()
