"""Scale-out on Dask: a LocalCluster of 2 worker processes on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_main

import ofstitch
from ofstitch import distributed
from ofstitch.settings import StitchSettings

pytest.importorskip("dask.distributed", reason="Dask is not installed (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        with Client(local) as client:
            yield local.scheduler_address, client


@pytest.fixture
def scan_3x4(make_synthetic):
    return make_synthetic(grid=(3, 4), tile_shape=(120, 160), seed=7)


def test_positions_equal_a_local_run_and_the_work_is_the_clusters(cluster, scan_3x4):
    from dask.distributed import get_task_stream

    address, client = cluster
    local = ofstitch.register(scan_3x4.folder, StitchSettings(), use_cache=False)
    with get_task_stream(client) as stream:
        remote = ofstitch.register(scan_3x4.folder, StitchSettings(scheduler=address),
                                   use_cache=False)
    assert remote.names == local.names
    np.testing.assert_allclose(remote.positions_px, local.positions_px, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(remote.shift_px, local.shift_px)
    # Every pair (and null pair) went through the workers, in chunks.
    n_pairs = len(local.graph.pairs) + local.n_null
    chunks = [t for t in stream.data if "correlate_chunk" in str(t["key"])]
    assert len(chunks) == -(-n_pairs // distributed.CHUNK_PAIRS)
    assert {t["worker"] for t in chunks} <= set(client.scheduler_info()["workers"])


def test_a_worker_killed_mid_run_changes_nothing(cluster, scan_3x4, monkeypatch):
    """Kill a worker process while its chunks run: Dask runs them again elsewhere (its
    nanny starts a new worker), and the positions are those of a local run."""
    import os
    import threading

    address, client = cluster
    monkeypatch.setattr(distributed, "CHUNK_PAIRS", 2)  # many small tasks
    local = ofstitch.register(scan_3x4.folder, StitchSettings(), use_cache=False)
    victim = sorted(client.scheduler_info()["workers"])[0]
    killed = threading.Event()

    def kill_soon() -> None:
        time.sleep(0.3)
        try:
            client.run(os._exit, 1, workers=[victim], wait=False)
        except Exception:  # the worker dies while it answers: its connection closes
            pass
        finally:
            killed.set()

    threading.Thread(target=kill_soon, daemon=True).start()
    remote = ofstitch.register(scan_3x4.folder, StitchSettings(scheduler=address),
                               use_cache=False)
    assert killed.wait(30)
    np.testing.assert_allclose(remote.positions_px, local.positions_px, atol=1e-6, rtol=0)
    client.wait_for_workers(2, timeout=60)  # the nanny brought it back for the next tests


def test_cache_filled_by_the_cluster_serves_a_local_run(cluster, scan_3x4):
    address, _ = cluster
    ofstitch.register(scan_3x4.folder, StitchSettings(scheduler=address))
    assert ofstitch.register(scan_3x4.folder).n_correlated == 0


def test_a_worker_that_cannot_see_the_scan_says_so(cluster, scan_3x4, tmp_path):
    """The workers read tiles by path: a path they cannot see fails with a clear message."""
    address, _ = cluster
    settings = StitchSettings(scheduler=address)
    paths = [tmp_path / "elsewhere" / "tile_0000.jpg", tmp_path / "elsewhere" / "tile_0001.jpg"]
    with pytest.raises(distributed.SharedFileSystemError, match="shared|every worker"):
        list(distributed.correlate_on_cluster(
            address, paths, np.array([[0, 1]]), np.array([[0.0, 112.0]]),
            settings.correlation, (120, 160)))


def test_unreachable_scheduler_is_one_line(scan_3x4, capsys):
    result = run_main(scan_3x4.folder, "--scheduler", "tcp://127.0.0.1:9", "-q", capsys=capsys)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tcp://127.0.0.1:9" in lines[0] and "Traceback" not in lines[0]


def _three_scans(make_synthetic, tmp_path) -> list[Path]:
    good = [make_synthetic(f"scans/good{k}", grid=(2, 2), tile_shape=(120, 160), seed=k).folder
            for k in range(2)]
    broken = tmp_path / "scans" / "broken"
    broken.mkdir(parents=True)
    (broken / "tile_0_0.jpg").write_bytes(b"not an image")
    return [*good, broken]


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_batch_stitches_every_scan_and_reports_the_broken_one(where, cluster, make_synthetic,
                                                             tmp_path, capsys):
    folders = _three_scans(make_synthetic, tmp_path)
    out = tmp_path / "out"
    extra = ["--jobs", "2"] if where == "local" else ["--scheduler", cluster[0]]
    result = run_main("batch", *folders, "-o", out, "--stitching-mode", "preview", *extra,
                      capsys=capsys)
    assert result.returncode == 2  # one scan failed
    for folder in folders[:2]:
        assert (out / folder.name / "preview.jpg").is_file()
    assert "broken" in result.stdout and "failed" in result.stdout
    assert "2 tiles" not in result.stdout and "4 tiles" in result.stdout
    assert "1 of 3 scans failed" in result.stderr


def test_scheduler_from_the_environment_in_a_real_process(cluster, scan_3x4, tmp_path):
    """``OFSTITCH_SCHEDULER`` alone sends the work to the cluster (a real process, as a lab
    would run it); the positions equal a local run's."""
    address, _ = cluster
    out = tmp_path / "out"
    env = {**_env(), "OFSTITCH_SCHEDULER": address}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ofstitch", str(scan_3x4.folder), "-o",
                           str(out), "--stitching-mode", "preview", "-q",
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 300
    remote = (out / "OFMTileConfiguration.txt").read_text()
    shutil.rmtree(out)
    local = ofstitch.stitch(scan_3x4.folder, StitchSettings(stitching_mode="preview"),
                            output_dir=out, cache_dir=tmp_path / "local-cache")
    assert local.outputs["tile_configuration"].read_text() == remote


def _env() -> dict:
    import os

    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
