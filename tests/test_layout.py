"""The layout the README describes is the layout on disk, and imports point down.

``streamer/`` is one sub-package per layer; a module may import the layers below its own and never one above:

    cli.py ─► tools/ ─► app.py ─► runtime/ ─► contract/ ─► science/        (every layer: config.py, errors.py)
    training/ ─► contract/, science/                                       (found by cli through an entry point)

The checks read the source with ``ast`` (imports inside functions and ``TYPE_CHECKING`` blocks count too), so they
need nothing installed; the one that imports the daemon does it in a subprocess where scipy, tqdm and the training
package cannot be imported.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STREAMER = ROOT / "streamer"
README = ROOT / "README.md"
# Installed name -> folder (pyproject.toml's [tool.setuptools.package-dir]).
PACKAGES = {"spectranet.streamer": ROOT / "streamer", "spectranet.training": ROOT / "training",
            "spectranet.schemas": ROOT / "schemas"}
SOURCE_FOLDERS = ("streamer", "training", "schemas", "tests", "deploy", "bench", "docs")
LAYERS = ("science", "contract", "runtime", "tools")
TOP_MODULES = {"__init__", "cli", "app", "config", "errors"}
# What each part of streamer/ must not import (by the first component below spectranet.streamer).
FORBIDDEN = {
    "science": {"contract", "runtime", "tools", "app", "cli"},
    "contract": {"runtime", "tools", "app", "cli"},
    "runtime": {"tools", "app", "cli"},
    "tools": {"cli"},
    "app": {"tools", "cli"},
    "config": {*LAYERS, "app", "cli"},
    "errors": {*LAYERS, "app", "cli", "config"},
}
TRAINING_MAY_IMPORT = {"science", "contract", "errors"}
OPTIONAL_FOR_THE_DAEMON = ("scipy", "tqdm", "spectranet.training")


# --- what the README names -----------------------------------------------------------------------------------------

def _readme() -> str:
    return README.read_text()


def _code_spans(text: str) -> list[str]:
    """Inline code spans (```` `...` ````), outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _module_file(dotted: str) -> tuple[Path | None, list[str]]:
    """The file or package folder of the longest importable prefix of ``dotted``, and the names after it."""
    for top, folder in PACKAGES.items():
        if dotted == top or dotted.startswith(top + "."):
            parts = dotted[len(top):].lstrip(".").split(".") if dotted != top else []
            path = folder
            for i, part in enumerate(parts):
                if (path / part / "__init__.py").is_file():
                    path = path / part
                elif (path / f"{part}.py").is_file():
                    return path / f"{part}.py", parts[i + 1:]
                else:
                    return (path if (path / "__init__.py").is_file() else None), parts[i:]
            return (path if (path / "__init__.py").is_file() else None), []
    return None, [dotted]


def _definitions(tree: ast.Module | ast.ClassDef) -> dict[str, ast.AST]:
    """Names defined at the top of a module or class body (functions, classes, assignments, imports)."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            found.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
        elif isinstance(node, ast.ImportFrom | ast.Import):
            found.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return found


def _has_attributes(path: Path, names: list[str]) -> bool:
    if not names:
        return True
    if path.is_dir():
        path = path / "__init__.py"
    scope: ast.Module | ast.ClassDef = ast.parse(path.read_text())
    for name in names:
        node = _definitions(scope).get(name)
        if node is None:
            return False
        if not isinstance(node, ast.ClassDef):
            return name == names[-1]
        scope = node
    return True


def _all_classes() -> dict[str, list[ast.ClassDef]]:
    classes: dict[str, list[ast.ClassDef]] = {}
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, []).append(node)
    return classes


def stale_names(text: str) -> list[str]:
    """Every path, module, ``Class.attribute`` and file name the README mentions that does not exist."""
    bad: list[str] = []
    spans = _code_spans(text)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    for target in [*spans, *links]:
        for word in target.split():
            word = word.strip(",;:()")
            if re.fullmatch(rf"({'|'.join(SOURCE_FOLDERS)})/[\w./-]*", word) \
                    and not (ROOT / word).exists():
                bad.append(word)
    for dotted in sorted(set(re.findall(r"\bspectranet\.(?:streamer|training|schemas)(?:\.\w+)*", text))):
        path, rest = _module_file(dotted)
        if path is None or not _has_attributes(path, rest):
            bad.append(dotted)
    classes = _all_classes()
    for span in spans:
        m = re.fullmatch(r"([A-Z]\w*)\.(\w+)(?:\(\))?", span)
        if m:
            cls, attr = m.groups()
            if not any(attr in _definitions(node) for node in classes.get(cls, [])):
                bad.append(span)
    for span in spans:
        if re.fullmatch(r"\w+\.py", span) and not any(any((ROOT / top).rglob(span)) for top in SOURCE_FOLDERS):
            bad.append(span)
    return bad


def test_every_path_module_and_method_the_readme_names_exists() -> None:
    assert stale_names(_readme()) == []


def test_the_readme_check_finds_stale_names() -> None:
    text = ("One packet: `Daemon._deliver`, `Daemon.run`, `streamer/engine.py`, `streamer/runtime/daemon.py`,\n"
            "`spectranet.streamer.engine`, `spectranet.streamer.contract.codec.Codec.decode`, "
            "`spectranet.streamer.contract.codec.Codec.nope`, `kafka_io.py`, `nowhere.py`, [x](training/gone.md).\n"
            "```python\nfrom spectranet.streamer.gone import x\n```\n")
    assert stale_names(text) == ["streamer/engine.py", "training/gone.md",
                                 "spectranet.streamer.contract.codec.Codec.nope", "spectranet.streamer.engine",
                                 "spectranet.streamer.gone", "Daemon._deliver", "nowhere.py"]


def test_the_readme_module_table_names_every_module_of_streamer() -> None:
    named = set(_code_spans(_readme()))
    missing = [str(p.relative_to(ROOT)) for p in _streamer_modules()
               if p.name != "__init__.py" and "migrations" not in p.parts and str(p.relative_to(ROOT)) not in named]
    assert missing == [], "add them to the README's module table"


# --- imports point down --------------------------------------------------------------------------------------------

def _streamer_modules() -> list[Path]:
    return sorted(STREAMER.rglob("*.py"))


def _part(path: Path) -> str:
    """The layer of a file under streamer/ (science, contract, ...), or its module name at the top."""
    rel = path.relative_to(STREAMER).parts
    return rel[0] if len(rel) > 1 else path.stem


def imported_modules(source: str, *, package: str) -> Iterator[str]:
    """Absolute names of everything a module imports, relative imports resolved against ``package``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def upward_imports(source: str, *, part: str, package: str) -> list[str]:
    bad = []
    for name in imported_modules(source, package=package):
        if name == "training" or name.startswith(("training.", "spectranet.training")):
            bad.append(name)
        elif name.startswith("spectranet.streamer."):
            if name.split(".")[2] in FORBIDDEN.get(part, set()):
                bad.append(name)
    return sorted(set(bad))


def _package_of(path: Path) -> str:
    rel = path.relative_to(STREAMER).with_suffix("").parts
    return ".".join(["spectranet.streamer", *rel[:-1]])


@pytest.mark.parametrize("path", _streamer_modules(), ids=lambda p: str(p.relative_to(STREAMER)))
def test_imports_point_down(path: Path) -> None:
    assert upward_imports(path.read_text(), part=_part(path), package=_package_of(path)) == []


def test_the_import_check_finds_upward_imports() -> None:
    source = textwrap.dedent("""
        from spectranet.streamer.science.model import SpectraNet
        from ..runtime import db
        def later():
            from spectranet.streamer.tools.files import packet_from_file
            import spectranet.training.simulate
    """)
    assert upward_imports(source, part="contract", package="spectranet.streamer.contract") == [
        "spectranet.streamer.runtime", "spectranet.streamer.runtime.db", "spectranet.streamer.tools.files",
        "spectranet.streamer.tools.files.packet_from_file", "spectranet.training.simulate"]
    assert upward_imports(source, part="tools", package="spectranet.streamer.tools") == [
        "spectranet.training.simulate"]


@pytest.mark.parametrize("path", sorted((ROOT / "training").rglob("*.py")), ids=lambda p: p.name)
def test_training_imports_only_science_contract_and_errors(path: Path) -> None:
    layers = {name.split(".")[2] for name in imported_modules(path.read_text(), package="spectranet.training")
              if name.startswith("spectranet.streamer.")}
    assert layers <= TRAINING_MAY_IMPORT


@pytest.mark.parametrize("path", sorted((ROOT / "schemas").rglob("*.py")), ids=lambda p: p.name)
def test_schemas_import_nothing_of_the_project_but_themselves(path: Path) -> None:
    ours = [name for name in imported_modules(path.read_text(), package="spectranet.schemas")
            if name.startswith(("spectranet.", "streamer", "training")) and not name.startswith("spectranet.schemas")]
    assert ours == []


# --- the daemon without the training extra -------------------------------------------------------------------------

_BLOCKED_IMPORT = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked (not installed in the daemon's image)")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import scipy  # the blocker itself must work, or the rest proves nothing
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let scipy through")
    attempts.clear()
    import spectranet.streamer.runtime.daemon
    import spectranet.streamer.app
    import spectranet.streamer.cli as cli
    import argparse
    parser = cli._parser()
    commands = sorted(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps({{"loaded": loaded, "commands": commands, "attempts": sorted(set(attempts))}}))
""")


def test_the_daemon_and_its_cli_import_without_scipy_tqdm_or_training() -> None:
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT.format(blocked=OPTIONAL_FOR_THE_DAEMON)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert "run" in report["commands"] and "train" not in report["commands"]
    # The CLI looked for the training commands through its entry point, and did without them.
    assert "spectranet.training" in report["attempts"]


# --- one sub-package per layer -------------------------------------------------------------------------------------

def test_streamer_has_one_sub_package_per_layer() -> None:
    packages = sorted(p.parent.name for p in STREAMER.glob("*/__init__.py"))
    assert packages == sorted(LAYERS)
    for layer in LAYERS:
        assert ast.get_docstring(ast.parse((STREAMER / layer / "__init__.py").read_text())), layer
    top = {p.stem for p in STREAMER.glob("*.py")}
    assert top == TOP_MODULES
    # Folders beside the layers hold data only (the shipped model, sample spectra).
    strays = [str(p.relative_to(ROOT)) for p in STREAMER.rglob("*.py")
              if p.relative_to(STREAMER).parts[0] not in {*LAYERS, *(f"{m}.py" for m in TOP_MODULES)}]
    assert strays == []
