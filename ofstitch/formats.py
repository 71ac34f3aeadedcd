"""Writing the mosaic: JPEG, pyramidal OME-TIFF, Deep Zoom (+ viewer) and OME-Zarr.

Every writer takes a lazy pyvips image (see :mod:`ofstitch.render`) and pulls
its pixels through once, top to bottom, straight into the encoder, so memory is
bounded by a strip of the mosaic whatever its size. Every output is written
under a temporary name and renamed into place.

The data formats (OME-TIFF, OME-Zarr) keep the mosaic's data type and channel
count; JPEG, DZI and the slide TIFF are 8-bit RGB renderings (see
:mod:`ofstitch.levels`).

- JPEG: one image with ofstitch's EXIF (pixel size, the first tile's metadata);
  limited to 65,535 px per side.
- OME-TIFF: tiled BigTIFF with a SubIFD pyramid, JPEG (8-bit data only),
  deflate or LZW compressed, OME-XML (built by tifffile's ``OmeXml``, with
  ``PhysicalSizeX/Y`` in µm) in the ImageDescription.
- pyramid TIFF: a tiled pyramidal TIFF as libvips writes it for slide viewers,
  its levels in the main chain of IFDs (OpenSlide reads them; it ignores
  SubIFDs), JPEG tiles, resolution in pixels per cm.
- DZI: a Deep Zoom pyramid of JPEG tiles and ``viewer.html``, a page that shows
  it with the bundled OpenSeadragon (no network needed).
- OME-Zarr: written with ``zarr`` and ``ome-zarr``; NGFF 0.4 (Zarr v2, the
  default) or 0.5 (Zarr v3, sharded), axes ``c, y, x`` with a ``scale``
  transform in micrometres, Blosc-LZ4-compressed chunks, ``omero`` rendering
  metadata (channel colours and the display window).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from html import escape
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import piexif
import pyvips

from .atomic import atomic_dir, atomic_path, write_text
from .errors import OfstitchError, OfstitchWarning
from .levels import VIPS_DTYPES, Levels
from .settings import OUTPUT_FORMATS, TIFF_COMPRESSIONS

Format = Literal["jpeg", "ome-tiff", "dzi", "ome-zarr", "pyramid-tiff"]
FORMATS = OUTPUT_FORMATS
TiffCompression = Literal["jpeg", "deflate", "lzw"]
SUFFIXES = {"jpeg": ".jpg", "ome-tiff": ".ome.tiff", "dzi": ".dzi", "ome-zarr": ".ome.zarr",
            "pyramid-tiff": ".pyramid.tiff"}
# The formats that keep the mosaic's data; the others are 8-bit renderings.
DATA_FORMATS = ("ome-tiff", "ome-zarr")

JPEG_MAX_SIDE = 65535
JPEG_QUALITY = 90
THUMBNAIL_SIZE = 400
TILE_SIZE = 256
ZARR_CHUNK = 512
VIEWER_NAME = "viewer.html"

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


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


def ome_xml(width: int, height: int, *, pixel_size_um: float | None, name: str = "mosaic",
            dtype: np.dtype | type = np.uint8, channels: int = 3) -> str:
    """OME-XML for one plane of ``dtype`` with ``channels`` interleaved samples (3 for RGB,
    1 for grey), ``PhysicalSizeX/Y`` in µm; built by tifffile's ``OmeXml``."""
    import tifffile

    from . import __version__

    physical = {}
    if pixel_size_um:
        physical = {"PhysicalSizeX": float(pixel_size_um), "PhysicalSizeY": float(pixel_size_um),
                    "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    ome = tifffile.OmeXml(Creator=f"ofstitch {__version__}")
    if channels == 1:
        ome.addimage(np.dtype(dtype), (height, width), (1, 1, 1, height, width, 1), axes="YX",
                     Name=name, **physical)
    else:
        ome.addimage(np.dtype(dtype), (height, width, channels),
                     (1, 1, 1, height, width, channels), axes="YXS", Name=name, **physical)
    return ome.tostring(declaration=True)


def write_ome_tiff(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
                   compression: TiffCompression = "jpeg", tile_size: int = TILE_SIZE,
                   quality: int = JPEG_QUALITY, name: str = "mosaic",
                   progress: Progress | None = None) -> None:
    """Save a tiled pyramidal OME-TIFF (BigTIFF, reduced levels in SubIFDs) of ``image``'s
    own data type and bands.

    JPEG compression holds 8-bit data only: any other data type is written with
    deflate (lossless) instead, and the log says so.
    """
    if compression not in TIFF_COMPRESSIONS:
        raise OfstitchError(f"--tiff-compression must be one of {', '.join(TIFF_COMPRESSIONS)}"
                            f", got {compression!r}")
    dtype = np.dtype(VIPS_DTYPES[image.format])
    if compression == "jpeg" and image.format != "uchar":
        log.info("writing the %s OME-TIFF with deflate: JPEG compression holds 8-bit data only",
                 dtype)
        compression = "deflate"
    image = image.copy()
    image.set_type(pyvips.GValue.gstr_type, "image-description",
                   ome_xml(image.width, image.height, pixel_size_um=pixel_size_um, name=name,
                           dtype=dtype, channels=image.bands))
    if compression == "jpeg":
        options = {"Q": quality}
    else:
        options = {"predictor": "float" if dtype.kind == "f" else "horizontal"}
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    image = _watch(image, progress)
    with atomic_path(path) as tmp:
        image.tiffsave(tmp, tile=True, pyramid=True, subifd=True, bigtiff=True,
                       compression=compression, tile_width=tile_size, tile_height=tile_size,
                       resunit="cm", **options)
        if not pixel_size_um:
            _unknown_resolution(tmp)


def write_pyramid_tiff(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
                       tile_size: int = TILE_SIZE, quality: int = JPEG_QUALITY,
                       progress: Progress | None = None) -> None:
    """Save an 8-bit RGB tiled pyramidal TIFF for slide viewers: the reduced levels follow
    the full one in the main chain of IFDs, as OpenSlide reads a generic tiled TIFF."""
    if pixel_size_um:
        image = image.copy(xres=1e3 / pixel_size_um, yres=1e3 / pixel_size_um)
    image = _watch(image, progress)
    with atomic_path(path) as tmp:
        image.tiffsave(tmp, tile=True, pyramid=True, bigtiff=True, compression="jpeg",
                       Q=quality, tile_width=tile_size, tile_height=tile_size, resunit="cm")
        if not pixel_size_um:
            _unknown_resolution(tmp)


def _unknown_resolution(path: str) -> None:
    """Mark every page of a TIFF as of unknown resolution (ResolutionUnit 1, none).

    libvips always writes a resolution (72 dpi when it knows none), which slide
    readers such as OpenSlide would report as a pixel size of 353 µm.
    """
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        pages = {page.offset: page for page in tif.pages}
        for series in tif.series:
            for level in series.levels:
                pages.update({page.offset: page for page in level.pages if page is not None})
        for page in pages.values():
            tag = page.tags.get("ResolutionUnit")
            if tag is not None:
                tag.overwrite(1)


# ----------------------------------------------------------------------------- DZI


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
        with atomic_dir(path.parent / f"{base}_files") as files:
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


def zarr_level_shapes(size: tuple[int, int], chunk: int = ZARR_CHUNK) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: halved (rounding up) until it fits in one chunk."""
    from .omezarr import level_shapes

    return level_shapes(size, chunk)


def write_ome_zarr(image: pyvips.Image, path: Path, *, pixel_size_um: float | None,
                   chunk: int = ZARR_CHUNK, name: str = "mosaic", ngff_version: str = "0.4",
                   window: Levels | None = None, progress: Progress | None = None) -> None:
    """Save an OME-Zarr multiscale image (NGFF ``ngff_version``, 0.4 or 0.5) of ``image``'s
    own data type and bands, streamed a row of chunks at a time (:mod:`ofstitch.omezarr`).

    ``window`` is the display range written in the ``omero`` metadata.
    """
    from . import omezarr

    omezarr.require()
    omezarr.write(_watch(image, progress), path, pixel_size_um=pixel_size_um, chunk=chunk,
                  name=name, ngff_version=ngff_version, window=window)


# ----------------------------------------------------------------------------- Fiji


def fiji_name_problem(name: str) -> str | None:
    """Why a Fiji TileConfiguration cannot hold the file name ``name`` (``None`` if it can):
    ``;`` ends its name field, and a line break or a leading ``#`` splits or hides the line."""
    if ";" in name:
        return "it contains ';'"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
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
