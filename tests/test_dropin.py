"""ofstitch as a drop-in for openflexure-stitch 0.3.1, and for Fiji and ASHLAR users.

The OpenFlexure server's calls run in real processes, as the server runs them
(its stdout is a pipe, not a terminal); the many option checks run in-process.
"""

from __future__ import annotations

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


def run_stitcher(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ofstitch ARGS`` in a process whose stdout and stderr are pipes, as the server runs it."""
    env = dict(os.environ)
    for name in ("FORCE_COLOR", "NO_COLOR", "COLUMNS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "ofstitch.cli", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=180)
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
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


@pytest.mark.parametrize("spelling, suffix", [
    ("jpg", ".jpg"), ("JPEG", ".jpg"), ("tif", ".ome.tiff"), ("TIFF", ".ome.tiff"),
    ("ome.tif", ".ome.tiff"), ("OME-TIFF", ".ome.tiff"), ("zarr", ".ome.zarr"),
    ("ome.zarr", ".ome.zarr"), ("DZI", ".dzi"),
])
def test_format_spellings(tiny, tmp_path, capsys, spelling, suffix):
    out = tmp_path / "out"
    _stitch(capsys, tiny, "-o", out, "--format", spelling, "-q")
    assert (out / f"tiny_stitched{suffix}").exists()
    others = {".jpg", ".ome.tiff", ".ome.zarr", ".dzi"} - {suffix}
    assert not any((out / f"tiny_stitched{s}").exists() for s in others)


def test_plain_progress_has_no_bars(tiny, capsys):
    result = _stitch(capsys, tiny, "--stitching-mode", "only-correlate")
    assert "Correlating pairs: 0/" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr
    assert np.all([":" in line for line in result.stdout.splitlines()
                   if line.startswith("Correlating")])
