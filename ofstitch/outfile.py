"""``-o mosaic.ome.tif``: the mosaic written to the file named, as ASHLAR users expect.

``-o`` names a folder for all the outputs, unless its name ends in an image
extension: then it is the one file to write, in the format of its extension,
and nothing else is written beside it (but ``viewer.html`` for a DZI). The
correlation cache still lives with the scan (or in ``--cache-dir``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import render
from .errors import OfstitchError
from .pipeline import (
    StitchResult,
    check_writable,
    full_resolution_formats,
    output_prefix,
    register,
    write_full_resolution,
)
from .scan import require_folder
from .settings import StitchSettings

# Longest first: '.ome.tif' before '.tif'.
FILE_FORMATS = {".pyramid.tiff": "pyramid-tiff", ".pyramid.tif": "pyramid-tiff",
                ".ome.tiff": "ome-tiff", ".ome.tif": "ome-tiff", ".ome.zarr": "ome-zarr",
                ".tiff": "ome-tiff", ".tif": "ome-tiff", ".zarr": "ome-zarr", ".dzi": "dzi",
                ".jpeg": "jpeg", ".jpg": "jpeg"}
NOT_WRITTEN = (".png", ".bmp", ".gif", ".webp")


def output_file_format(path: Path | None) -> str | None:
    """The format ``-o path`` asks for when it names a file, else ``None`` (a folder).

    Raises
    ------
    OfstitchError
        An image extension ofstitch does not write (``.png``...).
    """
    if path is None:
        return None
    name = Path(path).name.lower()
    for suffix, fmt in FILE_FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    if name.endswith(NOT_WRITTEN) and not Path(path).is_dir():
        raise OfstitchError(
            f"-o {path}: ofstitch does not write {Path(path).suffix} mosaics: name a .jpg, "
            ".ome.tif, .ome.zarr or .dzi file, or a folder for all the outputs")
    return None


def stitch_to_file(folder: Path | str, settings: StitchSettings, target: Path | str, *,
                   cache_dir: Path | str | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   ask_thresholds: Callable[[], tuple[float, float]] | None = None
                   ) -> StitchResult:
    """Register the scan in ``folder`` and write its full-resolution mosaic to ``target``,
    in the format of ``target``'s extension."""
    target = Path(target)
    fmt = output_file_format(target)
    if fmt is None:
        raise OfstitchError(f"-o {target} is not an image file name")
    if settings.stitching_mode != "all":
        raise OfstitchError(
            f"-o {target} writes the full mosaic, and --stitching-mode "
            f"{settings.stitching_mode} does not: give -o a folder")
    if settings.output_formats not in (("jpeg",), (fmt,)):
        raise OfstitchError(
            f"-o {target} writes {fmt}: drop --format/--stitch-tiff/--stitch-dzi, or give -o "
            "a folder for several formats")
    settings = replace(settings, formats=(fmt,), stitch_tiff=False, stitch_dzi=False)
    require_folder(Path(folder))  # before anything is created
    check_writable(target.parent)
    kwargs = {} if progress is None else {"progress": progress}
    reg = register(folder, settings, output_dir=target.parent, cache_dir=cache_dir,
                   ask_thresholds=ask_thresholds, **kwargs)
    positions = reg.positions_px
    wanted = full_resolution_formats(
        settings, render.make_layout(positions, reg.scan.tile_shape).size)
    extra = {"camera_to_sample_matrix_suggested": reg.suggested_csm().round(6).tolist()}
    outputs = write_full_resolution(reg.scan, positions, target.parent, output_prefix(folder),
                                    settings, wanted, extra=extra, paths={fmt: target},
                                    **kwargs)
    return StitchResult(reg, outputs, positions, reg.names)
