"""Robustness: a catalogue of bad inputs, each driven through the ``ofstitch`` command line.

Every entry starts from a small good scan (3x3 tiles of 160x120 px cut with 30% overlap
from tissue of the real H&E image, positioned by their ``tile_X_Y`` names, or a
:func:`ofstitch.synthetic.make_scan` scan with OpenFlexure EXIF) and adds one bad thing.
The defined outcome of each entry is one of:

(a) **skip**: the bad file is skipped with a ``warning:`` line on stderr that names it and
    says why, and the run finishes (exit code 0) with the tiles that remain;
(b) **stop**: exactly one line on stderr starting ``ofstitch: error:`` (after the warnings
    of any files skipped first), exit code 2, no traceback; ``--debug`` shows the traceback.

Most runs call :func:`ofstitch.cli.main` in this process (:func:`run_main`: fast); the
decompression bombs, the ``--debug`` checks, the stderr-noise checks and the check that
inputs are never modified run ``python -m ofstitch.cli`` in a real process
(:func:`run_cli`), with a timeout and a cap on its address space. Entries where ofstitch
does not behave as catalogued yet are ``xfail(strict=True)`` with the bug in the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import piexif
import pytest
import pyvips
from cli_helpers import run_main

from ofstitch.cache import CACHE_NAME, FORMAT, VERSION
from ofstitch.settings import CorrelationSettings
from ofstitch.synthetic import make_scan

TILE_SHAPE = (120, 160)  # (height, width)
STEP = (84, 112)  # (row, col) between neighbours: 30% overlap
GRID = (3, 3)  # (rows, cols)
EXTENT = (STEP[0] * (GRID[0] - 1) + TILE_SHAPE[0], STEP[1] * (GRID[1] - 1) + TILE_SHAPE[1])
MARGIN = 64  # around the grid in the tissue crop (make_scan needs room for stage errors)
DEFAULT_KEY = CorrelationSettings().key()
N_PAIRS = 12  # pairs of a 3x3 grid at 30% overlap: 6 horizontal, 6 vertical
# Robust placement also correlates the null pairs: tiles two steps apart, one per row and
# one per column of a 3x3 grid.
N_ENTRIES = N_PAIRS + 6
PLOTS = {"stitching_inputs.png", "stitching_correlations.png",
         "stitching_residuals.png"}
PREVIEW_OUTPUTS = {"preview.jpg", "stitched_thumbnail.jpg", "OFMTileConfiguration.txt"} | PLOTS
ADDRESS_SPACE_CAP = 6 << 30  # bytes; a bomb decoded for real needs tens of GiB
FIJI_LINE = re.compile(r"^(?P<name>[^;]+); ; \((?P<x>-?[\d.]+), (?P<y>-?[\d.]+)\)$")


# ----------------------------------------------------------------------------- running


def _cap_address_space() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m ofstitch.cli ARGS`` in a real process, wide terminal, no colour, its
    address space capped (so a decompression bomb cannot take the machine down)."""
    env = dict(os.environ, COLUMNS="1000", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "ofstitch.cli", *map(str, args)], input="",
                          capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=_cap_address_space)




def stitch(folder: Path, capsys, *extra) -> tuple[subprocess.CompletedProcess, Path]:
    """Stitch ``folder`` in-process into a fresh output folder beside it."""
    out = folder.parent / f"{folder.name}-out"
    return run_main(folder, "-o", out, "-q", *extra, capsys=capsys), out


# ----------------------------------------------------------------------------- checks


def _details(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_finished(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, _details(result)
    assert "Traceback" not in result.stderr + result.stdout, _details(result)
    assert "ofstitch: error" not in result.stderr, _details(result)


def assert_skipped(result: subprocess.CompletedProcess, name: str, reason: str) -> str:
    """(a): exit 0, no traceback, a warning line naming ``name`` whose text matches the
    regular expression ``reason``. Returns that line."""
    assert_finished(result)
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("warning:") and name in line]
    assert lines, f"no warning names {name}\n{_details(result)}"
    # The reason must be in ofstitch's words, not in a path (test names hold words too).
    matching = [line for line in lines if re.search(reason, re.sub(r'"[^"]*"|/\S+', "", line))]
    assert matching, f"no warning about {name} says /{reason}/:\n{_details(result)}"
    return matching[0]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str,
                      after_warnings: bool = False) -> str:
    """(b): exit 2, no traceback, exactly one ``ofstitch: error:`` line on stderr (preceded
    only by ``warning:`` lines when ``after_warnings``), holding each fragment."""
    assert result.returncode == 2, _details(result)
    assert "Traceback" not in result.stderr + result.stdout, _details(result)
    lines = result.stderr.splitlines()
    if after_warnings:
        assert lines and all(line.startswith("warning:") for line in lines[:-1]), \
            _details(result)
        lines = lines[-1:]
    assert len(lines) == 1, _details(result)
    assert lines[0].startswith("ofstitch: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def placed(out: Path) -> set[str]:
    """The tiles listed in the OFMTileConfiguration.txt written into ``out``."""
    names = set()
    for line in (out / "OFMTileConfiguration.txt").read_text().splitlines():
        match = FIJI_LINE.match(line)
        if match:
            assert match["name"] not in names, f"{match['name']} listed twice"
            names.add(match["name"])
    return names


def positions(out: Path) -> dict[str, tuple[float, float]]:
    """``{name: (x, y)}`` from the OFMTileConfiguration.txt written into ``out``."""
    found = {}
    for line in (out / "OFMTileConfiguration.txt").read_text().splitlines():
        match = FIJI_LINE.match(line)
        if match:
            found[match["name"]] = (float(match["x"]), float(match["y"]))
    return found


def mosaic(out: Path) -> np.ndarray:
    """The full-resolution mosaic written into ``out``, as an (h, w, bands) uint8 array."""
    (path,) = out.glob("*_stitched.jpg")
    return pyvips.Image.new_from_file(str(path)).numpy()


# ----------------------------------------------------------------------------- scans


@pytest.fixture(scope="session")
def tissue(source_image) -> np.ndarray:
    """The window of the source image with the most tissue, big enough for a 3x3 scan plus
    a margin: sharpness (z-stacks) and colour (grey tiles) checks need texture."""
    grey = source_image[..., :3].mean(axis=2)
    h, w = EXTENT[0] + 2 * MARGIN, EXTENT[1] + 2 * MARGIN
    _, r, c = max(((grey[r:r + h:4, c:c + w:4] < 200).mean(), r, c)
                  for r in range(0, grey.shape[0] - h, 40) for c in range(0, grey.shape[1] - w, 40))
    return np.ascontiguousarray(source_image[r:r + h, c:c + w, :3])


def grid_names(ext: str = ".png") -> list[str]:
    """Names of the 3x3 grid's tiles: ``tile_X_Y`` with X the column and Y the row (px)."""
    return [f"tile_{c * STEP[1]}_{r * STEP[0]}{ext}"
            for r in range(GRID[0]) for c in range(GRID[1])]


def crop(tissue: np.ndarray, x: int, y: int, shape=TILE_SHAPE) -> np.ndarray:
    """The tile whose top-left corner is at grid pixel ``(x, y)``."""
    return np.ascontiguousarray(tissue[MARGIN + y:MARGIN + y + shape[0],
                                       MARGIN + x:MARGIN + x + shape[1]])


def write_image(path: Path, array: np.ndarray) -> Path:
    image = pyvips.Image.new_from_array(array if array.ndim == 2 else
                                        (array if array.shape[2] > 1 else array[..., 0]))
    if array.dtype == np.uint16:  # else libvips saves a 'b-w' image as 8 bits
        image = image.copy(interpretation="grey16" if image.bands == 1 else "rgb16")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.jpegsave(str(path), Q=90, strip=True)
    else:
        image.write_to_file(str(path))
    return path


def write_grid(folder: Path, tissue: np.ndarray, ext: str = ".png") -> list[str]:
    """A good 3x3 scan positioned by file name, with increasing modification times."""
    folder.mkdir(parents=True, exist_ok=True)
    names = grid_names(ext)
    for k, name in enumerate(names):
        x, y = (int(v) for v in name.rsplit(".", 1)[0].split("_")[1:3])
        write_image(folder / name, crop(tissue, x, y))
        os.utime(folder / name, ns=(1_700_000_000 * 10**9 + k * 10**9,) * 2)
    return names


def exif_scan(folder: Path, tissue: np.ndarray, **kwargs):
    """A 3x3 JPEG scan with OpenFlexure v3 EXIF (stage steps and a CSM), via make_scan.

    Tile ``names[0]`` is captured first (its CSM is the scan's); ``names[8]`` is a corner.
    """
    return make_scan(folder, source=tissue, grid=GRID, tile_shape=TILE_SHAPE, seed=3,
                     **kwargs)


def usercomment(path: Path) -> dict:
    return json.loads(piexif.load(str(path))["Exif"][piexif.ExifIFD.UserComment])


def set_usercomment(path: Path, raw: bytes | dict) -> None:
    """Replace a JPEG's EXIF UserComment, keeping its capture time."""
    exif = piexif.load(str(path))
    exif["Exif"][piexif.ExifIFD.UserComment] = raw if isinstance(raw, bytes) else \
        json.dumps(raw).encode()
    piexif.insert(piexif.dump(exif), str(path))


def png_bomb(good_png: bytes, width: int = 100_000, height: int = 100_000) -> bytes:
    """A small valid PNG whose IHDR claims ``width`` x ``height`` pixels (CRC fixed)."""
    assert good_png[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + good_png[24:29]
    return good_png[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) \
        + good_png[33:]


def jpeg_bomb(good_jpeg: bytes, width: int = 65_000, height: int = 65_000) -> bytes:
    """A small JPEG whose SOF header claims ``width`` x ``height`` pixels."""
    sof = 2
    while good_jpeg[sof + 1] not in (0xC0, 0xC1, 0xC2):  # walk the marker segments
        sof += 2 + struct.unpack(">H", good_jpeg[sof + 2:sof + 4])[0]
    return good_jpeg[:sof + 5] + struct.pack(">HH", height, width) + good_jpeg[sof + 9:]


def noise_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def scan_data_start(jpeg: bytes) -> int:
    """Offset of the first entropy-coded byte of a baseline JPEG (after the SOS header)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]


# ----------------------------------------------------------------------------- (a) unreadable files

# name: (extension of the good scan, builder(folder, tissue) -> (bad file, reason regex)).
# The builder either adds a file beside the 9 good tiles or spoils one of them.
Builder = Callable[[Path, np.ndarray], tuple[str, str]]


def _garbage_jpeg(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_336_84.jpg").write_bytes(noise_bytes(5000))
    return "tile_336_84.jpg", "cannot read"


def _jpeg_cut_in_middle(folder: Path, tissue) -> tuple[str, str]:
    cut(folder / "tile_224_168.jpg", 0.5)
    return "tile_224_168.jpg", "truncated|cannot read"


def _jpeg_cut_in_header(folder: Path, tissue) -> tuple[str, str]:
    path = folder / "tile_224_168.jpg"
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\xff\xda")])  # before its image data starts
    return "tile_224_168.jpg", "truncated|cannot read"


def _jpeg_cut_near_end(folder: Path, tissue) -> tuple[str, str]:
    cut(folder / "tile_224_168.jpg", 0.97)
    return "tile_224_168.jpg", "truncated"


def _png_cut_in_middle(folder: Path, tissue) -> tuple[str, str]:
    cut(folder / "tile_224_168.png", 0.5)
    return "tile_224_168.png", "truncated"


def _garbage_tiff(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_336_84.tif").write_bytes(b"II*\x00" + noise_bytes(3000))
    return "tile_336_84.tif", "cannot read"


def _tiff_cut_in_middle(folder: Path, tissue) -> tuple[str, str]:
    path = write_image(folder / "tile_336_84.tif", crop(tissue, 224, 84))
    cut(path, 0.5)
    return "tile_336_84.tif", "cannot read"


def _empty_file(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_336_84.png").write_bytes(b"")
    return "tile_336_84.png", "is empty|cannot read"


def _text_as_png(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_336_84.png").write_text("Stage log\nx=0 y=0\n" * 50)
    return "tile_336_84.png", "cannot read"


def _pdf_as_jpeg(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_336_84.jpg").write_bytes(
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
        b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")
    return "tile_336_84.jpg", "cannot read"


def _odd_size(folder: Path, tissue) -> tuple[str, str]:
    (folder / "tile_112_84.png").unlink()
    write_image(folder / "tile_112_84.png", crop(tissue, 112, 84, shape=(100, 200)))
    return "tile_112_84.png", r"200x100 px but most tiles are 160x120"


UNREADABLE: dict[str, tuple[str, Builder]] = {
    "garbage-bytes-as-jpeg": (".png", _garbage_jpeg),
    "jpeg-cut-in-the-middle": (".jpg", _jpeg_cut_in_middle),
    "jpeg-cut-in-its-header": (".jpg", _jpeg_cut_in_header),
    "jpeg-cut-near-its-end": (".jpg", _jpeg_cut_near_end),
    "png-cut-in-the-middle": (".png", _png_cut_in_middle),
    "garbage-tiff": (".png", _garbage_tiff),
    "tiff-cut-in-the-middle": (".png", _tiff_cut_in_middle),
    "empty-file": (".png", _empty_file),
    "text-as-png": (".png", _text_as_png),
    "pdf-as-jpeg": (".png", _pdf_as_jpeg),
    "odd-tile-size": (".png", _odd_size),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_file_is_skipped(case, tmp_path, tissue, capsys):
    ext, build = UNREADABLE[case]
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue, ext)
    bad, reason = build(folder, tissue)
    result, out = stitch(folder, capsys)
    assert_skipped(result, bad, reason)
    assert placed(out) == set(names) - {bad}
    assert {p.name for p in out.iterdir()} == PREVIEW_OUTPUTS | {"scan_stitched.jpg"}


def test_unreadable_file_from_a_real_process(tmp_path, tissue):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue, ".jpg")
    bad, reason = _jpeg_cut_in_middle(folder, tissue)
    result = run_cli(folder, "-o", tmp_path / "out", "-q")
    assert_skipped(result, bad, reason)
    assert placed(tmp_path / "out") == set(names) - {bad}


def test_empty_file_warning_says_it_is_empty(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    bad, _ = _empty_file(folder, tissue)
    result, _ = stitch(folder, capsys)
    assert_skipped(result, bad, "is empty")


# Corrupt data behind an intact header: the header check passes, decoding fails later;
# the tile is left out of the mosaic (its neighbours cover its place).
CORRUPT_DATA_REASON = r"(leaving out|skipping).*cannot (read|decode)"


def _corrupt_jpeg_data(folder: Path, tissue) -> tuple[str, str]:
    path = folder / "tile_112_84.jpg"
    data = bytearray(path.read_bytes())
    start = scan_data_start(bytes(data))
    middle = (start + len(data)) // 2
    data[middle:middle + 2] = b"\xff\xd9"  # an end-of-image marker half-way through
    path.write_bytes(bytes(data))
    return "tile_112_84.jpg", CORRUPT_DATA_REASON


def _corrupt_png_data(folder: Path, tissue) -> tuple[str, str]:
    path = folder / "tile_112_84.png"
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 100:idat + 600] = noise_bytes(500, seed=1)
    path.write_bytes(bytes(data))
    return "tile_112_84.png", CORRUPT_DATA_REASON


@pytest.mark.parametrize("ext, build", [(".jpg", _corrupt_jpeg_data),
                                        (".png", _corrupt_png_data)], ids=["jpeg", "png"])
def test_corrupt_image_data_behind_a_good_header_is_skipped(ext, build, tmp_path, tissue,
                                                            capsys, monkeypatch):
    from ofstitch import render

    def second_pass(*args, **kwargs):
        raise AssertionError("the mosaic was written twice to find the bad tile")

    # The mosaic leaves the tile out as it meets it: one pass, one warning.
    monkeypatch.setattr(render, "find_undecodable", second_pass)
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue, ext)
    bad, reason = build(folder, tissue)
    result, out = stitch(folder, capsys)
    assert_skipped(result, bad, reason)
    assert sum(line.startswith(f"warning: leaving out {bad}")
               for line in result.stderr.splitlines()) == 1, _details(result)
    assert placed(out) >= set(names) - {bad}  # it may stay, placed from the stage


def _only_ofstitch_lines(stderr: str) -> list[str]:
    """The stderr lines that are not ofstitch's own (warnings, errors)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("warning: skipping", "ofstitch:"))]


@pytest.mark.parametrize("build", [
    pytest.param(_jpeg_cut_in_header, id="jpeg-cut-in-its-header"),
    pytest.param(_tiff_cut_in_middle, id="tiff-cut-in-the-middle"),
])
def test_skipping_prints_nothing_but_the_warning(build, tmp_path, tissue):
    """libvips' log records and Pillow's warnings about a skipped file stay off stderr."""
    folder = tmp_path / "scan"
    write_grid(folder, tissue, ".jpg")
    bad, reason = build(folder, tissue)
    result = run_cli(folder, "-o", tmp_path / "out", "-q")
    assert_skipped(result, bad, reason)
    assert _only_ofstitch_lines(result.stderr) == []


# ----------------------------------------------------------------------------- (a) mixed tiles


def test_grey_tile_among_rgb_is_used_as_grey(tmp_path, tissue, capsys):
    """One single-band tile in an RGB scan: stitched (decoded to grey, rendered as RGB)."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    (folder / "tile_112_84.png").unlink()
    grey = crop(tissue, 112, 84).mean(axis=2).round().astype(np.uint8)
    write_image(folder / "tile_112_84.png", grey)
    result, out = stitch(folder, capsys)
    assert_finished(result)
    assert result.stderr == ""
    assert placed(out) == set(names)
    image = mosaic(out).astype(int)
    assert image.shape[2] == 3

    def spread(r: int, c: int) -> float:  # colour of the 40x40 window at a tile's centre
        win = image[r + 40:r + 80, c + 60:c + 100]
        return float(np.abs(win - win.mean(axis=2, keepdims=True)).mean())

    assert spread(STEP[0], STEP[1]) < 2.0  # the grey tile
    assert spread(0, 0) > 4 * spread(STEP[0], STEP[1]) + 2.0  # a colour tile


def test_rgba_tile_among_rgb_is_used(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    rgb = crop(tissue, 112, 84)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    write_image(folder / "tile_112_84.png", rgba)
    result, out = stitch(folder, capsys)
    assert_finished(result)
    assert placed(out) == set(names)
    assert mosaic(out).shape[2] == 3


def test_16bit_tile_among_8bit_tiles_is_skipped(tmp_path, tissue, capsys):
    """8-bit and 16-bit tiles cannot share one intensity scale: the odd depth is skipped
    (before, the 16-bit tile was rendered saturated white without a word)."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    grey16 = (crop(tissue, 112, 84).mean(axis=2) * 257).round().astype(np.uint16)
    write_image(folder / "tile_112_84.png", grey16)
    assert pyvips.Image.new_from_file(str(folder / "tile_112_84.png")).format == "ushort"
    os.utime(folder / "tile_112_84.png", ns=(1_800_000_000 * 10**9,) * 2)  # captured last
    result, out = stitch(folder, capsys)
    assert_skipped(result, "tile_112_84.png", "16-bit")
    assert placed(out) == set(names) - {"tile_112_84.png"}
    assert mosaic(out)[:STEP[0], :STEP[1]].mean() < 250  # 8-bit tiles are not saturated


# ----------------------------------------------------------------------------- (a) bad metadata


def test_malformed_usercomment_json_is_skipped(tmp_path, tissue, capsys):
    scan = exif_scan(tmp_path / "scan", tissue)
    bad = scan.names[8]
    set_usercomment(scan.folder / bad, b'{"stage": {"position": {"x": 1,')
    result, out = stitch(scan.folder, capsys)
    assert_skipped(result, bad, "no stage position")
    assert placed(out) == set(scan.names) - {bad}


POSITIONS = {  # a bad stage position, and the JSON text that carries it
    "nan-x": '{"x": NaN, "y": 0, "z": 0}',
    "infinite-y": '{"x": 0, "y": Infinity, "z": 0}',
    "overflowing-x": '{"x": 1e400, "y": 0, "z": 0}',
    "missing-y": '{"x": 0, "z": 0}',
    "text-x": '{"x": "left", "y": 0}',
    "null": "null",
    "list-with-nan": "[NaN, 0, 0]",
}


@pytest.mark.parametrize("case", POSITIONS)
def test_bad_stage_position_is_skipped(case, tmp_path, tissue, capsys):
    scan = exif_scan(tmp_path / "scan", tissue)
    bad = scan.names[8]
    comment = usercomment(scan.folder / bad)
    text = json.dumps(comment)
    position = json.dumps(comment["stage"]["position"])
    assert position in text
    text = text.replace(position, POSITIONS[case])
    set_usercomment(scan.folder / bad, text.encode())
    result, out = stitch(scan.folder, capsys)
    assert_skipped(result, bad, "no stage position")
    assert placed(out) == set(scan.names) - {bad}


def _set_csm(path: Path, matrix) -> None:
    comment = usercomment(path)
    comment["camera_stage_mapping"]["image_to_stage_displacement_matrix"] = matrix
    set_usercomment(path, comment)


def test_singular_csm_in_exif_stops(tmp_path, tissue, capsys):
    scan = exif_scan(tmp_path / "scan", tissue)
    for name in scan.names:
        _set_csm(scan.folder / name, [[1, 2], [2, 4]])
    assert_user_error(stitch(scan.folder, capsys)[0], "singular", "--csm-matrix")


def test_non_numeric_csm_in_every_tile_falls_back_with_a_warning(tmp_path, tissue, capsys):
    # One stage step per pixel and no rotation, so the fallback (x = column) is right.
    scan = exif_scan(tmp_path / "scan", tissue, steps_per_px=1.0, rotation_deg=0.0)
    for name in scan.names:
        _set_csm(scan.folder / name, [["a", "b"], ["c", None]])
    result, out = stitch(scan.folder, capsys)
    assert_finished(result)
    assert placed(out) == set(scan.names)
    assert re.search(r"warning:.*(camera-to-sample|matrix|CSM)", result.stderr, re.I), \
        _details(result)


def test_non_numeric_csm_in_the_first_tile_uses_the_others(tmp_path, tissue, capsys):
    scan = exif_scan(tmp_path / "scan", tissue)
    _set_csm(scan.folder / scan.names[0], "rotate 90 degrees")
    result, out = stitch(scan.folder, capsys)
    assert_finished(result)
    assert placed(out) == set(scan.names)
    assert re.search(rf"warning:.*{re.escape(scan.names[0])}", result.stderr), _details(result)


# ----------------------------------------------------------------------------- (a) z-stacks


@pytest.mark.parametrize("twin", ["tile_112_84_5.png", "copy_112_84.png"])
def test_duplicate_position_keeps_the_sharpest(twin, tmp_path, tissue, capsys, caplog):
    """Two different images at one xy (a z-stack): the sharper is used, the other dropped,
    and the log says which was kept."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    blurred = pyvips.Image.new_from_file(str(folder / "tile_112_84.png")).gaussblur(2.0)
    blurred.cast("uchar").write_to_file(str(folder / twin))
    caplog.set_level(logging.INFO, logger="ofstitch.scan")
    out = tmp_path / "out"
    result = run_main(folder, "-o", out, capsys=capsys)
    assert_finished(result)
    assert f"Placed {len(names)} tiles" in result.stdout
    assert placed(out) == set(names)  # the sharp original, not the blurred twin
    assert "z-stack of 2 images" in caplog.text
    assert "keeping tile_112_84.png" in caplog.text


def test_single_tile_gives_outputs(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    folder.mkdir()
    write_image(folder / "tile_0_0.png", crop(tissue, 0, 0))
    result, out = stitch(folder, capsys)
    assert_finished(result)
    assert placed(out) == {"tile_0_0.png"}
    assert {p.name for p in out.iterdir()} == \
        PREVIEW_OUTPUTS - {"stitching_correlations.png", "stitching_residuals.png"} \
        | {"scan_stitched.jpg"}
    assert mosaic(out).shape[:2] == TILE_SHAPE


def test_symlink_loop_and_dangling_links_are_ignored(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    os.symlink("missing.png", folder / "tile_336_84.png")
    os.symlink(folder, folder / "itself")
    result, out = stitch(folder, capsys)
    assert_finished(result)
    assert placed(out) == set(names)
    assert all(line.startswith("warning:") for line in result.stderr.splitlines())


# ----------------------------------------------------------------------------- (a) bombs


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_decompression_bomb_is_skipped(ext, tmp_path, tissue):
    """A tiny file whose header claims 10^10 pixels: skipped quickly, never decoded.

    Runs in a real process with a timeout and its address space capped at 6 GiB.
    """
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue, ext)
    good = (folder / names[0]).read_bytes()
    bomb = f"tile_336_84{ext}"
    (folder / bomb).write_bytes(png_bomb(good) if ext == ".png" else jpeg_bomb(good))
    header = pyvips.Image.new_from_file(str(folder / bomb))
    assert header.width * header.height > 4 * 10**9  # the header really claims that
    result = run_cli(folder, "-o", tmp_path / "out", "-q", timeout=60)
    assert_skipped(result, bomb, r"decompression bomb|\d{5}x\d{5}")
    assert placed(tmp_path / "out") == set(names)


def test_mostly_decompression_bombs(tmp_path, tissue):
    """Five bombs among nine tiles: the bombs must not set the tile size."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    bombs = names[:5]
    for name in bombs:
        (folder / name).write_bytes(png_bomb((folder / name).read_bytes()))
    result = run_cli(folder, "-o", tmp_path / "out", "-q", timeout=60)
    for name in bombs:
        assert_skipped(result, name, "decompression bomb")
    assert placed(tmp_path / "out") == set(names) - set(bombs)


def test_only_a_decompression_bomb_stops(tmp_path, tissue):
    folder = tmp_path / "scan"
    folder.mkdir()
    good = write_image(folder / "tile_0_0.png", crop(tissue, 0, 0)).read_bytes()
    (folder / "tile_0_0.png").write_bytes(png_bomb(good))
    result = run_cli(folder, "-o", tmp_path / "out", "-q", timeout=60)
    assert_user_error(result, str(folder), after_warnings=True)
    assert "decompression bomb" in result.stderr


# ----------------------------------------------------------------------------- (b) stop


def _empty(tmp_path: Path, tissue) -> list:
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty", "-o", tmp_path / "out"]


def _missing(tmp_path: Path, tissue) -> list:
    return [tmp_path / "no" / "such" / "scan", "-o", tmp_path / "out"]


def _a_file(tmp_path: Path, tissue) -> list:
    names = write_grid(tmp_path / "scan", tissue)
    return [tmp_path / "scan" / names[0], "-o", tmp_path / "out"]


def _disconnected(tmp_path: Path, tissue) -> list:
    write_grid(tmp_path / "scan", tissue)
    write_image(tmp_path / "scan" / "tile_5000_5000.png", crop(tissue, 0, 0))
    return [tmp_path / "scan", "-o", tmp_path / "out"]


def _output_under_a_file(tmp_path: Path, tissue) -> list:
    write_grid(tmp_path / "scan", tissue)
    (tmp_path / "report.txt").write_text("a file, not a folder")
    return [tmp_path / "scan", "-o", tmp_path / "report.txt" / "out"]


STOPS = {  # name: (arguments from tmp_path and the tissue, fragments of the error line)
    "empty-folder": (_empty, ["no tile images"]),
    "folder-does-not-exist": (_missing, ["does not exist"]),
    "folder-is-a-file": (_a_file, ["not a folder"]),
    "not-connected": (_disconnected, ["do not overlap", "tile_5000_5000.png",
                                      "--minimum-overlap"]),
    "output-folder-under-a-file": (_output_under_a_file, ["cannot write", "-o/--output-dir"]),
}


@pytest.mark.parametrize("case", STOPS)
def test_stops_with_one_line(case, tmp_path, tissue, capsys):
    make_args, fragments = STOPS[case]
    result = run_main(*make_args(tmp_path, tissue), "-q", capsys=capsys)
    assert_user_error(result, *fragments)
    assert result.stdout == ""


@pytest.mark.parametrize("case", ["empty-folder", "not-connected", "output-folder-under-a-file"])
def test_stops_from_a_real_process_and_debug_shows_the_traceback(case, tmp_path, tissue):
    make_args, fragments = STOPS[case]
    args = make_args(tmp_path, tissue)
    assert_user_error(run_cli(*args, "-q"), *fragments)
    debug = run_cli(*args, "-q", "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert fragments[0] in debug.stderr


OPTION_VALUES = [  # a bad option value: arguments, fragment of the error line
    pytest.param(["--csm-matrix", "rotate please"], "--csm-matrix", id="csm-not-json"),
    pytest.param(["--csm-matrix", "[[NaN, 0], [0, 1]]"], "--csm-matrix", id="csm-nan"),
    pytest.param(["--csm-matrix", "[" * 5000], "--csm-matrix", id="csm-deeply-nested"),
    pytest.param(["--device-memory", "lots"], "--device-memory", id="device-memory-words"),
    pytest.param(["--device-memory", "1e308TB"], "--device-memory",
                 id="device-memory-overflowing"),
    # Absurd numbers: each names its option and the range it allows.
    pytest.param(["--resize", "1e-9"], "--resize must be in [0.01, 1]", id="resize-tiny"),
    pytest.param(["--resize", "0.05"], "too small to correlate", id="resize-tiles-too-small"),
    pytest.param(["--high-pass-sigma", "inf"], "--high-pass-sigma", id="sigma-inf"),
    pytest.param(["--high-pass-sigma", "nan"], "--high-pass-sigma", id="sigma-nan"),
    pytest.param(["--high-pass-sigma", "1e308"], "--high-pass-sigma", id="sigma-huge"),
    pytest.param(["--corr-mask-radius", "nan"], "--corr-mask-radius", id="mask-nan"),
    pytest.param(["--corr-mask-radius", "inf"], "--corr-mask-radius", id="mask-inf"),
    pytest.param(["--workers", "-1"], "--workers must be between 1", id="workers-negative"),
    pytest.param(["--min-peak-quality", "-1"], "--min-peak-quality must be in [0, 1]",
                 id="quality-negative"),
    pytest.param(["--csm-calibration-width", "1000000000"], "--csm-calibration-width",
                 id="calibration-width-huge"),
    pytest.param(["--csm-matrix", "[[0, 1e7], [1e7, 0]]"], "--csm-matrix", id="csm-huge"),
    pytest.param(["--minimum-overlap", "nan"], "--minimum-overlap", id="overlap-nan"),
]


@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--idle-timeout", "nan"], "--idle-timeout", id="idle-nan"),
    pytest.param(["--idle-timeout", "inf"], "--idle-timeout", id="idle-inf"),
    pytest.param(["--high-pass-sigma", "inf"], "--high-pass-sigma", id="sigma-inf"),
    pytest.param(["--settle-time", "-1"], "--settle-time", id="settle-negative"),
])
def test_bad_watch_option_value_stops(args, fragment, tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    result = run_main("watch", folder, *args, "-q", capsys=capsys)
    assert_user_error(result, fragment)


@pytest.mark.parametrize("args, fragment", OPTION_VALUES)
def test_bad_option_value_stops(args, fragment, tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    result, _ = stitch(folder, capsys, *args)
    assert_user_error(result, fragment)


def test_only_unreadable_files_stops(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    folder.mkdir()
    (folder / "tile_0_0.jpg").write_bytes(noise_bytes(2000))
    (folder / "tile_112_0.png").write_bytes(b"")
    result, _ = stitch(folder, capsys)
    line = assert_user_error(result, "none of the 2 image files", after_warnings=True)
    assert str(folder) in line
    assert "tile_0_0.jpg" in result.stderr and "tile_112_0.png" in result.stderr


def test_folder_that_cannot_be_read_stops(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK):
            pytest.skip("permissions are not enforced here (running as root)")
        assert_user_error(stitch(folder, capsys)[0], "cannot read the folder")
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- (a) bad cache files


def read_cache(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    return data["sets"]


CACHES = {  # what is found in ofstitch_tiling_cache.json
    "another-version": json.dumps({"format": FORMAT, "version": VERSION + 1,
                                   "sets": {DEFAULT_KEY: {"a::b": [0, 0, 1, 0, 0]}}}).encode(),
    "another-program": json.dumps({"format": "something-else", "version": VERSION}).encode(),
    "garbage-text": b"{{{ this is not JSON ]]",
    "binary": noise_bytes(4096, seed=2),
    "json-list": b"[1, 2, 3]",
    "empty": b"",
    "truncated": json.dumps({"format": FORMAT, "version": VERSION,
                             "sets": {DEFAULT_KEY: {}}}).encode()[:30],
}


@pytest.mark.parametrize("case", CACHES)
def test_bad_cache_warns_and_is_rebuilt(case, tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    (folder / CACHE_NAME).write_bytes(CACHES[case])
    result, out = stitch(folder, capsys)
    assert_skipped(result, CACHE_NAME, "ignoring the correlation cache|cannot read")
    assert placed(out) == set(names)
    sets = read_cache(folder / CACHE_NAME)  # rewritten, whole
    assert len(sets[DEFAULT_KEY]) == N_ENTRIES


def test_cache_that_is_a_folder_warns(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    (folder / CACHE_NAME).mkdir()
    result, out = stitch(folder, capsys)
    assert_skipped(result, CACHE_NAME, "cannot (read|write) the correlation cache")
    assert placed(out) == set(names)


def test_malformed_cache_entries_are_recomputed(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    assert_finished(stitch(folder, capsys)[0])
    data = json.loads((folder / CACHE_NAME).read_text())
    entries = data["sets"][DEFAULT_KEY]
    for k, key in enumerate(sorted(entries)):
        entries[key] = [[None, "x", 1, 2, 3], "shift", [1, 2, True, 0, 0], {}][k % 4]
    (folder / CACHE_NAME).write_text(json.dumps(data))
    result, out = stitch(folder, capsys)
    assert_skipped(result, CACHE_NAME, "malformed entries")
    assert placed(out) == set(names)
    assert all(len(e) == 6 for e in read_cache(folder / CACHE_NAME)[DEFAULT_KEY].values())


def test_cache_entry_with_a_huge_integer_is_recomputed(tmp_path, tissue, capsys):
    """An integer no float can hold (10**400) is a malformed entry, not a crash."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    assert_finished(stitch(folder, capsys)[0])
    data = json.loads((folder / CACHE_NAME).read_text())
    for entry in data["sets"][DEFAULT_KEY].values():
        entry[0] = 10**400
    (folder / CACHE_NAME).write_text(json.dumps(data))
    result, out = stitch(folder, capsys)
    assert_skipped(result, CACHE_NAME, "malformed entries")
    assert placed(out) == set(names)
    assert max(abs(v) for xy in positions(out).values() for v in xy) < 1000


def test_cache_with_impossible_shifts_is_not_trusted(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    assert_finished(stitch(folder, capsys)[0])
    data = json.loads((folder / CACHE_NAME).read_text())
    for entry in data["sets"][DEFAULT_KEY].values():
        entry[0] = 1e30
    (folder / CACHE_NAME).write_text(json.dumps(data))
    result, out = stitch(folder, capsys)
    assert_finished(result)
    assert "RuntimeWarning" not in result.stderr, _details(result)
    assert placed(out) == set(names)
    assert max(abs(v) for xy in positions(out).values() for v in xy) < 1000


# ----------------------------------------------------------------------------- inputs untouched


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Per file: content hash, size, modification time, inode and mode."""
    out = {}
    for path in sorted(folder.iterdir()):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[path.name] = (digest, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
    return out


def test_a_full_run_modifies_no_input(tmp_path, tissue):
    """Mode all with --stitch-tiff, outputs into the scan folder: every input keeps its
    bytes, times, inode and mode; the only new files are the cache and the outputs."""
    scan = exif_scan(tmp_path / "scan", tissue)
    (scan.folder / "notes.txt").write_text("operator notes")
    (scan.folder / "TileConfiguration.txt").write_text("dim = 2\ntile_0000.jpg; ; (0, 0)\n")
    before, parent_before = _snapshot(scan.folder), _snapshot(tmp_path)
    folder_mode = scan.folder.stat().st_mode
    result = run_cli(scan.folder, "--stitch-tiff", "-q")
    assert_finished(result)
    after = _snapshot(scan.folder)
    assert {name: after.get(name) for name in before} == before
    new = set(after) - set(before)
    outputs = PREVIEW_OUTPUTS | {"scan_stitched.jpg", "scan_stitched.ome.tiff"}
    assert outputs <= new
    assert CACHE_NAME in new
    # The cache may keep its (empty) flock file; nothing else may appear.
    assert new - outputs - {CACHE_NAME, CACHE_NAME + ".lock"} == set(), new
    assert scan.folder.stat().st_mode == folder_mode
    parent_after = _snapshot(tmp_path)
    assert set(parent_after) == set(parent_before)
    assert parent_after["scan_truth.json"] == parent_before["scan_truth.json"]


def test_a_scan_folder_with_a_very_long_name(tmp_path, tissue, capsys):
    """A 240-character folder name: every output name (and its temporary name) still fits
    the file system's 255 bytes; the prefix is shortened, nothing fails after the work."""
    folder = tmp_path / ("long" * 60)
    write_grid(folder, tissue)
    result = run_main(folder, "-q", "--format", "jpeg", "--format", "ome-zarr", capsys=capsys)
    assert result.returncode == 0, result.stderr
    stitched = [p.name for p in folder.iterdir() if "_stitched" in p.name]
    assert len(stitched) == 2 and all(len(os.fsencode(n)) <= 255 for n in stitched)
    assert all(n.startswith("long" * 50) for n in stitched)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_tile_name_that_is_not_utf8_is_stitched(tmp_path, tissue, capsys):
    """Any bytes a file system allows in a name: the tile is read and stitched (libvips
    takes names as UTF-8, so such a tile is decoded from memory), and left out of the Fiji
    file, which cannot hold its name, with a warning that shows it escaped."""
    folder = tmp_path / "scan"
    names = write_grid(folder, tissue)
    odd = os.fsdecode(b"\xff" + os.fsencode(names[4]))  # the centre tile
    os.rename(folder / names[4], folder / odd)
    result, out = stitch(folder, capsys, "--stitching-mode", "preview")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "not valid UTF-8" in result.stderr and "\\udcff" in result.stderr
    lines = [ln for ln in (out / "OFMTileConfiguration.txt").read_text().splitlines()
             if FIJI_LINE.match(ln)]
    assert len(lines) == len(names) - 1
    assert (out / "preview.jpg").stat().st_size > 1000


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs (mounted when the tests run as root, as in CI; else skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(small_disk, tmp_path, tissue):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    out = small_disk / "out"
    result = run_cli(folder, "-o", out, "-q", "--format", "ome-tiff", "--tiff-compression",
                     "deflate")
    line = assert_user_error(result, "the disk is full", "-o/--output-dir")
    assert str(out) in line
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_run_leaves_the_last_good_outputs_whole(tmp_path, tissue, monkeypatch):
    """Outputs are replaced as a set: a run that fails after writing some of its outputs
    (here: the thumbnail cannot be written) leaves every output of the previous run as it
    was, and no staging folder behind."""
    import errno

    import ofstitch
    from ofstitch import formats
    from ofstitch.settings import StitchSettings

    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    out = tmp_path / "out"
    ofstitch.stitch(folder, StitchSettings(stitching_mode="preview"), output_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (folder / grid_names()[0]).unlink()  # the next run's outputs would differ

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formats, "write_thumbnail", full)
    with pytest.raises(ofstitch.OfstitchError, match="disk is full|No space"):
        ofstitch.stitch(folder, StitchSettings(stitching_mode="preview"), output_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, tissue, capsys):
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    out = tmp_path / "scan-out"  # where stitch() below writes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / f".ofstitch-outputs.{dead.pid}.abcd1234"
    leftover.mkdir(parents=True)
    (leftover / "preview.jpg").write_bytes(b"half")
    result, _ = stitch(folder, capsys, "--stitching-mode", "preview")
    assert result.returncode == 0, result.stderr
    assert not leftover.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_debug_shows_ofstitch_lines_not_third_party_noise(tmp_path, tissue):
    """--debug used to print about 15,500 lines, almost all from matplotlib and pyvips."""
    folder = tmp_path / "scan"
    write_grid(folder, tissue)
    result = run_cli(folder, "-o", tmp_path / "out", "-q", "--debug")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("DEBUG ofstitch") or line.startswith("INFO ofstitch")
               for line in lines), result.stderr[-2000:]
    assert not [line for line in lines if "matplotlib" in line or "pyvips" in line.split()[:2]]
    assert len(lines) < 300
