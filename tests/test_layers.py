"""The house's rules, read from the source with `ast` (every import, lazy ones in functions too):
layers go one way (only the orchestration and the CLI import stages/), no two files import each
other through any chain, and no file of the library or the stages is over 600 lines."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mmpr_pipeline", "stages")
MAY_IMPORT_STAGES = {"mmpr_pipeline.pipeline", "mmpr_pipeline.cli"}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_only_the_orchestration_and_the_cli_import_stages():
    wrong = sorted(
        f"{a} imports {b}"
        for a, deps in graph().items()
        for b in deps
        if a.startswith("mmpr_pipeline") and b.startswith("stages") and a not in MAY_IMPORT_STAGES
    )
    assert not wrong, wrong


def test_no_import_cycle_between_files():
    edges = graph()
    cycles = []
    for start in edges:  # a path from a module's imports back to itself
        seen, todo = set(), list(edges[start])
        while todo:
            node = todo.pop()
            if node == start:
                cycles.append(start)
                break
            if node not in seen:
                seen.add(node)
                todo.extend(edges[node])
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_the_checks_see_a_cycle_and_a_stage_import(monkeypatch):
    """The two checks above, fed a graph with the faults they look for."""
    fake = {"mmpr_pipeline.a": {"mmpr_pipeline.b"}, "mmpr_pipeline.b": {"mmpr_pipeline.a", "stages.x"}}
    fake["stages.x"] = set()
    monkeypatch.setitem(globals(), "graph", lambda: fake)
    with pytest.raises(AssertionError, match="mmpr_pipeline.b imports stages.x"):
        test_only_the_orchestration_and_the_cli_import_stages()
    with pytest.raises(AssertionError, match="mmpr_pipeline.a"):
        test_no_import_cycle_between_files()


def test_no_room_over_600_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
