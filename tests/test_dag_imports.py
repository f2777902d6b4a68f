"""The modules of dags/ and plugins/ import one another one way only: recipe DAGs -> steps and params ->
the task factory -> backends -> settings. No cycle, not even through an import inside a function, which
Python resolves at call time and a linter of top-level imports does not see.

dags/ and plugins/ are folders of top-level modules (Airflow puts both on sys.path), not a package, so
the graph is read here with `ast` from every `import` and `from ... import` statement of every file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (ROOT / "dags", ROOT / "plugins")


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module name -> the modules among ``files`` that it imports, wherever the statement stands."""
    names = {f.stem for f in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[path.stem] = (imported & names) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]``, or [] when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def project_files() -> list[Path]:
    return sorted(f for folder in FOLDERS for f in folder.glob("*.py"))


def test_dags_and_plugins_have_no_import_cycle():
    graph = import_graph(project_files())
    assert {"synthval_tasks", "synthval_pods", "synthval_jobs", "synthval_leaderboard"} <= set(graph)
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_recipe_dags_are_imported_by_nothing():
    """A recipe file (every dags/ file not named synthval_*) is a leaf: Airflow parses it, nothing imports it."""
    graph = import_graph(project_files())
    recipes = {name for name in graph if not name.startswith("synthval_")}
    assert "train_on_synthdet_sample" in recipes
    importers = {f"{module} imports {target}" for module, targets in graph.items() for target in targets & recipes}
    assert importers == set()


def test_the_factory_and_backends_point_down_only():
    """The layers: the factory sees the backends, the backends never see the factory or the DAG-facing
    modules (params, steps), and settings see no other module."""
    graph = import_graph(project_files())

    def reachable(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    above_backends = {"synthval_tasks", "synthval_params", "synthval_steps"}
    for backend in ("synthval_local", "synthval_pod_task", "synthval_pods", "synthval_jobs"):
        assert reachable(backend) & above_backends == set(), backend
    assert graph["synthval_settings"] == set()
    assert {"synthval_local", "synthval_pod_task"} <= graph["synthval_tasks"]


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from c import thing\n")
    (tmp_path / "c.py").write_text("import os\n\ndef f():\n    import a.sub\n")
    graph = import_graph(sorted(tmp_path.glob("*.py")))
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(sorted(tmp_path.glob("*.py")))) == []


def test_the_dag_processor_skips_every_helper_module():
    """Only recipe files hold DAGs; the helpers (synthval_*.py) are listed in .airflowignore, each by its
    full name, which reads the same as a glob and as a regular expression."""
    listed = set((ROOT / "dags" / ".airflowignore").read_text(encoding="utf-8").split())
    helpers = {f.name for f in (ROOT / "dags").glob("synthval_*.py")}
    assert listed == helpers
