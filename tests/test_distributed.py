"""Scale-out on Dask: a LocalCluster of 2 worker processes on 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
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
def own_cluster():
    """A cluster of its own for a test that kills a worker: whether and when the nanny
    brings the worker back (slow on a loaded machine) matters to no other test."""
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


def test_a_worker_killed_mid_run_changes_nothing(own_cluster, scan_3x4, monkeypatch):
    """Kill a worker process when the first of many chunks is back: Dask runs its chunks
    again elsewhere (its nanny starts a new worker), and the positions are those of a
    local run."""
    import os

    address, client = own_cluster
    monkeypatch.setattr(distributed, "CHUNK_PAIRS", 2)  # many small tasks
    local = ofstitch.register(scan_3x4.folder, StitchSettings(), use_cache=False)
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    left: list[int] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "correlate" and done:
            left.append(total - done)
            if len(left) == 1:
                os.kill(pid, signal.SIGKILL)  # the worker process, as the OOM killer would

    remote = ofstitch.register(scan_3x4.folder, StitchSettings(scheduler=address),
                               use_cache=False, progress=progress)
    assert left[0] > 10 and left[-1] == 0  # many chunks were still to run, and all ran
    assert victim not in client.scheduler_info()["workers"]
    np.testing.assert_allclose(remote.positions_px, local.positions_px, atol=1e-6, rtol=0)


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


# ----------------------------------------------------------------------------- OME-Zarr


def _mosaic(reg, flat=None, **kwargs):
    from ofstitch import render

    return render.Mosaic(reg.scan.paths, reg.positions_px, reg.scan.tile_shape,
                         pixels=render.Pixels.data(np.uint8, 3, flat), **kwargs)


def _zarr_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _local_zarr(reg, path: Path, flat=None, **kwargs) -> None:
    from ofstitch import formats

    _mosaic(reg, flat).write(lambda im: formats.write_ome_zarr(im, path, pixel_size_um=0.5,
                                                               chunk=32, **kwargs))


@pytest.mark.parametrize(("ngff_version", "flat_field"),
                         [("0.4", False), ("0.5", False), ("0.4", True)])
def test_ome_zarr_written_by_the_workers_equals_a_local_run(cluster, scan_3x4, tmp_path,
                                                            ngff_version, flat_field):
    """Every level (the mosaic is 287 x 500: odd sizes on the way down) and every file,
    metadata included, are those of the streamed local writer; the chunks were written by
    the workers, one task per region. A flat field travels to the workers too."""
    from dask.distributed import get_task_stream

    from ofstitch import flatfield

    address, client = cluster
    reg = ofstitch.register(scan_3x4.folder, use_cache=False)
    flat = flatfield.resolve("auto", reg.scan.paths, reg.scan.tile_shape) if flat_field \
        else None
    local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
    _local_zarr(reg, local, flat, ngff_version=ngff_version)
    with get_task_stream(client) as stream:
        distributed.write_ome_zarr_on_cluster(address, _mosaic(reg, flat), remote,
                                              pixel_size_um=0.5,
                                              chunk=32, ngff_version=ngff_version,
                                              levels_per_task=1)
    files = _zarr_files(local)
    assert len(files) > 10 and _zarr_files(remote) == files
    tasks = [t for t in stream.data if "zarr_tiles_task" in str(t["key"])]
    assert len(tasks) > 1
    assert {t["worker"] for t in tasks} <= set(client.scheduler_info()["workers"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stitch_with_a_scheduler_writes_the_same_ome_zarr(cluster, scan_3x4, tmp_path):
    import zarr

    address, _ = cluster
    settings = StitchSettings(formats=("ome-zarr",))
    local = ofstitch.stitch(scan_3x4.folder, settings, output_dir=tmp_path / "local",
                            cache_dir=tmp_path / "cache")
    remote = ofstitch.stitch(scan_3x4.folder, StitchSettings(formats=("ome-zarr",),
                                                             scheduler=address),
                             output_dir=tmp_path / "remote", cache_dir=tmp_path / "cache")
    a = zarr.open_group(local.outputs["ome_zarr"], mode="r")
    b = zarr.open_group(remote.outputs["ome_zarr"], mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for key in a.array_keys():
        np.testing.assert_array_equal(b[key][:], a[key][:])
    assert dict(b.attrs) == dict(a.attrs)


def test_a_worker_killed_mid_write_gives_the_same_ome_zarr(own_cluster, scan_3x4, tmp_path):
    """Each task writes whole chunks, so a task run again on another worker after its
    worker died (perhaps half-way through a chunk) leaves the same files. The worker is
    killed when the third of many tasks is done, so the others are still to run."""
    import os

    address, client = own_cluster
    reg = ofstitch.register(scan_3x4.folder, use_cache=False)
    local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
    _local_zarr(reg, local)
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    left: list[int] = []

    def progress(done: int, total: int) -> None:
        left.append(total - done)
        if done == 3:
            os.kill(pid, signal.SIGKILL)  # the worker process, as the OOM killer would

    distributed.write_ome_zarr_on_cluster(address, _mosaic(reg), remote, pixel_size_um=0.5,
                                          chunk=32, levels_per_task=1, progress=progress)
    assert left[2] > 20 and left[-1] == 0  # many tasks were still to run, and all ran
    assert victim not in client.scheduler_info()["workers"]
    assert _zarr_files(remote) == _zarr_files(local)


def test_an_undecodable_tile_is_left_out_as_locally(cluster, scan_3x4, tmp_path):
    import warnings

    address, _ = cluster
    reg = ofstitch.register(scan_3x4.folder, use_cache=False)
    broken = reg.scan.paths[5]
    broken.write_bytes(broken.read_bytes()[:2000])  # a truncated JPEG
    local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
    with pytest.warns(ofstitch.OfstitchWarning, match=broken.name):
        _local_zarr(reg, local)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.write_ome_zarr_on_cluster(address, _mosaic(reg), remote, pixel_size_um=0.5,
                                              chunk=32, levels_per_task=1)
    assert [str(w.message) for w in caught if broken.name in str(w.message)]
    assert _zarr_files(remote) == _zarr_files(local)


def test_a_failed_cluster_write_leaves_nothing(cluster, scan_3x4, tmp_path):
    """A tile the workers cannot see stops the run with the shared-file-system message,
    and no OME-Zarr, whole or partial, is left behind."""
    from ofstitch import render

    address, _ = cluster
    reg = ofstitch.register(scan_3x4.folder, use_cache=False)
    paths = list(reg.scan.paths)
    paths[3] = tmp_path / "elsewhere" / paths[3].name
    mosaic = render.Mosaic(paths, reg.positions_px, reg.scan.tile_shape,
                           pixels=render.Pixels.data(np.uint8, 3))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(distributed.SharedFileSystemError, match="every worker"):
        distributed.write_ome_zarr_on_cluster(address, mosaic, out / "m.zarr",
                                              pixel_size_um=0.5, chunk=32, levels_per_task=1)
    assert list(out.iterdir()) == []


def test_live_stitching_sends_each_new_tiles_pairs_to_the_cluster(cluster, scan_3x4, tmp_path):
    """`ofstitch watch --scheduler`: as each tile arrives its new pairs are correlated on
    the workers, and the live positions are those of a local live run."""
    from dask.distributed import get_task_stream

    from ofstitch.live import AddStatus, LiveStitcher

    address, client = cluster
    runs = {}
    for where, settings in (("local", StitchSettings()),
                            ("cluster", StitchSettings(scheduler=address))):
        folder = tmp_path / where
        folder.mkdir()
        live = LiveStitcher(folder, settings, settle_time=0, use_cache=False)
        tasks = []
        for name in scan_3x4.names:
            shutil.copy2(scan_3x4.folder / name, folder / name)
            with get_task_stream(client) as stream:  # (collected when the block ends)
                assert live.add(folder / name) == AddStatus.ADDED
            chunks = [t for t in stream.data if "correlate_chunk" in str(t["key"])]
            tasks.append((live.last_update.n_correlated, len(chunks)))
        runs[where] = (live.positions(), tasks)
        live.close()
    local, local_tasks = runs["local"]
    remote, remote_tasks = runs["cluster"]
    assert local.keys() == remote.keys()
    assert max(abs(local[n][i] - remote[n][i]) for n in local for i in (0, 1)) < 1e-6
    assert not any(chunks for _, chunks in local_tasks)  # a local run uses no cluster
    # On the cluster, every tile that brought new pairs sent them to the workers.
    assert sum(pairs for pairs, _ in remote_tasks) >= 17
    assert all(chunks >= 1 for pairs, chunks in remote_tasks if pairs)


def test_a_cancelled_task_that_is_running_is_waited_for():
    """Cancelling does not stop a running task: the writer waits for it before removing
    its folder, or the task would write into the folder after it was removed."""
    import time

    from dask.distributed import Client, LocalCluster

    from ofstitch.distributed import _wait_until_stopped

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        future = client.submit(time.sleep, 1.5, pure=False)
        while not client.processing()[next(iter(client.processing()))]:
            time.sleep(0.02)  # until it runs
        start = time.monotonic()
        client.cancel([future])
        _wait_until_stopped(client, {str(future.key)})
        assert time.monotonic() - start > 0.5  # it waited for the sleep, not just the cancel
