"""The mosaic and its formats: composition rule, streaming, and round trips of every format.

Scans here are cut exactly (PNG, no noise or vignetting) from the real H&E image,
so that a correct mosaic equals the source image wherever tiles cover it.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import pyvips
from cli_helpers import run_main

from ofstitch import formats, render
from ofstitch.errors import OfstitchError, OfstitchWarning
from ofstitch.pipeline import full_resolution_formats
from ofstitch.settings import StitchSettings

UM_PER_PX = 0.83
TILE_SHAPE = (90, 120)  # (height, width)


@pytest.fixture
def exact_scan(make_synthetic):
    """A 3x4 PNG scan cut exactly from the source image; truth positions from the origin."""
    scan = make_synthetic("exact", grid=(3, 4), tile_shape=TILE_SHAPE, overlap=0.3,
                          stage_error_px=3.0, rotation_deg=1.0, vignetting=0.0, noise=0.0,
                          extension=".png", layout="filename", seed=3)
    paths = [scan.folder / n for n in scan.names]
    origin = scan.truth_px.min(axis=0).astype(int)
    region = scan.source[origin[0]:, origin[1]:]
    return scan, paths, scan.truth_px, region


def _covered(layout: render.Layout) -> np.ndarray:
    mask = np.zeros(layout.size, bool)
    th, tw = layout.tile_shape
    for ty, tx in layout.top_left:
        mask[ty:ty + th, tx:tx + tw] = True
    return mask


def _mosaic_array(paths, positions, **kwargs) -> np.ndarray:
    mosaic = render.Mosaic(paths, positions, TILE_SHAPE, **kwargs)
    image, stream = render.stream_mosaic(mosaic.paths, mosaic.layout, blend=mosaic.blend,
                                         band_height=kwargs.get("band_height", 128))
    array = image.numpy()
    assert stream.error is None
    return array


# ----------------------------------------------------------------------------- composition


def test_mosaic_equals_the_source_wherever_tiles_cover_it(exact_scan):
    scan, paths, truth, region = exact_scan
    mosaic = _mosaic_array(paths, truth, band_height=37)  # bands cut through the tiles
    layout = render.make_layout(truth, TILE_SHAPE)
    assert mosaic.shape == (*layout.size, 3)
    covered = _covered(layout)
    expected = region[:layout.size[0], :layout.size[1]]
    assert covered.mean() > 0.9
    np.testing.assert_array_equal(mosaic[covered], expected[covered])
    assert (mosaic[~covered] == 0).all()  # black where no tile is


def _brute_force_owner(layout: render.Layout) -> np.ndarray:
    """The nearest-centre tile of every pixel, straight from the definition."""
    th, tw = layout.tile_shape
    rows, cols = np.mgrid[0:layout.size[0], 0:layout.size[1]] + 0.5
    owner = np.full(layout.size, -1)
    best = np.full(layout.size, np.inf)
    for i in np.argsort(layout.top_left[:, 0], kind="stable"):  # priority order
        ty, tx = layout.top_left[i]
        inside = (rows >= ty) & (rows < ty + th) & (cols >= tx) & (cols < tx + tw)
        d = (rows - layout.centre[i, 0]) ** 2 + (cols - layout.centre[i, 1]) ** 2
        nearer = inside & (d < best)
        owner[nearer], best[nearer] = i, d[nearer]
    return owner


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_each_pixel_comes_from_the_tile_with_the_nearest_centre(tmp_path, scale):
    """Tiles of distinct flat colours at sub-pixel positions: the mosaic's colour at each
    pixel names its tile, which must be the one the nearest-centre rule picks."""
    rng = np.random.default_rng(5)
    grid = np.array([(r * 63.0, c * 84.0) for r in range(3) for c in range(4)])
    positions = grid + rng.uniform(-6, 6, grid.shape)  # sub-pixel, rounded floor(p + 0.5)
    paths = []
    for k in range(len(positions)):
        colour = np.array([20 * k + 5, 255 - 20 * k, (53 * k) % 256], dtype=np.uint8)
        path = tmp_path / f"flat_{k}.png"
        pyvips.Image.new_from_array(np.broadcast_to(colour, (*TILE_SHAPE, 3)).copy()
                                    ).write_to_file(str(path))
        paths.append(path)
    layout = render.make_layout(positions, TILE_SHAPE, scale)
    mosaic = render.compose(paths, layout).numpy()
    owner = _brute_force_owner(layout)
    colours = np.array([[20 * k + 5, 255 - 20 * k, (53 * k) % 256]
                        for k in range(len(positions))])
    expected = np.where(owner[..., None] >= 0, colours[owner], 0)
    if scale != 1.0:  # resampled tiles have soft edges: compare away from them
        keep = np.ones(layout.size, bool)
        for axis in (0, 1):
            keep &= np.diff(owner, axis=axis, prepend=-2) == 0
            keep &= np.flip(np.diff(np.flip(owner, axis), axis=axis, prepend=-2) == 0, axis)
        assert keep.mean() > 0.7
        assert np.abs(mosaic[keep].astype(int) - expected[keep]).max() <= 1
    else:
        np.testing.assert_array_equal(mosaic, expected)


def test_streamed_bands_equal_the_whole_mosaic(exact_scan):
    _, paths, truth, _ = exact_scan
    layout = render.make_layout(truth, TILE_SHAPE)
    whole = render.compose(paths, layout).numpy()
    for band_height in (1, 50, 1000):
        done: list[tuple[int, int]] = []
        image, stream = render.stream_mosaic(paths, layout, band_height=band_height,
                                             progress=lambda d, t, done=done: done.append((d, t)))
        np.testing.assert_array_equal(image.numpy(), whole)
        n_bands = math.ceil(layout.size[0] / band_height)
        assert done == [(k, n_bands) for k in range(1, n_bands + 1)]



def test_on_band_sees_every_band_in_order_and_its_error_ends_the_mosaic(exact_scan):
    """``on_band`` sees each band's own pixels, in order, even when it is slow (the band's
    buffer is reused only after it returns), and an error it raises, on a band in the
    middle or on the last, ends the mosaic with that error."""
    import time

    _, paths, truth, _ = exact_scan
    layout = render.make_layout(truth, TILE_SHAPE)
    whole = render.compose(paths, layout).numpy()
    seen: list[tuple[tuple[int, int], np.ndarray]] = []

    def slow(rows, band):
        time.sleep(0.02)
        seen.append((rows, band[..., :3].copy()))

    image, stream = render.stream_mosaic(paths, layout, band_height=7, on_band=slow)
    np.testing.assert_array_equal(image.numpy(), whole)
    stream.close()  # as Mosaic.write does
    assert stream.error is None
    assert [rows for rows, _ in seen] == render.band_rows(layout, 7)
    for (r0, r1), band in seen:
        np.testing.assert_array_equal(band, whole[r0:r1])

    for last in (21, layout.size[0] - 1):  # a band in the middle, the last band

        def failing(rows, band, last=last):
            if rows[0] <= last < rows[1]:
                raise RuntimeError("on_band failed")

        mosaic = render.Mosaic(paths, truth, TILE_SHAPE, band_height=7)
        with pytest.raises(RuntimeError, match="on_band failed"):
            mosaic.write(lambda image: image.numpy(), on_band=failing)


@pytest.mark.parametrize("pixels", [render.Pixels(), render.Pixels.data(np.uint16, 1),
                                    render.Pixels.data(np.uint16, 3),
                                    render.Pixels.data(np.int16, 1),
                                    render.Pixels.data(np.float32, 3)],
                         ids=["rgb8", "grey16", "rgb16", "grey-int16", "float-rgb"])
def test_streamed_mosaic_equals_the_whole_one_in_every_pixel_format(exact_scan, pixels):
    """The streamed bands (pasted with NumPy, through the TIFF stream) give the whole
    composition (libvips' ``case``) exactly: every pixel format (padded to a machine word
    or not), a scale, a tile left out."""
    _, paths, truth, _ = exact_scan
    layout = render.make_layout(truth, TILE_SHAPE, 0.7)
    whole = render.compose(paths, layout, pixels=pixels, skip={5}).numpy()
    image, stream = render.stream_mosaic(paths, layout, pixels=pixels, skip={5}, band_height=23)
    streamed = image.numpy()
    assert stream.error is None
    assert streamed.dtype == whole.dtype == pixels.dtype
    np.testing.assert_array_equal(streamed, whole)
    assert (streamed == 0).any() and (streamed != 0).mean() > 0.5  # a hole where tile 5 was


def test_feather_ramps_linearly_across_an_overlap(tmp_path):
    """Two flat tiles side by side, overlapping by 40 px: a linear ramp between them."""
    a, b = 40, 200
    paths = []
    for k, v in enumerate((a, b)):
        path = tmp_path / f"t{k}.png"
        pyvips.Image.new_from_array(np.full((*TILE_SHAPE, 3), v, np.uint8)).write_to_file(
            str(path))
        paths.append(path)
    positions = np.array([(0.0, 0.0), (0.0, 80.0)])  # overlap: columns 80-119
    mosaic = _mosaic_array(paths, positions, blend="feather")[..., 0].astype(float)
    row = mosaic[TILE_SHAPE[0] // 2]  # away from the top and bottom edges
    assert (row[:80] == a).all() and (row[120:] == b).all()
    x = np.arange(80, 120) + 0.5
    w_a, w_b = 120 - x, x - 80  # distances to each tile's nearest edge
    np.testing.assert_allclose(row[80:120], (a * w_a + b * w_b) / (w_a + w_b), atol=0.51)
    assert (np.diff(row[78:122]) >= 0).all()
    nearest = _mosaic_array(paths, positions)[TILE_SHAPE[0] // 2, :, 0]
    assert set(np.unique(nearest[80:120])) == {a, b}  # the default does not blend


# ----------------------------------------------------------------------------- formats


@pytest.fixture
def mosaic(exact_scan):
    scan, paths, truth, region = exact_scan
    m = render.Mosaic(paths, truth, TILE_SHAPE)
    expected = render.compose(paths, m.layout).numpy()
    covered = _covered(m.layout)
    assert (expected[covered] == region[:m.size[0], :m.size[1]][covered]).all()
    return m, expected


def test_jpeg_round_trip(mosaic, tmp_path):
    m, expected = mosaic
    path = tmp_path / "m.jpg"
    m.write(lambda im: formats.write_jpeg(im, path, pixel_size_um=UM_PER_PX, n_tiles=12))
    back = pyvips.Image.new_from_file(str(path))
    assert (back.height, back.width) == m.size
    assert back.xres == pytest.approx(1e3 / UM_PER_PX, rel=1e-3)
    assert np.abs(back.numpy().astype(int) - expected).mean() < 3  # JPEG error only


def test_jpeg_refuses_more_than_65535_px(tmp_path):
    huge = pyvips.Image.black(70_000, 8, bands=3)
    with pytest.raises(OfstitchError, match=r"70000x8 px.*--format ome-tiff"):
        formats.write_jpeg(huge, tmp_path / "huge.jpg")
    assert not list(tmp_path.iterdir())
    with pytest.raises(OfstitchError, match="--format ome-tiff, --format dzi or --format "
                                            "ome-zarr"):
        full_resolution_formats(StitchSettings(), (8, 70_000))
    with pytest.warns(OfstitchWarning, match="not writing the full-resolution JPEG"):
        kept = full_resolution_formats(StitchSettings(formats=("jpeg", "ome-zarr")),
                                       (8, 70_000))
    assert kept == ("ome-zarr",)
    assert full_resolution_formats(StitchSettings(stitch_tiff=True), (8, 100)) == \
        ("jpeg", "ome-tiff")


def _ome_pixels(tif) -> ET.Element:
    root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": root.tag.split("}")[0].strip("{")}
    return root.find("ome:Image/ome:Pixels", ns)


@pytest.mark.parametrize("compression", ["deflate", "lzw", "jpeg"])
def test_ome_tiff_round_trip(mosaic, tmp_path, compression):
    tifffile = pytest.importorskip("tifffile")
    m, expected = mosaic
    path = tmp_path / "m.ome.tiff"
    m.write(lambda im: formats.write_ome_tiff(im, path, pixel_size_um=UM_PER_PX,
                                              compression=compression, tile_size=64))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        series = tif.series[0]
        assert series.axes == "YXS"
        shapes = [level.shape for level in series.levels]
        assert shapes[0] == (*m.size, 3)
        assert len(shapes) >= 3
        for big, small in zip(shapes, shapes[1:], strict=False):
            assert small[0] == big[0] // 2 and small[1] == big[1] // 2
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression.name.lower().startswith(
            {"deflate": "adobe_deflate", "lzw": "lzw", "jpeg": "jpeg"}[compression])
        pixels = _ome_pixels(tif)
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(UM_PER_PX)
        assert float(pixels.get("PhysicalSizeY")) == pytest.approx(UM_PER_PX)
        assert pixels.get("PhysicalSizeXUnit", "µm") == "µm"
        assert (int(pixels.get("SizeX")), int(pixels.get("SizeY"))) == (m.size[1], m.size[0])
        if compression == "deflate":  # tifffile decodes LZW and JPEG only with imagecodecs
            np.testing.assert_array_equal(series.levels[1].asarray(),
                                          pyvips.Image.tiffload(str(path), subifd=0).numpy())
    full = pyvips.Image.tiffload(str(path)).numpy()
    half = pyvips.Image.tiffload(str(path), subifd=0).numpy()
    if compression == "jpeg":
        assert np.abs(full.astype(int) - expected).mean() < 3
    else:
        np.testing.assert_array_equal(full, expected)
    # The reduced level is the mosaic shrunk by two.
    mean = expected[:half.shape[0] * 2, :half.shape[1] * 2].reshape(
        half.shape[0], 2, half.shape[1], 2, 3).mean(axis=(1, 3))
    assert np.abs(half - mean).mean() < 3


def test_dzi_round_trip_and_viewer(mosaic, tmp_path):
    m, expected = mosaic
    path = tmp_path / "m.dzi"
    m.write(lambda im: formats.write_dzi(im, path, tile_size=64, pixel_size_um=UM_PER_PX))
    root = ET.fromstring(path.read_text())
    size = root[0]
    assert (int(size.get("Height")), int(size.get("Width"))) == m.size
    assert root.get("TileSize") == "64" and root.get("Overlap") == "1"
    files = tmp_path / "m_files"
    n_levels = math.ceil(math.log2(max(m.size))) + 1
    assert sorted(int(p.name) for p in files.iterdir() if p.is_dir()) == list(range(n_levels))
    top = files / str(n_levels - 1)
    tile = pyvips.Image.new_from_file(str(top / "1_1.jpg")).numpy()  # overlaps by 1 px
    assert tile.shape == (66, 66, 3)
    assert np.abs(tile.astype(int) - expected[63:129, 63:129]).mean() < 4
    html = (tmp_path / formats.VIEWER_NAME).read_text()
    assert '"Url": "m_files/"' in html and f'"Width": "{m.size[1]}"' in html
    assert "OpenSeadragon" in html and "<script src" not in html  # self-contained
    assert "http://" not in html.split("<script>")[0] + html.split("</script>")[-1]


def test_ome_zarr_round_trip(mosaic, tmp_path):
    zarr = pytest.importorskip("zarr")
    m, expected = mosaic
    path = tmp_path / "m.ome.zarr"
    m.write(lambda im: formats.write_ome_zarr(im, path, pixel_size_um=UM_PER_PX, chunk=64))
    group = zarr.open_group(str(path), mode="r")
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    shapes = formats.zarr_level_shapes(m.size, 64)
    assert len(ms["datasets"]) == len(shapes) >= 3
    for k, ds in enumerate(ms["datasets"]):
        scale = ds["coordinateTransformations"][0]["scale"]
        assert scale == pytest.approx([1.0, UM_PER_PX * 2 ** k, UM_PER_PX * 2 ** k])
        assert group[ds["path"]].shape == (3, *shapes[k])
        assert group[ds["path"]].chunks == (3, 64, 64)
    level0 = np.asarray(group["0"][:]).transpose(1, 2, 0)
    np.testing.assert_array_equal(level0, expected)
    level1 = np.asarray(group["1"][:]).transpose(1, 2, 0).astype(float)
    h, w = expected.shape[0] // 2, expected.shape[1] // 2
    mean = expected[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1[:h, :w] - mean).max() <= 0.5 + 1e-9  # a rounded 2x2 mean


def test_ome_zarr_reads_with_ome_zarr_py(mosaic, tmp_path):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    m, expected = mosaic
    path = tmp_path / "m.ome.zarr"
    m.write(lambda im: formats.write_ome_zarr(im, path, pixel_size_um=UM_PER_PX, chunk=64))
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    assert [tuple(d.shape) for d in image.data] == \
        [(3, *s) for s in formats.zarr_level_shapes(m.size, 64)]
    np.testing.assert_array_equal(np.asarray(image.data[0][:, 10:50, 20:70]),
                                  expected[10:50, 20:70].transpose(2, 0, 1))
    scales = image.metadata["coordinateTransformations"]
    assert scales[1][0]["scale"] == pytest.approx([1.0, 2 * UM_PER_PX, 2 * UM_PER_PX])


def test_outputs_replace_older_ones_atomically(mosaic, tmp_path):
    m, _ = mosaic
    out = tmp_path / "out"
    path = out / "m.ome.zarr"
    (path / "stale").mkdir(parents=True)
    m.write(lambda im: formats.write_ome_zarr(im, path, pixel_size_um=None, chunk=64))
    assert not (path / "stale").exists()
    assert sorted(p.name for p in out.iterdir()) == ["m.ome.zarr"]  # no temporaries
    attrs = json.loads((path / ".zattrs").read_text())
    assert "unit" not in attrs["multiscales"][0]["axes"][1]  # no pixel size, no unit


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_every_format(exact_scan, tmp_path, capsys):
    scan, *_ = exact_scan
    out = tmp_path / "out"
    result = run_main(scan.folder, "-o", out, "-q", "--format", "ome-tiff", "--format",
                      "dzi", "-f", "ome-zarr", "--format", "jpeg", "--blend", "feather",
                      "--tiff-compression", "lzw", "--tile-size", "64", capsys=capsys)
    assert result.returncode == 0, result.stderr
    for name in ("exact_stitched.jpg", "exact_stitched.ome.tiff", "exact_stitched.dzi",
                 "exact_stitched_files", "exact_stitched.ome.zarr", "viewer.html",
                 "preview.jpg"):
        assert (out / name).exists(), name
    jpeg = pyvips.Image.new_from_file(str(out / "exact_stitched.jpg"))
    tiff = pyvips.Image.new_from_file(str(out / "exact_stitched.ome.tiff"))
    assert (tiff.width, tiff.height) == (jpeg.width, jpeg.height)
    assert tiff.get("n-subifds") >= 1


def test_band_preview_is_the_mean_of_the_pixels_it_covers():
    """The preview drawn from a mosaic's bands: each pixel the mean of the mosaic pixels
    it covers, whatever the bands' height; a band from row 0 starts it again."""
    from ofstitch.preview import BandPreview

    rng = np.random.default_rng(4)
    size = (310, 707)
    for band_height in (1, 7, 128, 400):
        preview = BandPreview(size, 100)
        for mosaic in (rng.integers(0, 256, (*size, 4), dtype=np.uint8),
                       rng.integers(0, 256, (*size, 3), dtype=np.uint8)):
            for r0 in range(0, size[0], band_height):
                preview.add((r0, min(size[0], r0 + band_height)), mosaic[r0:r0 + band_height])
            out_h, out_w = preview.shape
            assert out_w == 100 and out_h == round(size[0] * 100 / size[1])
            rows = np.arange(size[0]) * out_h // size[0]
            cols = np.arange(size[1]) * out_w // size[1]
            sums = np.zeros((out_h, out_w, 3))
            counts = np.zeros((out_h, out_w))
            np.add.at(sums, (rows[:, None], cols[None, :]), mosaic[..., :3].astype(float))
            np.add.at(counts, (rows[:, None], cols[None, :]), 1)
            np.testing.assert_array_equal(preview.image(),
                                          np.round(sums / counts[..., None]).astype(np.uint8))


def test_full_stitch_preview_is_its_jpeg_shrunk(exact_scan, tmp_path, capsys, monkeypatch):
    """A full stitch draws preview.jpg from the bands of its full-resolution JPEG, every
    row of it once, from the top (no second decode of the tiles)."""
    from ofstitch import preview

    seen: list[tuple[int, int]] = []
    drawn: list[preview.BandPreview] = []

    class Recording(preview.BandPreview):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self)

        def add(self, rows, band):
            seen.append(rows)
            super().add(rows, band)

    def no_shrunk_decode(*args, **kwargs):
        raise AssertionError("the tiles were decoded again for the preview")

    monkeypatch.setattr(preview, "BandPreview", Recording)
    monkeypatch.setattr(preview.PreviewTiles, "decode", no_shrunk_decode)
    monkeypatch.setattr(render, "PREVIEW_WIDTH", 150)  # a third of the mosaic's width
    scan, *_ = exact_scan
    out = tmp_path / "out"
    result = run_main(scan.folder, "-o", out, "-q", capsys=capsys)
    assert result.returncode == 0, result.stderr
    mosaic = pyvips.Image.new_from_file(str(out / "exact_stitched.jpg"))
    assert seen == [(r, min(mosaic.height, r + 128)) for r in range(0, mosaic.height, 128)]
    got = pyvips.Image.new_from_file(str(out / "preview.jpg")).numpy()
    assert got.shape[1] == 150
    formats.write_jpeg(pyvips.Image.new_from_array(drawn[-1].image()).copy(
        interpretation="srgb"), tmp_path / "want.jpg")
    np.testing.assert_array_equal(got, pyvips.Image.new_from_file(
        str(tmp_path / "want.jpg")).numpy())


def test_cli_format_alone_skips_the_jpeg(exact_scan, tmp_path, capsys):
    scan, *_ = exact_scan
    out = tmp_path / "out"
    result = run_main(scan.folder, "-o", out, "-q", "--format", "ome-zarr", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert (out / "exact_stitched.ome.zarr").is_dir()
    assert not (out / "exact_stitched.jpg").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "png"], "--format"),
    (["--blend", "soft"], "--blend"),
    (["--tiff-compression", "zstd"], "--tiff-compression"),
])
def test_cli_rejects_unknown_choices(exact_scan, tmp_path, capsys, args, message):
    scan, *_ = exact_scan
    result = run_main(scan.folder, "-o", tmp_path / "out", *args, capsys=capsys)
    assert result.returncode == 2
    assert message in result.stderr


def test_settings_validate_formats():
    with pytest.raises(OfstitchError, match="^formats must be one of") as caught:
        StitchSettings(formats=("bmp",))
    assert caught.value.for_cli().startswith("--format must be one of")
    assert StitchSettings(formats=("TIFF", "jpg")).formats == ("ome-tiff", "jpeg")  # spellings
    with pytest.raises(OfstitchError, match="^blend must be one of"):
        StitchSettings(blend="average")
    assert StitchSettings(formats="ome-tiff").formats == ("ome-tiff",)
    assert StitchSettings(formats=("dzi",), stitch_tiff=True).output_formats == \
        ("ome-tiff", "dzi")


def test_tile_configuration_refuses_names_fiji_cannot_hold(tmp_path):
    """'tile;3; (5, 5).jpg' would be read back as a tile called 'tile': it is left out of
    the file, with a warning, and every line that is written reads back as written."""
    from ofstitch.formats import write_tile_configuration
    from ofstitch.metadata import read_tile_configuration

    names = ["a.jpg", "tile;3; (5, 5).jpg", "two\nlines.jpg", "b c.jpg"]
    path = tmp_path / "OFMTileConfiguration.txt"
    with pytest.warns(OfstitchWarning, match="2 tile\\(s\\) out of .*';'"):
        write_tile_configuration(path, names, np.array([[0, 0], [0, 10], [10, 0], [10, 10]]))
    assert read_tile_configuration(path) == {"a.jpg": (0.0, 0.0), "b c.jpg": (10.0, 10.0)}


def test_two_writers_of_one_output_folder_both_finish(tmp_path):
    """Two runs writing the same DZI or OME-Zarr folder at once: both finish without an
    error, and the folder is one writer's whole (it used to fail with FileNotFoundError
    from deleting the old folder in place)."""
    import threading

    from ofstitch.atomic import atomic_dir

    target = tmp_path / "mosaic.ome.zarr"
    errors = []

    def write(k: int) -> None:
        try:
            for _ in range(10):
                with atomic_dir(target) as tmp:
                    for j in range(20):
                        (tmp / f"chunk{j}").write_text(str(k))
        except Exception as exc:  # noqa: BLE001 - any failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    contents = {p.read_text() for p in target.iterdir()}
    assert len(contents) == 1 and len(list(target.iterdir())) == 20  # one writer's, whole
    assert [p.name for p in tmp_path.iterdir()] == ["mosaic.ome.zarr"]  # nothing left over
