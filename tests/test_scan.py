"""Scan loading: tile discovery, OpenFlexure EXIF layouts, fallbacks, sorting and skipping.

Expectations are derived from the inputs each test writes: pixel positions are
chosen first, and the stage coordinates written into the files are computed
from them with the documented mapping ``stage_xy = pixel_rc @ M``.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import piexif
import piexif.helper
import pytest
import pyvips
from hypothesis import given, settings
from hypothesis import strategies as st

from ofstitch.errors import MetadataError, NoImagesError, OfstitchError, OfstitchWarning
from ofstitch.metadata import parse_usercomment, position_from_filename, read_tile_configuration
from ofstitch.scan import is_tile_name, load_scan
from ofstitch.settings import StitchSettings
from ofstitch.tiles import TileReadError, read_grey

TH, TW = 48, 64  # tile (height, width)
BASE_TIME = datetime(2025, 6, 1, 9, 30, 0)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def textured_corners(source_image) -> list[tuple[int, int]]:
    """Top-left corners of well-textured tissue windows of the real H&E image."""
    grey = source_image[..., :3].mean(axis=2)
    h, w = grey.shape
    corners = [(r, c) for r in range(0, h - 2 * TH, 60) for c in range(0, w - 2 * TW, 60)
               if grey[r:r + 2 * TH, c:c + 2 * TW].std() > 30]
    assert len(corners) >= 20, "the source image has too little tissue"
    return corners


@pytest.fixture
def texture(source_image, textured_corners):
    """Factory: a (TH, TW, 3) uint8 crop of tissue from the real H&E image, different per ``k``."""

    def crop(k: int = 0, shape: tuple[int, int] = (TH, TW)) -> np.ndarray:
        r, c = textured_corners[(7 * k) % len(textured_corners)]
        return np.ascontiguousarray(source_image[r:r + shape[0], c:c + shape[1], :3])

    return crop


def _image(arr: np.ndarray) -> pyvips.Image:
    return pyvips.Image.new_from_array(arr if arr.ndim == 2 or arr.shape[2] > 1 else arr[..., 0])


def write_jpeg(path: Path, arr: np.ndarray, exif: dict | None = None, q: int = 90) -> Path:
    _image(arr).jpegsave(str(path), Q=q, strip=True)
    if exif is not None:
        piexif.insert(piexif.dump(exif), str(path))
    return path


def write_png(path: Path, arr: np.ndarray) -> Path:
    _image(arr).pngsave(str(path))
    return path


def exif_dict(comment: dict | bytes | None = None, *, when: datetime | None = None,
              original: bool = True, padding: int = 0) -> dict:
    """An EXIF dict with a UserComment (JSON dict or raw bytes) and capture time."""
    exif: dict = {"0th": {}, "Exif": {}}
    if comment is not None:
        raw = json.dumps(comment).encode() if isinstance(comment, dict) else comment
        exif["Exif"][piexif.ExifIFD.UserComment] = raw
    if when is not None:
        stamp = when.strftime("%Y:%m:%d %H:%M:%S").encode()
        exif["0th"][piexif.ImageIFD.DateTime] = stamp
        if original:
            exif["Exif"][piexif.ExifIFD.DateTimeOriginal] = stamp
    if padding:
        exif["0th"][piexif.ImageIFD.ImageDescription] = b"p" * padding
    return exif


def v3_comment(x, y, z=0.0, csm=None, resolution=None, **extra) -> dict:
    data: dict = {"stage": {"position": {"x": x, "y": y, "z": z}}}
    if csm is not None:
        data["camera_stage_mapping"] = {"image_to_stage_displacement_matrix": csm}
        if resolution is not None:
            data["camera_stage_mapping"]["image_resolution"] = resolution
    data.update(extra)
    return data


def legacy_comment(x, y, z=0.0, csm=None, resolution=None) -> dict:
    data: dict = {"/stage/": {"position": {"x": x, "y": y, "z": z}}}
    if csm is not None:
        data["/camera_stage_mapping/"] = {"image_to_stage_displacement_matrix": csm}
        if resolution is not None:
            data["/camera_stage_mapping/"]["image_resolution"] = resolution
    return data


def v2_comment(x, y, z=0.0, csm=None, um_per_px=None) -> dict:
    extensions: dict = {}
    if csm is not None:
        extensions["org.openflexure.camera_stage_mapping"] = {"image_to_stage_displacement": csm}
    if um_per_px is not None:
        extensions["usafcal"] = {"um_per_px": um_per_px}
    return {"instrument": {"state": {"stage": {"position": {"x": x, "y": y, "z": z}}},
                           "settings": {"extensions": extensions}}}


def set_mtimes(paths: list[Path], start_ns: int = 1_600_000_000 * 10**9) -> None:
    """Give ``paths`` strictly increasing modification times, in list order."""
    for k, path in enumerate(paths):
        t = start_ns + k * 10**9
        os.utime(path, ns=(t, t))


def load_quiet(folder: Path, settings_: StitchSettings | None = None):
    """``load_scan`` that fails the test on any OfstitchWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfstitchWarning)
        return load_scan(folder, settings_)


def names_of(scan) -> list[str]:
    return [f.name for f in scan.files]


def bmp_bytes(arr: np.ndarray) -> bytes:
    """A plain 24-bit BMP (bottom-up, BGR rows padded to 4 bytes) of an RGB uint8 array."""
    h, w = arr.shape[:2]
    row_bytes = (w * 3 + 3) // 4 * 4
    pixels = b"".join(
        arr[r, :, ::-1].tobytes().ljust(row_bytes, b"\0") for r in range(h - 1, -1, -1))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + dib + pixels


def _vips_reads_bmp() -> bool:
    try:
        pyvips.Image.new_from_buffer(bmp_bytes(np.zeros((4, 4, 3), np.uint8)), "")
    except pyvips.Error:
        return False
    return True


# ----------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("name, expected", [
    ("tile_1_2.jpg", True), ("TILE_1_2.JPG", True), ("t.jpeg", True), ("t.JPEG", True),
    ("t.png", True), ("t.Png", True), ("t.tif", True), ("t.TIF", True), ("t.tiff", True),
    ("t.bmp", True), ("t.gif", True), ("t.GIF", True),
    ("t.pdf", False), ("t.txt", False), ("t.jpg.txt", False), ("t.webp", False),
    ("scan_stitched.jpg", False), ("comparison_1_2.png", False), ("Fused_1_2.tif", False),
    ("stage_1_2.jpg", False), ("stitching_correlations.png", False),
    ("PREVIEW_1_2.jpg", False), ("x_STITCHED.JPG", False),
])
def test_is_tile_name(name, expected):
    assert is_tile_name(name) is expected


def test_extensions_are_case_insensitive(tmp_path, texture):
    arr = texture(0)
    written = {}
    for k, name in enumerate(["TILE_0_0.JPG", "tile_64_0.JPEG", "Tile_0_48.TIF",
                              "tile_64_48.TIFF", "t_0_96.Png", "t_64_96.GIF", "u_0_144.jpeg",
                              "u_64_144.tif", "v_0_192.png", "v_64_192.gif"]):
        path = tmp_path / name
        ext = path.suffix.lower()
        if ext in (".jpg", ".jpeg"):
            write_jpeg(path, arr)
        elif ext == ".gif":
            _image(arr).gifsave(str(path))
        else:
            _image(arr).write_to_file(str(path) + "_tmp" + ext)
            os.replace(str(path) + "_tmp" + ext, path)
        written[name] = position_from_filename(name)[:2]
        set_mtimes([path], 1_600_000_000 * 10**9 + k * 10**9)
    scan = load_quiet(tmp_path)
    assert sorted(names_of(scan)) == sorted(written)
    for name, (x, y) in zip(names_of(scan), scan.stage_px[:, ::-1].tolist(), strict=True):
        assert (x, y) == pytest.approx(written[name])


def test_unsupported_and_output_files_are_ignored(tmp_path, texture):
    arr = texture(0)
    tiles = [write_png(tmp_path / "tile_0_0.png", arr), write_png(tmp_path / "tile_40_0.png", arr)]
    # Perfectly readable images with usable positions in their names: only the
    # extension or an output phrase may exclude them.
    write_png(tmp_path / "tmp.png", arr)
    os.replace(tmp_path / "tmp.png", tmp_path / "notes_80_0.pdf")
    write_png(tmp_path / "tmp.png", arr)
    os.replace(tmp_path / "tmp.png", tmp_path / "readme_120_0.txt")
    for name in ["scan_stitched_0_40.png", "comparison_40_40.png", "Fused_80_40.png",
                 "stage_120_40.png", "stitching_0_80.png", "preview_40_80.png",
                 "mosaic_STITCHED_80_80.jpg", ".tile_120_80.png"]:
        path = tmp_path / name
        if path.suffix == ".jpg":
            write_jpeg(path, arr)
        else:
            write_png(path, arr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = load_scan(tmp_path)
    assert sorted(names_of(scan)) == sorted(p.name for p in tiles)
    # Images left out for an output word that ofstitch's own outputs do not carry are
    # reported, once; the names of outputs are left out in silence.
    messages = [str(w.message) for w in caught if issubclass(w.category, OfstitchWarning)]
    assert len(messages) == 1 and "3 image file(s)" in messages[0], messages


def test_bmp_tiles_load(tmp_path, texture):
    for k, name in enumerate(["a_0_0.bmp", "b_40_0.BMP"]):
        (tmp_path / name).write_bytes(bmp_bytes(texture(k)))
    scan = load_quiet(tmp_path)
    assert sorted(names_of(scan)) == ["a_0_0.bmp", "b_40_0.BMP"]
    assert scan.tile_shape == (TH, TW)
    assert scan.bands == 3


def test_empty_folder_raises_no_images(tmp_path):
    with pytest.raises(NoImagesError):
        load_scan(tmp_path)


def test_folder_with_only_ignored_files_raises_no_images(tmp_path, texture):
    write_png(tmp_path / "x_stitched_0_0.png", texture(0))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NoImagesError):
        load_scan(tmp_path)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(OfstitchError, match="does not exist"):
        load_scan(tmp_path / "nope")


def test_file_instead_of_folder_raises(tmp_path, texture):
    path = write_png(tmp_path / "tile_0_0.png", texture(0))
    with pytest.raises(OfstitchError):
        load_scan(path)


# ----------------------------------------------------------------------------- synthetic scans


@pytest.mark.parametrize("layout, calibration_width, rotation", [
    ("v3", None, 0.0), ("v3", 832, 1.5), ("legacy", 410, -2.0), ("legacy", None, 0.0),
    ("v2", 832, 1.0),  # v2 records no calibration width: the loader must assume 832
])
def test_make_scan_layouts_round_trip(make_synthetic, layout, calibration_width, rotation):
    sc = make_synthetic(layout=layout, grid=(2, 3), tile_shape=(TH, TW), overlap=0.3,
                        stage_error_px=0.0, rotation_deg=rotation, vignetting=0.0, noise=0.0,
                        calibration_width=calibration_width, um_per_px=0.61)
    # Scramble the modification times: EXIF capture time must decide the order.
    set_mtimes([sc.folder / n for n in reversed(sc.names)])
    scan = load_quiet(sc.folder)
    assert names_of(scan) == sc.names
    assert scan.tile_shape == (TH, TW)
    assert scan.bands == 3
    assert scan.bit_depth == 8
    assert scan.position_source == "exif"
    np.testing.assert_allclose(scan.stage_xy, sc.stage_xy, atol=1e-9)
    calib = calibration_width or TW
    np.testing.assert_allclose(scan.csm, sc.csm * calib / TW, rtol=1e-9)
    assert scan.csm_calibration_width == calib
    # Stage-predicted layout equals the true layout up to the rounding of the truth.
    rel = scan.stage_px - scan.stage_px[0]
    truth_rel = sc.truth_px - sc.truth_px[0]
    assert np.abs(rel - truth_rel).max() <= 1.0
    expected_um = {"v3": 0.61, "v2": 0.61, "legacy": None}[layout]
    assert scan.pixel_size_um == (pytest.approx(expected_um) if expected_um else None)
    assert isinstance(scan.metadata, dict)


def test_make_scan_filename_layout(make_synthetic):
    sc = make_synthetic(layout="filename", grid=(2, 3), tile_shape=(TH, TW), stage_error_px=0.0,
                        rotation_deg=0.0, steps_per_px=1.0, vignetting=0.0, noise=0.0)
    set_mtimes([sc.folder / n for n in sc.names])
    scan = load_quiet(sc.folder)
    assert names_of(scan) == sc.names
    assert scan.position_source == "filename"
    rel = scan.stage_px - scan.stage_px[0]
    assert np.abs(rel - (sc.truth_px - sc.truth_px[0])).max() <= 1.0


# ----------------------------------------------------------------------------- EXIF layouts

# Image (row, col) displacement -> stage displacement, at the calibration width.
CSM = [[0.25, 2.1], [1.8, -0.15]]
PIXELS = np.array([[0.0, 0.0], [3.0, 45.0], [34.0, -2.0], [30.0, 41.5]])


def _stage_from_pixels(pixels: np.ndarray, m: np.ndarray) -> np.ndarray:
    return pixels @ m


@pytest.mark.parametrize("layout, resolution, expected_width", [
    ("v3", [600, 800], 800),        # image_resolution is [height, width]
    ("v3", None, 832),              # OpenFlexure default
    ("legacy", [312, 416], 416),
    ("legacy", None, 832),
    ("v2", None, 832),              # v2 never records it
])
def test_exif_layout_positions_and_csm(tmp_path, texture, layout, resolution, expected_width):
    m = np.array(CSM) * expected_width / TW
    stage = _stage_from_pixels(PIXELS, m)
    comments = []
    # Names carry bogus positions: the EXIF must win over the file name.
    names = [f"tile_{900 + k}_{-900 - k}.jpg" for k in range(len(PIXELS))]
    for k, ((x, y), name) in enumerate(zip(stage.tolist(), names, strict=True)):
        z = 10.0 * k
        if layout == "v3":
            comment = v3_comment(x, y, z, CSM, resolution)
        elif layout == "legacy":
            comment = legacy_comment(x, y, z, CSM, resolution)
        else:
            comment = v2_comment(x, y, z, CSM, um_per_px=0.37)
        comments.append(comment)
        write_jpeg(tmp_path / name, texture(k),
                   exif_dict(comment, when=BASE_TIME + timedelta(seconds=5 * k)))
    scan = load_quiet(tmp_path)
    assert names_of(scan) == names
    assert scan.position_source == "exif"
    np.testing.assert_allclose(scan.stage_xy, stage, rtol=1e-12)
    np.testing.assert_allclose(scan.csm, m, rtol=1e-12)
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-9)
    assert scan.csm_calibration_width == expected_width
    assert scan.metadata == comments[0]
    assert scan.pixel_size_um == (pytest.approx(0.37) if layout == "v2" else None)


def test_v3_resolution_height_is_not_used_as_width(tmp_path, texture):
    # A tall calibration image: using the height instead of the width would be 2x off.
    m = np.array(CSM) * 500 / TW
    stage = _stage_from_pixels(PIXELS[:2], m)
    for k, (x, y) in enumerate(stage.tolist()):
        write_jpeg(tmp_path / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(x, y, 0, CSM, [1000, 500]),
                             when=BASE_TIME + timedelta(seconds=k)))
    scan = load_quiet(tmp_path)
    np.testing.assert_allclose(scan.stage_px, PIXELS[:2], atol=1e-9)


def test_v3_position_without_csm_uses_swapped_axes(tmp_path, texture):
    positions = [(0.0, 0.0), (40.0, 3.0), (-5.0, 30.0)]  # stage (x, y), already pixels
    for k, (x, y) in enumerate(positions):
        write_jpeg(tmp_path / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(x, y), when=BASE_TIME + timedelta(seconds=k)))
    scan = load_quiet(tmp_path)
    np.testing.assert_allclose(scan.stage_px, [(y, x) for x, y in positions])


def test_v3_pixel_size(tmp_path, texture):
    for k in range(2):
        write_jpeg(tmp_path / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(40.0 * k, 0.0, pixel_size_um=1.25),
                             when=BASE_TIME + timedelta(seconds=k)))
    assert load_quiet(tmp_path).pixel_size_um == pytest.approx(1.25)


# ----------------------------------------------------------------------------- capture order


def test_sorted_by_exif_time_not_name_or_mtime(make_synthetic):
    sc = make_synthetic(layout="v3", grid=(2, 3), tile_shape=(TH, TW), stage_error_px=0.0,
                        vignetting=0.0, noise=0.0)
    n = len(sc.names)
    # Rename so that name order is the reverse of capture order, and make the
    # modification times reverse too.
    renamed = []
    for k, name in enumerate(sc.names):
        new = f"z{n - 1 - k:02d}.jpg"
        os.replace(sc.folder / name, sc.folder / new)
        renamed.append(new)
    set_mtimes([sc.folder / r for r in reversed(renamed)])
    scan = load_quiet(sc.folder)
    assert names_of(scan) == renamed
    np.testing.assert_allclose(scan.stage_xy, sc.stage_xy)


def test_sorted_by_exif_datetime_without_datetime_original(tmp_path, texture):
    # Positions from the names; the capture time only in IFD0 DateTime.
    times = {"b_0_0.jpg": 20, "a_40_0.jpg": 10, "c_80_0.jpg": 0}
    for k, (name, seconds) in enumerate(times.items()):
        write_jpeg(tmp_path / name, texture(k),
                   exif_dict(None, when=BASE_TIME + timedelta(seconds=seconds), original=False))
    expected = sorted(times, key=times.get)
    set_mtimes([tmp_path / name for name in reversed(expected)])
    scan = load_quiet(tmp_path)
    assert names_of(scan) == expected
    assert scan.position_source == "filename"


def test_without_exif_time_sorted_by_mtime(tmp_path, texture):
    names = ["d_0_0.png", "a_40_0.png", "c_0_30.png", "b_40_30.png"]
    for k, name in enumerate(names):
        write_png(tmp_path / name, texture(k))
    order = ["c_0_30.png", "a_40_0.png", "d_0_0.png", "b_40_30.png"]
    set_mtimes([tmp_path / name for name in order])
    scan = load_quiet(tmp_path)
    assert names_of(scan) == order
    # Positions follow their files through the sort.
    expected_px = [(position_from_filename(n)[1], position_from_filename(n)[0]) for n in order]
    np.testing.assert_allclose(scan.stage_px, expected_px)
    assert [f.mtime_ns for f in scan.files] == sorted(f.mtime_ns for f in scan.files)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_image_count_after_sorting(tmp_path, texture, count):
    names = ["e_0_0.png", "d_40_0.png", "c_80_0.png", "b_0_30.png", "a_40_30.png"]
    for k, name in enumerate(names):
        write_png(tmp_path / name, texture(k))
    set_mtimes([tmp_path / name for name in names])  # capture order = list order, not name order
    scan = load_quiet(tmp_path, StitchSettings(image_count=count))
    assert names_of(scan) == names[:count]
    assert scan.stage_px.shape == (count, 2)
    assert scan.stage_xy.shape == (count, 2)


# ----------------------------------------------------------------------------- bad metadata


def _unicode_comment() -> bytes:
    return piexif.helper.UserComment.dump(
        json.dumps(v3_comment(123.0, 456.0)), encoding="unicode")


@pytest.mark.parametrize("raw, from_exif", [
    pytest.param(piexif.helper.UserComment.dump(json.dumps(v3_comment(123.0, 456.0)),
                                                encoding="ascii"), True, id="ascii-prefix"),
    pytest.param(b"\0" * 8 + json.dumps(v3_comment(123.0, 456.0)).encode(), True,
                 id="undefined-prefix"),
    pytest.param(_unicode_comment(), True, id="unicode-prefix"),
    pytest.param(b'{"stage": {"position": {"x": 1,', False, id="truncated-json"),
    pytest.param(b"not json at all", False, id="plain-text"),
    pytest.param(b"[1, 2, 3]", False, id="json-list"),
    pytest.param(b"\xff\xfe\xfa{{", False, id="not-utf8"),
    pytest.param(b'{"stage": {"position": {"x": NaN, "y": 2}}}', False, id="nan-x"),
    pytest.param(b'{"stage": {"position": {"x": 1, "y": Infinity}}}', False, id="inf-y"),
    pytest.param(b'{"stage": {"position": {"x": "left", "y": 2}}}', False, id="text-x"),
    pytest.param(b'{"stage": {"position": {"x": true, "y": 2}}}', False, id="bool-x"),
    pytest.param(b'{"stage": {"position": "here"}}', False, id="position-string"),
    pytest.param(b'{"stage": [1, 2]}', False, id="stage-list"),
    pytest.param(b'{"instrument": {"state": null}}', False, id="v2-null"),
    pytest.param(('{"stage": {"position": {"x": 1' + "0" * 400 + ', "y": 2}}}').encode(),
                 False, id="huge-int-x"),
])
def test_usercomment_variants_do_not_crash(tmp_path, texture, raw, from_exif):
    # The odd tile has a usable position in its name; a good tile sits beside it.
    write_jpeg(tmp_path / "m_5_6.jpg", texture(0),
               exif_dict(raw, when=BASE_TIME))
    write_jpeg(tmp_path / "n_70_6.jpg", texture(1),
               exif_dict(None, when=BASE_TIME + timedelta(seconds=1)))
    scan = load_quiet(tmp_path)
    assert names_of(scan) == ["m_5_6.jpg", "n_70_6.jpg"]
    expected_xy = (123.0, 456.0) if from_exif else (5.0, 6.0)
    assert tuple(scan.stage_xy[0]) == pytest.approx(expected_xy)
    assert tuple(scan.stage_xy[1]) == pytest.approx((70.0, 6.0))


def test_parse_usercomment_ascii_prefix():
    data = {"stage": {"position": {"x": 1.5, "y": -2}}}
    raw = b"ASCII\0\0\0" + json.dumps(data).encode()
    assert parse_usercomment(raw) == data
    assert parse_usercomment(json.dumps(data)) == data
    assert parse_usercomment(b"ASCII\0\0\0not json") is None
    assert parse_usercomment(None) is None


def test_nan_position_without_name_position_is_skipped_with_warning(tmp_path, texture):
    write_jpeg(tmp_path / "good_0_0.jpg", texture(0), exif_dict(None, when=BASE_TIME))
    write_jpeg(tmp_path / "nowhere.jpg", texture(1), exif_dict(
        b'{"stage": {"position": {"x": NaN, "y": NaN}}}', when=BASE_TIME))
    with pytest.warns(OfstitchWarning, match="nowhere.jpg"):
        scan = load_scan(tmp_path)
    assert names_of(scan) == ["good_0_0.jpg"]


def test_no_positions_anywhere_raises(tmp_path, texture):
    write_png(tmp_path / "alpha.png", texture(0))
    write_png(tmp_path / "beta.png", texture(1))
    with pytest.warns(OfstitchWarning) as record, pytest.raises(OfstitchError):
        load_scan(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "alpha.png" in messages
    assert "beta.png" in messages


@pytest.mark.parametrize("bad_csm", [
    [["a", "b"], ["c", "d"]], [[1, 2], [3]], "identity", [[1, None], [0, 1]],
    [[float("nan"), 0], [0, 1]], [[1, 0], [0, 1], [1, 1]],
])
def test_non_numeric_csm_is_ignored(tmp_path, texture, bad_csm):
    positions = [(0.0, 0.0), (40.0, 3.0)]
    for k, (x, y) in enumerate(positions):
        write_jpeg(tmp_path / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(x, y, 0, bad_csm, [TH, TW]),
                             when=BASE_TIME + timedelta(seconds=k)))
    with pytest.warns(OfstitchWarning, match="camera-to-sample matrix of 2 tile"):
        scan = load_scan(tmp_path)
    assert names_of(scan) == ["t0.jpg", "t1.jpg"]
    # No usable CSM: stage x is the column and y the row.
    np.testing.assert_allclose(scan.stage_px, [(y, x) for x, y in positions])


def test_singular_csm_in_metadata_raises(tmp_path, texture):
    for k in range(2):
        write_jpeg(tmp_path / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(10.0 * k, 0, 0, [[1, 2], [2, 4]], [TH, TW]),
                             when=BASE_TIME + timedelta(seconds=k)))
    with pytest.raises(MetadataError):
        load_scan(tmp_path)


# ----------------------------------------------------------------------------- file names


@pytest.mark.parametrize("name, expected", [
    ("tile_10_20.jpg", (10.0, 20.0, 0.0)),
    ("TILE_1_2.JPG", (1.0, 2.0, 0.0)),
    ("tile_10_20_30.png", (10.0, 20.0, 30.0)),
    ("tile_-12.5_7.25.tif", (-12.5, 7.25, 0.0)),
    ("scan_3_-4_-1.5.jpeg", (3.0, -4.0, -1.5)),
    ("1.5_-2.jpg", (1.5, -2.0, 0.0)),
    ("my scan 100_200.png", (100.0, 200.0, 0.0)),
    ("2025-01-01_10_20.jpg", (10.0, 20.0, 0.0)),
    ("tile_0007.jpg", None),
    ("tile.jpg", None),
    ("tile_a_b.jpg", None),
])
def test_position_from_filename(name, expected):
    assert position_from_filename(name) == expected


@settings(max_examples=60, deadline=None)
@given(x=st.integers(-10**6, 10**6), y=st.integers(-10**6, 10**6),
       fx=st.integers(0, 999), fy=st.integers(0, 999), z=st.none() | st.integers(-50, 50),
       prefix=st.sampled_from(["tile", "img", "a b", "Scan-3"]))
def test_position_from_filename_property(x, y, fx, fy, z, prefix):
    sx, sy = f"{x}.{fx:03d}", f"{y}.{fy:03d}"
    name = f"{prefix}_{sx}_{sy}" + (f"_{z}" if z is not None else "") + ".jpg"
    assert position_from_filename(name) == (float(sx), float(sy), float(z or 0))


def test_filename_positions_x_is_column_y_is_row(tmp_path, texture):
    names = ["tile_0_0.png", "tile_50.5_-3.png", "tile_-7_33.25_2.png"]
    for k, name in enumerate(names):
        write_png(tmp_path / name, texture(k))
    set_mtimes([tmp_path / n for n in names])
    scan = load_quiet(tmp_path)
    assert names_of(scan) == names
    assert scan.position_source == "filename"
    np.testing.assert_allclose(scan.stage_xy, [(0, 0), (50.5, -3), (-7, 33.25)])
    np.testing.assert_allclose(scan.stage_px, [(0, 0), (-3, 50.5), (33.25, -7)])
    np.testing.assert_allclose(scan.csm, [[0, 1], [1, 0]])
    assert scan.csm_calibration_width is None
    assert scan.pixel_size_um is None


# ----------------------------------------------------------------------------- TileConfiguration


FIJI_HEADER = ("# Define the number of dimensions we are working on\ndim = 2\n\n"
               "# Define the image coordinates\n")


@pytest.mark.parametrize("config_name", ["TileConfiguration.txt", "tile_config.txt"])
def test_tile_configuration_positions(tmp_path, texture, config_name):
    positions = {"img_a.png": (0.0, 0.0), "img_b.png": (41.5, 2.0), "img_c.png": (-3.0, 30.25)}
    lines = [f"{name}; ; ({x}, {y})" for name, (x, y) in positions.items()]
    (tmp_path / config_name).write_text(FIJI_HEADER + "\n".join(lines) + "\n")
    for k, name in enumerate(positions):
        write_png(tmp_path / name, texture(k))
    set_mtimes([tmp_path / n for n in positions])
    scan = load_quiet(tmp_path)
    assert names_of(scan) == list(positions)
    assert scan.position_source == "tile-configuration"
    np.testing.assert_allclose(scan.stage_px, [(y, x) for x, y in positions.values()])


def test_tile_configuration_beats_filename(tmp_path, texture):
    # The names carry positions too; the configuration must win. (A 3D layout,
    # dim = 3, is refused: tests/test_dropin.py.)
    (tmp_path / "TileConfiguration.txt").write_text(
        "dim = 2\n"
        "tile_500_500.png; ; (10.0, 20.0)\n"
        "tile_600_600.png;;(70.0,25.0)\n")
    for k, name in enumerate(["tile_500_500.png", "tile_600_600.png"]):
        write_png(tmp_path / name, texture(k))
    set_mtimes([tmp_path / "tile_500_500.png", tmp_path / "tile_600_600.png"])
    scan = load_quiet(tmp_path)
    np.testing.assert_allclose(scan.stage_px, [(20.0, 10.0), (25.0, 70.0)])


def test_tile_configuration_lists_only_some_tiles(tmp_path, texture):
    (tmp_path / "TileConfiguration.txt").write_text(FIJI_HEADER + "p.png; ; (12, 34)\n")
    write_png(tmp_path / "p.png", texture(0))
    write_png(tmp_path / "q_50_60.png", texture(1))
    write_png(tmp_path / "r.png", texture(2))
    set_mtimes([tmp_path / n for n in ["p.png", "q_50_60.png", "r.png"]])
    with pytest.warns(OfstitchWarning, match="r.png"):
        scan = load_scan(tmp_path)
    assert names_of(scan) == ["p.png", "q_50_60.png"]
    np.testing.assert_allclose(scan.stage_px, [(34, 12), (60, 50)])


def test_read_tile_configuration(tmp_path):
    path = tmp_path / "TileConfiguration.txt"
    path.write_text(FIJI_HEADER + "a.jpg; ; (1.5, -2.5)\n# b.jpg; ; (9, 9)\n"
                    "c d.tif ; ; ( 3 , 4 )\nbad.jpg; ; (x, 1)\n")
    assert read_tile_configuration(path) == {"a.jpg": (1.5, -2.5), "c d.tif": (3.0, 4.0)}


# ----------------------------------------------------------------------------- CSM overrides

OVERRIDE = [[0.0, 1.6], [1.4, 0.1]]


def _write_v3_scan(folder: Path, texture, stage: np.ndarray, csm=CSM, resolution=(600, 800)):
    for k, (x, y) in enumerate(stage.tolist()):
        write_jpeg(folder / f"t{k}.jpg", texture(k),
                   exif_dict(v3_comment(x, y, 0, csm, list(resolution)),
                             when=BASE_TIME + timedelta(seconds=k)))


@pytest.mark.parametrize("width", [416, 1000])
def test_settings_csm_and_width_override_metadata(tmp_path, texture, width):
    m = np.array(OVERRIDE) * width / TW
    _write_v3_scan(tmp_path, texture, PIXELS @ m)
    scan = load_quiet(tmp_path, StitchSettings(csm_matrix=OVERRIDE, csm_calibration_width=width))
    np.testing.assert_allclose(scan.csm, m, rtol=1e-12)
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-9)
    assert scan.csm_calibration_width == width


def test_settings_calibration_width_zero_leaves_matrix_unscaled(tmp_path, texture):
    m = np.array(OVERRIDE)
    _write_v3_scan(tmp_path, texture, PIXELS @ m)
    scan = load_quiet(tmp_path, StitchSettings(csm_matrix=OVERRIDE, csm_calibration_width=0))
    np.testing.assert_allclose(scan.csm, m)
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-9)


def test_settings_calibration_width_only_rescales_file_csm(tmp_path, texture):
    m = np.array(CSM) * 300 / TW
    _write_v3_scan(tmp_path, texture, PIXELS @ m, resolution=(600, 800))
    scan = load_quiet(tmp_path, StitchSettings(csm_calibration_width=300))
    np.testing.assert_allclose(scan.csm, m, rtol=1e-12)
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-9)


def test_settings_calibration_width_zero_with_file_csm(tmp_path, texture):
    _write_v3_scan(tmp_path, texture, PIXELS @ np.array(CSM))
    scan = load_quiet(tmp_path, StitchSettings(csm_calibration_width=0))
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-9)


def test_settings_csm_on_filename_positions(tmp_path, texture):
    m = np.array(OVERRIDE)
    stage = np.array([[0.0, 0.0], [12.0, -30.0]])
    names = [f"t_{x:g}_{y:g}.png" for x, y in stage.tolist()]
    for k, name in enumerate(names):
        write_png(tmp_path / name, texture(k))
    set_mtimes([tmp_path / n for n in names])
    scan = load_quiet(tmp_path, StitchSettings(csm_matrix=OVERRIDE))
    np.testing.assert_allclose(scan.csm, m)
    np.testing.assert_allclose(scan.stage_px, stage @ np.linalg.inv(m), atol=1e-9)


def test_suggested_csm_round_trips_with_its_calibration_width(tmp_path, texture):
    m = np.array(CSM) * 800 / TW
    _write_v3_scan(tmp_path, texture, PIXELS @ m, resolution=(600, 800))
    from_metadata = load_quiet(tmp_path)
    # The matrix at the calibration width, as Registration.suggested_csm reports it.
    at_calibration = from_metadata.csm * TW / from_metadata.csm_calibration_width
    passed_back = tuple(tuple(row) for row in at_calibration.tolist())
    scan = load_quiet(tmp_path, StitchSettings(
        csm_matrix=passed_back, csm_calibration_width=from_metadata.csm_calibration_width))
    np.testing.assert_allclose(scan.csm, from_metadata.csm, rtol=1e-9)
    np.testing.assert_allclose(scan.stage_px, PIXELS, atol=1e-6)


@pytest.mark.parametrize("singular", [[[1.0, 2.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
def test_singular_settings_csm_raises(tmp_path, texture, singular):
    _write_v3_scan(tmp_path, texture, PIXELS @ np.array(CSM))
    with pytest.raises(MetadataError):
        load_scan(tmp_path, StitchSettings(csm_matrix=singular))


# ----------------------------------------------------------------------------- z-stacks


def _blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    return _image(arr).gaussblur(sigma).cast("uchar").numpy()


@pytest.mark.parametrize("sharp_index", [0, 1, 2])
def test_z_stack_keeps_sharpest_filename(tmp_path, texture, sharp_index):
    sharp = texture(3)
    zs = [-2.5, 0, 4]  # name order of the stack files
    stack = [tmp_path / f"zs_100_200_{z:g}.jpg" for z in zs]
    sigmas = [1.5, 3.0]
    for k, path in enumerate(stack):
        if k == sharp_index:
            write_jpeg(path, sharp, q=75)
        else:
            # Blurred and padded: larger files than the sharp one.
            write_jpeg(path, _blur(sharp, sigmas.pop()), exif_dict(padding=20000), q=100)
    others = [write_jpeg(tmp_path / "a_0_0.jpg", texture(0)),
              write_jpeg(tmp_path / "b_300_0.jpg", texture(1))]
    sizes = [p.stat().st_size for p in stack]
    assert all(s > sizes[sharp_index] for k, s in enumerate(sizes) if k != sharp_index)
    # Modification times against the name order.
    set_mtimes(others + list(reversed(stack)))
    scan = load_quiet(tmp_path)
    kept = [n for n in names_of(scan) if n.startswith("zs_")]
    assert kept == [stack[sharp_index].name]
    assert sorted(names_of(scan)) == sorted([o.name for o in others] + kept)
    row = names_of(scan).index(kept[0])
    assert tuple(scan.stage_px[row]) == pytest.approx((200.0, 100.0))


def test_z_stack_keeps_sharpest_exif(tmp_path, texture):
    sharp = texture(2)
    for k, (z, image, pad) in enumerate([(-10.0, _blur(sharp, 2.0), 20000),
                                         (0.0, sharp, 0),
                                         (10.0, _blur(sharp, 4.0), 20000)]):
        exif = exif_dict(v3_comment(500.0, 600.0, z), when=BASE_TIME + timedelta(seconds=k),
                         padding=pad)
        write_jpeg(tmp_path / f"s{k}.jpg", image, exif, q=100 if pad else 70)
    write_jpeg(tmp_path / "s9.jpg", texture(5),
               exif_dict(v3_comment(540.0, 600.0, 0.0), when=BASE_TIME + timedelta(seconds=9)))
    scan = load_quiet(tmp_path)
    assert names_of(scan) == ["s1.jpg", "s9.jpg"]


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("bands", [1, 3])
@pytest.mark.parametrize("depth", [8, 16])
def test_formats_load(tmp_path, texture, ext, bands, depth):
    for k in range(2):
        arr = texture(k)
        if bands == 1:
            arr = arr.mean(axis=2).astype(np.uint8)
        image = _image(arr)
        if depth == 16:
            image = (image.cast("ushort") * 257).cast("ushort")
            image = image.copy(interpretation="grey16" if bands == 1 else "rgb16")
        path = tmp_path / f"t_{40 * k}_0{ext}"
        image.write_to_file(str(path))
        header = pyvips.Image.new_from_file(str(path))
        assert (header.bands, header.format) == (bands, "ushort" if depth == 16 else "uchar")
    scan = load_quiet(tmp_path)
    assert len(scan) == 2
    assert scan.tile_shape == (TH, TW)
    assert scan.bands == bands
    assert scan.bit_depth == depth


def test_grey_jpeg_scan(make_synthetic):
    sc = make_synthetic(layout="v3", grid=(1, 3), tile_shape=(TH, TW), grey=True, noise=0.0)
    scan = load_quiet(sc.folder)
    assert scan.bands == 1
    assert scan.bit_depth == 8


@pytest.mark.parametrize("kind", ["rgba-png", "gif"])
def test_alpha_band_is_not_a_colour_band(tmp_path, texture, kind):
    for k in range(2):
        arr = texture(k)
        path = tmp_path / f"t_{40 * k}_0.{'png' if kind == 'rgba-png' else 'gif'}"
        if kind == "rgba-png":
            write_png(path, np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]))
        else:
            _image(arr).gifsave(str(path))
    scan = load_quiet(tmp_path)
    assert scan.bands == 3


# ----------------------------------------------------------------------------- bad files


def test_mixed_tile_sizes_skip_the_odd_one(tmp_path, texture):
    names = ["a_0_0.jpg", "b_40_0.jpg", "c_80_0.jpg"]
    for k, name in enumerate(names):
        write_jpeg(tmp_path / name, texture(k))
    write_jpeg(tmp_path / "odd_0_30.jpg", texture(4, shape=(TH + 2, TW)))
    set_mtimes([tmp_path / n for n in ["odd_0_30.jpg", *names]])
    with pytest.warns(OfstitchWarning, match="odd_0_30.jpg"):
        scan = load_scan(tmp_path)
    assert names_of(scan) == names
    assert scan.tile_shape == (TH, TW)


def test_majority_size_wins_even_when_first_file_differs(tmp_path, texture):
    # The first file (by name and by time) has the odd size.
    write_png(tmp_path / "a_0_0.png", texture(0, shape=(TW, TH)))
    for k, name in enumerate(["b_40_0.png", "c_80_0.png"]):
        write_png(tmp_path / name, texture(k + 1))
    set_mtimes([tmp_path / n for n in ["a_0_0.png", "b_40_0.png", "c_80_0.png"]])
    with pytest.warns(OfstitchWarning, match="a_0_0.png"):
        scan = load_scan(tmp_path)
    assert names_of(scan) == ["b_40_0.png", "c_80_0.png"]
    assert scan.tile_shape == (TH, TW)


def test_empty_file_is_skipped_with_warning(tmp_path, texture):
    write_jpeg(tmp_path / "a_0_0.jpg", texture(0))
    write_jpeg(tmp_path / "b_40_0.jpg", texture(1))
    (tmp_path / "empty_80_0.jpg").write_bytes(b"")
    with pytest.warns(OfstitchWarning, match="empty_80_0.jpg"):
        scan = load_scan(tmp_path)
    assert sorted(names_of(scan)) == ["a_0_0.jpg", "b_40_0.jpg"]


def test_garbage_jpeg_is_skipped_with_warning(tmp_path, texture):
    write_jpeg(tmp_path / "a_0_0.jpg", texture(0))
    write_jpeg(tmp_path / "b_40_0.jpg", texture(1))
    good = (tmp_path / "a_0_0.jpg").read_bytes()
    (tmp_path / "bad_80_0.jpg").write_bytes(good[:40])  # cut inside the header
    (tmp_path / "junk_120_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.warns(OfstitchWarning) as record:
        scan = load_scan(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "bad_80_0.jpg" in messages
    assert "junk_120_0.png" in messages
    assert sorted(names_of(scan)) == ["a_0_0.jpg", "b_40_0.jpg"]


@pytest.fixture
def truncated_scan(tmp_path, texture) -> Path:
    """Two good JPEG tiles and one cut off half-way through its entropy-coded data."""
    write_jpeg(tmp_path / "a_0_0.jpg", texture(0))
    write_jpeg(tmp_path / "b_40_0.jpg", texture(1))
    data = (tmp_path / "b_40_0.jpg").read_bytes()
    sos = data.index(b"\xff\xda")
    (tmp_path / "cut_80_0.jpg").write_bytes(data[:(sos + len(data)) // 2])
    return tmp_path


def test_truncated_jpeg_really_is_unreadable(truncated_scan):
    with pytest.raises(TileReadError):
        read_grey(truncated_scan / "cut_80_0.jpg")


def test_truncated_jpeg_is_skipped_with_warning(truncated_scan):
    with pytest.warns(OfstitchWarning, match="cut_80_0.jpg"):
        scan = load_scan(truncated_scan)
    assert sorted(names_of(scan)) == ["a_0_0.jpg", "b_40_0.jpg"]


def test_images_left_out_for_an_output_word_are_reported_once(tmp_path):
    """'stage_01.jpg' holds the output word 'stage': left out, with one warning that counts
    them and gives an example; the outputs of a stitch are left out in silence."""
    from ofstitch.scan import find_image_files

    for name in ("tile_0_0.jpg", "tile_0_100.jpg", "stage_01.jpg", "stage_02.jpg",
                 "preview.jpg", "scan_stitched.jpg", "stitched_from_stage.jpg",
                 "stitching_inputs.png"):
        (tmp_path / name).write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_image_files(tmp_path)
    assert [p.name for p in found] == ["tile_0_0.jpg", "tile_0_100.jpg"]
    messages = [str(w.message) for w in caught if issubclass(w.category, OfstitchWarning)]
    assert len(messages) == 1, messages
    assert "2 image file(s)" in messages[0] and "'stage_01.jpg'" in messages[0]
