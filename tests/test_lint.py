"""The lint a contributor's pre-commit hook runs is the one .ci/run runs: the same ruff release."""

import re

from conftest import ROOT


def test_the_pre_commit_hook_pins_the_locked_ruff():
    locked = re.search(r"^ruff==(\S+)$", (ROOT / "locks" / "test.txt").read_text(), re.M)
    assert locked, "locks/test.txt pins no ruff"
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    pinned = re.findall(r'"ruff==([^"]+)"', hooks)
    assert pinned and set(pinned) == {locked.group(1)}, (pinned, locked.group(1))
    assert not re.search(r"ruff==\d", (ROOT / ".ci" / "run").read_text()), ".ci/run reads ruff's version from the lock"
