"""scripts/cpu_torchvision_hook.py: what ``install.sh --vlm`` adds on a CPU torch so that PyPI's
torchvision (a CUDA build whose operator library cannot load here) imports.

The stand-in package below fails exactly as that torchvision does at import time: it registers a
fake kernel for ``torchvision::nms``, which its operator library would have defined.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "scripts" / "cpu_torchvision_hook.py"

STAND_IN = """
import torch

@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)

@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)
"""

PROBE = """
import sys
# Start without the hook even where this environment has it installed (install.sh --vlm).
sys.modules.pop("_otprune_cpu_torchvision", None)
sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "_DeclareTorchvisionOperators"]
hooked = {hooked}
if hooked:
    sys.path.insert(0, {site!r})
    import _otprune_cpu_torchvision
    assert "torch" not in sys.modules, "the hook must not import torch at start-up"
    import json  # other imports pass through untouched
sys.path.insert(0, {packages!r})
import torchvision
import torch
print(sorted(name for name in ("nms", "qnms", "roi_align") if hasattr(torch.ops.torchvision, name)))
try:
    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except Exception as error:
    print("call fails:", type(error).__name__)
"""


@pytest.fixture
def layout(tmp_path):
    site, packages = tmp_path / "site", tmp_path / "packages"
    (packages / "torchvision").mkdir(parents=True)
    (packages / "torchvision" / "__init__.py").write_text(STAND_IN)
    site.mkdir()
    (site / "_otprune_cpu_torchvision.py").write_text(HOOK.read_text())
    return site, packages


def probe(layout, hooked: bool) -> subprocess.CompletedProcess:
    site, packages = layout
    code = PROBE.format(hooked=hooked, site=str(site), packages=str(packages))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_without_the_hook_the_import_fails_as_pypi_torchvision_does_on_a_cpu_torch(layout):
    result = probe(layout, hooked=False)
    assert result.returncode != 0 and "operator torchvision::nms does not exist" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="the hook acts on a CPU build of torch only")
def test_with_the_hook_the_import_succeeds_and_the_operators_stay_without_kernels(layout):
    result = probe(layout, hooked=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['nms', 'qnms']", "call fails: NotImplementedError"]
