"""The house's shape, checked: no import circles, parity independent of conversion, stages in order.

Imports are read from the source (function-level ones too, which hide circles at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "publisher"

# The pipeline's stages in order: a stage may import an earlier one, never a later one.
STAGES = ("recipe", "source", "convert", "compress", "parity", "card", "assemble", "hub", "pipeline", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the publisher modules it imports, anywhere in its body."""
    modules = {_module_name(path): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_circle_check_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_parity_does_not_depend_on_how_packages_are_made():
    graph = import_graph()
    for parity in ("publisher.parity", "publisher.language_model_parity"):
        assert "publisher.convert" not in graph[parity]
        assert "publisher.compress" not in graph[parity]


def test_a_stage_never_imports_a_later_one():
    graph = import_graph()
    later = []
    for index, stage in enumerate(STAGES):
        for target in graph[f"publisher.{stage}"]:
            short = target.removeprefix("publisher.")
            if short in STAGES and STAGES.index(short) > index:
                later.append(f"{stage} imports {short}")
    assert later == []
