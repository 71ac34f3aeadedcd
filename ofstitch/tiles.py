"""Decoding tile files into arrays (pyvips), on the host.

Everything that reads pixels from disk goes through here: grey float32 tiles
for correlation (decoded straight to reduced size with libjpeg's DCT scaling
when ``resize < 1``), tiles in their own pixel format for the data formats, and
8-bit RGB tiles for renderings. :func:`open_tile` decodes a tile as its file
means it (page, orientation, CMYK, palette, alpha); everything else starts there.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pyvips

from .errors import OfstitchError, OfstitchWarning
from .levels import Levels

# A tile claiming more pixels than this is refused (a decompression bomb).
MAX_TILE_PIXELS = 200_000_000
_ORIENTATION = 0x0112  # the EXIF tag
PILLOW_MAX_PIXELS = 1_000_000  # see _jpeg_pixels


class TileReadError(OfstitchError):
    """A tile file could not be decoded."""


def _pillow_image(path: Path, exc: Exception) -> pyvips.Image:
    """Fallback decoder for formats the bundled libvips lacks (BMP), through Pillow."""
    try:
        from PIL import Image, ImageOps

        Image.MAX_IMAGE_PIXELS = MAX_TILE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own chatter about bad files
            with Image.open(path) as pil:
                pil = ImageOps.exif_transpose(pil)
                image = pil if pil.mode in ("L", "RGB", "RGBA", "I;16", "LA", "I", "F") else \
                    pil.convert("RGB")
                arr = np.asarray(image)
    except Exception:
        raise TileReadError(f"cannot read {Path(path).name}: {_first_line(exc)}") from None
    return pyvips.Image.new_from_array(arr)


def load(path: Path | str, **options) -> pyvips.Image:
    """``pyvips.Image.new_from_file``, for any file name: libvips takes names as UTF-8, so a
    name that is not (bytes the file system allows, shown as surrogate escapes) is read
    into memory and decoded from there."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with open(name, "rb") as fh:
            return pyvips.Image.new_from_buffer(fh.read(), "", **options)
    return pyvips.Image.new_from_file(name, **options)


@functools.lru_cache(maxsize=4096)
def _largest_page(path: str, size: int, mtime_ns: int) -> int:
    """The page of a multi-page TIFF with the most pixels (the first of equals): a
    thumbnail or label page may come first. 0 for single-page files."""
    try:
        first = load(path)
        n_pages = first.get("n-pages") if first.get_typeof("n-pages") else 1
    except pyvips.Error:
        return 0
    if n_pages <= 1:
        return 0
    areas = []
    for k in range(min(n_pages, 64)):
        try:
            page = load(path, page=k)
            areas.append(page.width * page.height)
        except pyvips.Error:
            areas.append(-1)
    best = int(np.argmax(areas))
    if areas.count(areas[best]) > 1:
        warnings.warn(f"tiles have {areas.count(areas[best])} full-size pages (channels or "
                      "planes of one file): stitching the first of them only",
                      OfstitchWarning, stacklevel=2)
    return best


def _page(path: Path) -> int:
    if path.suffix.lower() not in (".tif", ".tiff"):
        return 0
    try:
        st = path.stat()
    except OSError:
        return 0
    return _largest_page(os.fspath(path), st.st_size, st.st_mtime_ns)


def _orientation(image: pyvips.Image) -> int:
    """The EXIF Orientation (1-8) of a decoded image; 1 when it has none."""
    try:
        value = int(image.get("orientation")) if image.get_typeof("orientation") else 1
    except (pyvips.Error, ValueError, TypeError):
        return 1
    return value if 1 <= value <= 8 else 1


def _cmyk_to_rgb(image: pyvips.Image) -> pyvips.Image:
    """A CMYK (or YCCK, which libjpeg hands over as CMYK) image as RGB.

    With an embedded ICC profile, through colour management; without one, as
    device CMYK (``R = (1 - C)(1 - K)``), as Pillow and web browsers show it.
    """
    alpha = image.extract_band(4) if image.bands > 4 else None
    cmyk = image.extract_band(0, n=4)
    if image.format == "uchar" and image.get_typeof("icc-profile-data"):
        try:
            return cmyk.icc_transform("srgb", embedded=True, intent="relative").cast("uchar")
        except pyvips.Error:
            pass  # a broken profile: device CMYK below
    top = 65535.0 if image.format == "ushort" else 255.0
    k = cmyk.extract_band(3).linear(-1.0, top)
    rgb = cmyk.extract_band(0, n=3).linear(-1.0, top) * k / top
    rgb = rgb.linear(1.0, 0.5).cast("ushort" if top > 255 else "uchar")
    return rgb if alpha is None else rgb.bandjoin(alpha)


def open_tile(path: Path, *, shrink: int = 1, sequential: bool = True) -> pyvips.Image:
    """A tile as a lazy pyvips image of its colour bands (1 or 3), in its own pixel format.

    Decoded as the file means it: the largest page of a multi-page TIFF, the
    EXIF Orientation applied, CMYK turned into RGB, a palette expanded, alpha
    dropped. JPEG tiles are shrunk inside libjpeg by ``shrink`` (1, 2, 4 or 8).
    """
    path = Path(path)
    kwargs: dict = {}
    if shrink > 1 and path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["shrink"] = shrink
    page = _page(path)
    if page:
        kwargs["page"] = page
    access = "sequential" if sequential else "random"
    try:
        image = load(path, access=access, fail=True, **kwargs)
    except pyvips.Error as exc:
        image = _pillow_image(path, exc)
    _require_sane_size(image, path)
    if _orientation(image) != 1:
        if sequential and image.get_typeof("vips-loader"):  # turning needs random access
            image = load(path, fail=True, **kwargs)
        image = image.autorot()
    return _colour_bands(image, path)


def _require_sane_size(image: pyvips.Image, path: Path) -> None:
    if image.width * image.height > MAX_TILE_PIXELS:
        raise TileReadError(
            f"{path.name} claims {image.width}x{image.height} pixels, more than a tile "
            "can have (a corrupt file or a decompression bomb)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def header(path: Path) -> tuple[int, int, int, str]:
    """``(height, width, colour bands, format)`` of a tile as :func:`open_tile` decodes it
    (after its EXIF Orientation; CMYK counts 3 bands), reading only its header.

    An alpha band is not counted. Raises :class:`TileReadError` for an
    unreadable or truncated file.
    """
    path = Path(path)
    page = _page(path)
    try:
        image = load(path, **({"page": page} if page else {}))
    except pyvips.Error as exc:
        image = _pillow_image(path, exc)
    _require_complete(path)
    _require_sane_size(image, path)
    height, width = image.height, image.width
    if _orientation(image) >= 5:  # turned by a quarter
        height, width = width, height
    if image.interpretation == "cmyk" and image.bands >= 4:
        bands = 3
    else:
        bands = image.bands - 1 if image.bands in (2, 4) else min(image.bands, 3)
    return height, width, bands, image.format


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


def _colour_bands(image: pyvips.Image, path: Path) -> pyvips.Image:
    """CMYK as RGB; an alpha band dropped; at most three colour bands."""
    if image.interpretation == "cmyk" and image.bands >= 4:
        image = _cmyk_to_rgb(image)
    if image.bands in (2, 4):
        if not image.hasalpha():
            warnings.warn(f"{path.name} has {image.bands} channels: stitching the first "
                          f"{image.bands - 1} (read as colour plus alpha)", OfstitchWarning,
                          stacklevel=3)
        image = image.extract_band(0, n=image.bands - 1)
    elif image.bands > 4:
        warnings.warn(f"{path.name} has {image.bands} channels: stitching the first three",
                      OfstitchWarning, stacklevel=3)
        image = image.extract_band(0, n=3)
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
        image = open_tile(path, shrink=_dct_shrink(resize))
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


def _jpeg_pixels(path: Path, shrink: int, *, words: bool = False) -> np.ndarray | None:
    """An 8-bit grey or RGB JPEG decoded by Pillow at ``1/shrink`` (libjpeg's DCT scaling),
    cropped to the size libvips' shrink-on-load gives: the same pixels as
    :func:`open_tile` (both are libjpeg's), decoded outside the GIL. From Python threads
    it is about twice as fast as libvips' loader (300 tiles of 820x616 on two cores: 0.8
    against 1.4 s).

    ``words``: an RGB JPEG only, as ``(h, w, 4)``, Pillow's own 4-byte pixels (the pixels
    as 32-bit words, :func:`ofstitch.compose.word_bands`; the fourth byte is not
    defined, and the mosaic drops it).

    Only for a result of up to :data:`PILLOW_MAX_PIXELS`, where libvips' fixed cost a
    call counts: it decodes larger tiles as fast on one thread and faster on several (a
    4056x3040 tile: libvips 176 ms on one thread and 82 ms on two, Pillow 172 and 97 ms),
    and mosaics of 1640x1232 tiles were no faster through Pillow.

    ``None`` when Pillow's decode would not be the same (another format or mode, an EXIF
    orientation, a decompression bomb), or might not be (an end-of-image marker before the
    end of the data: libjpeg warns and fills the rest, which Pillow accepts and libvips
    refuses), or fails: :func:`open_tile` then decodes the tile, and reports what is
    wrong with it as usual.
    """
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return None
    from PIL import Image

    try:
        with Image.open(path) as pil:  # the header only, so far
            full_w, full_h = pil.size
            w, h = full_w // shrink, full_h // shrink  # libvips rounds down, libjpeg up
            # (w * h bounds the tile's size too: MAX_TILE_PIXELS is not reached here)
            if pil.format != "JPEG" or pil.mode not in ("L", "RGB") or \
                    w * h > PILLOW_MAX_PIXELS or pil.getexif().get(_ORIENTATION, 1) != 1 or \
                    not _ends_at_its_end(path.read_bytes()):
                return None
            if shrink > 1:
                pil.draft(pil.mode, (w, h))
                if pil.size != (-(-full_w // shrink), -(-full_h // shrink)):
                    return None  # libjpeg scaled by another factor
            if not words:
                arr = np.asarray(pil)
            elif pil.mode == "RGB":
                arr = np.frombuffer(pil.tobytes("raw", "RGBX"), np.uint8).reshape(
                    pil.height, pil.width, 4)
            else:
                return None
    except Exception:  # noqa: BLE001 - open_tile decodes it again and says what is wrong
        return None
    if min(w, h) < 1 or arr.shape[0] < h or arr.shape[1] < w:
        return None
    return arr[:h, :w]


def _ends_at_its_end(data: bytes) -> bool:
    """Whether a JPEG's first end-of-image marker after its image data is the file's
    end (trailing zeros allowed). The segments before the first start-of-scan are
    skipped by their lengths, so an EXIF thumbnail's own markers do not count."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        if data[i + 1] == 0xFF:  # a fill byte
            i += 1
            continue
        if data[i + 1] == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    else:
        return False
    end = data.find(b"\xff\xd9", i)
    return end >= 0 and not data[end + 2:].strip(b"\x00")


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
            if pil.getexif().get(_ORIENTATION, 1) != 1:  # turned: open_tile turns it
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
                     levels: Levels | None = None, flat: pyvips.Image | None = None
                     ) -> np.ndarray:
    """Decode a tile as 8-bit RGB resized to exactly ``out_shape`` = ``(h, w)``, its
    values mapped to 8 bits by ``levels`` (default: 0-255 unchanged).

    Uses libjpeg's DCT scaling for JPEG tiles when ``scale <= 1/2``.
    """
    decoded = _jpeg_pixels(Path(path), _dct_shrink(scale))
    if decoded is not None and decoded.shape == (*out_shape, 3) and flat is None and \
            (levels is None or levels.identity):  # no pipeline: as decoded
        return np.ascontiguousarray(decoded)
    image = tile_image(path, scale, out_shape, levels=levels or Levels(), flat=flat,
                       decoded=decoded)
    return np.ascontiguousarray(_to_array(image, Path(path).name))


def _dct_shrink(scale: float) -> int:
    """The libjpeg shrink-on-load factor (1, 2, 4 or 8) for a tile drawn at ``scale``."""
    if scale >= 1:
        return 1
    return min(8, 2 ** int(math.floor(math.log2(1 / scale))))


def tile_image(path: Path, scale: float, out_shape: tuple[int, int] | None, *,
               levels: Levels | None = None, fmt: str = "uchar", bands: int = 3,
               flat: pyvips.Image | None = None, decoded: np.ndarray | None = None
               ) -> pyvips.Image:
    """A tile as a lazy pyvips image for a mosaic, resized to ``out_shape`` = ``(h, w)``.

    With ``levels``, an 8-bit RGB rendering (:meth:`Levels.to_uchar`); without,
    the tile's values cast to the mosaic's pixel format ``fmt`` (a cast that
    keeps them, see :func:`ofstitch.levels.mosaic_dtype`), with ``bands`` bands
    (a grey tile repeated in three bands for a colour mosaic). ``flat``, an
    illumination profile at the tile's output size (:mod:`ofstitch.flatfield`),
    divides every band first. ``decoded``: the tile as :func:`_jpeg_pixels` decoded it at
    ``scale``'s shrink (the same pixels, faster on threads), instead of opening it here.

    Opened for sequential access (top to bottom), so that a mosaic of thousands of tiles
    streams; JPEG tiles are shrunk inside libjpeg when ``scale <= 1/2``. Raises
    :class:`TileReadError` when the header cannot be read; corrupt pixel data raises
    ``pyvips.Error`` only when the pixels are computed.
    """
    image = open_tile(path, shrink=_dct_shrink(scale)) if decoded is None else \
        pyvips.Image.new_from_array(decoded)
    if image.bands == 1 and (levels is not None or bands == 3):
        image = image.bandjoin([image, image])
    if out_shape is not None and (image.height, image.width) != tuple(out_shape):
        out_h, out_w = out_shape
        image = image.resize(out_w / image.width, vscale=out_h / image.height)
        if (image.height, image.width) != (out_h, out_w):
            image = image.embed(0, 0, out_w, out_h, extend="copy")
    if flat is not None:
        if (flat.width, flat.height) != (image.width, image.height):
            flat = flat.resize(image.width / flat.width, vscale=image.height / flat.height)
        image = image.cast("float") / flat
        if levels is None and fmt not in ("float", "double"):
            image = image.rint()  # the cast below clips to the data type's range
    if levels is not None:
        return levels.to_uchar(image)
    if image.bands == 3 and bands == 1:
        image = image.bandmean()
    return image if image.format == fmt else image.cast(fmt)


def sample_values(path: Path, side: int) -> np.ndarray:
    """A tile's values (every colour band), shrunk to about ``side`` px on its longer side."""
    h, w = header(path)[:2]
    scale = min(1.0, side / max(h, w))
    image = open_tile(path, shrink=_dct_shrink(scale))
    if scale < 1:
        image = image.resize(side / max(image.width, image.height), kernel="linear")
    return _to_array(image, Path(path).name)
