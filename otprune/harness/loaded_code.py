"""The files whose content decides what a run computes, found from what the run loads, so that the
list cannot drift from the code: otprune's modules reachable by import from what lmms-eval loads
(the patch its entry point names, the bundled plugins: every module of ``otprune.plugins``, each
task folder's hook files), and every file of the task folders (yaml, hooks, data; not Python's
``__pycache__``, which a run itself writes there).

Imports are read from the sources (``ast``), not executed: a probe stays cheap (no torch), and a
module imported inside a function counts as one imported at the top. What it cannot see: a module
named by a computed string (``importlib.import_module(f"otprune.{name}")``); constant names passed
to ``importlib.import_module`` are followed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ENTRY_MODULE", "code_files", "code_sha256", "loaded_modules"]

# What pyproject's lmms-eval entry point names (``otprune = "otprune.patches:lmms_eval_plugin"``).
ENTRY_MODULE = "otprune.patches"
_PACKAGES = ("otprune.patches", "otprune")  # longest first: otprune.patches lives in its own folder


def _package_folders() -> dict[str, Path]:
    folders = {}
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not importable as a package")
        folders[name] = Path(list(spec.submodule_search_locations)[0])
    return folders


def _module_file(name: str, folders: dict[str, Path]) -> Path | None:
    """The source file of otprune module ``name`` (``None``: no such module, an attribute)."""
    for package in _PACKAGES:
        if name == package or name.startswith(package + "."):
            base = folders[package].joinpath(*name[len(package) :].split(".")[1:])
            for path in (base / "__init__.py", base.with_suffix(".py")):
                if path.is_file():
                    return path
            return None
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """The module names ``path`` (the source of ``module``) imports, with each prefix package."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + int(is_package)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    with_prefixes = set()
    for name in names:
        parts = name.split(".")
        with_prefixes.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return with_prefixes


def _is_import_module(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "import_module" or isinstance(func, ast.Name) and func.id == "import_module"


def loaded_modules(hook_files: Iterable[Path] = ()) -> dict[str, Path]:
    """``{module name: source file}`` of every otprune module a run loads: reachable by import from
    the entry point's module, the bundled plugins' modules and ``hook_files`` (task hooks)."""
    folders = _package_folders()
    plugins = sorted(_module_file("otprune.plugins", folders).parent.glob("*.py"))
    roots = [ENTRY_MODULE, *(f"otprune.plugins.{path.stem}" for path in plugins if path.stem != "__init__")]
    found: dict[str, Path] = {}
    # A module's parent packages load before it.
    roots = {".".join(name.split(".")[: i + 1]) for name in roots for i in range(name.count(".") + 1)}
    queue = [(name, _module_file(name, folders)) for name in sorted(roots)]
    queue += [(None, Path(path)) for path in hook_files]
    while queue:
        name, path = queue.pop()
        if path is None or (name is not None and name in found):
            continue
        if name is not None:
            found[name] = path
        for imported in _imported_names(path, name or path.stem):
            if imported not in found:
                queue.append((imported, _module_file(imported, folders)))
    return found


def code_files(task_folders: Iterable[Path]) -> list[tuple[str, Path]]:
    """``(label, path)`` of every file that decides a run's result, in a fixed order: otprune's
    modules a run loads (label: the module name), then each task folder's files (label: the folder
    name and the path inside it)."""
    folders = sorted(Path(folder) for folder in task_folders)
    task_files = {folder: [path for path in sorted(folder.rglob("*")) if path.is_file() and "__pycache__" not in path.parts] for folder in folders}
    hooks = [path for paths in task_files.values() for path in paths if path.suffix == ".py"]
    files = sorted(loaded_modules(hooks).items())
    for folder, paths in task_files.items():
        files += [(f"{folder.name}/{path.relative_to(folder).as_posix()}", path) for path in paths]
    return files


def code_sha256(task_folders: Iterable[Path]) -> str:
    """The first 16 hex digits of the SHA-256 over :func:`code_files`' labels and contents."""
    digest = hashlib.sha256()
    for label, path in code_files(task_folders):
        digest.update(label.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
