"""Door to ``otprune run`` (otprune.harness.cli), for callers of the old path; needs otprune installed."""

import sys

from otprune.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
