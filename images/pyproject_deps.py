"""Print the requirements that pyproject.toml declares, one per line, for an image build.

    python images/pyproject_deps.py pyproject.toml            # [project].dependencies (training image)
    python images/pyproject_deps.py pyproject.toml airflow    # [project.optional-dependencies].airflow

pyproject.toml is the one place where dependencies are declared. The Airflow image needs the
`airflow` extra's requirements but not the package's own (torch): `pip install .[airflow]` would
pull both, and `pip install --no-deps .[airflow]` neither, so the Airflow Dockerfile runs this
script on the copied pyproject.toml and installs its output. Standard library only (tomllib,
Python >= 3.11), so it runs in any image before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extra: str | None = None) -> list[str]:
    """The requirement strings of the core dependencies, or of one optional-dependency group."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    if extra is None:
        return list(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"{pyproject}: no [project.optional-dependencies].{extra} (have: {', '.join(sorted(extras))})")
    return list(extras[extra])


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        reqs = requirements(Path(argv[0]), argv[1] if len(argv) == 2 else None)
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{r}\n" for r in reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
