import functools
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def this_code() -> dict | None:
    """The code identity this checkout's harness stamps on its records (a probe, made once)."""
    from otprune.harness.code_identity import current_code

    return current_code()


def stamp_records(folder: Path) -> None:
    """Give every record below ``folder`` this code's identity, as a record this harness made
    carries (the shipped fixtures predate code identities, and the report marks such rows †)."""
    import json

    for path in folder.rglob("otprune_*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            path.write_text(json.dumps({**record, "code": this_code()}))


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts are not a package; they import each other)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def installed_plugins(tmp_path: Path, monkeypatch, module: str, source: str, entry_points: str, probe: str):
    """Yields the module ``source`` installed under ``tmp_path`` as a package whose entry points are
    ``entry_points`` (found as an installed package's are), imported through the method ``probe``;
    removed again after. For a fixture: ``yield from installed_plugins(...)``."""
    import otprune.methods

    (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    otprune.methods.get_method.cache_clear()
    yield sys.modules[otprune.methods.get_method(probe).function.__module__]
    otprune.methods.get_method.cache_clear()
    sys.modules.pop(module, None)


def tiny_vlms(root: Path, variants, padding_side: str | None = None) -> dict:
    """``build_tiny_qwen``'s tiny Qwen-VL / OneVision checkpoints, built under ``root`` and loaded
    in float32, eval mode: ``{variant: (processor, model)}``."""
    import torch
    from transformers import AutoModelForImageTextToText

    builder = load_script("build_tiny_qwen")
    loaded = {}
    for variant in variants:
        path = builder.build(root / variant, variant)
        processor = builder.load_processor(path)
        if padding_side is not None:
            processor.tokenizer.padding_side = padding_side
        loaded[variant] = (processor, AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval())
    return loaded


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Builds the tiny LLaVA checkpoints once per test session: ``{variant: folder}``."""
    pytest.importorskip("llava.model.language_model.llava_llama", reason="needs llava-torch (pip install --no-deps)")
    build = load_script("build_tiny_llava").build
    root = tmp_path_factory.mktemp("checkpoints")
    return {variant: build(root / f"tiny-{variant}", variant) for variant in ("llava-1.5", "llava-1.6")}


@pytest.fixture(scope="session")
def tiny_hf_checkpoints(tmp_path_factory):
    """transformers-native tiny checkpoints: ``{"llava-hf": folder, "llava-next-hf": folder}``."""
    pytest.importorskip("transformers")
    build = load_script("build_tiny_llava").build
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {variant: build(root / f"tiny-{variant}", variant) for variant in ("llava-hf", "llava-next-hf")}


@pytest.fixture
def pruning_off(models):
    """Pruning switched off on every model of the test module's ``models`` fixture
    (``{variant: (processor or tokenizer, model, ...)}``) before and after each test."""
    for entry in models.values():
        entry[1]._otprune_config = None
    yield
    for entry in models.values():
        entry[1]._otprune_config = None


def pytest_terminal_summary(terminalreporter):
    """What a test recorded it ran (``record_property("ran", ...)``), where a test runs one of
    several cases: shown at the end of every run, from every xdist worker."""
    lines = [
        f"{report.nodeid}: {value}"
        for status in ("passed", "failed")
        for report in terminalreporter.stats.get(status, [])
        if report.when == "call"
        for name, value in report.user_properties
        if name == "ran"
    ]
    if lines:
        terminalreporter.section("cases the tests ran")
        for line in lines:
            terminalreporter.line(line)
