"""The package's layout shows the pipeline, and its imports run one way (read from the source, not run).

The plumbing at the top (config, data, storage, ...) imports no stage; a stage package imports the plumbing,
its own modules and the core modules of earlier stages, never another stage's `stage` or `figures`; and no
import chain, however lazy (inside a function), comes back to where it started. Imports for type checking
only (`if TYPE_CHECKING:`) are not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "synthgap_helpers"
STAGES = ("sd", "inversion", "train", "lowdata", "gradcam", "geometry", "gap", "curation")  # pipeline order
NOT_CORE = ("stage", "figures")  # what another stage may never import


def module_name(path: Path) -> str:
    """`synthgap_helpers.train.models` for synthgap_helpers/train/models.py (packages by their __init__)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under `if TYPE_CHECKING:`."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(child for child in ast.iter_child_nodes(node) if not _type_checking_only(child))
    return found


def imports_of(name: str) -> set[str]:
    """The package's modules that `name` imports (`from pkg import module` counts as the module)."""
    targets = set()
    for node in _runtime_imports(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: use absolute imports (`from synthgap_helpers... import`)"
            base = node.module or ""
            names = [f"{base}.{alias.name}" for alias in node.names]
            targets.update(n if n in MODULES else base for n in names)
        else:
            targets.update(alias.name for alias in node.names)
    return {target for target in targets if target in MODULES and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def stage_of(name: str) -> str | None:
    """The stage package a module belongs to, or None for the plumbing."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_the_package_is_plumbing_at_the_top_and_one_package_per_stage():
    top = sorted(name.split(".")[1] for name in MODULES if name.count(".") == 1 and stage_of(name) is None)
    assert top == ["__main__", "cli", "config", "cost", "data", "datasets", "downloads", "errors", "exact", "imagesets",
                   "locks", "params", "plots", "recipes", "results", "runner", "sets", "storage", "workload"]
    for stage in STAGES:
        assert f"synthgap_helpers.{stage}.stage" in MODULES, f"the {stage} package has no stage.py"


def test_the_plumbing_imports_no_stage():
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() if stage_of(name) is None
             for target in sorted(targets) if stage_of(target) is not None]
    assert not wrong, "\n".join(wrong)


def test_a_stage_imports_only_the_plumbing_itself_and_the_core_of_earlier_stages():
    wrong = []
    for name, targets in GRAPH.items():
        own = stage_of(name)
        if own is None:
            continue
        for target in sorted(targets):
            other = stage_of(target)
            if other is None or other == own:
                continue
            if STAGES.index(other) > STAGES.index(own):
                wrong.append(f"{name} imports {target}, of a later stage")
            elif target.split(".")[-1] in NOT_CORE or target == f"synthgap_helpers.{other}":
                wrong.append(f"{name} imports {target}, not a core module of {other}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_anywhere():
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("source, rule", [
    ("from synthgap_helpers.train import stage\n", "not a core module of train"),
    ("from synthgap_helpers.gap import measures\n", "of a later stage"),
])
def test_the_rules_see_a_forbidden_import(tmp_path, monkeypatch, source, rule):
    """A module of gradcam that imports another stage's stage.py, or a later stage, is caught."""
    bad = PACKAGE / "gradcam" / "maps.py"
    monkeypatch.setitem(MODULES, "synthgap_helpers.gradcam.maps", tmp_path / "maps.py")
    (tmp_path / "maps.py").write_text(bad.read_text() + "\n" + source)
    monkeypatch.setitem(GRAPH, "synthgap_helpers.gradcam.maps", imports_of("synthgap_helpers.gradcam.maps"))
    with pytest.raises(AssertionError, match=rf"gradcam\.maps imports .*, {rule}"):
        test_a_stage_imports_only_the_plumbing_itself_and_the_core_of_earlier_stages()
