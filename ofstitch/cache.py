"""The correlation cache: pair results persisted beside the scan.

One JSON file, ``ofstitch_cache.json``, in the scan folder (or ``--cache-dir``).
Results are grouped by the correlation settings that produced them
(:meth:`CorrelationSettings.key`) and keyed by the identity of both files
(name, size, modification time), so a changed or replaced tile is correlated
again. Writes go to a temporary file that is renamed into place, after merging
with whatever another process wrote meanwhile, so an interrupted write leaves
the old cache or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import atomic
from .errors import OfstitchWarning
from .settings import CorrelationSettings

log = logging.getLogger(__name__)

CACHE_NAME = "ofstitch_cache.json"
FORMAT = "ofstitch-correlation-cache"
VERSION = 1


def cache_path(folder: Path, cache_dir: Path | None = None) -> Path:
    """Where the cache of ``folder`` lives."""
    if cache_dir is None:
        return Path(folder) / CACHE_NAME
    return Path(cache_dir) / f"{Path(folder).resolve().name}_{CACHE_NAME}"


def pair_key(file_a: str, file_b: str) -> str:
    return f"{file_a}::{file_b}"


@dataclass
class CorrelationCache:
    """In-memory view of the cache file.

    ``sets`` maps a settings key to ``{pair key: [dy, dx, quality, ey, ex]}``:
    the shift of b relative to a, its peak quality, and the expected shift
    used for the search mask.
    """

    path: Path
    sets: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CorrelationCache:
        """Read the cache; a missing file is empty, a corrupt one warns and is empty."""
        return cls(Path(path), _read_sets(Path(path)))

    def lookup(self, settings: CorrelationSettings, file_keys: list[str], pairs: np.ndarray,
               expected_shift_px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cached results for ``pairs``: ``(found mask, shift (m, 2), quality (m,))``."""
        entries = self.sets.get(settings.key(), {})
        m = len(pairs)
        found = np.zeros(m, dtype=bool)
        shift = np.full((m, 2), np.nan)
        quality = np.full(m, np.nan)
        invalid = 0
        for k, (a, b) in enumerate(pairs.tolist()):
            sign = 1.0
            entry = entries.get(pair_key(file_keys[a], file_keys[b]))
            if entry is None:
                entry = entries.get(pair_key(file_keys[b], file_keys[a]))
                sign = -1.0
            if entry is None:
                continue
            if not _valid_entry(entry):
                invalid += 1
                continue
            if settings.corr_mask_radius is not None:
                expected = sign * np.asarray(entry[3:5], dtype=float)
                if not np.allclose(expected, expected_shift_px[k], atol=1.0):
                    continue  # the search region moved: correlate again
            found[k] = True
            shift[k] = sign * np.asarray(entry[0:2], dtype=float)
            quality[k] = entry[2]
        if invalid:
            warnings.warn(f"ignoring {invalid} malformed entries of the correlation cache "
                          f"{self.path.name}; correlating those pairs again", OfstitchWarning,
                          stacklevel=2)
        return found, shift, quality

    def add(self, settings: CorrelationSettings, file_keys: list[str], pairs: np.ndarray,
            shift: np.ndarray, quality: np.ndarray, expected_shift_px: np.ndarray) -> None:
        """Record results (NaN results are not recorded)."""
        entries = self.sets.setdefault(settings.key(), {})
        for (a, b), s, q, e in zip(pairs.tolist(), shift.tolist(), quality.tolist(),
                                   expected_shift_px.tolist(), strict=True):
            if np.isfinite(q) and np.all(np.isfinite(s)):
                entries[pair_key(file_keys[a], file_keys[b])] = [s[0], s[1], q, e[0], e[1]]

    def save(self) -> bool:
        """Merge with the file on disk and replace it atomically. False if it cannot be written."""
        merged = _read_sets(self.path, quiet=True)
        for key, entries in self.sets.items():
            merged.setdefault(key, {}).update(entries)
        self.sets = merged
        payload = {"format": FORMAT, "version": VERSION, "sets": merged}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path, json.dumps(payload, separators=(",", ":")))
        except OSError as exc:
            warnings.warn(f"cannot write the correlation cache {self.path}: {exc.strerror}; "
                          "results will be recomputed next time (use --cache-dir)",
                          OfstitchWarning, stacklevel=2)
            return False
        return True

    def settings_summary(self, file_keys: list[str] | None = None
                         ) -> list[tuple[CorrelationSettings, int]]:
        """Each cached settings set and how many distinct tiles its pairs cover."""
        out = []
        for key, entries in self.sets.items():
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


def _valid_entry(entry: object) -> bool:
    """An entry is five finite numbers; anything else is ignored (and correlated again)."""
    if not isinstance(entry, list) or len(entry) != 5:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
               for v in entry)


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
