"""The correlation cache: pair results persisted beside the scan.

One JSON file, ``ofstitch_tiling_cache.json``, in the scan folder (or ``--cache-dir``).
Results are grouped by the correlation settings that produced them
(:meth:`CorrelationSettings.key`) and keyed by the identity of both files
(name, size, modification time), so a changed or replaced tile is correlated
again. The constrained local search's results (:mod:`ofstitch.local_search`) are kept
the same way, beside the correlations of the same settings (:meth:`lookup_local`): a
second run on the same tiles searches only the windows that moved.

Crash safety and concurrency:

- While correlating, each batch of results is appended to a journal beside the
  cache (``ofstitch_tiling_cache.json.journal``, one JSON line per batch, fsynced). A
  run killed at any point (even ``kill -9``) loses at most the batch in flight:
  the next run replays the journal and skips the pairs already done. A torn
  last line is ignored.
- At the end of a run the cache file is rewritten: the file on disk, the
  journal and this run's results are merged, written to a temporary file that
  is renamed into place, and only then is the journal removed. An interrupted
  write leaves the old cache or the new one, never half of one.
- Appends and rewrites hold an exclusive ``flock`` on the cache's folder, so
  two processes on one folder (a live preview and a full stitch) merge their
  results instead of overwriting each other's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import atomic
from .errors import OfstitchWarning
from .settings import CorrelationSettings

if TYPE_CHECKING:
    from .local_search import LocalReadings

log = logging.getLogger(__name__)

# "tiling_cache" in the name: the OpenFlexure server zips such files only once a scan is
# finished (a file it zipped mid-scan would stay stale in the zip).
CACHE_NAME = "ofstitch_tiling_cache.json"
FORMAT = "ofstitch-correlation-cache"
# 2: tiles are filtered without border steps (correlate.remove_background).
# 3: file keys carry a fingerprint of the content (scan.content_digest).
# 4: tiles are mirrored whole before filtering (correlate.remove_background through the DCT),
#    which changes filtered pixels near the edges, hence readings of whole-tile pairs.
# 5: overlap strips of large tiles are searched binned and refined at full resolution
#    (ofstitch.refine), which changes their readings by up to a tenth of a pixel.
VERSION = 5
# The constrained local search's results (ofstitch.local_search) are kept beside the
# correlations, under the correlation settings' key followed by this tag (not a settings
# key of its own). Bump its number when the search's readings change.
LOCAL_TAG = " local-search 1"
# A local-search result is reused for a window centre and radius this close to its own
# (the same integer window: the scores are the same; only the disc of shifts compared
# moves, by at most this much).
LOCAL_MATCH_PX = 0.05


def cache_path(folder: Path, cache_dir: Path | None = None) -> Path:
    """Where the cache of ``folder`` lives: beside its tiles, or in ``cache_dir`` under a
    name made from the folder's name and its full resolved path (two scan folders of the
    same name never share a cache there)."""
    if cache_dir is None:
        return Path(folder) / CACHE_NAME
    resolved = Path(folder).resolve()
    tag = hashlib.blake2b(os.fsencode(resolved), digest_size=6).hexdigest()
    stem = atomic.shorten_name(resolved.name, 120)
    return Path(cache_dir) / f"{stem}_{tag}_{CACHE_NAME}"


def _journal(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the cache at ``path`` (``flock`` on its folder; on
    Windows, ``msvcrt.locking`` on a lock file beside it)."""
    try:
        import fcntl
    except ImportError:
        with _windows_lock(path):
            yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Lock the cache's folder itself: no lock file is left behind in the user's scan.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _windows_lock(path: Path) -> Iterator[None]:
    import msvcrt  # only imported where fcntl is missing

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as fh:
        fh.seek(0)
        while True:
            try:
                msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                break
            except OSError:
                continue
        try:
            yield
        finally:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)


def pair_key(file_a: str, file_b: str) -> str:
    return f"{file_a}::{file_b}"


class CacheHit(NamedTuple):
    """What the cache holds for ``m`` pairs.

    Attributes
    ----------
    found : ndarray, shape (m,), bool
    shift_px : ndarray, shape (m, 2)
        NaN where not found, or where the correlation found no peak.
    quality : ndarray, shape (m,)
    candidates : ndarray, shape (m, K, 3)
        ``(dy, dx, overlap NCC)`` of each candidate peak, NaN-padded.
    """

    found: np.ndarray
    shift_px: np.ndarray
    quality: np.ndarray
    candidates: np.ndarray


@dataclass
class CorrelationCache:
    """In-memory view of the cache file.

    ``sets`` maps a settings key to ``{pair key: [dy, dx, quality, ey, ex, candidates]}``:
    the shift of b relative to a, its peak quality, the expected shift used for
    the search mask, and the candidate peaks as ``[[dy, dx, ncc], ...]`` (the
    last item is absent in entries written before candidates existed).
    """

    path: Path
    sets: dict[str, dict[str, list]] = field(default_factory=dict)
    pending: dict[str, dict[str, list]] = field(default_factory=dict)
    writable: bool = True

    @classmethod
    def load(cls, path: Path) -> CorrelationCache:
        """Read the cache and replay its journal; a corrupt cache warns and counts as empty."""
        path = Path(path)
        sets = _read_sets(path)
        _merge(sets, _read_journal(_journal(path)))
        return cls(path, sets)

    def lookup(self, settings: CorrelationSettings, file_keys: list[str], pairs: np.ndarray,
               expected_shift_px: np.ndarray, tile_shape: tuple[int, int] | None = None
               ) -> CacheHit:
        """Cached results for ``pairs``.

        With ``tile_shape``, a shift no correlation can produce (beyond the tile size
        plus the sub-pixel step) counts as malformed. Entries without candidate
        peaks (written by older versions) count as not found.
        """
        from .stream import CANDIDATES
        entries = self.sets.get(settings.key(), {})
        m = len(pairs)
        found = np.zeros(m, dtype=bool)
        shift = np.full((m, 2), np.nan)
        quality = np.full(m, np.nan)
        candidates = np.full((m, CANDIDATES, 3), np.nan)
        invalid = 0
        for k, (a, b) in enumerate(pairs.tolist()):
            sign = 1.0
            entry = entries.get(pair_key(file_keys[a], file_keys[b]))
            if entry is None:
                entry = entries.get(pair_key(file_keys[b], file_keys[a]))
                sign = -1.0
            if entry is None:
                continue
            if not _valid_entry(entry) or (
                    tile_shape is not None and entry[0] is not None
                    and (abs(entry[0]) > tile_shape[0] + 1
                         or abs(entry[1]) > tile_shape[1] + 1)):
                invalid += 1
                continue
            # A masked search, or strips cut around the predicted overlap, depend on
            # the stage's prediction.
            if settings.corr_mask_radius is not None or (settings.pad
                                                          and settings.search_margin > 0):
                expected = sign * np.asarray(entry[3:5], dtype=float)
                if not np.allclose(expected, expected_shift_px[k], atol=1.0):
                    continue  # the search region moved: correlate again
            if len(entry) < 6:
                continue  # written before candidates were kept: correlate again
            cands = np.asarray(entry[5], dtype=float).reshape(-1, 3)[:CANDIDATES]
            candidates[k, :len(cands)] = cands * np.array([sign, sign, 1.0])
            found[k] = True
            if entry[0] is not None:
                shift[k] = sign * np.asarray(entry[0:2], dtype=float)
            quality[k] = entry[2]
        if invalid:
            warnings.warn(f"ignoring {invalid} malformed entries of the correlation cache "
                          f"{self.path.name}; correlating those pairs again", OfstitchWarning,
                          stacklevel=2)
        return CacheHit(found, shift, quality, candidates)

    def add(self, settings: CorrelationSettings, file_keys: list[str], pairs: np.ndarray,
            shift: np.ndarray, quality: np.ndarray, expected_shift_px: np.ndarray,
            candidates: np.ndarray | None = None) -> None:
        """Record results. A pair with no peak (NaN shift) is recorded as such; a pair
        that could not be correlated at all (NaN quality: an unreadable tile) is not."""
        key = settings.key()
        entries = self.sets.setdefault(key, {})
        pending = self.pending.setdefault(key, {})
        for k, ((a, b), s, q, e) in enumerate(zip(pairs.tolist(), shift.tolist(),
                                                  quality.tolist(), expected_shift_px.tolist(),
                                                  strict=True)):
            if not np.isfinite(q):
                continue
            dy, dx = (s[0], s[1]) if np.all(np.isfinite(s)) else (None, None)
            entry = [dy, dx, q, e[0], e[1]]
            if candidates is not None:
                c = candidates[k]
                entry.append([[float(v) for v in row] for row in
                              c[np.all(np.isfinite(c), axis=1)].tolist()])
            entries[pair_key(file_keys[a], file_keys[b])] = entry
            pending[pair_key(file_keys[a], file_keys[b])] = entry

    def lookup_local(self, settings: CorrelationSettings, file_keys: list[str],
                     pairs: np.ndarray, centre: np.ndarray, radius: float
                     ) -> tuple[np.ndarray, LocalReadings]:
        """Cached local-search results (:func:`ofstitch.local_search.search_pairs`) of
        ``pairs`` searched around ``centre`` ``(m, 2)`` within ``radius`` px: ``(found,
        readings)``. A result counts only for the same pair the same way round, the same
        integer window, and a centre and radius within :data:`LOCAL_MATCH_PX`."""
        from .local_search import LocalReadings, window

        entries = self.sets.get(settings.key() + LOCAL_TAG, {})
        m = len(pairs)
        found = np.zeros(m, dtype=bool)
        out = LocalReadings.empty(m)
        invalid = 0
        if not entries:
            return found, out
        for k, (a, b) in enumerate(pairs.tolist()):
            entry = entries.get(pair_key(file_keys[a], file_keys[b]))
            if entry is None:
                continue
            if not _valid_local(entry):
                invalid += 1
                continue
            then = np.asarray(entry[0:2], dtype=float)
            if window(then, entry[2]) != window(centre[k], radius) or \
                    np.abs(then - centre[k]).max() > LOCAL_MATCH_PX or \
                    abs(entry[2] - radius) > LOCAL_MATCH_PX:
                continue  # searched elsewhere: search again
            sy, sx, score, located, area, ncc = (np.nan if v is None else v
                                                 for v in entry[3:9])
            out.shift_px[k] = (sy, sx)
            out.score[k], out.located[k], out.area[k], out.ncc[k] = score, located, area, ncc
            found[k] = True
        if invalid:
            warnings.warn(f"ignoring {invalid} malformed local-search entries of the "
                          f"correlation cache {self.path.name}; searching those pairs again",
                          OfstitchWarning, stacklevel=2)
        return found, out

    def add_local(self, settings: CorrelationSettings, file_keys: list[str], pairs: np.ndarray,
                  centre: np.ndarray, radius: float, readings: LocalReadings) -> None:
        """Record local-search results (see :meth:`lookup_local`). A pair with no score
        (a tile that could not be read, or no shift to score) is not recorded."""
        key = settings.key() + LOCAL_TAG
        entries = self.sets.setdefault(key, {})
        pending = self.pending.setdefault(key, {})
        for k, (a, b) in enumerate(pairs.tolist()):
            if not np.isfinite(readings.score[k]):
                continue
            entry = [float(centre[k, 0]), float(centre[k, 1]), float(radius),
                     _or_none(readings.shift_px[k, 0]), _or_none(readings.shift_px[k, 1]),
                     float(readings.score[k]), bool(readings.located[k]),
                     float(readings.area[k]), _or_none(readings.ncc[k])]
            entries[pair_key(file_keys[a], file_keys[b])] = entry
            pending[pair_key(file_keys[a], file_keys[b])] = entry

    def flush(self) -> bool:
        """Append the results added since the last flush to the journal (fsynced)."""
        if not any(self.pending.values()) or not self.writable:
            self.pending.clear()
            return self.writable
        line = json.dumps(self.pending, separators=(",", ":")) + "\n"
        try:
            with _locked(self.path), open(_journal(self.path), "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            return self._cannot_write(exc)
        self.pending.clear()
        return True

    def save(self) -> bool:
        """Merge the file on disk, the journal and this run's results; replace the file
        atomically, then drop the journal. False if the cache cannot be written."""
        if not self.writable:
            return False
        try:
            with _locked(self.path):
                merged = _read_sets(self.path, quiet=True)
                _merge(merged, _read_journal(_journal(self.path)))
                _merge(merged, self.sets)
                payload = {"format": FORMAT, "version": VERSION, "sets": merged}
                atomic.write_text(self.path, json.dumps(payload, separators=(",", ":")))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_journal(self.path))
        except OSError as exc:
            return self._cannot_write(exc)
        self.sets = merged
        self.pending.clear()
        return True

    def _cannot_write(self, exc: OSError) -> bool:
        if self.writable:
            warnings.warn(f"cannot write the correlation cache {self.path}: "
                          f"{exc.strerror or exc}; results will be recomputed next time "
                          "(use --cache-dir)", OfstitchWarning, stacklevel=3)
        self.writable = False
        return False

    def settings_summary(self, file_keys: list[str] | None = None
                         ) -> list[tuple[CorrelationSettings, int]]:
        """Each cached settings set and how many distinct tiles its pairs cover."""
        out = []
        for key, entries in self.sets.items():
            if key.endswith(LOCAL_TAG):  # the local search's results, not a settings set
                continue
            try:
                settings = CorrelationSettings.from_key(key)
            except Exception:  # a key from another version
                continue
            names = set()
            for pk in entries:
                names.update(pk.split("::"))
            covered = len(names & set(file_keys)) if file_keys is not None else len(names)
            out.append((settings, covered))
        return out


def _number(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _valid_entry(entry: object) -> bool:
    """``[dy, dx, quality, ey, ex]`` and optionally ``[[dy, dx, ncc], ...]``: finite
    numbers, except a shift of ``null, null`` (a pair with no peak). Anything else is
    ignored, and correlated again."""
    if not isinstance(entry, list) or len(entry) not in (5, 6):
        return False
    if len(entry) == 6 and not (isinstance(entry[5], list) and all(
            isinstance(c, list) and len(c) == 3 and all(_number(v) for v in c)
            for c in entry[5])):
        return False
    no_peak = entry[0] is None and entry[1] is None
    return (no_peak or (_number(entry[0]) and _number(entry[1]))) and all(
        _number(v) for v in entry[2:5])


def _or_none(value: float) -> float | None:
    """A finite number as a float, anything else as ``None`` (JSON ``null``)."""
    return float(value) if np.isfinite(value) else None

def _valid_local(entry: object) -> bool:
    """``[cy, cx, radius, sy, sx, score, located, area, ncc]``: finite numbers, except the
    shift and the NCC (``null`` for none) and ``located`` (a boolean)."""
    if not isinstance(entry, list) or len(entry) != 9 or not isinstance(entry[6], bool):
        return False
    return all(_number(v) for v in (*entry[0:3], entry[5], entry[7])) and all(
        v is None or _number(v) for v in (entry[3], entry[4], entry[8]))


def _merge(into: dict, sets: dict) -> None:
    for key, entries in sets.items():
        into.setdefault(key, {}).update(entries)


def _read_journal(path: Path) -> dict:
    """Replay a journal; a torn or garbled line (a crash mid-append) is skipped."""
    out: dict = {}
    try:
        raw = path.read_bytes()
    except OSError:
        return out
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            batch = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(batch, dict):
            _merge(out, {k: v for k, v in batch.items()
                         if isinstance(k, str) and isinstance(v, dict)})
    return out


def _read_sets(path: Path, quiet: bool = False) -> dict:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if not quiet:
            warnings.warn(f"cannot read the correlation cache {path}: {exc.strerror}; "
                          "correlating again", OfstitchWarning, stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError("another format or version")
        sets = data["sets"]
        if not isinstance(sets, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in sets.items()):
            raise ValueError("bad structure")
        return sets
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        if not quiet:
            warnings.warn(f"ignoring the correlation cache {path.name}: it is corrupt or from "
                          f"another version ({exc}); correlating again", OfstitchWarning,
                          stacklevel=3)
        return {}
