"""Both notebooks execute headless under papermill on tiny generated data, with this venv's Python.

The kernel is a kernelspec written into tmp_path that runs `sys.executable -m ipykernel_launcher`, found
through JUPYTER_PATH: nothing is installed into the user's Jupyter folders, and the notebook runs with
the very interpreter (and synthval) under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from report_fixtures import evaluate_fake, generate

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "synthval-test-venv"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "synthval tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook-data")
    real = generate("real-proxy", root / "real", 60, seed=2)
    synthetic = generate("synthetic", root / "synthetic", 20, seed=3)
    evaluation = evaluate_fake(real, root / "eval", seed=4)
    return {"real": real, "synthetic": synthetic, "metrics_uri": evaluation["metrics_uri"]}


def run(name: str, out: Path, kernel: str, parameters: dict) -> nbformat.NotebookNode:
    import papermill

    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, kernel_name=kernel,
                               cwd=str(out.parent), progress_bar=False, execution_timeout=300)
    return nbformat.read(str(out), as_version=4)


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


def test_notebooks_are_stored_without_outputs_and_parameterised():
    for name in ("visual_inspection.ipynb", "dataset_statistics.ipynb"):
        notebook = nbformat.read(str(NOTEBOOKS / name), as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name


def test_visual_inspection_notebook_runs(data, tmp_path, kernel):
    notebook = run("visual_inspection.ipynb", tmp_path / "visual.ipynb", kernel,
                   {"metrics_uri": data["metrics_uri"], "replicates": 50, "num_images": 2, "image_ids": [0]})
    assert len(outputs(notebook, "image/png")) >= 2 + 2 + 2  # charts, worst, best
    assert any("95% interval" in o["data"]["text/html"] for o in outputs(notebook, "text/html"))


def test_dataset_statistics_notebook_runs(data, tmp_path, kernel):
    notebook = run("dataset_statistics.ipynb", tmp_path / "stats.ipynb", kernel,
                   {"data_uri": data["synthetic"], "compare_data_uri": data["real"], "compare_split": "test",
                    "pixel_sample": 4})
    html = "".join(o["data"]["text/html"] for o in outputs(notebook, "text/html"))
    assert "Wasserstein-1" in html and "sampling noise" in html
    assert "What the simulator measured" not in html  # the notebook heads that section itself
    for text in ("visible fraction", "lighting info", "object placement info", "visible_pixels"):
        assert text in html, text
    assert len(outputs(notebook, "image/png")) >= 9
