"""ofstitch as a drop-in for openflexure-stitch 0.3.1, and for Fiji and ASHLAR users.

The OpenFlexure server's calls run in real processes, as the server runs them
(its stdout is a pipe, not a terminal); the many option checks run in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pyvips
from cli_helpers import run_main

from ofstitch.cache import CACHE_NAME
from ofstitch.compat import REFERENCE_OPTIONS, rewrite_argv
from ofstitch.errors import OfstitchError
from ofstitch.synthetic import make_scan

TILE_SHAPE = (120, 160)
# The files the server zips only when a scan ends (they change while it runs).
ZIP_TERMS = ("stitched.jp", "stitched_from", "stitched.om", "TileConfiguration", "tiling_cache")


def run_stitcher(*args, cwd: Path | None = None, rc: int = 0) -> subprocess.CompletedProcess:
    """``ofstitch ARGS`` in a process whose stdout and stderr are pipes, as the server runs it.

    Checks the exit code ``rc``; a user error (2) must be one line on stderr.
    """
    env = dict(os.environ)
    for name in ("FORCE_COLOR", "NO_COLOR", "COLUMNS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "ofstitch.cli", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=180)
    assert result.returncode == rc, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    if rc == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ofstitch: error:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "\x1b" not in result.stdout + result.stderr, "escape codes in a log"
    return result


def outputs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith("tile_")}


def zipped(folder: Path) -> dict[str, set[str]]:
    """The files the server's zip filter picks, by filter term."""
    return {term: {n for n in os.listdir(folder) if term in n} for term in ZIP_TERMS}


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def captured(tmp_path_factory, source_image) -> Path:
    """A finished 2x3 OpenFlexure (v3 EXIF) scan, to copy in tile by tile."""
    folder = tmp_path_factory.mktemp("captured") / "tiles"
    make_scan(folder, source=source_image, grid=(2, 3), tile_shape=TILE_SHAPE, seed=4)
    return folder


def test_the_servers_three_calls_on_a_scan_copied_in_tile_by_tile(captured, tmp_path):
    images = tmp_path / "my_scan" / "images"  # the server's layout: SCAN/images
    images.mkdir(parents=True)
    tiles = sorted(captured.iterdir())
    for k, tile in enumerate(tiles, start=1):
        shutil.copy2(tile, images / tile.name)
        if k not in (1, 2, len(tiles)):  # the calls on a few of the partial scans
            continue
        # 1. the live preview
        live = run_stitcher("--stitching_mode", "only_stage_stitch", images)
        assert (images / "stitched_from_stage.jpg").is_file(), live.stdout
        assert not (images / "preview.jpg").exists()
        assert pyvips.Image.new_from_file(str(images / "stitched_from_stage.jpg")).width <= 1000
        assert f"Placed {k} tiles" in live.stdout
        # 2. correlation as tiles arrive
        run_stitcher("--stitching_mode", "only_correlate", "--minimum_overlap", "0.27",
                     "--resize", "1", images)
    assert outputs(images) == {
        CACHE_NAME, "stitched_from_stage.jpg", "stitched_thumbnail.jpg",
        "OFMTileConfiguration.txt", "stitching_inputs.png", "stitching_correlations.png",
        "stitching_residuals.png"}

    # 3. the end of the scan, without and then with the OME-TIFF
    final = run_stitcher("--stitching_mode", "all", "--no-stitch_tiff", "--minimum_overlap",
                         "0.27", "--resize", "1", images)
    assert "0 correlated now" in final.stdout  # all from calls 1 and 2
    assert not any(".ome.tif" in n for n in os.listdir(images))
    final = run_stitcher("--stitching_mode", "all", "--stitch_tiff", "--minimum_overlap",
                         "0.27", "--resize", "1", images)
    # The reference's names, in the reference's places (the scan folder, named after
    # SCAN since the folder is 'images'), plus ofstitch's cache and residual plot.
    assert outputs(images) == {
        CACHE_NAME, "stitched_from_stage.jpg", "stitched_thumbnail.jpg",
        "OFMTileConfiguration.txt", "stitching_inputs.png", "stitching_correlations.png",
        "stitching_residuals.png", "preview.jpg", "my_scan_stitched.jpg",
        "my_scan_stitched.ome.tiff"}
    assert zipped(images) == {
        "stitched.jp": {"my_scan_stitched.jpg"},
        "stitched_from": {"stitched_from_stage.jpg"},
        "stitched.om": {"my_scan_stitched.ome.tiff"},
        "TileConfiguration": {"OFMTileConfiguration.txt"},
        # Only these are zipped when the scan ends: a file zipped mid-scan stays stale.
        "tiling_cache": {CACHE_NAME},
    }
    # The log: plain lines, progress included.
    lines = final.stdout.splitlines()
    assert any(line.startswith("Writing OME-TIFF: ") for line in lines), final.stdout
    assert any(line.startswith("Placed 6 tiles") for line in lines)


def test_progress_lines_in_a_log(captured, tmp_path):
    folder = tmp_path / "scan"
    shutil.copytree(captured, folder)
    result = run_stitcher(folder, "--stitching_mode", "preview_stitch")
    progress = [line for line in result.stdout.splitlines() if line.startswith("Correlating")]
    assert progress[0].endswith(": 0/" + progress[-1].split("/")[-1])
    assert progress[-1].split(": ")[1].split("/")[0] == progress[-1].split("/")[-1]
    assert 2 <= len(progress) <= 11
    assert result.stderr == ""
    quiet = run_stitcher(folder, "--stitching_mode", "preview_stitch", "-q")
    assert quiet.stdout == ""


# ----------------------------------------------------------------------------- the options


def test_every_reference_option_is_rewritten():
    for reference, ours in REFERENCE_OPTIONS.items():
        value = [] if "tiff" in reference or "dzi" in reference or "cached" in reference \
            else ["all"] if "mode" in reference else ["1"]
        assert rewrite_argv(["stitch", reference, *value, "x"]) == ["stitch", ours, *value, "x"]
    assert rewrite_argv(["stitch", "--stitching_mode=preview_stitch", "x"]) == \
        ["stitch", "--stitching-mode", "preview", "x"]
    assert rewrite_argv(["stitch", "--tile_size", "auto", "x", "--tile_size=4096"]) == \
        ["stitch", "x"]
    assert rewrite_argv(["stitch", "--csm_calibration_width", "832.0", "x"])[2] == "832"
    assert rewrite_argv(["stitch", "x", "--", "--stitch_tiff"])[-1] == "--stitch_tiff"
    with pytest.raises(OfstitchError, match="number of pixels or 'auto'"):
        rewrite_argv(["stitch", "--tile_size", "big", "x"])


@pytest.fixture
def tiny(tmp_path, source_image) -> Path:
    """A 2x2 scan with OpenFlexure metadata."""
    folder = tmp_path / "tiny"
    make_scan(folder, source=source_image, grid=(2, 2), tile_shape=TILE_SHAPE, seed=5)
    return folder


def _stitch(capsys, *args):
    result = run_main(*map(str, args), capsys=capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_reference_options_do_what_the_reference_does(tiny, tmp_path, capsys):
    """Each openflexure-stitch option, in its own spelling, once."""
    out = tmp_path / "out"
    shown = _stitch(capsys, tiny, "--show_cached_settings")
    assert "No cached correlation settings" in shown.stdout
    _stitch(capsys, tiny, "--stitching_mode", "only_correlate", "--pad", "--high_pass_sigma",
            "5", "--resize", "0.5", "--priority", "memory", "--corr_mask_radius", "40")
    shown = _stitch(capsys, tiny, "--show_cached_settings")
    assert "--high-pass-sigma 5.0" in shown.stdout and "--resize 0.5" in shown.stdout
    assert "--corr-mask-radius 40.0" in shown.stdout
    cached = _stitch(capsys, tiny, "--use_cached_settings", "--stitching_mode", "preview_stitch",
                     "--output_dir", out)
    assert "0 correlated now" in cached.stdout and (out / "preview.jpg").is_file()

    result = _stitch(capsys, tiny, "-o", out, "--stitching_mode", "stage_stitch",
                     "--csm_matrix", "[[0, 2], [2, 0]]", "--csm_calibration_width", "160")
    assert (out / "stitched_from_stage.jpg").is_file()
    result = _stitch(capsys, tiny, "-o", out, "--stitching_mode", "preview_stitch",
                     "--image_count", "3", "--no-pad", "--minimum_overlap", "0.1")
    assert "Placed 3 tiles" in result.stdout
    result = _stitch(capsys, tiny, "-o", out, "--stitching_mode", "preview_stitch",
                     "--thresholding_method", "automatic", "--max_stage_discrepancy", "50",
                     "--min_peak_quality", "0.1")
    # The reference's threshold search, within the hard limits.
    match = re.search(r"peak quality >= ([\d.]+), stage discrepancy <= ([\d.]+) px",
                      result.stdout)
    assert match, result.stdout
    assert float(match[1]) >= 0.1 and float(match[2]) <= 50
    result = _stitch(capsys, tiny, "--output_dir", out, "--stitching_mode", "all",
                     "--stitch_tiff", "--stitch_dzi", "--tile_size", "1024")
    names = set(os.listdir(out))
    assert {"tiny_stitched.jpg", "tiny_stitched.ome.tiff", "tiny_stitched.dzi"} <= names
    for name in ("tiny_stitched.ome.tiff", "tiny_stitched.dzi"):
        (out / name).unlink()
    _stitch(capsys, tiny, "--output_dir", out, "--no-stitch_tiff", "--no-stitch_dzi",
            "--tile_size", "auto")
    names = set(os.listdir(out))
    assert "tiny_stitched.jpg" in names and "tiny_stitched.ome.tiff" not in names
    assert "tiny_stitched.dzi" not in names


@pytest.mark.parametrize("args, fragments", [
    (["--stitching_mode", "stitch_everything"],
     ["--stitching-mode must be one of all, preview, stage, only-correlate",
      "preview_stitch, stage_stitch, only_correlate, only_stage_stitch", "stitch_everything"]),
    (["--stitching-mode", "everything"], ["only_stage_stitch"]),
    (["--stich_tiff"], ["No such option: --stich-tiff", "--stitch-tiff"]),
    (["--qqxz"], ["No such option: --qqxz", "ofstitch stitch --help"]),
    (["--priority", "speed"], ["'time'", "'memory'"]),
    (["--format", "bmp"], ["'jpeg'", "'ome-tiff'", "'dzi'", "'ome-zarr'"]),
    (["--tile_size", "large"], ["--tile_size", "'auto'"]),
])
def test_bad_options_are_one_line(tiny, capsys, args, fragments):
    result = run_main(tiny, *args, capsys=capsys)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ofstitch: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def test_help_keeps_kebab_case_and_says_underscores_work(capsys):
    result = run_main("stitch", "--help", capsys=capsys)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "openflexure-stitch 0.3.1's spellings work too" in text
    assert "--stitching-mode" in text and "--output_dir" not in text
    assert "--preview-name" not in text


def test_format_spellings(tiny, tmp_path, capsys):
    from ofstitch.settings import OUTPUT_FORMAT_ALIASES, OUTPUT_FORMATS, canonical_choice

    for spelling, fmt in [("jpg", "jpeg"), ("JPEG", "jpeg"), ("tif", "ome-tiff"),
                          ("TIFF", "ome-tiff"), ("ome.tif", "ome-tiff"), ("OME-TIFF", "ome-tiff"),
                          ("zarr", "ome-zarr"), ("ome.zarr", "ome-zarr"), ("DZI", "dzi")]:
        assert canonical_choice(spelling, OUTPUT_FORMATS, OUTPUT_FORMAT_ALIASES) == fmt
    out = tmp_path / "out"
    _stitch(capsys, tiny, "-o", out, "--format", "JPG", "-f", "ome.tif", "--format=Zarr", "-q")
    names = set(os.listdir(out))
    assert {"tiny_stitched.jpg", "tiny_stitched.ome.tiff", "tiny_stitched.ome.zarr"} <= names
    assert "tiny_stitched.dzi" not in names


def test_plain_progress_has_no_bars(tiny, capsys):
    result = _stitch(capsys, tiny, "--stitching-mode", "only-correlate")
    assert "Correlating pairs: 0/" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr
    assert np.all([":" in line for line in result.stdout.splitlines()
                   if line.startswith("Correlating")])


# ----------------------------------------------------------------------------- layouts


def cut_tiles(folder: Path, source: np.ndarray, xy: list[tuple[float, float]],
              names: list[str], tile_shape=TILE_SHAPE) -> None:
    """PNG tiles cut from ``source`` with their top-left corners at pixel ``xy``."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = tile_shape
    for (x, y), name in zip(xy, names, strict=True):
        x0, y0 = 50 + int(round(x)), 50 + int(round(y))
        crop = np.ascontiguousarray(source[y0:y0 + h, x0:x0 + w])
        pyvips.Image.new_from_array(crop).write_to_file(str(folder / name))


def grid_xy(rows: int, cols: int, overlap: float, jitter: float = 0.0, seed: int = 0,
            tile_shape=TILE_SHAPE) -> list[tuple[float, float]]:
    """Row-major ``(x, y)`` of a grid with ``overlap``, each moved by up to ``jitter`` px."""
    rng = np.random.default_rng(seed)
    h, w = tile_shape
    return [(c * w * (1 - overlap) + rng.integers(-jitter, jitter + 1),
             r * h * (1 - overlap) + rng.integers(-jitter, jitter + 1))
            for r in range(rows) for c in range(cols)]


def placed(out: Path) -> dict[str, tuple[float, float]]:
    """``{name: (x, y)}`` from the OFMTileConfiguration.txt ofstitch wrote."""
    found = {}
    for line in (out / "OFMTileConfiguration.txt").read_text().splitlines():
        match = re.match(r"^(.+?); ; \((-?[\d.]+), (-?[\d.]+)\)$", line)
        if match:
            found[match[1]] = (float(match[2]), float(match[3]))
    return found


def assert_relative_positions(found: dict, truth: dict, tolerance_px: float = 1.0) -> None:
    """The positions agree with ``truth`` up to a common shift."""
    names = sorted(truth)
    assert sorted(found) == names
    a = np.array([found[n] for n in names])
    b = np.array([truth[n] for n in names])
    error = (a - a[0]) - (b - b[0])
    assert np.abs(error).max() <= tolerance_px, dict(zip(names, error.round(2).tolist(),
                                                         strict=True))


def fiji_layout(path: Path, positions: dict[str, tuple[float, float]], dim: int = 2) -> None:
    lines = ["# Define the number of dimensions we are working on", f"dim = {dim}", "",
             "# Define the image coordinates"]
    zero = ", 0.0" if dim == 3 else ""
    lines += [f"{name}; ; ({x}, {y}{zero})" for name, (x, y) in positions.items()]
    path.write_text("\n".join(lines) + "\n")


def test_fiji_registered_layout_at_10_percent_needs_no_option(tmp_path, source_image):
    """Fiji's TileConfiguration.registered.txt is read, and a 10% overlap grid connects
    with the default --minimum-overlap."""
    xy = grid_xy(3, 3, 0.1, jitter=2)
    names = [f"x100_A{k + 1:03d}_I.png" for k in range(9)]  # no position in the names
    folder = tmp_path / "fiji"
    cut_tiles(folder, source_image, xy, names)
    truth = dict(zip(names, xy, strict=True))
    fiji_layout(folder / "TileConfiguration.registered.txt", truth)
    result = run_stitcher(folder, "-o", tmp_path / "out", "--stitching-mode", "preview")
    assert "Placed 9 tiles from 12 pairs" in result.stdout
    assert_relative_positions(placed(tmp_path / "out"), truth)


def test_layout_option_and_its_errors(tmp_path, source_image, capsys):
    xy = grid_xy(2, 2, 0.3, jitter=3, seed=1)
    names = ["a.png", "b.png", "c.png", "d.png"]
    cut_tiles(tmp_path / "scan", source_image, xy, names)
    truth = dict(zip(names, xy, strict=True))
    fiji_layout(tmp_path / "elsewhere.txt", truth)
    _stitch(capsys, tmp_path / "scan", "--layout", tmp_path / "elsewhere.txt", "-o",
            tmp_path / "out", "--stitching-mode", "preview")
    assert_relative_positions(placed(tmp_path / "out"), truth)

    def error(*args) -> str:
        result = run_main(tmp_path / "scan", "-o", tmp_path / "out", *args, capsys=capsys)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        return result.stderr

    assert "no such file" in error("--layout", tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("dim = 2\n")
    assert "no tile positions" in error("--layout", tmp_path / "empty.txt")
    fiji_layout(tmp_path / "3d.txt", truth, dim=3)
    line = error("--layout", tmp_path / "3d.txt")
    assert "3D layout (dim = 3)" in line and "dim = 2" in line
    fiji_layout(tmp_path / "scan" / "TileConfiguration.txt", truth, dim=3)
    assert "3D layout" in error()
    assert "--grid-order needs --grid" in error("--grid-order", "column")
    assert "give one" in error("--grid", "2x2", "--layout", tmp_path / "elsewhere.txt")
    assert "ROWSxCOLS" in error("--grid", "four")
    assert "row, column, snake-row, snake-column" in error("--grid", "2x2", "--grid-order",
                                                          "spiral")
    assert "has 2 places but the folder has 4 tiles" in error("--grid", "2x1")


@pytest.mark.parametrize("order, cells", [
    ("row", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]),
    ("column", [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]),
    ("snake-row", [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]),
    ("snake-column", [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2)]),
])
def test_grid_orders(tmp_path, source_image, order, cells):
    """Sequence-numbered tiles (1.png ... 6.png, natural order) on a 2x3 grid."""
    h, w = TILE_SHAPE
    overlap = 0.25
    rng = np.random.default_rng(7)
    xy = [(c * w * (1 - overlap) + rng.integers(-4, 5), r * h * (1 - overlap)
           + rng.integers(-4, 5)) for r, c in cells]
    names = [f"{k}.png" for k in range(1, 7)]
    cut_tiles(tmp_path / "scan", source_image, xy, names)
    run_stitcher(tmp_path / "scan", "--grid", "2x3", "--grid-order", order, "--grid-overlap",
                 str(overlap), "-o", tmp_path / "out", "--stitching-mode", "preview")
    assert_relative_positions(placed(tmp_path / "out"), dict(zip(names, xy, strict=True)))


def test_grid_on_real_sem_tiles(shared_data, tmp_path):
    """stitch2d's SEM tiles, 'stitch2d_ex[Grid@COL ROW].jpg': column by column."""
    src = shared_data / "stitch2d-sem-2x3"
    if not src.is_dir():
        pytest.skip("stitch2d-sem-2x3 is not in the shared data")
    shutil.copytree(src / "tiles", tmp_path / "scan")
    run_stitcher(tmp_path / "scan", "--grid", "3x2", "--grid-order", "column",
                 "--grid-overlap", "0.15", "-o", tmp_path / "out", "--stitching-mode",
                 "preview")
    reference = json.loads((src / "reference_positions_stitch2d.json").read_text())
    truth = {name: (x, y) for name, (y, x) in reference["coords_yx"].items()}
    # stitch2d's own test tolerance is 10 px; ofstitch agrees within 3.
    assert_relative_positions(placed(tmp_path / "out"), truth, tolerance_px=3)


@pytest.mark.parametrize("pattern", ["img_{r}_{c}.png", "scan {c}_{r}.png", "1_{r}_{c}.png"])
def test_index_names_stop_and_suggest_grid(tmp_path, source_image, pattern):
    """Names holding grid indices are not pixel positions (nor, for 1_R_C, z-stacks)."""
    cells = [(r, c) for r in range(1, 3) for c in range(1, 4)]
    xy = grid_xy(2, 3, 0.25)
    names = [pattern.format(r=r, c=c) for r, c in cells]
    cut_tiles(tmp_path / "scan", source_image, xy, names)
    result = run_stitcher(tmp_path / "scan", "-o", tmp_path / "out", rc=2)
    assert "look like grid indices" in result.stderr and "--grid ROWSxCOLS" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    order = "column" if pattern.startswith("scan") else "row"
    result = run_stitcher(tmp_path / "scan", "--grid", "2x3", "--grid-order", order,
                          "--grid-overlap", "0.25", "-o", tmp_path / "out",
                          "--stitching-mode", "preview")
    assert "Placed 6 tiles" in result.stdout
    assert_relative_positions(placed(tmp_path / "out"), dict(zip(names, xy, strict=True)))


def test_sequence_names_without_positions_suggest_grid(tmp_path, source_image, capsys):
    cut_tiles(tmp_path / "scan", source_image, grid_xy(1, 3, 0.3), ["1.png", "2.png", "3.png"])
    result = run_main(tmp_path / "scan", "-o", tmp_path / "out", capsys=capsys)
    assert result.returncode == 2
    assert "--grid ROWSxCOLS" in result.stderr.splitlines()[-1]


def test_disconnected_error_gives_the_overlap_that_connects(tmp_path, source_image, capsys):
    h, w = TILE_SHAPE
    # Columns overlap by 30%, rows by 1% only: the default cannot connect the rows.
    xy = [(c * w * 0.7, r * (h - 1)) for r in range(2) for c in range(3)]
    names = [f"t_{x:g}_{y:g}.png" for x, y in xy]
    cut_tiles(tmp_path / "scan", source_image, xy, names)
    result = run_main(tmp_path / "scan", "-o", tmp_path / "out", capsys=capsys)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "do not overlap the rest of the scan" in line
    assert "neighbouring tiles overlap by 0.3" in line
    suggested = float(re.search(r"--minimum-overlap ([\d.]+) would connect them", line)[1])
    assert 0 < suggested < 1 / h
    result = run_main(tmp_path / "scan", "-o", tmp_path / "out", "--minimum-overlap",
                      suggested, "--stitching-mode", "preview", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "Placed 6 tiles" in result.stdout


def test_minimum_overlap_adapts_only_when_needed():
    from ofstitch.graph import find_pairs

    h, w = TILE_SHAPE
    thirty = np.array([(r * h * 0.7, c * w * 0.7) for r in range(3) for c in range(3)])
    ten = np.array([(r * h * 0.9, c * w * 0.9) for r in range(3) for c in range(3)])
    assert find_pairs(thirty, TILE_SHAPE).minimum_overlap == 0.2
    graph = find_pairs(ten, TILE_SHAPE)
    assert graph.minimum_overlap == pytest.approx(0.05)
    assert len(graph.pairs) == 12  # neighbours, not corners
    assert find_pairs(ten, TILE_SHAPE, 0.2).minimum_overlap == 0.2  # as given


# ----------------------------------------------------------------------------- -o FILE


def test_output_file_formats():
    from ofstitch.outfile import output_file_format

    for name, fmt in [("m.jpg", "jpeg"), ("m.JPEG", "jpeg"), ("m.ome.tif", "ome-tiff"),
                      ("m.ome.tiff", "ome-tiff"), ("m.tif", "ome-tiff"),
                      ("m.ome.zarr", "ome-zarr"), ("m.zarr", "ome-zarr"), ("m.dzi", "dzi"),
                      ("out", None), ("scan.v2", None), (".jpg", None)]:
        assert output_file_format(Path(name)) == fmt, name


@pytest.mark.parametrize("name, written", [
    ("mosaic.jpg", {"mosaic.jpg"}),
    ("mosaic.ome.tif", {"mosaic.ome.tif"}),
    ("mosaic.ome.zarr", {"mosaic.ome.zarr"}),
    ("mosaic.dzi", {"mosaic.dzi", "mosaic_files", "viewer.html"}),
])
def test_output_file_by_extension(tiny, tmp_path, name, written):
    out = tmp_path / "out"
    run_stitcher(tiny, "-o", out / name, "-q")
    assert set(os.listdir(out)) == written
    if name.endswith((".jpg", ".jpeg", ".tif", ".tiff")):
        image = pyvips.Image.new_from_file(str(out / name))
        assert image.width > TILE_SHAPE[1] and image.height > TILE_SHAPE[0]
    if name.endswith(".ome.zarr"):
        assert (out / name / ".zattrs").is_file()
    assert not (tiny / "preview.jpg").exists()


def test_output_file_refusals(tiny, tmp_path, capsys):
    for args, fragment in ((["-o", tmp_path / "m.png"], "does not write .png"),
                           (["-o", tmp_path / "m.jpg", "--stitching-mode", "preview"],
                            "give -o a folder"),
                           (["-o", tmp_path / "m.jpg", "--stitch-tiff"], "drop --format")):
        result = run_main(tiny, *args, capsys=capsys)
        assert result.returncode == 2 and fragment in result.stderr, result.stderr


def test_grid_and_layout_beat_openflexure_metadata(tiny):
    """Given positions are pixels: neither the EXIF positions nor its matrix apply."""
    from ofstitch.layout import Grid
    from ofstitch.scan import load_scan
    from ofstitch.settings import StitchSettings

    names = sorted(p.name for p in tiny.glob("*.jpg"))
    scan = load_scan(tiny, StitchSettings(grid=Grid(2, 2, "column", 0.25)))
    h, w = TILE_SHAPE
    want = {names[0]: (0, 0), names[1]: (0.75 * h, 0), names[2]: (0, 0.75 * w),
            names[3]: (0.75 * h, 0.75 * w)}
    got = {f.name: tuple(scan.stage_px[i].tolist()) for i, f in enumerate(scan.files)}
    assert got == want
    np.testing.assert_allclose(scan.csm, [[0, 1], [1, 0]])
    assert scan.position_source == "tile-configuration"


def test_csm_matrix_as_numpy_prints_it():
    """An older server passes str(numpy matrix): no commas."""
    from ofstitch.metadata import parse_csm

    assert parse_csm(str(np.array([[0.0, 1.5], [-1.5, 0.0]]))) == ((0.0, 1.5), (-1.5, 0.0))
