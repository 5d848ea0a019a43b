"""The ``otprune`` command and the harness as an installed package: dispatch, a report pointed at the
parent of runs folders, and an installation without the checkout's configs or tiny-model builder."""

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from otprune import cli, report
from otprune.harness import checkpoints as harness_checkpoints
from otprune.harness import cli as harness_cli
from otprune.harness import config as harness_config
from otprune.harness import errors as harness_errors
from otprune.harness import prerequisites as harness_prerequisites
from otprune.harness import resources as harness_resources

FIXTURES = ROOT / "tests" / "fixtures" / "runs" / "smoke"


def test_report_command_writes_the_modules_table(tmp_path):
    assert cli.main(["report", str(FIXTURES), "--out", str(tmp_path / "cli")]) == 0
    report.write_report(FIXTURES, tmp_path / "module")
    assert (tmp_path / "cli" / "table1.md").read_text() == (tmp_path / "module" / "table1.md").read_text()
    assert "| OTPrune 0.098 † |" in (tmp_path / "cli" / "table1.md").read_text()  # the fixture predates code identities


def test_unknown_command_is_refused_naming_the_allowed_ones(capsys):
    assert cli.main(["repport", "runs/smoke"]) == 2
    err = capsys.readouterr().err
    assert "no command 'repport'; allowed: run, report, analysis" in err


def test_a_missing_dependency_of_a_command_is_named(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "otprune.report")
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert cli.main(["report", str(FIXTURES)]) == 2
    assert "otprune report needs the Python package 'scipy.stats'" in capsys.readouterr().err


def test_report_on_the_parent_of_runs_folders_names_them(tmp_path, capsys):
    parent = tmp_path / "runs"
    shutil.copytree(FIXTURES, parent / "smoke")
    (parent / "other" / "tiny-llava-1.5").mkdir(parents=True)
    first = sorted(p for p in (FIXTURES / "tiny-llava-1.5").iterdir() if (p / "setting.json").is_file())[0]
    shutil.copytree(first, parent / "other" / "tiny-llava-1.5" / first.name)
    (parent / "checkpoints" / "tiny-llava-1.5").mkdir(parents=True)
    in_fixtures = sum(1 for p in (FIXTURES / "tiny-llava-1.5").iterdir() if (p / "setting.json").is_file())

    assert report.main([str(parent)]) == 2
    err = capsys.readouterr().err
    assert f"  {parent / 'other'}  (1 run folder)\n" in err
    assert f"  {parent / 'smoke'}  ({in_fixtures} run folders)\n" in err
    assert not (parent / "table1.md").exists()


def test_a_runs_folder_of_one_config_is_reported_not_listed(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "smoke")
    assert report.nested_runs(tmp_path / "smoke") == {}
    assert report.main([str(tmp_path / "smoke")]) == 0


def test_without_configs_the_harness_names_the_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness_resources, "CONFIGS", tmp_path / "configs")
    assert harness_cli.main(["smoke", "--dry-run"]) == 2
    assert f"{tmp_path / 'configs' / 'tasks.yaml'} is missing" in capsys.readouterr().err


def test_without_a_checkout_tiny_models_name_their_builder(monkeypatch):
    monkeypatch.setattr(harness_resources, "CHECKOUT", None)
    harness_checkpoints.tiny_builder.cache_clear()
    missing, _ = harness_prerequisites.prerequisites(harness_config.load_config("smoke"), 1)
    assert any("tiny-llava-1.6 are built by scripts/build_tiny_llava.py" in m for m in missing)
    with pytest.raises(harness_errors.MissingResource, match="build_tiny_llava.py"):
        harness_checkpoints.tiny_builder()


def test_an_installed_layout_finds_its_configs_and_runs_in_the_working_folder(tmp_path):
    """A wheel's layout (otprune/ with configs/ inside, no checkout around it), imported by a fresh
    interpreter: the plan's task folder is the package's copy, runs go to ./runs."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "otprune", site / "otprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", site / "otprune" / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "otprune", "run", "smoke", "--dry-run"],
        cwd=work,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "are built by scripts/build_tiny_llava.py, which only a source checkout has" in done.stderr
    assert "-> runs/smoke\n" in done.stdout
    assert f"--include_path {site / 'otprune' / 'configs' / 'otprune_smoke'}" in done.stdout


BUILD_WITHOUT_TORCHVISION = """
import sys
sys.modules["torchvision"] = None  # as after scripts/install.sh removed a torchvision that cannot load
from otprune.harness import checkpoints as harness_checkpoints
from otprune.harness import cli as harness_cli
from otprune.harness import config as harness_config
from otprune.harness import errors as harness_errors
from otprune.harness import prerequisites as harness_prerequisites
from otprune.harness import resources as harness_resources
if sys.argv[2] == "quiet":
    harness_checkpoints.quiet_torchvision_hint()
harness_checkpoints.tiny_builder().build(sys.argv[1], "llava-1.5")
print("built")
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_the_harness_drops_the_advice_to_install_torchvision(tmp_path, quiet):
    pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")
    done = subprocess.run(
        [sys.executable, "-c", BUILD_WITHOUT_TORCHVISION, str(tmp_path / "tiny-llava"), "quiet" if quiet else "loud"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "built" in done.stdout, done.stderr
    assert ("Install torchvision" in done.stderr) is not quiet


def module_imports() -> dict[str, set[str]]:
    """``{module: otprune modules it imports}`` from the source, function-level imports included."""
    import ast

    graph = {}
    for path in (ROOT / "otprune").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("otprune"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}".replace(".", "/") in MODULE_PATHS else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("otprune")}
        graph[name] = found - {name}
    return graph


MODULE_PATHS = {str(p.relative_to(ROOT).with_suffix("")).removesuffix("/__init__") for p in (ROOT / "otprune").rglob("*.py")}


def test_the_harness_and_the_report_import_one_way():
    """No import cycle among otprune's modules, and the report reads records without importing the
    harness's planning, execution or command line (only the CLI runs the report, at the end)."""
    graph = module_imports()
    assert "otprune.report" in graph["otprune.harness.cli"] and "otprune.harness.records" in graph["otprune.report"]
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, f"import cycle: {' -> '.join(path + [target])}"
            if target in graph and target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    upstream = {
        "otprune.harness.cli",
        "otprune.harness.plan",
        "otprune.harness.attempt",
        "otprune.harness.executors",
        "otprune.harness.executors.local",
        "otprune.harness.executors.slurm",
        "otprune.harness.config",
        "otprune.harness.status",
    }
    assert not graph["otprune.report"] & upstream, graph["otprune.report"]
