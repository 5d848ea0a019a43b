"""Door to ``otprune report`` (otprune.report), for callers of the old path; needs otprune installed."""

import sys

from otprune.report import main

if __name__ == "__main__":
    sys.exit(main())
