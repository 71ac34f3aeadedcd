"""The notebooks run: their code cells are executed in order (outputs are not stored)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    # benchmarks.ipynb: run benchmarks/compare.py on two tiny scans instead of loading the
    # saved results (CI has no reference installed and no time for the real sizes).
    monkeypatch.setenv("OFSTITCH_BENCH_TINY", "1")
    notebook = json.loads(path.read_text())
    namespace: dict = {"__name__": "__notebook__"}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells
    for cell in cells:
        assert not cell.get("outputs"), f"{path.name} is stored with outputs"
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        exec(compile(source, f"{path.name}", "exec"), namespace)
