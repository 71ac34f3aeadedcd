"""The correlation cache, through :func:`ofstitch.register` and :func:`ofstitch.stitch`.

A pair is correlated again exactly when one of its files changed (name, size or
modification time) or the correlation settings changed; everything else comes
from ``ofstitch_tiling_cache.json``. A corrupt cache warns and is rebuilt; a failed
write leaves the previous cache intact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import ofstitch
from ofstitch import cache as cache_module
from ofstitch.cache import CACHE_NAME, FORMAT, LOCAL_TAG, VERSION, cache_path
from ofstitch.errors import OfstitchWarning
from ofstitch.settings import StitchSettings

TILE_SHAPE = (120, 160)  # (height, width)
DEFAULT_KEY = ofstitch.CorrelationSettings().key()


# ----------------------------------------------------------------------------- helpers


def register(folder: Path, settings: StitchSettings | None = None, **kwargs):
    """``ofstitch.register`` with no OfstitchWarning allowed (they are errors here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfstitchWarning)
        return ofstitch.register(folder, settings, **kwargs)


def pairs_with(reg, name: str) -> int:
    """How many of the registration's pairs involve the tile ``name``."""
    i = reg.names.index(name)
    return int((reg.graph.pairs == i).any(axis=1).sum())


def read_cache(path: Path, *, local: bool = False) -> dict:
    """The cache's correlation sets (with ``local``, its local-search results instead)."""
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert isinstance(data["sets"], dict)
    return {k: v for k, v in data["sets"].items() if k.endswith(LOCAL_TAG) == local}


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted or finished write might leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".ofstitch"))


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="1000", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "ofstitch.cli", *map(str, args)], input="",
                          capture_output=True, text=True, env=env, timeout=180)


@pytest.fixture
def scan(make_synthetic):
    """A 3x3 scan (12 pairs)."""
    return make_synthetic(grid=(3, 3), tile_shape=TILE_SHAPE, seed=11)


# ----------------------------------------------------------------------------- reuse


def test_second_run_correlates_nothing(scan):
    first = register(scan.folder)
    m = len(first.graph.pairs)
    assert m == 12
    assert (first.n_correlated, first.n_cached) == (m, 0)
    assert set(read_cache(scan.folder / CACHE_NAME)) == {DEFAULT_KEY}
    # The pairs, and the null pairs (tiles that do not overlap) of robust placement.
    assert first.n_null >= 4
    assert len(read_cache(scan.folder / CACHE_NAME)[DEFAULT_KEY]) == m + first.n_null

    second = register(scan.folder)
    assert (second.n_correlated, second.n_cached) == (0, m)
    assert second.names == first.names
    np.testing.assert_array_equal(second.shift_px, first.shift_px)
    np.testing.assert_array_equal(second.quality, first.quality)
    np.testing.assert_allclose(second.positions_px, first.positions_px, atol=1e-9)
    assert leftovers(scan.folder) == []


def test_stitch_uses_the_cache(scan, tmp_path):
    settings = StitchSettings(stitching_mode="preview")
    first = ofstitch.stitch(scan.folder, settings, output_dir=tmp_path / "a")
    second = ofstitch.stitch(scan.folder, settings, output_dir=tmp_path / "b")
    assert second.registration.n_correlated == 0
    assert second.registration.n_cached == len(first.registration.graph.pairs)
    np.testing.assert_allclose(second.positions_px, first.positions_px, atol=1e-9)
    for folder in (scan.folder, tmp_path / "a", tmp_path / "b"):
        assert leftovers(folder) == []


def test_use_cache_false_neither_reads_nor_writes(scan):
    reg = register(scan.folder, use_cache=False)
    assert reg.n_correlated == len(reg.graph.pairs) and reg.n_cached == 0
    assert not (scan.folder / CACHE_NAME).exists()


def test_added_tile_correlates_only_its_pairs(make_synthetic, tmp_path):
    full = make_synthetic("full", grid=(3, 4), tile_shape=TILE_SHAPE, seed=12)
    folder = tmp_path / "growing"
    folder.mkdir()
    *first_names, last = full.names
    for name in first_names:
        shutil.copy2(full.folder / name, folder / name)
    before = register(folder)
    assert before.n_correlated == len(before.graph.pairs)

    shutil.copy2(full.folder / last, folder / last)
    after = register(folder)
    assert len(after.names) == len(full.names)
    new_pairs = pairs_with(after, last)
    assert new_pairs >= 2
    assert after.n_correlated == new_pairs
    assert after.n_cached == len(after.graph.pairs) - new_pairs
    assert len(after.graph.pairs) == len(before.graph.pairs) + new_pairs


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))


def _replace_same_mtime(path: Path) -> None:
    """New content (a byte after the JPEG's end), the same modification time."""
    st = path.stat()
    path.write_bytes(path.read_bytes() + b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _rewrite(path: Path) -> None:
    """The same bytes, written again (a new modification time)."""
    data = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    path.unlink()
    path.write_bytes(data)
    if path.stat().st_mtime_ns == mtime:  # a coarse clock
        _touch(path)


def _other_content_same_size_and_mtime(path: Path) -> None:
    """Other pixels in a file of the same size, with its modification time kept (what
    ``cp -p`` or ``rsync -a`` of another image of the same size does)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = next(i for i in range(len(data) * 3 // 5, len(data))  # inside the entropy-coded data
             if data[i - 1] != 0xFF and data[i] < 0xFE)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("change", [_touch, _replace_same_mtime, _rewrite,
                                    _other_content_same_size_and_mtime],
                         ids=["touch", "replace-same-mtime", "rewrite", "same-size-and-mtime"])
def test_changed_tile_recorrelates_exactly_its_pairs(scan, change):
    first = register(scan.folder)
    centre = "tile_0004.jpg"  # the middle of the 3x3 grid: 4 pairs
    corner = "tile_0000.jpg"  # 2 pairs
    change(scan.folder / centre)
    second = register(scan.folder)
    assert (second.n_correlated, second.n_cached) == (4, 8)
    assert pairs_with(second, centre) == 4
    np.testing.assert_allclose(second.positions_px, first.positions_px, atol=0.05)

    change(scan.folder / corner)
    third = register(scan.folder)
    assert (third.n_correlated, third.n_cached) == (pairs_with(third, corner), 10)


# ----------------------------------------------------------------------------- settings


def test_changed_setting_correlates_everything_and_keeps_both_sets(scan):
    first = register(scan.folder)
    m = len(first.graph.pairs)
    sharper = StitchSettings().with_correlation(high_pass_sigma=5.0)
    second = register(scan.folder, sharper)
    assert (second.n_correlated, second.n_cached) == (m, 0)
    sets = read_cache(scan.folder / CACHE_NAME)
    assert set(sets) == {DEFAULT_KEY, sharper.correlation.key()}
    assert all(len(entries) == m + first.n_null for entries in sets.values())
    # Both sets stay usable.
    assert register(scan.folder).n_correlated == 0
    assert register(scan.folder, sharper).n_correlated == 0

    shown = run_cli(scan.folder, "--show-cached-settings")
    assert shown.returncode == 0, shown.stderr
    assert "Found 2 set(s)" in shown.stdout
    lines = [line for line in shown.stdout.splitlines() if line.strip().startswith("[")]
    assert len(lines) == 2
    assert any("--high-pass-sigma 5.0" in line and "9/9" in line for line in lines), lines
    assert any("no non-default settings" in line for line in lines), lines

    ambiguous = run_cli(scan.folder, "--use-cached-settings", "--stitching-mode",
                        "only-correlate")
    assert ambiguous.returncode == 2
    errors = ambiguous.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("ofstitch: error:"), ambiguous.stderr
    assert "Traceback" not in ambiguous.stderr


def test_use_cached_settings_reuses_the_only_set(scan, tmp_path):
    sharper = StitchSettings(stitching_mode="only-correlate").with_correlation(
        high_pass_sigma=5.0, pad=False)
    ofstitch.stitch(scan.folder, sharper)
    before = (scan.folder / CACHE_NAME).read_bytes()

    shown = run_cli(scan.folder, "--show-cached-settings")
    assert "Found 1 set(s)" in shown.stdout
    assert "--pad False" in shown.stdout and "--high-pass-sigma 5.0" in shown.stdout

    result = run_cli(scan.folder, "--use-cached-settings", "--stitching-mode", "preview",
                     "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "(0 correlated now, 12 from the cache" in result.stdout, result.stdout
    # The correlations are as they were; the local search's results were added (a run
    # that only correlates does not search), and a second run finds them all.
    assert read_cache(scan.folder / CACHE_NAME) == json.loads(before)["sets"]
    assert read_cache(scan.folder / CACHE_NAME, local=True)
    searched = (scan.folder / CACHE_NAME).read_bytes()
    again = run_cli(scan.folder, "--use-cached-settings", "--stitching-mode", "preview",
                    "-o", tmp_path / "out")
    assert again.returncode == 0, again.stderr
    assert (scan.folder / CACHE_NAME).read_bytes() == searched


def test_equal_settings_share_the_cache(scan):
    register(scan.folder)
    same = StitchSettings().with_correlation(high_pass_sigma=10, resize=1)
    assert same == StitchSettings()
    assert register(scan.folder, same).n_correlated == 0


# ----------------------------------------------------------------------------- corruption


CORRUPT = {
    "text-garbage": b"this is not JSON at all",
    "truncated-json": None,  # the first half of a valid cache
    "empty-file": b"",
    "json-list": b"[1, 2, 3]",
    "json-null": b"null",
    "other-format": json.dumps({"format": "something-else", "version": VERSION,
                                "sets": {}}).encode(),
    "other-version": None,  # a valid cache with version + 1
    "sets-not-a-dict": json.dumps({"format": FORMAT, "version": VERSION,
                                   "sets": [1, 2]}).encode(),
    "binary-garbage": b"\xff\xfe\x00\x80garbage\x81\x00",
    "non-numeric-entries": "strings",  # the real keys, with entries that are not numbers
    "null-entries": "nulls",
}


def _corrupt_bytes(kind: str, valid: bytes) -> bytes:
    if kind == "truncated-json":
        return valid[: len(valid) // 2]
    if kind == "other-version":
        data = json.loads(valid)
        data["version"] = VERSION + 1
        return json.dumps(data).encode()
    if kind in ("non-numeric-entries", "null-entries"):
        data = json.loads(valid)
        value = ["a", "b", "c", "d", "e"] if kind == "non-numeric-entries" else [None] * 5
        data["sets"] = {k: {p: value for p in v} for k, v in data["sets"].items()}
        return json.dumps(data).encode()
    return CORRUPT[kind]


@pytest.mark.parametrize("kind", [
    k for k in CORRUPT])
def test_corrupt_cache_warns_recomputes_and_is_replaced(scan, kind):
    path = scan.folder / CACHE_NAME
    first = register(scan.folder)
    m = len(first.graph.pairs)
    path.write_bytes(_corrupt_bytes(kind, path.read_bytes()))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = ofstitch.register(scan.folder)  # exceptions escape as themselves
    messages = [str(w.message) for w in caught if issubclass(w.category, OfstitchWarning)]
    assert any("correlation cache" in msg for msg in messages), messages
    assert (reg.n_correlated, reg.n_cached) == (m, 0)
    np.testing.assert_allclose(reg.positions_px, first.positions_px, atol=0.05)
    sets = read_cache(path)  # a valid cache again
    assert len(sets[DEFAULT_KEY]) == m + reg.n_null
    assert register(scan.folder).n_correlated == 0
    assert leftovers(scan.folder) == []


# ----------------------------------------------------------------------------- atomic writes


def test_failed_rename_keeps_the_old_cache(scan, monkeypatch):
    path = scan.folder / CACHE_NAME
    register(scan.folder)
    old = path.read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == CACHE_NAME:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.warns(OfstitchWarning, match="cannot write the correlation cache"):
        reg = ofstitch.register(scan.folder,
                                StitchSettings().with_correlation(high_pass_sigma=5.0))
    assert reg.n_correlated == len(reg.graph.pairs)  # the run still finishes
    assert path.read_bytes() == old
    assert leftovers(scan.folder) == []


def _crash_in_dumps(monkeypatch):
    def dumps(*args, **kwargs):
        raise RuntimeError("simulated crash while serialising")

    fake = types.SimpleNamespace(dumps=dumps, loads=json.loads)
    monkeypatch.setattr(cache_module, "json", fake)


def _crash_in_fsync(monkeypatch):
    def fsync(fd):
        raise RuntimeError("simulated crash after writing, before the rename")

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("crash", [_crash_in_dumps, _crash_in_fsync], ids=["dumps", "fsync"])
def test_crash_while_saving_keeps_the_old_cache(scan, monkeypatch, crash):
    path = scan.folder / CACHE_NAME
    register(scan.folder)
    old = path.read_bytes()
    crash(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ofstitch.register(scan.folder, StitchSettings().with_correlation(high_pass_sigma=5.0))
    assert path.read_bytes() == old
    assert leftovers(scan.folder) == []
    monkeypatch.undo()
    assert set(read_cache(path)) == {DEFAULT_KEY}
    assert register(scan.folder).n_correlated == 0


# ----------------------------------------------------------------------------- --cache-dir


def test_cache_dir_keeps_the_scan_folder_clean(scan, tmp_path):
    cache_dir = tmp_path / "caches"
    cache_dir.mkdir()
    before = sorted(p.name for p in scan.folder.iterdir())
    first = register(scan.folder, cache_dir=cache_dir)
    assert first.n_correlated == len(first.graph.pairs)
    assert sorted(p.name for p in scan.folder.iterdir()) == before
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].name.endswith(CACHE_NAME)
    assert len(read_cache(files[0])[DEFAULT_KEY]) == len(first.graph.pairs) + first.n_null
    assert register(scan.folder, cache_dir=cache_dir).n_correlated == 0
    # The scan folder's own (absent) cache is a different one.
    assert register(scan.folder, use_cache=True).n_cached == 0


def test_cache_dir_from_the_command_line(scan, tmp_path):
    cache_dir = tmp_path / "caches"
    cache_dir.mkdir()
    result = run_cli(scan.folder, "--stitching-mode", "only-correlate", "--cache-dir",
                     cache_dir, "-q")
    assert result.returncode == 0, result.stderr
    assert not (scan.folder / CACHE_NAME).exists()
    assert [p.name for p in cache_dir.iterdir()] == [cache_path(scan.folder, cache_dir).name]
    assert cache_path(scan.folder, cache_dir).name.startswith(scan.folder.name + "_")
    assert register(scan.folder, cache_dir=cache_dir).n_correlated == 0


def test_cache_dir_keeps_two_folders_of_the_same_name_apart(make_synthetic, tmp_path):
    """Two scans both called 'scan' (in different places) get their own caches there."""
    one = make_synthetic("a/scan", grid=(2, 2), tile_shape=TILE_SHAPE, seed=1)
    two = make_synthetic("b/scan", grid=(2, 2), tile_shape=TILE_SHAPE, seed=2)
    cache_dir = tmp_path / "caches"
    register(one.folder, cache_dir=cache_dir)
    assert register(two.folder, cache_dir=cache_dir).n_cached == 0
    assert len(list(cache_dir.iterdir())) == 2
    assert register(one.folder, cache_dir=cache_dir).n_correlated == 0


def test_missing_cache_dir_is_created(scan, tmp_path):
    cache_dir = tmp_path / "new" / "caches"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ofstitch.register(scan.folder, cache_dir=cache_dir)
    assert [str(w.message) for w in caught if issubclass(w.category, OfstitchWarning)] == []
    assert register(scan.folder, cache_dir=cache_dir).n_correlated == 0


# ----------------------------------------------------------------------------- local search


def _local_readings():
    from ofstitch.local_search import LocalReadings

    found = LocalReadings.empty(3)
    found.shift_px[:] = [[31.0, 101.5], [np.nan, np.nan], [np.nan, np.nan]]
    found.score[:] = [0.9, 0.1, np.nan]  # the third: not searched (an unreadable tile)
    found.located[:] = [True, False, False]
    found.area[:] = [1000.0, 50.0, 0.0]
    found.ncc[:] = [0.8, np.nan, np.nan]
    return found


def test_local_search_results_are_reused_only_for_the_same_windows(tmp_path):
    from ofstitch.cache import LOCAL_MATCH_PX, CorrelationCache

    keys, cs = ["a.jpg", "b.jpg", "c.jpg"], ofstitch.CorrelationSettings()
    pairs = np.array([[0, 1], [1, 2], [0, 2]])
    centre = np.array([[30.2, 100.4], [-5.0, 140.0], [60.0, 0.0]])
    found = _local_readings()
    cache = CorrelationCache(tmp_path / CACHE_NAME)
    cache.add_local(cs, keys, pairs, centre, 12.0, found)
    assert cache.save()
    loaded = CorrelationCache.load(tmp_path / CACHE_NAME)
    assert loaded.settings_summary() == []  # not a set of correlation settings

    hit, got = loaded.lookup_local(cs, keys, pairs, centre, 12.0)
    assert hit.tolist() == [True, True, False]
    for name in ("shift_px", "score", "located", "area", "ncc"):
        np.testing.assert_array_equal(getattr(got, name)[:2], getattr(found, name)[:2])
    assert np.isnan(got.shift_px[2]).all() and not got.located[2]

    nearby = centre + 0.8 * LOCAL_MATCH_PX
    assert loaded.lookup_local(cs, keys, pairs, nearby, 12.0)[0].tolist() == [True, True, False]
    # Searched again: a centre or radius moved farther, the pair the other way round,
    # other settings.
    assert not loaded.lookup_local(cs, keys, pairs, centre + 2 * LOCAL_MATCH_PX, 12.0)[0].any()
    assert not loaded.lookup_local(cs, keys, pairs, centre, 12.0 + 2 * LOCAL_MATCH_PX)[0].any()
    assert not loaded.lookup_local(cs, keys, pairs[:, ::-1], -centre, 12.0)[0].any()
    sharper = ofstitch.CorrelationSettings(high_pass_sigma=5.0)
    assert not loaded.lookup_local(sharper, keys, pairs, centre, 12.0)[0].any()


def test_local_search_results_in_another_window_are_searched_again(tmp_path):
    from ofstitch.cache import CorrelationCache

    # Within the match distance, but rounded to another integer window centre (or half
    # side): other shifts were scored.
    keys, cs = ["a.jpg", "b.jpg"], ofstitch.CorrelationSettings()
    pairs = np.array([[0, 1]])
    cache = CorrelationCache(tmp_path / CACHE_NAME)
    cache.add_local(cs, keys, pairs, np.array([[30.49, 100.0]]), 12.0, _local_readings())
    assert cache.lookup_local(cs, keys, pairs, np.array([[30.47, 100.0]]), 12.0)[0].all()
    assert not cache.lookup_local(cs, keys, pairs, np.array([[30.51, 100.0]]), 12.0)[0].any()
    cache.add_local(cs, keys, pairs, np.array([[30.0, 100.0]]), 12.0, _local_readings())
    assert not cache.lookup_local(cs, keys, pairs, np.array([[30.0, 100.0]]), 12.02)[0].any()


def test_malformed_local_search_entries_warn_and_are_searched_again(tmp_path):
    from ofstitch.cache import CorrelationCache, pair_key

    keys, cs = ["a.jpg", "b.jpg"], ofstitch.CorrelationSettings()
    pairs = np.array([[0, 1]])
    cache = CorrelationCache(tmp_path / CACHE_NAME)
    good = [30.0, 100.0, 12.0, 31.0, 101.5, 0.9, True, 1000.0, 0.8]
    for bad in (good[:8], [*good[:6], 1, *good[7:]], [*good[:5], None, *good[6:]],
                [*good[:3], "31", *good[4:]], {"dy": 1}):
        cache.sets[cs.key() + LOCAL_TAG] = {pair_key(*keys): bad}
        with pytest.warns(OfstitchWarning, match="malformed local-search entries"):
            hit, _ = cache.lookup_local(cs, keys, pairs, np.array([[30.0, 100.0]]), 12.0)
        assert not hit.any()
