"""The folders are the architecture: each part imports only what its `__init__` docstring allows.

Read from the source with `ast` (no import runs), so a function-local import counts as much as one at the top,
and so does one under `if TYPE_CHECKING:` (a cycle in the types is a cycle in the design). Besides the folders:
each top-level module imports only what its own rule allows, no module imports itself back through others (an
import cycle), and the API process, started for real, loads no worker module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# part -> prefixes it must never import (a prefix matches the module and everything under it)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "fake_replicate": ("mediagen", "fake_fal"),
    "fake_fal": ("mediagen", "fake_replicate"),
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
        "fake_fal",
    ),
    "mediagen.providers": (
        "mediagen.api",
        "mediagen.worker",
        "mediagen.core.jobs",
        "mediagen.core.models",
        "mediagen.core.db",
        "mediagen.storage",
        "mediagen.devtools",
        "mediagen.broker",
        "mediagen.notify",
        "mediagen.services",
        "mediagen.cli",
        "fake_replicate",
        "fake_fal",
    ),
    "mediagen.storage": (
        "mediagen.api",
        "mediagen.worker",
        "mediagen.providers",
        "mediagen.devtools",
        "mediagen.broker",
        "mediagen.notify",
        "mediagen.services",
        "mediagen.cli",
        "fake_replicate",
        "fake_fal",
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
        "fake_fal",
    ),
    "mediagen.api": ("mediagen.worker", "mediagen.devtools", "mediagen.cli", "fake_replicate", "fake_fal"),
    "mediagen.worker": ("mediagen.api", "mediagen.devtools", "mediagen.cli", "fake_replicate", "fake_fal"),
}

# top-level module -> the only parts of mediagen it may import (a prefix matches everything under it;
# `mediagen` itself, for `__version__`, is always allowed). A new top-level module needs a rule here.
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    # read by every process and every layer: it parses the price table (core.pricing, pure) and nothing else
    "mediagen.settings": ("mediagen.core.pricing",),
    "mediagen.logging": (),
    "mediagen.metrics": (),
    # the GCRA maths as Lua, run by the API's per-key limits and the workers' Replicate budget alike
    "mediagen.gcra": (),
    # the two wires between processes, used by the API and the worker alike: the job queue (API -> worker)
    # and the wake-ups (worker and Replicate's webhooks -> whoever waits); they know no table and no route
    "mediagen.broker": (),
    "mediagen.notify": ("mediagen.logging",),
    # builds the shared resources from settings: the adapters and the wires, never a process's own code
    "mediagen.services": (
        "mediagen.settings",
        "mediagen.broker",
        "mediagen.core.db",
        "mediagen.providers",
        "mediagen.storage",
    ),
    # the operator's command: the domain, the resources, the embedded servers of `make run`; no process's code
    "mediagen.cli": (
        "mediagen.settings",
        "mediagen.logging",
        "mediagen.services",
        "mediagen.broker",
        "mediagen.core",
        "mediagen.devtools.embedded",
    ),
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


def test_every_top_level_module_has_a_rule() -> None:
    modules = {module_name(path) for path in (SRC / "mediagen").glob("*.py")} - {"mediagen"}
    assert modules == set(TOP_LEVEL), "give each top-level module a rule in TOP_LEVEL (and the README's map a line)"


@pytest.mark.parametrize("module", sorted(TOP_LEVEL))
def test_each_top_level_module_imports_only_what_its_rule_allows(module: str) -> None:
    path = SRC / (module.replace(".", "/") + ".py")
    allowed = (module, *TOP_LEVEL[module])
    breaches = [
        f"{module} imports {name}"
        for name in sorted(imported_modules(path))
        if matches(name, "mediagen") and name != "mediagen" and not any(matches(name, prefix) for prefix in allowed)
    ]
    assert not breaches, "\n".join(breaches)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Each module under `root` -> the modules under `root` it imports (names that are not modules, such as
    the `Claim` of `from mediagen.core.jobs import Claim`, are left out)."""
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    return {
        name: {imported for imported in imported_modules(path, root) if imported in paths and imported != name}
        for name, path in paths.items()
    }


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per group of modules that import each
    other: Tarjan's strongly connected components, then the shortest way round from the group's first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph: Mapping[str, Iterable[str]], group: set[str]) -> list[str]:
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if target in group and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no way round {sorted(group)}")


def test_no_module_imports_itself_back() -> None:
    """An import cycle (at the top or inside a function) means two modules are one room with a wall in it,
    and leaves one of them half-initialised whenever the other is imported first."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


_API_IMPORTS = """
import asyncio, json, sys
from mediagen.api.app import create_app

app = create_app(configure_logs=False)
app.openapi()

async def serve_nothing() -> None:
    async with app.router.lifespan_context(app):
        pass

asyncio.run(serve_nothing())
print(json.dumps(sorted(sys.modules)))
"""


def test_the_api_process_loads_no_worker_module(service_env: dict[str, str]) -> None:
    """Built and started as uvicorn starts it (the lifespan too), in a fresh interpreter: no worker code and
    none of what only the worker needs (Pillow reads the pixel size of stored outputs)."""
    done = subprocess.run(
        [sys.executable, "-c", _API_IMPORTS], env=service_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "mediagen.api.app" in loaded and "mediagen.services" in loaded
    worker_only = [name for name in loaded if matches(name, "mediagen.worker") or matches(name, "PIL")]
    assert not worker_only, f"the API process loaded {worker_only}"


@pytest.mark.parametrize("fake", ["fake_replicate", "fake_fal"])
def test_each_fake_stands_alone(fake: str) -> None:
    """A fake stands in for a provider (api.replicate.com, queue.fal.run), so it may share nothing with the
    service it fakes."""
    modules = {m for path in part_files(fake) for m in imported_modules(path)}
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


def test_the_cycle_finder_names_a_cycle_through_a_function_local_import(tmp_path: Path) -> None:
    """The cycle check can fail: a cycle closed inside a function, three modules round, is reported in order."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("from pkg.c import thing\n")
    (package / "c.py").write_text("def thing():\n    from . import a\n    return a\n")
    (package / "d.py").write_text("import pkg.a\n")
    assert import_cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
