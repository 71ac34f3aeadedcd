"""Crash safety and concurrency of the correlation cache, with real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ofstitch
from ofstitch.cache import CACHE_NAME, CorrelationCache, pair_key
from ofstitch.settings import CorrelationSettings, StitchSettings
from ofstitch.synthetic import make_scan

JOURNAL = CACHE_NAME + ".journal"


@pytest.fixture(scope="module")
def big_scan(tmp_path_factory, source_image):
    """20 tiles of 624x832: correlating them one pair at a time takes a few seconds."""
    big = np.pad(source_image, ((0, source_image.shape[0]), (0, source_image.shape[1]), (0, 0)),
                 mode="reflect")
    folder = tmp_path_factory.mktemp("interrupt") / "scan"
    return make_scan(folder, source=big, grid=(5, 4), tile_shape=(624, 832), seed=3)


def _copy(scan, dest):
    dest.mkdir()
    for name in scan.names:
        (dest / name).write_bytes((scan.folder / name).read_bytes())
    return dest


def _cli(folder, *args):
    return [sys.executable, "-m", "ofstitch.cli", str(folder), "--quiet", "--workers", "1",
            "--device-memory", "1MB", *args]


def _wait_until(proc: subprocess.Popen, ready, step: float = 0.005) -> None:
    """Poll until ``ready()`` or until ``proc`` ends (2 minutes at most)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(step)


def _journal_lines(journal) -> int:
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def test_kill_9_mid_correlation_then_resume(big_scan, tmp_path):
    folder = _copy(big_scan, tmp_path / "killed")
    # Whole tiles: binned strips correlate these 20 tiles in about a second, which can end
    # before the journal has two flushes to kill between.
    whole = StitchSettings(correlation=CorrelationSettings(search_margin=0))
    proc = subprocess.Popen(_cli(folder, "--stitching-mode", "only-correlate",
                                 "--search-margin", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = folder / JOURNAL
    _wait_until(proc, lambda: _journal_lines(journal) >= 2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / CACHE_NAME).exists()  # it died before the final rewrite
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    assert sum(len(v) for line in lines for v in line.values()) >= 2

    resumed = ofstitch.register(folder, whole)
    files = resumed.scan.files
    real = {pair_key(files[a].key, files[b].key) for a, b in resumed.graph.pairs.tolist()}
    # The scan's own pairs in the journal (it also holds null pairs, which are not pairs).
    journaled = len({k for line in lines for v in line.values() for k in v} & real)
    total = len(resumed.graph.pairs)
    assert resumed.n_cached >= journaled
    assert resumed.n_correlated == total - resumed.n_cached
    assert resumed.n_correlated > 0  # the kill really interrupted the work
    assert not journal.exists() and (folder / CACHE_NAME).is_file()

    clean = ofstitch.register(_copy(big_scan, tmp_path / "clean"), whole, use_cache=False)
    np.testing.assert_allclose(resumed.positions_px, clean.positions_px, atol=1e-6)
    np.testing.assert_allclose(resumed.quality, clean.quality, rtol=1e-6)


def test_torn_journal_line_is_ignored(big_scan, tmp_path):
    folder = _copy(big_scan, tmp_path / "torn")
    first = ofstitch.register(folder)
    payload = json.loads((folder / CACHE_NAME).read_text())
    (folder / CACHE_NAME).unlink()
    (key, entries), = payload["sets"].items()
    files = first.scan.files
    real = {pair_key(files[a].key, files[b].key) for a, b in first.graph.pairs.tolist()}
    kept = dict([item for item in entries.items() if item[0] in real][:5])
    (folder / JOURNAL).write_text(json.dumps({key: kept}) + "\n" + '{"' + key[:20])
    again = ofstitch.register(folder)
    assert again.n_cached == 5
    assert again.n_correlated == len(first.graph.pairs) - 5


def test_two_processes_at_once_merge_their_results(big_scan, tmp_path):
    folder = _copy(big_scan, tmp_path / "shared")
    procs = [subprocess.Popen(_cli(folder, "--stitching-mode", "only-correlate",
                                   "--high-pass-sigma", sigma),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for sigma in ("10", "6")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    assert not (folder / JOURNAL).exists()
    cache = CorrelationCache.load(folder / CACHE_NAME)  # valid JSON, both sets whole
    assert len(cache.sets) == 2
    for sigma in (10.0, 6.0):
        reg = ofstitch.register(folder, StitchSettings(
            correlation=CorrelationSettings(high_pass_sigma=sigma)))
        assert reg.n_correlated == 0 and reg.n_cached == len(reg.graph.pairs)


def test_sigterm_mid_correlation_exits_143_and_keeps_the_work(big_scan, tmp_path):
    """SIGTERM (a server stopping its stitcher) unwinds like Ctrl-C: one line, exit 143,
    the journal kept, no temporary file left; the next run correlates only the rest."""
    folder = _copy(big_scan, tmp_path / "terminated")
    # Whole tiles, as above: binned strips can finish before the journal's first flush.
    proc = subprocess.Popen(_cli(folder, "--search-margin", "0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    journal = folder / JOURNAL
    _wait_until(proc, lambda: _journal_lines(journal) >= 1)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        "ofstitch: stopped (SIGTERM)")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries
    resumed = ofstitch.register(folder, StitchSettings(
        correlation=CorrelationSettings(search_margin=0)))
    assert resumed.n_cached > 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_mosaic_renders_stops_the_run(big_scan, tmp_path, sig, code):
    """libvips calls back into Python for the mosaic's bytes; a signal that lands there
    used to be printed and dropped by cffi ("Exception ignored from cffi callback"), and
    the run went on to exit 0. Now it stops: exit 130 / 143, one line, no temporaries."""
    folder = _copy(big_scan, tmp_path / "render")
    ofstitch.register(folder)  # correlation done: the run goes straight to rendering
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli(folder, "-o", str(out), "--format", "jpeg", "--format", "ome-tiff",
             "--format", "dzi", "--format", "ome-zarr"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The run's outputs are written into a hidden folder until all are done; the
    # full-resolution JPEG (and the preview, from its bands) come first.
    _wait_until(proc, lambda: any(out.glob(".ofstitch-outputs.*/*_stitched*")), step=0.002)
    time.sleep(0.3)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
