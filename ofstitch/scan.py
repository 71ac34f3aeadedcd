"""Scan loading: find the tile files of a folder and read where each tile is.

A tile's stage position and the camera-to-sample matrix (CSM) come from the
OpenFlexure EXIF UserComment JSON, in any of the layouts the microscope has
written:

- v3: ``stage.position`` and ``camera_stage_mapping.image_to_stage_displacement_matrix``
  (calibration size in ``camera_stage_mapping.image_resolution`` = ``[height, width]``);
- legacy v3: the same under ``/stage/`` and ``/camera_stage_mapping/``;
- v2: ``instrument.state.stage.position``,
  ``instrument.settings.extensions.org.openflexure.camera_stage_mapping.image_to_stage_displacement``
  and ``instrument.settings.extensions.usafcal.um_per_px``.

Without EXIF the position comes from a Fiji ``TileConfiguration.txt`` beside
the tiles (positions in pixels), else from a ``name_X_Y[_Z]`` file name.

Stage coordinates become pixel coordinates ``(row, col)`` by
``stage_xy @ inv(M)``, where ``M = CSM * calibration_width / tile_width`` maps
an image displacement (pixels, ``(row, col)``) to a stage displacement. With no
CSM, ``M`` swaps the axes: stage ``x`` is the column and ``y`` the row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import layout, tiles
from .errors import MetadataError, NoImagesError, OfstitchError, OfstitchWarning
from .metadata import (
    TileMetadata,
    position_from_filename,
    read_metadata,
)
from .settings import StitchSettings

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif")
# Files whose names contain one of these are stitching outputs, not tiles.
IGNORED_PHRASES = ("stitched", "comparison", "fused", "stage", "stitching", "preview",
                   "thumbnail")
SWAP_AXES = np.array([[0.0, 1.0], [1.0, 0.0]])  # x = column, y = row, when no CSM is known
SWAP_AXES.flags.writeable = False

SAMPLE_EDGE_BYTES = 16 << 10  # the content fingerprint reads the first and last 16 KiB
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 8, 4 << 10  # ... and 8 blocks of 4 KiB between them


def content_digest(path: Path, size: int) -> str:
    """A fast fingerprint of a file's content (64 KiB read at most): a file replaced by
    another of the same size with its modification time kept (``cp -p``, ``rsync -a``)
    gets another one. Empty when the file cannot be read."""
    h = hashlib.blake2b(digest_size=8)
    try:
        with open(path, "rb") as fh:
            h.update(fh.read(SAMPLE_EDGE_BYTES))
            if size > 2 * SAMPLE_EDGE_BYTES:
                for k in range(1, SAMPLE_BLOCKS + 1):
                    fh.seek(k * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS + 1))
                    h.update(fh.read(SAMPLE_BLOCK_BYTES))
                fh.seek(max(size - SAMPLE_EDGE_BYTES, 0))
                h.update(fh.read(SAMPLE_EDGE_BYTES))
    except OSError:
        return ""
    return h.hexdigest()


@dataclass(frozen=True)
class TileFile:
    """A tile file's identity: what the cache checks to know a file is unchanged (its name,
    size, modification time and a fingerprint of its content)."""

    name: str
    size: int
    mtime_ns: int
    digest: str = ""

    @property
    def key(self) -> str:
        base = f"{self.name}|{self.size}|{self.mtime_ns}"
        return f"{base}|{self.digest}" if self.digest else base

    @classmethod
    def of(cls, record: TileRecord) -> TileFile:
        return cls(record.path.name, record.stat.st_size, record.stat.st_mtime_ns,
                   record.digest)


@dataclass(frozen=True)
class Scan:
    """The tiles of a scan and where the stage says they are.

    Tiles are numbered ``0..n-1`` in capture order; file names appear only in
    ``files``.

    Attributes
    ----------
    folder : Path
    files : tuple of TileFile, length n
    tile_shape : (int, int)
        ``(height, width)`` shared by every tile.
    bands : int
        Colour bands of the tiles (1 or 3).
    stage_px : ndarray, shape (n, 2), float64
        Stage-predicted ``(row, col)`` of each tile's top-left corner, in pixels.
    stage_xy : ndarray, shape (n, 2), float64
        Raw stage coordinates ``(x, y)`` (pixels when the source is a file name
        or tile configuration without a CSM).
    csm : ndarray, shape (2, 2)
        The effective matrix ``M`` (see module docstring) after scaling.
    csm_calibration_width : int or None
    pixel_size_um : float or None
    metadata : dict or None
        The first tile's UserComment JSON (written into output EXIF).
    bit_depth : int
        8 or 16.
    pixel_formats : tuple of str
        The libvips pixel formats of the tiles (``"uchar"``, ``"ushort"``, ``"float"``...).
    capture_order_known : bool
        Whether the tiles' own metadata gives their capture order (every tile has an EXIF
        capture time, no two the same). Modification times and file names never do: the
        stage's direction of travel (backlash, :mod:`ofstitch.backlash`) is used only then.
    """

    folder: Path
    files: tuple[TileFile, ...]
    tile_shape: tuple[int, int]
    bands: int
    stage_px: np.ndarray
    stage_xy: np.ndarray
    csm: np.ndarray
    csm_calibration_width: int | None
    pixel_size_um: float | None
    metadata: dict | None
    bit_depth: int = 8
    position_source: str = "exif"
    pixel_formats: tuple[str, ...] = ()
    capture_order_known: bool = False

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.folder / self.files[i].name

    @property
    def paths(self) -> list[Path]:
        return [self.folder / f.name for f in self.files]


# ----------------------------------------------------------------------------- discovery



def expected_shifts(scan: Scan, pairs: np.ndarray) -> np.ndarray:
    """The stage-predicted shift of each pair (tile b relative to tile a), ``(m, 2)`` px."""
    return scan.stage_px[pairs[:, 1]] - scan.stage_px[pairs[:, 0]]

def is_tile_name(name: str) -> bool:
    """Whether a file name looks like a tile: a supported extension, not an output name."""
    lower = name.lower()
    if name.startswith(".") or not lower.endswith(IMAGE_EXTENSIONS):
        return False
    return not any(phrase in lower for phrase in IGNORED_PHRASES)


def require_folder(folder: Path) -> None:
    """Raise a clear :class:`OfstitchError` unless ``folder`` is an existing folder."""
    folder = Path(folder)
    if not folder.exists():
        raise OfstitchError(f"the folder {folder} does not exist: check the path")
    if not folder.is_dir():
        raise OfstitchError(f"{folder} is not a folder: give the folder that holds the tiles")


def find_image_files(folder: Path) -> list[Path]:
    """The candidate tile files of ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    require_folder(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        raise OfstitchError(f"cannot read the folder {folder}: check its permissions") from None
    out, ignored = [], []
    for entry in entries:
        try:
            if not entry.is_file():
                continue
        except OSError:  # a dangling link or a symlink loop
            continue
        if is_tile_name(entry.name):
            out.append(Path(entry.path))
        elif _looks_like_a_tile_with_an_output_word(entry.name):
            ignored.append(entry.name)
    if ignored:
        word = next(p for p in IGNORED_PHRASES if p in ignored[0].lower())
        warnings.warn(
            f"leaving out {len(ignored)} image file(s) whose names mark them as outputs, "
            f"e.g. {ignored[0]!r} (it contains {word!r}): rename them to stitch them",
            OfstitchWarning, stacklevel=2)
    return out


_OUTPUT_NAME = re.compile(r"stitched|^preview|^stitching_|^thumbnail", re.IGNORECASE)


def _looks_like_a_tile_with_an_output_word(name: str) -> bool:
    """An image whose name holds an output word (so it is left out) but is not named like
    the outputs of ofstitch or openflexure-stitching (which are left out in silence)."""
    lower = name.lower()
    return (not name.startswith(".") and lower.endswith(IMAGE_EXTENSIONS)
            and any(p in lower for p in IGNORED_PHRASES) and not _OUTPUT_NAME.search(name))


# ----------------------------------------------------------------------------- the scan


def _effective_csm(csm: Any, calibration_width: int | None, tile_width: int) -> np.ndarray:
    m = np.asarray(csm, dtype=np.float64)
    if calibration_width:
        m = m * calibration_width / tile_width
    det = np.linalg.det(m)
    if not np.isfinite(det) or abs(det) < 1e-12 * max(1.0, float(np.abs(m).max()) ** 2):
        raise MetadataError(
            "the camera-to-sample matrix is singular, so stage positions cannot be turned "
            "into pixels: pass a valid one with --csm-matrix")
    return m


class TileRecord(NamedTuple):
    """What :func:`read_tile` learnt about one tile file (before the scan-wide checks)."""

    path: Path
    stat: os.stat_result
    shape: tuple[int, int]
    bands: int
    format: str
    meta: TileMetadata
    digest: str = ""  # content_digest of the file


def tile_configuration(folder: Path) -> dict[str, tuple[float, float]]:
    """Positions from the Fiji tile configuration beside the tiles, if there is one."""
    return layout.layout_beside(folder)


def read_tile(path: Path, tile_config: dict[str, tuple[float, float]] | None = None, *,
              override: bool = False) -> TileRecord | None:
    """Read one tile file's header and position; ``None`` (with a warning) if it is unusable.

    The position comes from the file's metadata, else ``tile_config``, else its name;
    with ``override`` (a layout the user gave), from ``tile_config`` first.
    """
    path = Path(path)
    try:
        stat = path.stat()
        if stat.st_size == 0:
            warnings.warn(f"skipping {path.name}: the file is empty", OfstitchWarning,
                          stacklevel=2)
            return None
        h, w, bands, fmt = tiles.header(path)
    except (OSError, tiles.TileReadError) as exc:
        warnings.warn(f"skipping {path.name}: {exc}", OfstitchWarning, stacklevel=2)
        return None
    meta = read_metadata(path)
    if override and tile_config and path.name in tile_config:
        # Pixel positions: the metadata's position and camera-to-sample matrix do not apply.
        meta = TileMetadata(**{**meta.__dict__, "stage_xyz": None, "csm": None,
                               "csm_width": None, "csm_unreadable": False})
    if meta.stage_xyz is None and tile_config and path.name in tile_config:
        x, y = tile_config[path.name]
        meta = TileMetadata(**{**meta.__dict__, "stage_xyz": (x, y, 0.0),
                               "position_source": "tile-configuration"})
    if meta.stage_xyz is None:
        pos = position_from_filename(path.name)
        if pos is not None:
            meta = TileMetadata(**{**meta.__dict__, "stage_xyz": pos,
                                   "position_source": "filename"})
    if meta.stage_xyz is None:
        warnings.warn(
            f"skipping {path.name}: no stage position in its metadata or its name "
            "(expected OpenFlexure EXIF, a TileConfiguration.txt, or name_X_Y.jpg)",
            OfstitchWarning, stacklevel=2)
        return None
    return TileRecord(path, stat, (h, w), bands, fmt, meta, content_digest(path, stat.st_size))


def load_scan(folder: Path, settings: StitchSettings | None = None) -> Scan:
    """Find the tiles of ``folder`` and their stage-predicted pixel positions.

    Unreadable files, files of another size and files without any position are
    skipped with an :class:`OfstitchWarning`. A z-stack keeps its sharpest image.

    Raises
    ------
    NoImagesError
        No usable tile (unreadable files and files without any position are
        skipped with a warning first).
    MetadataError
        A singular camera-to-sample matrix.
    """
    folder = Path(folder)
    paths = find_image_files(folder)
    if not paths:
        raise NoImagesError(
            f"no tile images (jpg, png, tif, bmp, gif) found in {folder}: give the folder "
            "that holds the scan's tiles")
    settings = settings or StitchSettings()
    tile_config, override = _given_layout(paths, settings)
    if tile_config is None:
        tile_config, override = tile_configuration(folder), False
    records = [r for r in (read_tile(path, tile_config, override=override) for path in paths)
               if r is not None]
    if not records:
        hint = "" if tile_config else (": if their names hold grid indices or a sequence "
                                       "number, give the layout with --grid ROWSxCOLS or "
                                       "--layout FILE")
        raise NoImagesError(f"none of the {len(paths)} image files in {folder} can be used "
                            f"as a tile (see the warnings above){hint}")
    return scan_from_tiles(folder, records, settings)


def _given_layout(paths: list[Path], settings: StitchSettings
                  ) -> tuple[dict[str, tuple[float, float]] | None, bool]:
    """The layout given by ``--layout`` or ``--grid`` (it beats the tiles' metadata)."""
    if settings.layout is not None and settings.grid is not None:
        raise OfstitchError("--layout and --grid both give the tile positions: give one")
    if settings.layout is not None:
        return layout.read_layout_option(Path(settings.layout)), True
    if settings.grid is not None:
        shapes = []
        for path in paths[:5]:
            try:
                shapes.append(tiles.header(path)[:2])
            except (OSError, tiles.TileReadError):
                continue
        if not shapes:
            return None, False  # every file is unreadable: read_tile says why
        shape = Counter(shapes).most_common(1)[0][0]
        return settings.grid.positions([p.name for p in paths], shape), True
    return None, False


def _refuse_index_names(records: list[TileRecord], tile_shape: tuple[int, int]) -> None:
    """Stop when the numbers in the tiles' names are grid indices, not pixel positions."""
    named = [r for r in records if r[5].position_source == "filename"]
    if len(named) < 2 or len(named) < len(records) / 2:
        return
    why = layout.index_like(np.array([r[5].stage_xyz[:2] for r in named]), tile_shape)
    if why is None:
        return
    examples = ", ".join(r[0].name for r in named[:2])
    raise MetadataError(
        f"the numbers in the tile names ({examples}, ...) look like grid indices or "
        f"sequence numbers, not pixel positions: {why}. Give the layout with --grid "
        "ROWSxCOLS (and --grid-order, --grid-overlap), or a Fiji layout with --layout FILE")


def scan_from_tiles(folder: Path, records: list[TileRecord],
                    settings: StitchSettings | None = None) -> Scan:
    """The scan made of ``records`` (from :func:`read_tile`), as :func:`load_scan` makes it.

    Applies the scan-wide rules: the majority tile size and bit depth, the
    sharpest image of each z-stack, capture order, ``image_count`` and the CSM.
    """
    settings = settings or StitchSettings()
    folder = Path(folder)
    if not records:
        raise NoImagesError(f"no usable tile in {folder}")
    shape_counts = Counter(r[2] for r in records)
    tile_shape = shape_counts.most_common(1)[0][0]
    kept = []
    for rec in records:
        if rec[2] != tile_shape:
            warnings.warn(
                f"skipping {rec[0].name}: it is {rec[2][1]}x{rec[2][0]} px but most tiles are "
                f"{tile_shape[1]}x{tile_shape[0]}", OfstitchWarning, stacklevel=2)
        else:
            kept.append(rec)
    records = kept

    # 8-bit and 16-bit tiles cannot share one intensity scale: keep the majority's depth.
    depth_counts = Counter(_is_8bit(r[4]) for r in records)
    majority_8bit = depth_counts.most_common(1)[0][0]
    for rec in [r for r in records if _is_8bit(r[4]) != majority_8bit]:
        warnings.warn(
            f"skipping {rec[0].name}: it is {'8' if _is_8bit(rec[4]) else '16'}-bit but most "
            f"tiles are {'8' if majority_8bit else '16'}-bit", OfstitchWarning, stacklevel=2)
    records = [r for r in records if _is_8bit(r[4]) == majority_8bit]

    _refuse_index_names(records, tile_shape)
    records = _keep_sharpest_of_stacks(records)

    # Capture order: EXIF time when every tile has one, else modification time.
    if all(r[5].capture_time is not None for r in records):
        records.sort(key=lambda r: (r[5].capture_time, r[1].st_mtime_ns, r[0].name))
    else:
        records.sort(key=lambda r: (r[1].st_mtime_ns, r[0].name))
    if settings.image_count is not None:
        records = records[: settings.image_count]

    first_meta = records[0][5]
    tile_h, tile_w = tile_shape
    with_csm = [r[5] for r in records if r[5].csm is not None]
    unreadable = [r[0].name for r in records if r[5].csm_unreadable]
    if unreadable and settings.csm_matrix is None:
        fallback = "the other tiles' matrix" if with_csm else \
            "stage x as the column and y as the row, in pixels"
        warnings.warn(
            f"ignoring the camera-to-sample matrix of {len(unreadable)} tile(s) "
            f"({', '.join(unreadable[:3])}{'...' if len(unreadable) > 3 else ''}): not a 2x2 "
            f"matrix of numbers; using {fallback} (or pass --csm-matrix)",
            OfstitchWarning, stacklevel=2)
    if settings.csm_matrix is not None:
        csm_raw, source_width = settings.csm_matrix, None
    elif with_csm:
        csm_raw, source_width = with_csm[0].csm, with_csm[0].csm_width
    else:
        csm_raw, source_width = SWAP_AXES, None
    if settings.csm_calibration_width is not None:
        calibration = settings.csm_calibration_width or None  # 0 means: leave unscaled
    else:
        calibration = source_width
    csm = _effective_csm(csm_raw, calibration, tile_w)

    stage_xy = np.array([r[5].stage_xyz[:2] for r in records], dtype=np.float64)
    stage_px = stage_xy @ np.linalg.inv(csm)
    um = next((r[5].um_per_px for r in records if r[5].um_per_px is not None), None)
    bit_depth = 8 if _is_8bit(records[0][4]) else 16
    sources = Counter(r[5].position_source for r in records)
    files = tuple(TileFile.of(r) for r in records)
    log.info("scan %s: %d tiles of %dx%d px, positions from %s", folder, len(files), tile_w,
             tile_h, dict(sources))
    return Scan(folder=folder, files=files, tile_shape=tile_shape,
                bands=max(r[3] for r in records), stage_px=stage_px, stage_xy=stage_xy, csm=csm,
                csm_calibration_width=calibration, pixel_size_um=um,
                metadata=first_meta.usercomment, bit_depth=bit_depth,
                position_source=sources.most_common(1)[0][0],
                pixel_formats=tuple(sorted({r[4] for r in records})),
                capture_order_known=_capture_order_known(records))


def _capture_order_known(records: list) -> bool:
    """Every tile has its own capture time and no two share one (EXIF times are in
    whole seconds: ties would be broken by modification time, which does not count)."""
    times = [r[5].capture_time for r in records]
    return None not in times and len(set(times)) == len(times)


def _is_8bit(vips_format: str) -> bool:
    return vips_format in ("uchar", "char")


def _keep_sharpest_of_stacks(records: list) -> list:
    """Of the images sharing an xy stage position (a z-stack), keep the sharpest."""
    groups: dict[tuple[float, float], list] = {}
    for rec in records:
        x, y = rec[5].stage_xyz[:2]
        groups.setdefault((round(x, 3), round(y, 3)), []).append(rec)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        scores = []
        for rec in group:
            try:
                scores.append(tiles.focus_measure(rec[0]))
            except tiles.TileReadError:
                scores.append(-1.0)
        best = int(np.argmax(scores))
        log.info("z-stack of %d images at %s: keeping %s", len(group), rec[5].stage_xyz[:2],
                 group[best][0].name)
        out.append(group[best])
    return out
