"""Faithful pixels: tiles decoded as their files mean, data formats keeping the data.

Tiles are cut exactly from a known field, so that level 0 of every data format
must equal the field wherever a tile covers it.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
import piexif
import pytest
import pyvips
import scipy.ndimage as ndi
from cli_helpers import run_main
from PIL import Image

from ofstitch import formats, levels, render, tiles
from ofstitch.errors import OfstitchWarning
from ofstitch.tiles import TileReadError

tifffile = pytest.importorskip("tifffile")
from tile_helpers import cut_tiles  # noqa: E402

TILE = (48, 64)  # (height, width)
STEP = (36, 48)


def _field(source_image: np.ndarray, dtype, bands: int = 1) -> np.ndarray:
    """A field of ``dtype`` values with the sample's texture, beyond 8 bits."""
    rgb = source_image[300:300 + 3 * STEP[0] + TILE[0], 300:300 + 3 * STEP[1] + TILE[1]]
    base = rgb.astype(np.float64) if bands == 3 else rgb.mean(axis=2)
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return (base * 200 + 300).astype(dtype)  # 300 to 51,300: far above 255
    if dtype == np.int16:
        return ((base - np.median(base)) * 100).astype(dtype)  # half negative
    if dtype == np.float32:
        return ((base - np.median(base)) / 50).astype(dtype)  # half negative
    return base.astype(dtype)


def _cut(folder, field: np.ndarray, grid=(3, 3), suffix=".tif"):
    """Tiles of ``field`` at exact positions, named ``t_X_Y`` (their positions)."""
    return cut_tiles(folder, field, tile=TILE, step=STEP, grid=grid, suffix=suffix)


def _covered(layout: render.Layout) -> np.ndarray:
    mask = np.zeros(layout.size, bool)
    for ty, tx in layout.top_left:
        mask[ty:ty + layout.tile_shape[0], tx:tx + layout.tile_shape[1]] = True
    return mask


# ----------------------------------------------------------------------------- decoding


def _gradient_rgb(h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 3 + 20, y * 4 + 10, (x + y) * 2 + 5], -1).astype(np.uint8)


@pytest.mark.parametrize("profile", ["device", "icc"])
def test_cmyk_jpeg_decodes_to_rgb(tmp_path, profile):
    rgb = _gradient_rgb()
    path = tmp_path / "cmyk.jpg"
    if profile == "device":  # Pillow: C = 255 - R..., K = 0, no profile
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    else:  # libvips: through its CMYK profile, embedded in the file
        pyvips.Image.new_from_array(rgb).copy(interpretation="srgb").icc_transform(
            "cmyk", input_profile="srgb").jpegsave(str(path), Q=95)
    assert tiles.header(path)[2] == 3
    got = tiles.open_tile(path).numpy()
    assert got.shape == rgb.shape
    limit = 3 if profile == "device" else 6  # the profile maps dark colours lighter
    assert np.abs(got.astype(int) - rgb).mean() < limit  # not a colour negative
    grey = tiles.read_grey(path)
    assert np.abs(grey - rgb.mean(axis=2)).mean() < limit


@pytest.mark.parametrize("orientation, stored", [(6, 1), (8, -1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, stored):
    rgb = _gradient_rgb()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    Image.fromarray(np.rot90(rgb, stored).copy()).save(path, exif=exif, quality=95)
    assert tiles.header(path)[:2] == rgb.shape[:2]
    assert np.abs(tiles.open_tile(path).numpy().astype(int) - rgb).mean() < 2
    grey = tiles.read_grey(path)
    assert np.abs(grey - rgb.mean(axis=2)).mean() < 2
    half = tiles.read_grey(path, 0.5)
    assert half.shape == (24, 32)


@pytest.mark.parametrize("mode, size", [("RGB", (821, 615)), ("L", (830, 617)),
                                         ("RGB", (17, 9))])
def test_jpeg_fast_decode_gives_libvips_pixels(tmp_path, mode, size):
    """The previews and the mosaic decode JPEG tiles through Pillow on their threads:
    the same pixels, at the same size, as libvips' shrink-on-load, at every scale, with
    an EXIF thumbnail in front of the image."""
    rng = np.random.default_rng(1)
    w, h = size
    arr = (ndi.gaussian_filter(rng.random((h, w, 3)), (1.5, 1.5, 0)) * 255).astype(np.uint8)
    image = Image.fromarray(arr).convert(mode)
    thumb = io.BytesIO()
    image.resize((max(1, w // 10), max(1, h // 10))).save(thumb, "JPEG")
    exif = piexif.dump({"0th": {}, "thumbnail": thumb.getvalue(), "1st": {}})
    path = tmp_path / "tile.jpg"
    image.save(path, quality=90, exif=exif)
    for shrink in (1, 2, 4, 8):
        fast = tiles._jpeg_pixels(path, shrink)
        assert fast is not None
        want = tiles.open_tile(path, shrink=shrink).numpy()
        np.testing.assert_array_equal(fast.reshape(want.shape), want)
        assert fast.shape[:2] == want.shape[:2]
    words = tiles._jpeg_pixels(path, 1, words=True)  # RGB as 32-bit words, for the mosaic
    if mode == "RGB":
        assert words.shape == (h, w, 4)  # the fourth byte is not defined
        np.testing.assert_array_equal(words[..., :3], tiles.open_tile(path).numpy())
    else:
        assert words is None


def test_jpeg_fast_decode_leaves_doubtful_tiles_to_libvips(tmp_path, monkeypatch):
    """An end-of-image marker half-way (libjpeg fills the rest without an error), an
    EXIF orientation, a PNG, a large tile: None, so that libvips decodes them (and
    refuses the first)."""
    arr = _gradient_rgb()
    good = tmp_path / "good.jpg"
    Image.fromarray(arr).save(good, quality=90)
    assert tiles._jpeg_pixels(good, 1) is not None
    data = bytearray(good.read_bytes())
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 2] = b"\xff\xd9"
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(bytes(data))
    assert tiles._jpeg_pixels(cut, 1) is None
    with pytest.raises(TileReadError):
        tiles.read_rgb8_scaled(cut, 1.0, arr.shape[:2])
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(turned, exif=exif, quality=90)
    assert tiles._jpeg_pixels(turned, 1) is None
    png = tmp_path / "tile.png"
    Image.fromarray(arr).save(png)
    assert tiles._jpeg_pixels(png, 1) is None
    # A large tile (here: over a lowered limit) is left to libvips' own threads.
    monkeypatch.setattr(tiles, "PILLOW_MAX_PIXELS", arr.shape[0] * arr.shape[1] - 1)
    assert tiles._jpeg_pixels(good, 1) is None
    assert tiles._jpeg_pixels(good, 2) is not None


def test_the_largest_page_of_a_multipage_tiff(tmp_path):
    rgb = _gradient_rgb()
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, rgb[::4, ::4], photometric="rgb")  # a thumbnail first
    tifffile.imwrite(path, rgb, photometric="rgb", append=True)
    assert tiles.header(path)[:2] == rgb.shape[:2]
    np.testing.assert_array_equal(tiles.open_tile(path).numpy(), rgb)


def test_palette_and_alpha(tmp_path):
    rgb = _gradient_rgb()
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(tiles.open_tile(tmp_path / "pal.png").numpy(),
                                  np.asarray(pal.convert("RGB")))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(
        tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(tiles.open_tile(tmp_path / "rgba.png").numpy(), rgb)
    assert tiles.header(tmp_path / "la.png")[2] == 1
    np.testing.assert_array_equal(tiles.open_tile(tmp_path / "la.png").numpy(), rgb[..., 0])


@pytest.mark.parametrize("dtype, values", [
    (np.uint16, (0, 4095)),  # 12-bit data in 16-bit words
    (np.uint16, (0, 65535)),
    (np.int16, (-32768, 32767)),
    (np.int32, (-100_000, 100_000)),
    (np.float32, (-3.5, 2.25)),
])
def test_deep_and_signed_tiles_keep_their_values(tmp_path, dtype, values):
    rng = np.random.default_rng(1)
    arr = rng.uniform(*values, size=TILE).astype(dtype)
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, arr)
    h, w, bands, fmt = tiles.header(path)
    assert (h, w, bands) == (*TILE, 1)
    assert levels.VIPS_DTYPES[fmt] == dtype
    np.testing.assert_array_equal(tiles.open_tile(path).numpy(), arr)
    np.testing.assert_allclose(tiles.read_grey(path), arr.astype(np.float32), rtol=1e-6)


# ----------------------------------------------------------------------------- levels


@pytest.mark.parametrize("formats_, expected", [
    (("uchar",), np.uint8), (("ushort",), np.uint16), (("uchar", "ushort"), np.uint16),
    (("char",), np.int16), (("short",), np.int16), (("float",), np.float32),
    (("ushort", "short"), np.float32), (("ushort", "float"), np.float32),
])
def test_mosaic_dtype_rule(formats_, expected):
    assert levels.mosaic_dtype(formats_) == expected


@pytest.mark.parametrize("formats_", [("int",), ("uint",), ("double",)])
def test_wide_types_become_float32_with_a_warning(formats_):
    with pytest.warns(OfstitchWarning, match="written as float32"):
        assert levels.mosaic_dtype(formats_) == np.float32


def test_levels_map_a_narrow_range_to_the_full_8_bits():
    values = np.linspace(1000, 1010, 1001).reshape(7, 143)
    shown = levels.robust_range(values)
    assert shown.low == pytest.approx(1000.01) and shown.high == pytest.approx(1009.99)
    out = shown.to_uchar(pyvips.Image.new_from_array(values)).numpy()
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert 120 <= out[3, 71] <= 135  # the middle value shows mid-grey
    negative = levels.Levels(-2.0, 2.0).to_uchar(
        pyvips.Image.new_from_array(np.array([[-5.0, -2.0, 0.0, 2.0, 9.0]])))
    np.testing.assert_array_equal(negative.numpy()[0], [0, 0, 128, 255, 255])
    assert levels.Levels().identity and levels.robust_range(np.full(10, 7.0)).high > 7


# ----------------------------------------------------------------------------- data formats


def _read_ome_tiff(path):
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return series.levels[0].asarray(), series, tif.ome_metadata


def _read_zarr(path):
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(path), mode="r")
    return np.asarray(group["0"][:]), group


@pytest.mark.parametrize("dtype, bands", [(np.uint16, 1), (np.float32, 1), (np.int16, 1),
                                          (np.uint16, 3), (np.uint8, 1)])
def test_data_formats_keep_dtype_channels_and_values(tmp_path, source_image, dtype, bands):
    field = _field(source_image, dtype, bands)
    paths, positions = _cut(tmp_path / "tiles", field)
    pixels = render.Pixels.data(dtype, bands)
    mosaic = render.Mosaic(paths, positions, TILE, pixels=pixels)
    covered = _covered(mosaic.layout)
    expected = field[:mosaic.size[0], :mosaic.size[1]]
    tiff, zarr_path = tmp_path / "m.ome.tiff", tmp_path / "m.ome.zarr"
    # The default JPEG compression holds 8-bit data only: deeper data are deflated.
    compression = "deflate" if dtype == np.uint8 else "jpeg"
    mosaic.write(lambda im: formats.write_ome_tiff(im, tiff, pixel_size_um=0.5, tile_size=32,
                                                   compression=compression))
    mosaic.write(lambda im: formats.write_ome_zarr(im, zarr_path, pixel_size_um=0.5, chunk=32))

    level0, series, xml = _read_ome_tiff(tiff)
    assert level0.dtype == dtype and len(series.levels) >= 3
    assert level0.shape == (*mosaic.size, 3) if bands == 3 else mosaic.size
    np.testing.assert_array_equal(level0[covered], expected[covered])
    ome_type = {np.uint8: "uint8", np.uint16: "uint16", np.int16: "int16",
                np.float32: "float"}[dtype]
    assert f'Type="{ome_type}"' in xml and f'SizeC="{bands}"' in xml

    data, group = _read_zarr(zarr_path)
    assert data.dtype == dtype and data.shape == (bands, *mosaic.size)
    np.testing.assert_array_equal(np.moveaxis(data, 0, -1)[covered].squeeze(),
                                  expected[covered])
    omero = group.attrs["omero"]
    assert len(omero["channels"]) == bands
    assert omero["rdefs"]["model"] == ("color" if bands == 3 else "greyscale")
    if dtype == np.uint16:
        assert level0.max() > 255 and data.max() > 255
    if dtype in (np.float32, np.int16):
        assert (level0[covered] < 0).mean() > 0.05  # the negatives are kept
        assert level0[covered].min() == expected[covered].min() < 0


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_versions(tmp_path, source_image, version):
    zarr = pytest.importorskip("zarr")
    field = _field(source_image, np.uint16)
    paths, positions = _cut(tmp_path / "tiles", field)
    mosaic = render.Mosaic(paths, positions, TILE, pixels=render.Pixels.data(np.uint16, 1))
    path = tmp_path / "m.ome.zarr"
    mosaic.write(lambda im: formats.write_ome_zarr(im, path, pixel_size_um=None, chunk=16,
                                                   ngff_version=version))
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == (2 if version == "0.4" else 3)
    attrs = group.attrs.asdict()
    ms = (attrs["ome"] if version == "0.5" else attrs)["multiscales"][0]
    shapes = formats.zarr_level_shapes(mosaic.size, 16)
    assert [tuple(group[d["path"]].shape) for d in ms["datasets"]] == \
        [(1, *s) for s in shapes]
    covered = _covered(mosaic.layout)
    np.testing.assert_array_equal(np.asarray(group["0"][:])[0][covered],
                                  field[:mosaic.size[0], :mosaic.size[1]][covered])
    if version == "0.5":
        assert group["0"].shards == (1, 64, 64)


def test_renderings_scale_from_the_robust_range(tmp_path, source_image):
    """A 16-bit scan of values 1000-1010: the 8-bit rendering spans 0-255, not flat white."""
    grey = _field(source_image, np.float32)
    field = np.rint(1000 + 10 * (grey - grey.min()) / np.ptp(grey)).astype(np.uint16)
    paths, positions = _cut(tmp_path / "tiles", field)
    shown = levels.scan_levels(paths, np.uint16)
    assert 1000 <= shown.low < shown.high <= 1010
    mosaic = render.Mosaic(paths, positions, TILE, pixels=render.Pixels(shown))
    image = render.compose(paths, mosaic.layout, pixels=mosaic.pixels).numpy()
    covered = _covered(mosaic.layout)
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    assert image[covered].min() == 0 and image[covered].max() == 255
    assert image[covered].std() > 30


def test_cli_keeps_16_bit_grey_and_reports_the_range(tmp_path, source_image, capsys):
    field = _field(source_image, np.uint16)
    _cut(tmp_path / "scan", field)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        result = run_main(tmp_path / "scan", "-o", out, "--format", "ome-tiff", "--format",
                          "ome-zarr", "--format", "jpeg", "--format", "dzi", "--format",
                          "pyramid-tiff", "--tile-size", "64", capsys=capsys)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert "uint16, 1 channel" in result.stdout and "percentiles" in result.stdout
    level0, series, _ = _read_ome_tiff(out / "scan_stitched.ome.tiff")
    data, _ = _read_zarr(out / "scan_stitched.ome.zarr")
    assert level0.dtype == np.uint16 and level0.ndim == 2
    assert data.dtype == np.uint16 and data.shape[0] == 1
    np.testing.assert_array_equal(data[0], level0)
    # Stage positions are exact: the mosaic is the field.
    h, w = level0.shape
    np.testing.assert_array_equal(level0[:, :], field[:h, :w])
    # No pixel size is known (positions from file names): no TIFF claims one.
    for name in ("scan_stitched.ome.tiff", "scan_stitched.pyramid.tiff"):
        with tifffile.TiffFile(out / name) as tif:
            pages = list(tif.pages) + [lv.pages[0] for lv in tif.series[0].levels]
            units = {int(p.tags["ResolutionUnit"].value) for p in pages}
            assert len({p.offset for p in pages}) >= 3 and units == {1}, (name, units)
    jpeg = pyvips.Image.new_from_file(str(out / "scan_stitched.jpg")).numpy()
    assert jpeg.std() > 30 and jpeg.max() == 255  # scaled, not clipped to white
    # Outputs get the usual permissions (umask 022), files and folders alike.
    for name in ("scan_stitched.ome.zarr", "scan_stitched_files", "scan_stitched.ome.tiff",
                 "scan_stitched.pyramid.tiff", "scan_stitched.jpg", "preview.jpg"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == (0o755 if (out / name).is_dir() else 0o644), (name, oct(mode))
    for sub in (out / "scan_stitched.ome.zarr").rglob("*"):
        assert stat.S_IMODE(sub.stat().st_mode) & 0o044 == 0o044, sub


# ----------------------------------------------------------------------------- flat field


def test_flat_field_auto_divides_out_the_vignetting(make_synthetic):
    from ofstitch import flatfield

    scan = make_synthetic("vignetted", grid=(4, 5), tile_shape=(90, 120), overlap=0.3,
                          stage_error_px=0.0, rotation_deg=0.0, vignetting=0.6, noise=0.0,
                          extension=".png", layout="filename", seed=4)
    paths = [scan.folder / n for n in scan.names]
    flat = flatfield.estimate(paths, (90, 120))
    gain = flat.image((90, 120)).numpy()
    assert gain.mean() == pytest.approx(1.0, abs=0.01)
    yy, xx = np.mgrid[0:90, 0:120]
    shading = 1 - 0.6 * (((yy - 45) / 45) ** 2 + ((xx - 60) / 60) ** 2) / 2  # synthetic's
    assert np.corrcoef(gain.ravel(), shading.ravel())[0, 1] > 0.95
    origin = scan.truth_px.min(axis=0).astype(int)
    truth = scan.source[origin[0]:, origin[1]:].astype(float).mean(axis=2)

    def unevenness(flat_field) -> float:
        """Spread of mosaic / truth where tiles cover it: 0 for an evenly lit mosaic."""
        mosaic = render.Mosaic(paths, scan.truth_px, (90, 120),
                               pixels=render.Pixels(levels.Levels(), flat=flat_field))
        grey = render.compose(paths, mosaic.layout, pixels=mosaic.pixels).numpy().mean(axis=2)
        h, w = grey.shape
        keep = _covered(mosaic.layout) & (truth[:h, :w] > 40)
        ratio = grey[keep] / truth[:h, :w][keep]
        return float(ratio.std() / ratio.mean())

    assert unevenness(flat) < unevenness(None) / 2


def test_cli_flat_field(make_synthetic, tmp_path, capsys):
    scan = make_synthetic("vignetted", grid=(3, 3), tile_shape=(90, 120), overlap=0.3,
                          vignetting=0.5, noise=0.0, extension=".png", layout="filename")
    result = run_main(scan.folder, "-o", tmp_path / "out", "--flat-field", "auto",
                      "-f", "ome-tiff", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "flat field from the median of 9 tiles" in result.stdout
    Image.fromarray(np.full((45, 60), 100, np.uint8)).save(tmp_path / "flat.png")
    result = run_main(scan.folder, "-o", tmp_path / "out2", "--flat-field",
                      tmp_path / "flat.png", capsys=capsys)
    assert result.returncode == 0 and "flat field from flat.png" in result.stdout
    result = run_main(scan.folder, "-o", tmp_path / "out3", "--flat-field", "nothing.png",
                      capsys=capsys)
    assert result.returncode == 2 and "--flat-field must be 'auto' or an image" in result.stderr


def test_cmyk_and_turned_tiles_register_like_the_others(make_synthetic, tmp_path):
    """A scan with a CMYK tile and tiles stored turned (with their EXIF Orientation) is
    placed as the same scan with ordinary tiles, and no tile is skipped."""
    import warnings

    import ofstitch

    scan = make_synthetic("plain", grid=(3, 3), tile_shape=(120, 160), overlap=0.3,
                          noise=1.0, layout="filename", seed=7)
    odd = tmp_path / "odd"
    odd.mkdir()
    for k, name in enumerate(scan.names):
        with Image.open(scan.folder / name) as im:
            rgb = np.asarray(im.convert("RGB"))
        if k == 1:
            Image.fromarray(rgb).convert("CMYK").save(odd / name, quality=95)
        elif k in (4, 6):
            exif = Image.Exif()
            exif[0x0112] = 8 if k == 4 else 6
            Image.fromarray(np.rot90(rgb, -1 if k == 4 else 1).copy()).save(
                odd / name, exif=exif, quality=95)
        else:
            Image.fromarray(rgb).save(odd / name, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfstitchWarning)
        plain = ofstitch.register(scan.folder, use_cache=False)
        turned = ofstitch.register(odd, use_cache=False)
    assert sorted(turned.names) == sorted(plain.names)  # nothing skipped

    def relative(reg):  # by name (the capture order may differ), from the first tile
        pos = {n: p for n, p in zip(reg.names, reg.positions_px, strict=True)}
        return np.array([pos[n] - pos[scan.names[0]] for n in scan.names])

    moved = np.abs(relative(turned) - relative(plain)).max()
    assert moved <= 1.0, moved
