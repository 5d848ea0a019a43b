"""Door to ``otprune run`` (otprune.harness), for callers of the old path; needs otprune installed."""

import sys

from otprune.harness import main

if __name__ == "__main__":
    sys.exit(main())
