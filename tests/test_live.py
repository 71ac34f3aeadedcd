"""Live stitching: the LiveStitcher API and ``ofstitch watch`` in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import piexif
import pytest

import ofstitch
from ofstitch import registration
from ofstitch.errors import OfstitchError, OfstitchWarning
from ofstitch.graph import find_pairs
from ofstitch.live import AddStatus, LiveStitcher, shrink_for
from ofstitch.live import thresholds as thresholds_module
from ofstitch.live import watcher as watch_module
from ofstitch.metadata import parse_usercomment, read_tile_configuration

REPO = Path(__file__).resolve().parents[1]
GRID, TILE = (3, 4), (200, 260)


@pytest.fixture
def scan(make_synthetic):
    """A 3x4 synthetic scan (capture times in its EXIF) to copy tile by tile."""
    return make_synthetic("source", grid=GRID, tile_shape=TILE, seed=5)


def _copy(scan, name: str, folder: Path) -> Path:
    shutil.copy(scan.folder / name, folder / name)
    return folder / name


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(np.subtract(a[k], b[k])).max()) for k in a)


@pytest.fixture
def counted(monkeypatch):
    """Wrap the correlation stream; record the tile names of every pair it is given."""
    seen: list[set[frozenset[str]]] = []
    original = registration.correlate_pairs

    def wrapper(paths, pairs, *args, **kwargs):
        seen.append({frozenset((paths[a].name, paths[b].name)) for a, b in pairs.tolist()})
        yield from original(paths, pairs, *args, **kwargs)

    monkeypatch.setattr(registration, "correlate_pairs", wrapper)
    return seen


def test_adding_a_tile_correlates_only_its_new_pairs(scan, tmp_path, counted):
    folder = tmp_path / "live"
    folder.mkdir()
    live = LiveStitcher(folder, settle_time=0)
    done: set[frozenset[str]] = set()
    for name in scan.names:
        counted.clear()
        assert live.add(_copy(scan, name, folder)) == AddStatus.ADDED
        snap = live.snapshot()
        pairs = {frozenset((snap.names[a], snap.names[b])) for a, b in snap.pairs.tolist()}
        new = {p for p in pairs if name in p}
        assert pairs - new == done  # the older pairs were all there already
        correlated = set().union(*counted) if counted else set()
        assert correlated == new  # exactly this tile's pairs, each once
        assert sum(len(batch) for batch in counted) == len(new)
        assert live.last_update.n_correlated == len(new)
        done = pairs
    assert len(done) >= 17  # a 3x4 grid has at least its 17 edge pairs

    # A deleted tile is forgotten (and comes back when written again).
    gone = folder / scan.names[5]
    data = gone.read_bytes()
    gone.unlink()
    assert live.remove(gone) and len(live) == len(scan.names) - 1
    assert scan.names[5] not in live.positions() and not live.remove(gone)
    gone.write_bytes(data)
    assert live.add(gone) == AddStatus.ADDED and len(live) == len(scan.names)

    # The null pairs of robust placement (non-overlapping tiles, for the chance score)
    # were left for refine(), which correlates them a few at a time.
    assert not live.exact
    counted.clear()
    live.refine(max_null_pairs=1)
    assert sum(len(batch) for batch in counted) == 1
    assert not set().union(*counted) & done  # a null pair, not a graph pair
    live.refine()
    assert live.exact
    live.close()

    # The live cache serves a later batch run, which gives the same positions.
    counted.clear()
    reg = ofstitch.register(folder)
    assert reg.n_correlated == 0 and reg.n_cached == len(done) and not counted
    assert _max_difference(live.positions(), reg.positions()) < 1e-6
    assert _max_difference(live.finish(render_outputs=False).positions(), reg.positions()) < 1e-6


def test_quick_placement_reuses_thresholds_then_refines_to_the_batch_result(
        scan, tmp_path, monkeypatch):
    # Reference placement; pretend its threshold search is slow: updates reuse the last
    # thresholds.
    monkeypatch.setattr(thresholds_module, "SYNC_SEARCH_S", -1.0)
    settings = ofstitch.StitchSettings(placement="reference")
    folder = tmp_path / "live"
    folder.mkdir()
    for name in scan.names:
        _copy(scan, name, folder)
    live = LiveStitcher(folder, settings, settle_time=0)
    live.add_many(folder / n for n in scan.names[:4])
    assert live.exact  # the first placement always searches
    for name in scan.names[4:]:
        live.add(folder / name)
    assert not live.exact
    quick = live.positions()
    reg = ofstitch.register(folder, settings)
    # Quick positions are close to the batch ones (same pairs, older thresholds)...
    assert _max_difference(quick, reg.positions()) < 5.0
    # refine() runs the full search; it says whether any position moved, which depends
    # on whether the older thresholds happened to pick the same pairs.
    changed = live.refine()
    assert live.exact
    assert changed == (_max_difference(quick, reg.positions()) > 0)
    # ...and the full search makes them equal.
    assert _max_difference(live.positions(), reg.positions()) < 1e-6
    assert not live.refine()  # nothing stale any more
    live.close()


def test_concurrent_readers_see_consistent_snapshots(scan, tmp_path):
    folder = tmp_path / "live"
    folder.mkdir()
    live = LiveStitcher(folder, settle_time=0)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = {"positions": 0, "preview": 0}

    def reader(kind: str) -> None:
        last_version = 0
        try:
            while not stop.is_set():
                snap = live.snapshot()
                assert snap.version >= last_version
                last_version = snap.version
                assert len(snap.names) == len(snap.positions_px) == len(set(snap.names))
                assert np.all(np.isfinite(snap.positions_px))
                if kind == "positions":
                    positions = live.positions()
                    assert len(positions) >= len(snap.names)  # never goes back
                    reads["positions"] += 1
                elif snap.names:
                    image = live.preview(width=300)
                    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[1] <= 300
                    assert image.dtype == np.uint8 and image.max() > 0
                    reads["preview"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in
               ("positions", "positions", "preview", "preview")]
    for t in threads:
        t.start()
    try:
        for name in scan.names:
            assert live.add(_copy(scan, name, folder)) == AddStatus.ADDED
    finally:
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    assert reads["positions"] > 0 and reads["preview"] > 0
    assert len(live) == len(scan.names)
    live.refine()
    live.close()
    assert _max_difference(live.positions(), ofstitch.register(folder).positions()) < 1e-6


def test_files_still_being_written_wait(scan, tmp_path):
    folder = tmp_path / "live"
    folder.mkdir()
    name = scan.names[0]
    data = (scan.folder / name).read_bytes()
    live = LiveStitcher(folder, settle_time=0)
    path = folder / name
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfstitchWarning)  # no warning for an unfinished file
        assert live.add(path) == AddStatus.WAITING
        assert len(live) == 0
        path.write_bytes(data)
        assert live.add(path) == AddStatus.ADDED
        assert live.add(path) == AddStatus.IGNORED  # unchanged: nothing to do
    # A file younger than the settle time waits, however complete.
    slow = LiveStitcher(folder, settle_time=30)
    assert slow.add(path) == AddStatus.WAITING
    # Outputs and other files are not tiles.
    shutil.copy(path, folder / "preview.jpg")
    assert live.add(folder / "preview.jpg") == AddStatus.IGNORED
    # A complete but undecodable file is skipped once, with a warning.
    bad = folder / "tile_bad.jpg"
    bad.write_bytes(b"\xff\xd8" + b"\x00" * 500 + b"\xff\xd9")
    with pytest.warns(OfstitchWarning, match="tile_bad.jpg"):
        assert live.add(bad) == AddStatus.SKIPPED
    assert live.add(bad) == AddStatus.IGNORED
    # A tile of another size is skipped.
    import pyvips

    other = folder / "tile_other.jpg"
    pyvips.Image.black(100, 80).write_to_file(str(other))
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.load(
        str(path))["Exif"][piexif.ExifIFD.UserComment]}}), str(other))
    with pytest.warns(OfstitchWarning, match="100x80"):
        assert live.add(other) == AddStatus.SKIPPED
    assert live.names == (name,)
    live.close()


def test_preview_of_tiles_not_yet_joined_follows_the_stage(scan, tmp_path):
    folder = tmp_path / "live"
    folder.mkdir()
    live = LiveStitcher(folder, settle_time=0)
    with pytest.raises(OfstitchError, match="no tile"):
        live.preview()
    first, last = scan.names[0], scan.names[-1]  # opposite corners of the grid
    live.add_many([_copy(scan, first, folder), _copy(scan, last, folder)])
    snap = live.snapshot()
    assert snap.n_components == 2 and len(snap.pairs) == 0
    stage = snap.scan.stage_px
    np.testing.assert_allclose(snap.positions_px, stage - stage.min(axis=0), atol=1e-9)
    image = live.preview(path=folder / "preview.jpg")
    assert image.shape[1] == min(1000, round(np.ptp(stage[:, 1]) + TILE[1]))
    assert (folder / "preview.jpg").is_file()
    # A third tile joins the first one; the group is placed where the stage puts it.
    live.add(_copy(scan, scan.names[1], folder))
    snap = live.snapshot()
    assert snap.n_components == 2 and len(snap.pairs) == 1
    live.close()


def test_shrink_for():
    assert shrink_for(1.0) == 1 and shrink_for(0.6) == 1 and shrink_for(0.5) == 2
    assert shrink_for(0.3) == 2 and shrink_for(0.2) == 4 and shrink_for(0.01) == 8


def _preview_count(path: Path) -> int | None:
    try:
        comment = piexif.load(os.fspath(path))["Exif"][piexif.ExifIFD.UserComment]
        return int(parse_usercomment(comment)["NumberOfImages"])
    except Exception:  # not there yet
        return None


def _watch(folder: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.Popen([sys.executable, "-m", "ofstitch", "watch", str(folder), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_watch_follows_a_scan_written_tile_by_tile(scan, tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    proc = _watch(folder, "--settle-time", "0.2")
    preview = folder / "preview.jpg"
    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def monitor() -> None:
        last = None
        while not done.is_set():
            try:
                ident = (preview.stat().st_ino, preview.stat().st_mtime_ns)
            except FileNotFoundError:
                ident = None
            if ident is not None and ident != last:
                count = _preview_count(preview)
                if count is not None:
                    seen.append((time.monotonic(), count))
                    last = ident
            time.sleep(0.01)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    halves: dict[int, tuple[float, float]] = {}  # tile -> (first half written, completed)
    try:
        time.sleep(1.0)
        for k, name in enumerate(scan.names):
            data = (scan.folder / name).read_bytes()
            with open(folder / name, "wb") as fh:
                if k % 3 == 1:  # written in two halves, with a pause longer than the settle time
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    started = time.monotonic()
                    time.sleep(0.8)
                    fh.write(data[len(data) // 2:])
                    fh.flush()
                    halves[k] = (started, time.monotonic())
                else:
                    fh.write(data)
            time.sleep(0.15)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1][1] < len(scan.names)):
            time.sleep(0.05)
    finally:
        done.set()
        watcher.join()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "warning" not in err.lower() and "truncated" not in err.lower(), err
    counts = [c for _, c in seen]
    assert counts and counts[-1] == len(scan.names)
    assert len(set(counts)) >= 4 and counts == sorted(counts)  # appeared, then updated
    # No preview counted a half-written tile before its second half was written.
    for k, (_started, completed) in halves.items():
        assert not any(t < completed and c > k for t, c in seen), (k, seen)
    # The live positions (rewritten with each preview) are those of a batch run, whose
    # pairs all come from the cache the watcher left behind.
    live_positions = {n: (y, x) for n, (x, y) in
                      read_tile_configuration(folder / "OFMTileConfiguration.txt").items()}
    assert len(live_positions) == len(scan.names)
    reg = ofstitch.register(folder)
    assert reg.n_correlated == 0
    assert reg.scan.tile_shape == TILE and len(reg.scan) == len(scan.names)
    assert _max_difference(live_positions, reg.positions()) < 2e-3  # 3 decimals in the file


def test_watch_idle_timeout_and_final_outputs(scan, tmp_path):
    folder = tmp_path / "watched"
    shutil.copytree(scan.folder, folder)
    proc = _watch(folder, "--settle-time", "0", "--idle-timeout", "1", "--final",
                  "--stitching-mode", "preview", "--dzi", "-q")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == "" and err == ""  # quiet, and nothing to warn about
    assert (folder / "preview.dzi").is_file() and any((folder / "preview_files").iterdir())
    assert (folder / "preview.jpg").is_file() and (folder / "stitched_thumbnail.jpg").is_file()
    assert _preview_count(folder / "preview.jpg") == len(scan.names)
    final = {n: (y, x) for n, (x, y) in
             read_tile_configuration(folder / "OFMTileConfiguration.txt").items()}
    reg = ofstitch.register(folder)
    assert reg.n_correlated == 0
    assert _max_difference(final, reg.positions()) < 2e-3


def test_watch_is_a_command_and_bare_folders_still_stitch(tmp_path, capsys):
    from cli_helpers import run_main

    result = run_main("watch", "--help", capsys=capsys)
    assert result.returncode == 0 and "--settle-time" in result.stdout
    assert "--idle-timeout" in result.stdout and "--final" in result.stdout
    missing = run_main("watch", tmp_path / "nope", capsys=capsys)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = run_main("watch", tmp_path, "--settle-time", "-1", capsys=capsys)
    assert bad.returncode == 2 and "--settle-time" in bad.stderr
    # 'ofstitch FOLDER' is still 'ofstitch stitch FOLDER'.
    empty = run_main(tmp_path, capsys=capsys)
    assert empty.returncode == 2 and "no tile images" in empty.stderr


def test_grey_png_tiles_positioned_by_file_name(make_synthetic, tmp_path):
    source = make_synthetic("png", grid=(2, 3), tile_shape=TILE, layout="filename",
                            extension=".png", grey=True, seed=7)
    folder = tmp_path / "live"
    folder.mkdir()
    live = LiveStitcher(folder, settle_time=0)
    data = (source.folder / source.names[0]).read_bytes()
    (folder / source.names[0]).write_bytes(data[:-20])  # no IEND chunk yet
    assert live.add(folder / source.names[0]) == AddStatus.WAITING
    for name in source.names:
        shutil.copy(source.folder / name, folder / name)
    statuses = live.add_many(folder / n for n in source.names)
    assert set(statuses.values()) == {AddStatus.ADDED}
    image = live.preview()
    assert image.shape[2] == 3 and np.ptp(image) > 0
    live.refine()
    live.close()
    assert _max_difference(live.positions(), ofstitch.register(folder).positions()) < 1e-6


def test_pacer_leaves_refine_steps_to_the_gaps_between_tiles():
    pacer = watch_module._Pacer()
    assert not pacer.has_time()  # no pace known yet
    now = time.monotonic()
    pacer.tile_added(now - 2.0)
    pacer.tile_added(now)  # one tile every 2 s, the last one just now
    assert pacer.has_time()  # about 2 s before the next tile; a step costs ~0.5 s
    pacer.refined(10.0, 1)  # steps turn out slow
    assert not pacer.has_time()
    pacer.tile_added(now + 0.2)  # tiles come faster: less time still
    assert pacer.pace_s < 2.0 and not pacer.has_time()


def test_blank_tiles_islands_and_the_batch_result(make_synthetic, tmp_path):
    # Blank tiles cannot be correlated: robust placement leaves them in islands and a batch
    # run tries their diagonal neighbours too. The live path does the same.
    source = make_synthetic("blank", grid=GRID, tile_shape=TILE, blank_fraction=0.25, seed=0)
    folder = tmp_path / "live"
    folder.mkdir()
    live = LiveStitcher(folder, settle_time=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OfstitchWarning)  # "no pair could be correlated"
        for name in source.names:
            assert live.add(_copy(source, name, folder)) == AddStatus.ADDED
            assert np.all(np.isfinite(live.snapshot().positions_px))
        live.refine()
        live.close()
        reg = ofstitch.register(folder)
    overlap_graph = find_pairs(reg.scan.stage_px, reg.scan.tile_shape, 0.2)
    assert len(reg.graph.pairs) > len(overlap_graph.pairs)  # islands joined by extra pairs
    np.testing.assert_array_equal(live.snapshot().pairs, reg.graph.pairs)  # the same ones
    assert reg.n_correlated == 0  # the live path correlated those too
    assert _max_difference(live.positions(), reg.positions()) < 1e-6


def test_watch_ends_with_one_line_when_its_folder_goes_away(scan, tmp_path):
    """A deleted (or unmounted) watched folder ends the watch: exit 2, one error line, the
    preview so far kept where the outputs go."""
    folder = tmp_path / "watched"
    folder.mkdir()
    out = tmp_path / "out"
    for name in scan.names[:4]:
        _copy(scan, name, folder)
    proc = _watch(folder, "--settle-time", "0", "-o", str(out), "-q")
    deadline = time.monotonic() + 60
    while not (out / "preview.jpg").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (out / "preview.jpg").exists()
    shutil.rmtree(folder)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("ofstitch: error:")]
    assert len(errors) == 1 and "is gone" in errors[0], stderr
    assert "Traceback" not in stderr
    assert (out / "preview.jpg").exists()
