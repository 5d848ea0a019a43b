"""``python -m otprune``: the ``otprune`` command without its console script on PATH."""

import sys

from otprune.cli import main

sys.exit(main())
