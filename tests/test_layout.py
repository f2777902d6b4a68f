"""The package's map holds: dependencies point down (cli -> steps -> libraries -> io), no step imports
another, no import cycle anywhere (imports inside functions count), and every module says why it exists."""

import ast
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tasks" / "synthval"


def test_import_contracts_of_pyproject_are_kept(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 kept, 0 broken" in out  # the contracts ran, rather than none being found


def test_a_cycle_through_an_import_inside_a_function_breaks_the_contracts(tmp_path, monkeypatch, capsys):
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
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 1
    assert "synthval.io.storage -> synthval.steps.fetch" in out


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
