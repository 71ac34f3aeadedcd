"""Decoding tile files into arrays (pyvips), on the host.

Everything that reads pixels from disk goes through here: grey float32 tiles
for correlation (decoded straight to reduced size with libjpeg's DCT scaling
when ``resize < 1``), and 8-bit RGB tiles for rendering.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyvips

from .errors import OfstitchError

# A tile claiming more pixels than this is refused (a decompression bomb).
MAX_TILE_PIXELS = 200_000_000


class TileReadError(OfstitchError):
    """A tile file could not be decoded."""


def _pillow_image(path: Path, exc: Exception) -> pyvips.Image:
    """Fallback decoder for formats the bundled libvips lacks (BMP), through Pillow."""
    try:
        import warnings

        from PIL import Image

        Image.MAX_IMAGE_PIXELS = MAX_TILE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own chatter about bad files
            with Image.open(path) as pil:
                image = pil if pil.mode in ("L", "RGB", "RGBA", "I;16", "LA") else \
                    pil.convert("RGB")
                arr = np.asarray(image)
    except Exception:
        raise TileReadError(f"cannot read {Path(path).name}: {_first_line(exc)}") from None
    return pyvips.Image.new_from_array(arr)


def _open(path: Path, *, shrink: int = 1) -> pyvips.Image:
    kwargs = {}
    if shrink > 1 and Path(path).suffix.lower() in (".jpg", ".jpeg"):
        kwargs["shrink"] = shrink
    try:
        image = pyvips.Image.new_from_file(os.fspath(path), access="sequential", fail=True,
                                           **kwargs)
    except pyvips.Error as exc:
        image = _pillow_image(path, exc)
    _require_sane_size(image, Path(path))
    return image


def _require_sane_size(image: pyvips.Image, path: Path) -> None:
    if image.width * image.height > MAX_TILE_PIXELS:
        raise TileReadError(
            f"{path.name} claims {image.width}x{image.height} pixels, more than a tile "
            "can have (a corrupt file or a decompression bomb)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def header(path: Path) -> tuple[int, int, int, str]:
    """``(height, width, colour bands, format)`` of an image file, reading only its header.

    An alpha band is not counted. Raises :class:`TileReadError` for an
    unreadable or truncated file.
    """
    try:
        image = pyvips.Image.new_from_file(os.fspath(path))
    except pyvips.Error as exc:
        image = _pillow_image(path, exc)
    _require_complete(Path(path))
    _require_sane_size(image, Path(path))
    bands = image.bands - 1 if image.bands in (2, 4) else image.bands
    return image.height, image.width, bands, image.format


def _require_complete(path: Path) -> None:
    """Cheap check that a JPEG or PNG was written to the end (a microscope may crash mid-write)."""
    suffix = path.suffix.lower()
    if suffix not in (".jpg", ".jpeg", ".png"):
        return
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64))
            tail = fh.read()
    except OSError as exc:
        raise TileReadError(f"cannot read {path.name}: {exc.strerror}") from None
    complete = b"\xff\xd9" in tail if suffix != ".png" else b"IEND" in tail
    if not complete:
        raise TileReadError(f"{path.name} is truncated (an incomplete or interrupted write)")


def _colour_bands(image: pyvips.Image) -> pyvips.Image:
    """Drop an alpha band, if any."""
    if image.bands in (2, 4):
        image = image.extract_band(0, n=image.bands - 1)
    return image


def _to_array(image: pyvips.Image, name: str) -> np.ndarray:
    try:
        return image.numpy()
    except pyvips.Error as exc:
        raise TileReadError(f"cannot decode {name}: {_first_line(exc)}") from None


def read_grey(path: Path, resize: float = 1.0, *, shape: tuple[int, int] | None = None
              ) -> np.ndarray:
    """Decode a tile as grey float32, optionally scaled by ``resize``.

    Parameters
    ----------
    path : Path
        The tile file.
    resize : float
        Scale factor in (0, 1].
    shape : (int, int), optional
        The full-resolution ``(height, width)``; with it, the output shape is
        exactly ``(round(height * resize), round(width * resize))``.

    Returns
    -------
    ndarray, shape (h, w), float32
        Mean of the colour bands, in the file's own units (0-255 or 0-65535).
    """
    full_h, full_w = shape if shape is not None else header(path)[:2]
    out_h, out_w = scaled_shape((full_h, full_w), resize)
    grey = _jpeg_luma(Path(path), (out_h, out_w)) if \
        Path(path).suffix.lower() in (".jpg", ".jpeg") else None
    if grey is not None and grey.shape == (out_h, out_w):
        return grey.astype(np.float32)
    if grey is not None:
        image = pyvips.Image.new_from_array(grey)
    else:
        image = _colour_bands(_open(path, shrink=_dct_shrink(resize)))
        if image.bands > 1:
            image = image.bandmean()
    image = image.cast("float")
    if (image.height, image.width) != (out_h, out_w):
        image = image.resize(out_w / image.width, vscale=out_h / image.height, kernel="linear")
    arr = _to_array(image, Path(path).name)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.shape != (out_h, out_w):
        raise TileReadError(
            f"{Path(path).name} decoded to {arr.shape[1]}x{arr.shape[0]}, expected "
            f"{out_w}x{out_h}: tiles must all have the same size")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _jpeg_luma(path: Path, out_shape: tuple[int, int]) -> np.ndarray | None:
    """An 8-bit JPEG decoded by libjpeg straight to its luma channel (no chroma
    upsampling or colour conversion: about three times faster than RGB), at the smallest
    DCT scale (1, 1/2, 1/4, 1/8) not below ``out_shape``.

    ``None`` when libjpeg cannot do it (CMYK, 12-bit...): the caller decodes another way.
    Raises :class:`TileReadError` for a file that cannot be decoded.
    """
    from PIL import Image

    # No warnings.catch_warnings() here: this runs on the decode threads, and that context
    # manager swaps the process-wide warning state, which would swallow (or leak) the
    # warnings the main thread is reporting at the same time.
    try:
        with Image.open(path) as pil:
            if pil.format != "JPEG" or pil.mode not in ("L", "RGB"):
                return None
            if pil.width * pil.height > MAX_TILE_PIXELS:
                raise TileReadError(
                    f"{path.name} claims {pil.width}x{pil.height} pixels, more than a "
                    "tile can have (a corrupt file or a decompression bomb)")
            pil.draft("L", (out_shape[1], out_shape[0]))
            if pil.mode != "L":
                return None
            arr = np.asarray(pil)
    except TileReadError:
        raise
    except Exception as exc:
        raise TileReadError(f"cannot decode {path.name}: {_first_line(exc)}") from None
    return arr


def read_rgb8(path: Path, *, value_scale: float = 1.0) -> np.ndarray:
    """Decode a tile as 8-bit RGB for rendering.

    ``value_scale`` multiplies the values before they are clipped to 0-255 (for
    16-bit tiles).
    """
    image = _colour_bands(_open(path))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    if image.format != "uchar" or value_scale != 1.0:
        image = (image.cast("float") * value_scale).cast("uchar")
    return np.ascontiguousarray(_to_array(image, Path(path).name))


def scaled_shape(shape: tuple[int, int], resize: float) -> tuple[int, int]:
    """Tile shape after ``resize``."""
    return max(1, round(shape[0] * resize)), max(1, round(shape[1] * resize))


def focus_measure(path: Path) -> float:
    """Sharpness of a tile: variance of the Laplacian of its grey image (higher is sharper).

    Computed at up to 1/4 scale for speed; used to pick the sharpest image of a z-stack.
    """
    h, w = header(path)[:2]
    scale = min(1.0, 512 / max(h, w))
    grey = read_grey(path, scale) if scale < 1 else read_grey(path)
    lap = (-4 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1]
           + grey[1:-1, :-2] + grey[1:-1, 2:])
    return float(np.var(lap))


def read_rgb8_scaled(path: Path, scale: float, out_shape: tuple[int, int], *,
                     value_scale: float = 1.0) -> np.ndarray:
    """Decode a tile as 8-bit RGB resized to exactly ``out_shape`` = ``(h, w)``
    (:func:`rgb8_image`, computed).

    Uses libjpeg's DCT scaling for JPEG tiles when ``scale <= 1/2``.
    """
    image = rgb8_image(path, scale, out_shape, value_scale=value_scale)
    return np.ascontiguousarray(_to_array(image, Path(path).name))


def _dct_shrink(scale: float) -> int:
    """The libjpeg shrink-on-load factor (1, 2, 4 or 8) for a tile drawn at ``scale``."""
    if scale >= 1:
        return 1
    return min(8, 2 ** int(math.floor(math.log2(1 / scale))))


def rgb8_image(path: Path, scale: float, out_shape: tuple[int, int] | None, *,
               value_scale: float = 1.0) -> pyvips.Image:
    """A tile as a lazy 8-bit RGB pyvips image, resized to ``out_shape`` = ``(h, w)``.

    Opened for sequential access (top to bottom), so that a mosaic of thousands
    of tiles streams; JPEG tiles are shrunk inside libjpeg when ``scale <= 1/2``.
    Raises :class:`TileReadError` when the header cannot be read; corrupt pixel
    data raises ``pyvips.Error`` only when the pixels are computed.
    """
    image = _colour_bands(_open(path, shrink=_dct_shrink(scale)))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    if out_shape is not None and (image.height, image.width) != tuple(out_shape):
        out_h, out_w = out_shape
        image = image.resize(out_w / image.width, vscale=out_h / image.height)
        if (image.height, image.width) != (out_h, out_w):
            image = image.embed(0, 0, out_w, out_h, extend="copy")
    if image.format != "uchar" or value_scale != 1.0:
        image = (image.cast("float") * value_scale).cast("uchar")
    return image
