"""The package's map holds: dependencies point down (cli -> steps -> libraries -> io), no step imports
another, no import cycle anywhere (imports inside functions count), and every module says why it exists."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tasks" / "synthval"
# import-linter finds the package by importing it: a fresh interpreter, so the copy under test is the one found.
LINT = ("import sys\nfrom importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")


def lint(root: Path, package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_of_pyproject_are_kept():
    result = lint(ROOT, PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout  # the contracts ran, rather than none being found


def test_a_cycle_through_an_import_inside_a_function_breaks_the_contracts(tmp_path):
    """The contracts see lazy imports: the kind that hid checkpoint <-> model and evaluate <-> report."""
    config = (ROOT / "pyproject.toml").read_text()
    package = tmp_path / "synthval"
    for path in PACKAGE.rglob("*.py"):
        target = package / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    storage = package / "io" / "storage.py"
    storage.write_text(storage.read_text() + "\n\ndef _upward():\n    from synthval.steps import fetch  # noqa: F401\n")
    (tmp_path / "pyproject.toml").write_text(config)
    result = lint(tmp_path, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "synthval.io.storage -> synthval.steps.fetch" in result.stdout


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
