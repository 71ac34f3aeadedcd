"""Synthetic scans with exact ground truth, cut from a real image.

Used by ``ofstitch demo``, the tests and the benchmarks. A scan is a grid of
tiles cut from a source image at known pixel positions. The stage positions
written into each tile's OpenFlexure EXIF are the commanded grid; the true
positions differ from them by a rotated and scaled camera-to-stage mapping and
by random stage error, as on a real microscope. Vignetting, sensor noise and
JPEG compression can be added.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import piexif
import pyvips

SAMPLE_NAME = "cmu1-he-small.jpg"
LAYOUTS = ("v3", "legacy", "v2", "filename", "none")


def sample_image_path() -> Path:
    """The CC0 H&E sample image shipped with the package (see data/ATTRIBUTION.txt)."""
    return Path(str(resources.files("ofstitch") / "data" / SAMPLE_NAME))


@dataclass(frozen=True)
class SyntheticScan:
    """A synthetic scan on disk and its ground truth.

    Attributes
    ----------
    folder : Path
    names : list of str
        Tile file names, in capture order.
    truth_px : ndarray, shape (n, 2)
        True ``(row, col)`` of each tile's top-left corner in the source image.
    stage_xy : ndarray, shape (n, 2)
        Stage coordinates written into the metadata.
    csm : ndarray, shape (2, 2)
        The matrix written into the metadata (image-to-stage displacement, at
        the calibration width).
    tile_shape : (int, int)
    source : ndarray
        The source image (for texture checks).
    blank : ndarray of int
        Tiles written blank (background and noise only: no content of the source).
    """

    folder: Path
    names: list[str]
    truth_px: np.ndarray
    stage_xy: np.ndarray
    csm: np.ndarray
    tile_shape: tuple[int, int]
    source: np.ndarray
    blank: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def load_source(path: Path | None = None) -> np.ndarray:
    """Decode a source image as uint8 (H, W, 3)."""
    image = pyvips.Image.new_from_file(str(path or sample_image_path()))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    return image.extract_band(0, n=3).cast("uchar").numpy()


def _usercomment(layout: str, stage_xyz: tuple[float, float, float], csm: np.ndarray,
                 calibration_shape: tuple[int, int], um_per_px: float) -> dict:
    x, y, z = stage_xyz
    pos = {"x": x, "y": y, "z": z}
    matrix = csm.tolist()
    if layout == "v3":
        return {"stage": {"position": pos},
                "camera_stage_mapping": {"image_to_stage_displacement_matrix": matrix,
                                         "image_resolution": list(calibration_shape)},
                "pixel_size_um": um_per_px}
    if layout == "legacy":
        return {"/stage/": {"position": pos},
                "/camera_stage_mapping/": {"image_to_stage_displacement_matrix": matrix,
                                           "image_resolution": list(calibration_shape)}}
    if layout == "v2":
        return {"instrument": {
            "state": {"stage": {"position": pos}},
            "settings": {"extensions": {
                "org.openflexure.camera_stage_mapping": {"image_to_stage_displacement": matrix},
                "usafcal": {"um_per_px": um_per_px}}}}}
    raise ValueError(f"no UserComment for layout {layout!r}")


def make_scan(
    folder: Path,
    *,
    source: np.ndarray | Path | None = None,
    grid: tuple[int, int] = (4, 5),
    tile_shape: tuple[int, int] = (240, 320),
    overlap: float = 0.3,
    stage_error_px: float = 3.0,
    rotation_deg: float = 0.5,
    steps_per_px: float = 2.0,
    calibration_width: int | None = None,
    vignetting: float = 0.1,
    noise: float = 2.0,
    jpeg_quality: int = 90,
    layout: str = "v3",
    snake: bool = True,
    grey: bool = False,
    um_per_px: float = 0.83,
    extension: str = ".jpg",
    seed: int = 0,
    backlash_px: float = 0.0,
    blank_fraction: float = 0.0,
    content: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> SyntheticScan:
    """Write a synthetic scan into ``folder`` and return its ground truth.

    Parameters
    ----------
    grid : (rows, cols)
    tile_shape : (height, width)
    overlap : float
        Nominal overlap between neighbours, as a fraction of the tile size.
    stage_error_px : float
        Standard deviation of the random error of each true position, in pixels.
    rotation_deg : float
        Rotation of the camera relative to the stage axes.
    steps_per_px : float
        Stage steps per pixel (the scale of the CSM).
    calibration_width : int, optional
        Width recorded as the CSM's calibration width (v3 and legacy layouts);
        the written matrix is scaled accordingly. Default: the tile width.
    layout : {"v3", "legacy", "v2", "filename", "none"}
        Where positions are written: an OpenFlexure EXIF layout, the file name
        (``tile_X_Y.jpg``, stage in pixels, no CSM), or nowhere.
    backlash_px : float
        Stage backlash: tiles of the rows scanned right to left (snake order) land
        this many pixels to the side of where the stage says.
    blank_fraction : float
        Fraction of tiles written blank: the source's background level plus noise
        and shading, no content (as from an empty field or a failed capture).
    content : callable, optional
        ``content(box, background) -> box``: rewrites the part of the source the scan
        covers (float32 ``(H, W, 3)``, and the background colour), for scans whose
        content has a given shape (:func:`edge_content`, :func:`corner_content`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    rng = np.random.default_rng(seed)
    src = load_source(source) if not isinstance(source, np.ndarray) else source
    rows, cols = grid
    th, tw = tile_shape
    step = np.array([th * (1 - overlap), tw * (1 - overlap)])

    # Commanded stage positions on a regular grid, in capture (optionally snake) order.
    order = []
    for r in range(rows):
        cs = range(cols) if not (snake and r % 2) else range(cols - 1, -1, -1)
        order.extend((r, c) for c in cs)
    grid_px = np.array([(r * step[0], c * step[1]) for r, c in order], dtype=np.float64)

    theta = math.radians(rotation_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    # Pixel (row, col) = stage (x, y) @ P; the true mapping includes the rotation.
    p_true = swap @ rot.T / steps_per_px
    m_true = np.linalg.inv(p_true)  # image (row, col) displacement -> stage displacement
    p_nominal = swap / steps_per_px
    stage_xy = grid_px @ np.linalg.inv(p_nominal)  # commanded: a regular stage grid
    truth = stage_xy @ p_true + rng.normal(0, stage_error_px, size=grid_px.shape)
    if backlash_px:
        reverse = np.array([bool(snake and r % 2) for r, _ in order])
        truth[reverse, 1] += backlash_px
    truth = np.round(truth - truth.min(axis=0) + 2).astype(np.int64)
    need = truth.max(axis=0) + np.array(tile_shape) + 2
    if need[0] > src.shape[0] or need[1] > src.shape[1]:
        raise ValueError(
            f"the source image ({src.shape[1]}x{src.shape[0]}) is too small for this scan, "
            f"which needs {need[1]}x{need[0]} px: use fewer or smaller tiles")
    # Centre the scan in the source.
    margin = (np.array(src.shape[:2]) - need) // 2
    truth = truth + margin
    if content is not None:
        background = np.percentile(src.reshape(-1, src.shape[-1]), 98, axis=0)
        y0, x0 = truth.min(axis=0)
        y1, x1 = truth.max(axis=0) + np.array(tile_shape)
        src = src.copy()
        box = content(src[y0:y1, x0:x1].astype(np.float32), background.astype(np.float32))
        src[y0:y1, x0:x1] = np.clip(np.round(box), 0, 255).astype(src.dtype)

    calib_w = calibration_width or tw
    csm_written = m_true * tw / calib_w
    yy, xx = np.mgrid[0:th, 0:tw]
    r2 = ((yy - th / 2) / (th / 2)) ** 2 + ((xx - tw / 2) / (tw / 2)) ** 2
    shading = (1 - vignetting * r2 / 2)[..., None]

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 1, 1, 12, 0, 0)
    n_blank = int(round(blank_fraction * len(truth)))
    blank = np.sort(rng.choice(len(truth), size=n_blank, replace=False)) if n_blank else \
        np.zeros(0, np.int64)
    background = np.percentile(src.reshape(-1, src.shape[-1]), 98, axis=0)
    names = []
    for k, (ty, tx) in enumerate(truth.tolist()):
        tile = src[ty:ty + th, tx:tx + tw].astype(np.float32)
        if k in blank:
            tile = np.broadcast_to(background.astype(np.float32), tile.shape)
        tile = tile * shading
        if noise > 0:
            tile = tile + rng.normal(0, noise, size=tile.shape)
        tile = np.clip(np.round(tile), 0, 255).astype(np.uint8)
        if grey:
            tile = tile.mean(axis=2, keepdims=True).astype(np.uint8)
        sx, sy = stage_xy[k]
        if layout == "filename":  # pixels, x = column, y = row (no CSM)
            row, col = grid_px[k]
            name = f"tile_{int(round(col))}_{int(round(row))}{extension}"
        else:
            name = f"tile_{k:04d}{extension}"
        path = folder / name
        image = pyvips.Image.new_from_array(tile) if tile.shape[2] > 1 else \
            pyvips.Image.new_from_array(tile[..., 0])
        if extension.lower() in (".jpg", ".jpeg"):
            image.jpegsave(str(path), Q=jpeg_quality, strip=True)
        else:
            image.write_to_file(str(path))
        if layout in ("v3", "legacy", "v2") and extension.lower() in (".jpg", ".jpeg"):
            comment = _usercomment(layout, (float(sx), float(sy), 0.0), csm_written,
                                   (round(calib_w * th / tw), calib_w), um_per_px)
            when = (start + timedelta(seconds=2 * k)).strftime("%Y:%m:%d %H:%M:%S").encode()
            exif = {"0th": {piexif.ImageIFD.DateTime: when},
                    "Exif": {piexif.ExifIFD.UserComment: json.dumps(comment).encode(),
                             piexif.ExifIFD.DateTimeOriginal: when}}
            piexif.insert(piexif.dump(exif), str(path))
        names.append(name)

    (folder.parent / f"{folder.name}_truth.json").write_text(json.dumps({
        "names": names, "truth_px_row_col": truth.tolist(), "tile_shape": list(tile_shape)}))
    return SyntheticScan(folder=folder, names=names, truth_px=truth.astype(np.float64),
                         stage_xy=stage_xy, csm=csm_written, tile_shape=tile_shape, source=src,
                         blank=np.asarray(blank, np.int64))


HARD_SCAN = dict(stage_error_px=20.0, rotation_deg=2.0, backlash_px=12.0, blank_fraction=0.1,
                 vignetting=0.15, noise=3.0, jpeg_quality=85, snake=True)


def hard_source(source: np.ndarray, *, scale: int = 2, dim_contrast: float = 0.3,
                seed: int = 0) -> np.ndarray:
    """A harder source image: upscaled, with large blank areas and dim, low-contrast content.

    The image is enlarged ``scale`` times (so that a scan of hundreds of tiles fits
    with realistic tile sizes). A large ellipse and a band are set to the background
    level (the 98th percentile: the bright, empty slide), and a second region keeps
    only ``dim_contrast`` of its contrast around the background, like dim fluorescence
    or faint stain.
    """
    rng = np.random.default_rng(seed)
    image = pyvips.Image.new_from_array(source)
    if scale != 1:
        image = image.resize(scale, kernel="lanczos3")
    src = image.cast("uchar").numpy().astype(np.float32)
    h, w = src.shape[:2]
    background = np.percentile(src.reshape(-1, src.shape[-1]), 98, axis=0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.25, 0.35), w * rng.uniform(0.6, 0.75)
    blank = ((yy - cy) / (0.22 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 <= 1
    blank |= (yy > 0.86 * h)
    dim = (yy > 0.55 * h) & (yy <= 0.86 * h) & (xx < 0.55 * w)
    out = src.copy()
    out[dim] = background + dim_contrast * (src[dim] - background)
    out[blank] = background
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def make_hard_scan(folder: Path, *, source: np.ndarray | Path | None = None,
                   grid: tuple[int, int] = (16, 13), tile_shape: tuple[int, int] = (320, 400),
                   seed: int = 0, **kwargs) -> SyntheticScan:
    """A hard scan for placement: at least 200 tiles by default, with large background
    areas, 10% blank tiles, dim low-texture content, stage noise of 20 px, a 2 degree
    camera rotation and a snake-order scan with backlash (:data:`HARD_SCAN`).
    """
    src = load_source(source) if not isinstance(source, np.ndarray) else source
    options = {**HARD_SCAN, **kwargs}
    return make_scan(folder, source=hard_source(src, seed=seed), grid=grid,
                     tile_shape=tile_shape, seed=seed, **options)


def edge_content(at: float = 0.35, band: float = 0.3) -> Callable:
    """A straight tissue edge against blank slide (the aperture problem).

    Left of the vertical line at ``at`` of the scan's width is blank slide; right of it,
    over ``band`` of the width, tissue of one flat colour (stain without texture); then
    the source's own texture. An overlap that holds only the edge locates a tile across
    the edge (in x) and not along it (in y).
    """
    def apply(box: np.ndarray, background: np.ndarray) -> np.ndarray:
        w = box.shape[1]
        x0, x1 = int(at * w), int((at + band) * w)
        out = box.copy()
        tissue = np.median(box.reshape(-1, box.shape[-1]), axis=0)
        out[:, :x0] = background
        out[:, x0:x1] = 0.5 * (tissue + background) - 40.0
        return out

    return apply


def corner_content(radius: float = 0.3) -> Callable:
    """Texture only near one corner: blank slide except within ``radius`` of the scan's
    diagonal from its top-left corner (a sparse sample)."""
    def apply(box: np.ndarray, background: np.ndarray) -> np.ndarray:
        h, w = box.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        far = np.hypot(yy, xx) > radius * np.hypot(h, w)
        out = box.copy()
        out[far] = background
        return out

    return apply


def pair_errors(positions: np.ndarray, truth: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Error (pixels) of each pair's relative placement against the truth."""
    a, b = pairs[:, 0], pairs[:, 1]
    got = positions[b] - positions[a]
    want = truth[b] - truth[a]
    return np.linalg.norm(got - want, axis=1)


def texture_map(source: np.ndarray, window: int = 7, min_std: float = 8.0) -> np.ndarray:
    """Pixels of ``source`` with local texture: grey std over a window above ``min_std``."""
    from scipy.ndimage import uniform_filter

    grey = source.mean(axis=2) if source.ndim == 3 else source.astype(np.float64)
    mean = uniform_filter(grey, window)
    var = uniform_filter(grey * grey, window) - mean * mean
    return np.sqrt(np.clip(var, 0, None)) > min_std


def textured_pairs(scan: SyntheticScan, pairs: np.ndarray, min_fraction: float = 0.1,
                   texture: np.ndarray | None = None) -> np.ndarray:
    """Whether the true overlap of each pair has texture.

    A pair's overlap has texture when at least ``min_fraction`` of it has local
    texture (:func:`texture_map`): a few specks in a blank background do not count.
    A pair with a blank tile (:attr:`SyntheticScan.blank`) has none.
    """
    texture = texture_map(scan.source) if texture is None else texture
    th, tw = scan.tile_shape
    out = np.zeros(len(pairs), dtype=bool)
    blank = set(scan.blank.tolist())
    for k, (a, b) in enumerate(pairs.tolist()):
        if a in blank or b in blank:
            continue
        (ya, xa), (yb, xb) = scan.truth_px[a].astype(int), scan.truth_px[b].astype(int)
        y0, y1 = max(ya, yb), min(ya, yb) + th
        x0, x1 = max(xa, xb), min(xa, xb) + tw
        if y1 - y0 > 4 and x1 - x0 > 4:
            out[k] = texture[y0:y1, x0:x1].mean() >= min_fraction
    return out


@dataclass(frozen=True)
class PairResults:
    """Synthetic correlation results for a grid scan (no images): for placement tests
    and benchmarks at sizes no image scan reaches quickly.

    Attributes
    ----------
    truth_px, stage_px : ndarray, shape (n, 2)
    pairs : ndarray, shape (m, 2)
    candidates : ndarray, shape (m, K, 3)
        ``(dy, dx, score)`` candidates, as :mod:`ofstitch.stream` makes them.
    null_pairs, null_candidates, null_stage_shift
        The same for non-overlapping pairs.
    kind : ndarray, shape (m,), str
        ``"good"``, ``"blank"`` (no true candidate) or ``"repeat"`` (a periodic
        sample: a wrong candidate scores higher than the true one).
    """

    truth_px: np.ndarray
    stage_px: np.ndarray
    pairs: np.ndarray
    candidates: np.ndarray
    null_pairs: np.ndarray
    null_candidates: np.ndarray
    null_stage_shift: np.ndarray
    kind: np.ndarray


def synthetic_pair_results(grid: tuple[int, int], *, tile_shape: tuple[int, int] = (624, 832),
                           overlap: float = 0.3, stage_error_px: float = 20.0,
                           rotation_deg: float = 2.0, blank_fraction: float = 0.1,
                           repeat_fraction: float = 0.02, k: int = 8, seed: int = 0
                           ) -> PairResults:
    """Pair results of a ``grid`` scan with known truth, without any image.

    Good pairs have the true shift (plus 0.1 px noise) among their candidates with a
    score in [0.5, 1]; blank pairs have only chance candidates (scores below 0.3);
    repeat pairs have, besides the true one, a candidate one period (a third of the
    tile) away that scores a little higher. The null pairs score like chance.
    """
    rng = np.random.default_rng(seed)
    rows, cols = grid
    th, tw = tile_shape
    step = np.array([th * (1 - overlap), tw * (1 - overlap)])
    rc = np.array([(r, c) for r in range(rows) for c in range(cols)], dtype=np.float64)
    nominal = rc * step
    theta = math.radians(rotation_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    truth = nominal @ rot.T + rng.normal(0, stage_error_px, size=nominal.shape)
    index = np.arange(rows * cols).reshape(rows, cols)
    right = np.stack([index[:, :-1].ravel(), index[:, 1:].ravel()], 1)
    down = np.stack([index[:-1, :].ravel(), index[1:, :].ravel()], 1)
    pairs = np.concatenate([right, down]).astype(np.int64)
    m = len(pairs)
    true_shift = truth[pairs[:, 1]] - truth[pairs[:, 0]]
    stage_shift = nominal[pairs[:, 1]] - nominal[pairs[:, 0]]

    def chance(count: int, around: np.ndarray) -> np.ndarray:
        out = np.empty((count, k, 3))
        out[..., :2] = around[:, None, :] + rng.uniform(-0.3, 0.3, (count, k, 2)) * [th, tw]
        out[..., 2] = np.sort(rng.uniform(-0.1, 0.3, (count, k)) ** 3 * 8, axis=1)[:, ::-1]
        out[..., 2] = np.clip(out[..., 2], -0.1, 0.3)
        return out

    candidates = chance(m, stage_shift)
    u = rng.uniform(size=m)
    kind = np.where(u < blank_fraction, "blank",
                    np.where(u < blank_fraction + repeat_fraction, "repeat", "good"))
    good = kind != "blank"
    score = rng.uniform(0.5, 1.0, size=m)
    slot = rng.integers(0, k, size=m)
    rows_ = np.arange(m)
    candidates[rows_[good], slot[good], :2] = true_shift[good] + rng.normal(0, 0.1,
                                                                            (good.sum(), 2))
    candidates[rows_[good], slot[good], 2] = score[good]
    rep = np.flatnonzero(kind == "repeat")
    other = (slot[rep] + 1) % k
    candidates[rep, other, :2] = true_shift[rep] + np.array([0.0, tw / 3])
    candidates[rep, other, 2] = np.minimum(score[rep] + 0.05, 1.0)
    # Null pairs: two steps along each row, searched as a right neighbour.
    null = np.stack([index[:, :-2].ravel(), index[:, 2:].ravel()], 1).astype(np.int64)
    null = null[:: max(1, len(null) // 200)][:200]
    null_shift = np.tile([0.0, step[1]], (len(null), 1))
    null_candidates = chance(len(null), null_shift)
    return PairResults(truth, nominal, pairs, candidates, null, null_candidates, null_shift,
                       kind)
