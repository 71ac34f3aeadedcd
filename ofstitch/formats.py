"""Writing the mosaic: JPEG, pyramidal OME-TIFF, Deep Zoom (+ viewer) and OME-Zarr.

Every writer takes a lazy pyvips image (see :mod:`ofstitch.render`) and pulls
its pixels through once, top to bottom, straight into the encoder, so memory is
bounded by a strip of the mosaic whatever its size. Every output is written
under a temporary name and renamed into place.

- JPEG: one image with ofstitch's EXIF (pixel size, the first tile's metadata);
  limited to 65,535 px per side.
- OME-TIFF: tiled BigTIFF with a SubIFD pyramid, JPEG, deflate or LZW
  compressed, OME-XML (with ``PhysicalSizeX/Y`` in µm) in the ImageDescription.
- DZI: a Deep Zoom pyramid of JPEG tiles and ``viewer.html``, a page that shows
  it with the bundled OpenSeadragon (no network needed).
- OME-Zarr: an NGFF 0.4 multiscale image (Zarr v2 layout), axes ``c, y, x``
  with a ``scale`` transform in micrometres, Blosc-LZ4-compressed chunks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from html import escape
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import piexif
import pyvips
from numcodecs import Blosc

from .atomic import atomic_path, write_text
from .errors import OfstitchError, OfstitchWarning

Format = Literal["jpeg", "ome-tiff", "dzi", "ome-zarr"]
FORMATS = ("jpeg", "ome-tiff", "dzi", "ome-zarr")
TiffCompression = Literal["jpeg", "deflate", "lzw"]
TIFF_COMPRESSIONS = ("jpeg", "deflate", "lzw")
SUFFIXES = {"jpeg": ".jpg", "ome-tiff": ".ome.tiff", "dzi": ".dzi", "ome-zarr": ".ome.zarr"}

JPEG_MAX_SIDE = 65535
JPEG_QUALITY = 90
THUMBNAIL_SIZE = 400
TILE_SIZE = 256
ZARR_CHUNK = 512
# Blosc with LZ4: what Zarr readers expect, and fast enough not to slow the render.
_COMPRESSOR = Blosc(cname="lz4", clevel=5, shuffle=Blosc.NOSHUFFLE)
VIEWER_NAME = "viewer.html"

Progress = Callable[[int, int], None]


def _watch(image: pyvips.Image, progress: Progress | None) -> pyvips.Image:
    """Report the encoder's progress (percent of the pixels computed) to ``progress``."""
    if progress is None:
        return image
    image = image.copy()
    image.set_progress(True)
    image.signal_connect("eval", lambda _image, p: progress(int(p.percent), 100))
    image.signal_connect("posteval", lambda _image, p: progress(100, 100))
    return image


def too_big_for_jpeg(size: tuple[int, int]) -> bool:
    """Whether an image of ``(height, width)`` exceeds what JPEG can hold."""
    return max(size) > JPEG_MAX_SIDE


def jpeg_refusal(size: tuple[int, int]) -> OfstitchError:
    """The error for a mosaic too large for JPEG."""
    return OfstitchError(
        f"the mosaic is {size[1]}x{size[0]} px, larger than JPEG allows ({JPEG_MAX_SIDE} px "
        "per side): use --format ome-tiff, --format dzi or --format ome-zarr")


# ----------------------------------------------------------------------------- JPEG


def _exif_bytes(metadata: dict | None, pixel_size_um: float | None, n_tiles: int,
                extra: dict | None = None) -> bytes:
    comment = dict(metadata or {})
    for key in ("stage", "/stage/"):
        comment.pop(key, None)
    comment.update({"Notes": "Stitched by ofstitch", "NumberOfImages": n_tiles})
    if pixel_size_um is not None:
        comment["pixel_size_um"] = pixel_size_um
    if extra:
        comment.update(extra)
    zeroth: dict = {piexif.ImageIFD.Software: b"ofstitch"}
    if pixel_size_um:
        px_per_cm = 1e4 / pixel_size_um
        rational = (int(round(px_per_cm * 1000)), 1000)
        zeroth.update({piexif.ImageIFD.XResolution: rational,
                       piexif.ImageIFD.YResolution: rational,
                       piexif.ImageIFD.ResolutionUnit: 3})
    exif = {"0th": zeroth,
            "Exif": {piexif.ExifIFD.UserComment: json.dumps(comment).encode("utf-8")}}
    return piexif.dump(exif)


def write_jpeg(image: pyvips.Image, path: Path, *, metadata: dict | None = None,
               pixel_size_um: float | None = None, n_tiles: int = 0,
               quality: int = JPEG_QUALITY, extra: dict | None = None,
               progress: Progress | None = None) -> None:
    """Save ``image`` as a JPEG with ofstitch EXIF (UserComment JSON, resolution)."""
    if too_big_for_jpeg((image.height, image.width)):
        raise jpeg_refusal((image.height, image.width))
    image = image.copy()
    image.set_type(pyvips.GValue.blob_type, "exif-data",
                   _exif_bytes(metadata, pixel_size_um, n_tiles, extra))
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    image = _watch(image, progress)
    with atomic_path(path) as tmp:
        image.jpegsave(tmp, Q=quality, keep="exif")


def write_thumbnail(source: Path, path: Path, size: int = THUMBNAIL_SIZE) -> None:
    """A small JPEG that fits in ``size`` x ``size``."""
    image = pyvips.Image.thumbnail(str(source), size, height=size)
    with atomic_path(path) as tmp:
        image.jpegsave(tmp, Q=85, keep="none")


# ----------------------------------------------------------------------------- OME-TIFF


def ome_xml(width: int, height: int, *, pixel_size_um: float | None, name: str = "mosaic"
            ) -> str:
    """OME-XML for one interleaved 8-bit RGB plane (``PhysicalSizeX/Y`` in µm, the default)."""
    physical = ""
    if pixel_size_um:
        physical = f' PhysicalSizeX="{pixel_size_um:.9g}" PhysicalSizeY="{pixel_size_um:.9g}"'
    from . import __version__

    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" '
        f'Creator="ofstitch {__version__}">'
        f'<Image ID="Image:0" Name="{escape(name)}">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="{width}" '
        f'SizeY="{height}" SizeC="3" SizeZ="1" SizeT="1" Interleaved="true"{physical}>'
        '<Channel ID="Channel:0:0" SamplesPerPixel="3"><LightPath/></Channel>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        '</Pixels></Image></OME>')


def write_ome_tiff(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
                   compression: TiffCompression = "jpeg", tile_size: int = TILE_SIZE,
                   quality: int = JPEG_QUALITY, name: str = "mosaic",
                   progress: Progress | None = None) -> None:
    """Save a tiled pyramidal OME-TIFF (BigTIFF, reduced levels in SubIFDs)."""
    if compression not in TIFF_COMPRESSIONS:
        raise OfstitchError(f"--tiff-compression must be one of {', '.join(TIFF_COMPRESSIONS)}"
                            f", got {compression!r}")
    image = image.copy()
    image.set_type(pyvips.GValue.gstr_type, "image-description",
                   ome_xml(image.width, image.height, pixel_size_um=pixel_size_um, name=name))
    options = {"Q": quality} if compression == "jpeg" else {"predictor": "horizontal"}
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    image = _watch(image, progress)
    with atomic_path(path) as tmp:
        image.tiffsave(tmp, tile=True, pyramid=True, subifd=True, bigtiff=True,
                       compression=compression, tile_width=tile_size, tile_height=tile_size,
                       resunit="cm", **options)


# ----------------------------------------------------------------------------- DZI


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path``, renamed to ``path`` on success."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dzi(image: pyvips.Image, path: Path, *, tile_size: int = TILE_SIZE,
              quality: int = JPEG_QUALITY, pixel_size_um: float | None = None,
              viewer: bool = True, progress: Progress | None = None) -> None:
    """Save a Deep Zoom pyramid: ``path`` (.dzi), the ``*_files`` folder beside it, and
    (with ``viewer``) ``viewer.html`` beside them."""
    path = Path(path)
    base = path.with_suffix("").name
    image = _watch(image, progress)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".dzi.", dir=path.parent))
    try:
        image.dzsave(str(tmp_dir / base), tile_size=tile_size, overlap=1,
                     suffix=f".jpg[Q={quality}]")
        with _atomic_dir(path.parent / f"{base}_files") as files:
            files.rmdir()
            os.replace(tmp_dir / f"{base}_files", files)
        os.replace(tmp_dir / f"{base}.dzi", path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if viewer:
        write_viewer(path.parent / VIEWER_NAME, path, (image.height, image.width),
                     tile_size=tile_size, pixel_size_um=pixel_size_um)


def _viewer_asset(name: str) -> bytes:
    return (resources.files("ofstitch") / "data" / "viewer" / name).read_bytes()


def write_viewer(path: Path, dzi: Path, size: tuple[int, int], *, tile_size: int = TILE_SIZE,
                 pixel_size_um: float | None = None) -> None:
    """A self-contained page that shows the Deep Zoom image ``dzi`` with OpenSeadragon.

    The script and button images are inlined and the DZI descriptor is written
    into the page, so it needs only the ``*_files`` folder beside it.
    """
    dzi = Path(dzi)
    base = dzi.with_suffix("").name
    rel = os.path.relpath(dzi.parent / f"{base}_files", Path(path).parent).replace(os.sep, "/")
    source = {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                        "Url": f"{rel}/", "Format": "jpg", "Overlap": "1",
                        "TileSize": str(tile_size),
                        "Size": {"Width": str(size[1]), "Height": str(size[0])}}}
    images = {}
    for entry in (resources.files("ofstitch") / "data" / "viewer" / "images").iterdir():
        if entry.name.endswith(".png"):
            images[entry.name[:-4]] = ("data:image/png;base64,"
                                       + base64.b64encode(entry.read_bytes()).decode())
    js = _viewer_asset("openseadragon.min.js").decode("utf-8")
    version = js.split("\n", 1)[0].replace("//! openseadragon", "").strip()
    pixel = f", {pixel_size_um:.4g} µm/px" if pixel_size_um else ""
    html = _viewer_asset("viewer.html").decode("utf-8")
    for key, value in (("__TITLE__", escape(base)), ("__WIDTH__", str(size[1])),
                       ("__HEIGHT__", str(size[0])), ("__PIXEL__", escape(pixel)),
                       ("__OSD_VERSION__", version),
                       ("__TILE_SOURCE__", json.dumps(source)),
                       ("__NAV_IMAGES__", json.dumps(images, sort_keys=True)),
                       ("__OSD_JS__", js.replace("</script", "<\\/script"))):
        html = html.replace(key, value)
    write_text(path, html)


# ----------------------------------------------------------------------------- OME-Zarr


class _ZarrLevel:
    """One resolution level of an OME-Zarr pyramid, written one row of chunks at a time.

    Rows of the level arrive in order through :meth:`push`; each full row of
    chunks is compressed and written, and the rows are halved (2x2 mean) and
    pushed to the next level.
    """

    def __init__(self, folder: Path, shape: tuple[int, int], chunk: int,
                 next_level: _ZarrLevel | None) -> None:
        self.folder, self.shape, self.chunk, self.next = folder, shape, chunk, next_level
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.chunk_row = 0
        self.odd: np.ndarray | None = None  # a row waiting for its pair
        folder.mkdir()
        meta = {"zarr_format": 2, "shape": [3, shape[0], shape[1]], "chunks": [3, chunk, chunk],
                "dtype": "|u1", "compressor": _COMPRESSOR.get_config(), "fill_value": 0,
                "order": "C", "filters": None, "dimension_separator": "/"}
        (folder / ".zarray").write_text(json.dumps(meta, indent=2))

    def push(self, rows: np.ndarray) -> None:
        """Add ``rows`` (shape ``(n, width, 3)``, uint8) below the rows already pushed."""
        if not len(rows):
            return
        self.pending.append(rows)
        self.n_pending += len(rows)
        while self.n_pending >= self.chunk:
            self._write_chunk_row(self._take(self.chunk))
        if self.next is not None:
            self._downsample(rows)

    def finish(self) -> None:
        if self.n_pending:
            self._write_chunk_row(self._take(self.n_pending))
        if self.next is not None:
            if self.odd is not None:
                self.next.push(_halve(np.concatenate([self.odd, self.odd])))
                self.odd = None
            self.next.finish()

    def _take(self, n: int) -> np.ndarray:
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        out, rest = block[:n], block[n:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)
        return out

    def _downsample(self, rows: np.ndarray) -> None:
        if self.odd is not None:
            rows = np.concatenate([self.odd, rows])
            self.odd = None
        if len(rows) % 2:
            self.odd, rows = rows[-1:], rows[:-1]
        if len(rows):
            self.next.push(_halve(rows))

    def _write_chunk_row(self, block: np.ndarray) -> None:
        c = self.chunk
        row_dir = self.folder / "0" / str(self.chunk_row)
        row_dir.mkdir(parents=True)
        for j in range(math.ceil(self.shape[1] / c)):
            part = block[:, j * c:(j + 1) * c]
            full = np.zeros((3, c, c), dtype=np.uint8)  # edge chunks are stored whole
            full[:, :part.shape[0], :part.shape[1]] = part.transpose(2, 0, 1)
            (row_dir / str(j)).write_bytes(_COMPRESSOR.encode(full))
        self.chunk_row += 1


def _halve(rows: np.ndarray) -> np.ndarray:
    """2x2 mean of an even number of rows (the last column repeated if the width is odd)."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, rows[:, -1:]], axis=1)
    pairs = rows[0::2].astype(np.uint16)
    pairs += rows[1::2]
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    quads += 2
    quads >>= 2
    return quads.astype(np.uint8)


def zarr_level_shapes(size: tuple[int, int], chunk: int = ZARR_CHUNK) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: halved (rounding up) until it fits in one chunk."""
    shapes = [tuple(size)]
    while max(shapes[-1]) > chunk:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_ome_zarr(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
                   chunk: int = ZARR_CHUNK, name: str = "mosaic",
                   progress: Progress | None = None) -> None:
    """Save an OME-Zarr (NGFF 0.4, Zarr v2) multiscale image, streamed chunk row by row."""
    path = Path(path)
    shapes = zarr_level_shapes((image.height, image.width), chunk)
    unit = pixel_size_um or 1.0
    axes = [{"name": "c", "type": "channel"}]
    for ax in ("y", "x"):
        axes.append({"name": ax, "type": "space", **({"unit": "micrometer"}
                                                      if pixel_size_um else {})})
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, unit * 2 ** k, unit * 2 ** k]}]}
        for k in range(len(shapes))]
    colours = ("FF0000", "00FF00", "0000FF")
    attrs = {
        "multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets,
                         "type": "mean", "metadata": {"method": "2x2 mean",
                                                      "software": "ofstitch"}}],
        "omero": {"name": name, "version": "0.4", "rdefs": {"model": "color"},
                  "channels": [{"label": label, "color": colour, "active": True,
                                "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                               for label, colour in zip(("red", "green", "blue"), colours,
                                                        strict=True)]}}
    image = _watch(image, progress)
    row_bytes = image.width * 3
    with _atomic_dir(path) as store:
        (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        (store / ".zattrs").write_text(json.dumps(attrs, indent=2))
        level = None
        for k in reversed(range(len(shapes))):
            level = _ZarrLevel(store / str(k), shapes[k], chunk, level)
        buffer = bytearray()

        def take(n: int) -> np.ndarray:
            with memoryview(buffer) as view:
                rows = np.frombuffer(view[:n * row_bytes], np.uint8).copy()
            del buffer[:n * row_bytes]
            return rows.reshape(n, image.width, 3)

        def on_write(data: bytes) -> int:
            buffer.extend(data)
            n = len(buffer) // row_bytes
            if n >= 64:  # small pieces keep the downsampling's temporaries small
                level.push(take(n))
            return len(data)

        target = pyvips.TargetCustom()
        target.on_write(on_write)
        image.cast("uchar").rawsave_target(target)
        if buffer:
            level.push(take(len(buffer) // row_bytes))
        level.finish()


# ----------------------------------------------------------------------------- Fiji


def fiji_name_problem(name: str) -> str | None:
    """Why a Fiji TileConfiguration cannot hold the file name ``name`` (``None`` if it can):
    ``;`` ends its name field, and a line break or a leading ``#`` splits or hides the line."""
    if ";" in name:
        return "it contains ';'"
    if "\n" in name or "\r" in name:
        return "it contains a line break"
    if name.lstrip().startswith("#"):
        return "it starts with '#'"
    if name != name.strip():
        return "it starts or ends with a space"
    return None


def write_tile_configuration(path: Path, names: list[str], positions_px: np.ndarray) -> None:
    """Fiji TileConfiguration (``name; ; (x, y)``, top-left, pixels).

    A tile whose name the format cannot hold (:func:`fiji_name_problem`) is left out of
    the file, with a warning: read back, it would be another file or none.
    """
    lines = ["# Define the number of dimensions used", "dim = 2", "",
             "# Define the image coordinates"]
    left_out = []
    for name, (row, col) in zip(names, np.asarray(positions_px).tolist(), strict=True):
        if fiji_name_problem(name):
            left_out.append(name)
            continue
        lines.append(f"{name}; ; ({col:.3f}, {row:.3f})")
    if left_out:
        warnings.warn(
            f"leaving {len(left_out)} tile(s) out of {Path(path).name}: a Fiji "
            f"TileConfiguration cannot hold their names ({left_out[0]!r}: "
            f"{fiji_name_problem(left_out[0])}); rename them to keep them",
            OfstitchWarning, stacklevel=2)
    write_text(path, "\n".join(lines) + "\n")
