"""The folders are the architecture: each part imports only what its `__init__` docstring allows.

Read from the source with `ast` (no import runs), so a function-local import counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# part -> prefixes it must never import (a prefix matches the module and everything under it)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "fake_replicate": ("mediagen",),
    "mediagen.core": (
        "mediagen.api",
        "mediagen.catalog",
        "mediagen.notify",
        "mediagen.worker",
        "mediagen.providers",
        "mediagen.storage",
        "mediagen.devtools",
        "mediagen.broker",
        "mediagen.services",
        "fake_replicate",
    ),
    "mediagen.providers": (
        "mediagen.api",
        "mediagen.worker",
        "mediagen.core.jobs",
        "mediagen.core.models",
        "mediagen.core.db",
        "mediagen.storage",
        "mediagen.devtools",
        "fake_replicate",
    ),
    "mediagen.storage": (
        "mediagen.api",
        "mediagen.worker",
        "mediagen.providers",
        "mediagen.devtools",
        "fake_replicate",
    ),
    "mediagen.catalog": (
        "mediagen.api",
        "mediagen.worker",
        "mediagen.providers",
        "mediagen.storage",
        "mediagen.devtools",
        "mediagen.broker",
        "mediagen.services",
        "mediagen.core.db",
        "mediagen.core.jobs",
        "mediagen.core.models",
        "fake_replicate",
    ),
    "mediagen.api": ("mediagen.worker", "mediagen.devtools", "fake_replicate"),
    "mediagen.worker": ("mediagen.api", "mediagen.devtools", "fake_replicate"),
}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = SRC) -> set[str]:
    """Every module a file imports, resolved to absolute names (`from x import y` yields x and x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def part_files(part: str) -> list[Path]:
    folder = SRC / part.replace(".", "/")
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_its_layer_allows(part: str) -> None:
    files = part_files(part)
    assert files, f"{part} has no modules: the layout changed without this test"
    breaches = [
        f"{module_name(path)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if any(matches(module, prefix) for prefix in FORBIDDEN[part])
    ]
    assert not breaches, "\n".join(breaches)


def test_the_fake_replicate_stands_alone() -> None:
    """The fake stands in for api.replicate.com, so it may share nothing with the service it fakes."""
    modules = {m for path in part_files("fake_replicate") for m in imported_modules(path)}
    assert "starlette.applications" in modules or any(matches(m, "starlette") for m in modules)
    assert not [m for m in modules if matches(m, "mediagen")]


def test_every_part_says_what_lives_there() -> None:
    for init in sorted(SRC.glob("*/__init__.py")) + sorted(SRC.glob("mediagen/*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 12, f"{init.relative_to(SRC)} needs a docstring saying what lives there"


def test_the_import_reader_sees_a_breach(tmp_path: Path) -> None:
    """The checks above can fail: a reach into mediagen, inside a function or relative, is found."""
    (tmp_path / "fake_replicate").mkdir()
    sneaky = tmp_path / "fake_replicate" / "sneaky.py"
    sneaky.write_text("def f():\n    from mediagen.core import jobs\n    return jobs\n")
    assert "mediagen.core.jobs" in imported_modules(sneaky, tmp_path)
    relative = tmp_path / "fake_replicate" / "relative.py"
    relative.write_text("from .server import create_app\n")
    assert "fake_replicate.server.create_app" in imported_modules(relative, tmp_path)
