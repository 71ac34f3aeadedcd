"""The ``ofstitch`` command line, driven as a user would: ``python -m ofstitch.cli ...``.

Stitching runs write their outputs with ``-o`` into a fresh folder and check that
the scan's tiles are left untouched. User errors must give exit code 2 and exactly
one line on stderr, without a traceback; most error paths run ``ofstitch.cli.main``
in-process (:func:`run_main`) to keep the file fast, one runs in a real process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import piexif
import pytest
import pyvips
from cli_helpers import run_main

import ofstitch
from ofstitch.cache import CACHE_NAME
from ofstitch.synthetic import make_scan

TILE_SHAPE = (120, 160)  # (height, width)
PIXEL_SIZE_UM = 0.83  # what make_scan writes into the v3 metadata
STITCH_OPTIONS = (
    "--output-dir --stitching-mode --device --show-cached-settings --use-cached-settings "
    "--csm-matrix --csm-calibration-width --image-count --thresholding "
    "--max-stage-discrepancy --min-peak-quality --pad --no-pad --high-pass-sigma --resize "
    "--minimum-overlap --priority --corr-mask-radius --format --blend --tiff-compression "
    "--stitch-tiff --stitch-dzi --tile-size --cache-dir"
).split()
ALL_OUTPUTS = {"preview.jpg", "stitched_thumbnail.jpg", "OFMTileConfiguration.txt",
               "stitching_inputs.png", "stitching_correlations.png",
               "stitching_residuals.png"}
FIJI_LINE = re.compile(r"^(?P<name>[^;]+); ; \((?P<x>-?\d+(?:\.\d+)?), (?P<y>-?\d+(?:\.\d+)?)\)$")


# ----------------------------------------------------------------------------- helpers


def run_cli(*args, input: str | None = None, cwd: Path | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m ofstitch.cli ARGS`` with a wide, non-interactive terminal."""
    env = dict(os.environ, COLUMNS="1000", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "ofstitch.cli", *map(str, args)],
                          input=input if input is not None else "", capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)




def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, one 'ofstitch: error:' line on stderr, no traceback; return the line."""
    assert result.returncode == 2, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ofstitch: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tile_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of the scan folder except the correlation cache."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_NAME}


def assert_inputs_untouched(scan, hashes: dict[str, str]) -> None:
    assert tile_hashes(scan.folder) == hashes
    extra = {p.name for p in scan.folder.iterdir()} - set(hashes) - {CACHE_NAME}
    assert not extra, f"files written into the scan folder: {extra}"


def read_tile_configuration(path: Path) -> dict[str, tuple[float, float]]:
    """Parse a Fiji TileConfiguration strictly: ``{name: (x, y)}``, one line per tile."""
    lines = path.read_text().splitlines()
    assert "dim = 2" in lines
    out = {}
    for line in lines:
        if not line.strip() or line.startswith("#") or line.startswith("dim"):
            continue
        match = FIJI_LINE.match(line)
        assert match, f"not a Fiji tile line: {line!r}"
        assert match["name"] not in out, f"{match['name']} listed twice"
        out[match["name"]] = (float(match["x"]), float(match["y"]))
    return out


def user_comment(path: Path) -> dict:
    raw = piexif.load(str(path))["Exif"][piexif.ExifIFD.UserComment]
    if raw[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00", b"\x00" * 8):
        raw = raw[8:]
    return json.loads(raw.decode("utf-8"))


def write_filename_tiles(folder: Path, source: np.ndarray, positions_xy, names_xy=None,
                         tile_shape=TILE_SHAPE) -> list[str]:
    """PNG tiles cut from ``source`` at pixel ``(x, y)``, named ``tile_X_Y.png``.

    ``names_xy`` (default: the positions) are the coordinates written in the names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    th, tw = tile_shape
    names = []
    for (x, y), (nx, ny) in zip(positions_xy, names_xy or positions_xy, strict=True):
        crop = np.ascontiguousarray(source[100 + y:100 + y + th, 100 + x:100 + x + tw])
        name = f"tile_{nx}_{ny}.png"
        pyvips.Image.new_from_array(crop).write_to_file(str(folder / name))
        names.append(name)
    return names


def cuda_usable() -> bool:
    from ofstitch.backends import select_backend
    from ofstitch.errors import DeviceUnavailableError

    try:
        select_backend("cuda")
    except DeviceUnavailableError:
        return False
    return True


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wide_scan(tmp_path_factory, source_image):
    """A 2x10 scan, wider than the 1000 px preview, and the hashes of its files."""
    folder = tmp_path_factory.mktemp("cli") / "scan"
    scan = make_scan(folder, source=source_image, grid=(2, 10), tile_shape=TILE_SHAPE,
                     seed=2)
    return scan, tile_hashes(folder)


@pytest.fixture(scope="module")
def all_run(wide_scan, tmp_path_factory):
    """``ofstitch FOLDER -o OUT`` (no subcommand), run once for several checks."""
    scan, _ = wide_scan
    out = tmp_path_factory.mktemp("all") / "out"
    result = ok(run_cli(scan.folder, "-o", out))
    return result, out


@pytest.fixture
def small_scan(tmp_path, source_image) -> Path:
    """A 2x2 scan of PNG tiles positioned by their names (no cache yet)."""
    folder = tmp_path / "small"
    write_filename_tiles(folder, source_image, [(0, 0), (100, 0), (0, 80), (100, 80)])
    return folder


# ----------------------------------------------------------------------------- modes


def test_default_command_is_stitch_and_writes_all_outputs(wide_scan, all_run):
    scan, hashes = wide_scan
    result, out = all_run
    assert set(os.listdir(out)) == ALL_OUTPUTS | {"scan_stitched.jpg"}
    assert f"Placed {len(scan.names)} tiles" in result.stdout
    assert_inputs_untouched(scan, hashes)
    assert (scan.folder / CACHE_NAME).is_file()


def test_preview_and_thumbnail_sizes(all_run):
    _, out = all_run
    full = pyvips.Image.new_from_file(str(out / "scan_stitched.jpg"))
    preview = pyvips.Image.new_from_file(str(out / "preview.jpg"))
    thumb = pyvips.Image.new_from_file(str(out / "stitched_thumbnail.jpg"))
    assert full.width > 1000  # so the preview really is reduced
    assert 990 <= preview.width <= 1000
    assert preview.height == pytest.approx(full.height * preview.width / full.width, abs=2)
    assert max(thumb.width, thumb.height) <= 400


def test_stitched_jpeg_size_matches_tile_positions(wide_scan, all_run):
    scan, _ = wide_scan
    _, out = all_run
    config = read_tile_configuration(out / "OFMTileConfiguration.txt")
    assert sorted(config) == sorted(scan.names)
    xy = np.array(list(config.values()))
    assert xy.min(axis=0) == pytest.approx([0, 0], abs=1e-3)
    top_left = np.floor(xy + 0.5)
    th, tw = TILE_SHAPE
    image = pyvips.Image.new_from_file(str(out / "scan_stitched.jpg"))
    assert (image.width, image.height) == (int(top_left[:, 0].max()) + tw,
                                           int(top_left[:, 1].max()) + th)


def test_stitched_jpeg_exif(wide_scan, all_run):
    scan, _ = wide_scan
    _, out = all_run
    path = out / "scan_stitched.jpg"
    comment = user_comment(path)
    assert comment["pixel_size_um"] == pytest.approx(PIXEL_SIZE_UM)
    assert comment["NumberOfImages"] == len(scan.names)
    assert np.shape(comment["camera_to_sample_matrix_suggested"]) == (2, 2)
    zeroth = piexif.load(str(path))["0th"]
    assert zeroth[piexif.ImageIFD.ResolutionUnit] == 3  # centimetres
    for tag in (piexif.ImageIFD.XResolution, piexif.ImageIFD.YResolution):
        num, den = zeroth[tag]
        assert num / den == pytest.approx(1e4 / PIXEL_SIZE_UM, rel=1e-3)


def test_stitch_subcommand_tiff_and_dzi(wide_scan, tmp_path):
    scan, hashes = wide_scan
    out = tmp_path / "out"
    ok(run_cli("stitch", scan.folder, "-o", out, "--stitch-tiff", "--stitch-dzi",
               "--tile-size", "128", "-q"))
    expected = ALL_OUTPUTS | {"scan_stitched.jpg", "scan_stitched.ome.tiff",
                              "scan_stitched.dzi", "scan_stitched_files", "viewer.html"}
    assert set(os.listdir(out)) == expected
    full = pyvips.Image.new_from_file(str(out / "scan_stitched.jpg"))
    tiff = pyvips.Image.new_from_file(str(out / "scan_stitched.ome.tiff"))
    assert (tiff.width, tiff.height) == (full.width, full.height)
    assert tiff.get("n-subifds") > 1  # pyramidal
    dzi = (out / "scan_stitched.dzi").read_text()
    assert 'TileSize="128"' in dzi
    assert f'Width="{full.width}"' in dzi and f'Height="{full.height}"' in dzi
    levels = [p for p in (out / "scan_stitched_files").iterdir() if p.is_dir()]
    assert len(levels) == math.ceil(math.log2(max(full.width, full.height))) + 1
    assert_inputs_untouched(scan, hashes)


def test_preview_mode(wide_scan, tmp_path):
    scan, hashes = wide_scan
    out = tmp_path / "out"
    ok(run_cli("stitch", scan.folder, "-o", out, "--stitching-mode", "preview", "-q"))
    assert set(os.listdir(out)) == ALL_OUTPUTS
    assert_inputs_untouched(scan, hashes)


def test_stage_mode(wide_scan, tmp_path):
    scan, hashes = wide_scan
    out = tmp_path / "out"
    ok(run_cli(scan.folder, "-o", out, "--stitching-mode", "stage", "-q"))
    assert set(os.listdir(out)) == {"stitched_from_stage.jpg"}
    assert pyvips.Image.new_from_file(str(out / "stitched_from_stage.jpg")).width <= 1000
    assert_inputs_untouched(scan, hashes)


def test_only_correlate_mode(make_synthetic, tmp_path):
    scan = make_synthetic(grid=(3, 3), tile_shape=TILE_SHAPE)
    hashes = tile_hashes(scan.folder)
    out = tmp_path / "out"
    ok(run_cli("stitch", scan.folder, "-o", out, "--stitching-mode", "only-correlate", "-q"))
    assert not out.exists() or not any(out.iterdir())
    assert_inputs_untouched(scan, hashes)
    data = json.loads((scan.folder / CACHE_NAME).read_text())
    assert data["format"] == "ofstitch-correlation-cache"
    assert len(data["sets"]) == 1
    # Every pair of a 3x3 grid (12), and the 6 null pairs of robust placement (tiles two
    # steps apart in each row and column), so that a later run correlates nothing.
    assert len(next(iter(data["sets"].values()))) == 12 + 6
    reg = ofstitch.register(scan.folder)
    assert reg.n_correlated == 0 and reg.n_cached == 12 and reg.n_null == 6


def test_search_margin_selects_strips_for_any_placement(make_synthetic):
    """Overlap strips with a 10% margin by default; --search-margin sets the margin, with
    robust placement (the default) as with the reference method, and 0 correlates whole
    tiles."""
    scan = make_synthetic(grid=(2, 3), tile_shape=TILE_SHAPE)

    def margins(*options):
        (scan.folder / CACHE_NAME).unlink(missing_ok=True)
        ok(run_cli("stitch", scan.folder, "--stitching-mode", "only-correlate", "-q",
                   *options))
        keys = json.loads((scan.folder / CACHE_NAME).read_text())["sets"]
        return [json.loads(k)["search_margin"] for k in keys]

    assert margins() == [0.1]
    assert margins("--search-margin", "0") == [0.0]
    assert margins("--placement", "reference", "--search-margin", "0.2") == [0.2]


def test_manual_thresholding_reads_stdin(wide_scan, tmp_path):
    scan, hashes = wide_scan
    out = tmp_path / "out"
    result = ok(run_cli(scan.folder, "-o", out, "--thresholding", "manual",
                        input="0.5\n1000\n"))
    assert (out / "stitching_correlations.png").is_file()
    assert (out / "scan_stitched.jpg").is_file()
    assert "peak quality >= 0.500000, stage discrepancy <= 1000.0 px" in result.stdout
    assert_inputs_untouched(scan, hashes)


def test_demo(tmp_path):
    out = tmp_path / "demo"
    result = ok(run_cli("demo", "-o", out, "-q"))
    match = re.search(r"Accuracy against the ground truth.*max ([\d.]+) px, RMS ([\d.]+) px",
                      result.stdout)
    assert match, result.stdout
    assert float(match[1]) < 1.0
    assert str(out / "preview.jpg") in result.stdout
    assert (out / "preview.jpg").is_file()
    assert (out / "demo-scan_stitched.jpg").is_file()


def test_outputs_in_place_do_not_feed_back(tmp_path, source_image):
    """Our OFMTileConfiguration.txt output must not be read back as stage positions.

    Filename positions are in stage steps (2 per pixel) with a CSM; outputs go into
    the scan folder, so a second run would find the first run's tile configuration.
    (In-process through :func:`ofstitch.stitch`, which the CLI calls, to save time.)
    """
    import ofstitch
    from ofstitch.scan import load_scan
    from ofstitch.settings import StitchSettings

    folder = tmp_path / "steps"
    positions = [(c * 112, r * 84) for r in range(2) for c in range(3)]
    write_filename_tiles(folder, source_image, positions,
                         names_xy=[(2 * x, 2 * y) for x, y in positions])
    settings = StitchSettings(csm_matrix=((0.0, 2.0), (2.0, 0.0)), stitching_mode="preview")
    names = [f"tile_{2 * x}_{2 * y}.png" for x, y in positions]
    expected = [(y, x) for x, y in positions]  # (row, col), in the order of names

    def stage_px() -> np.ndarray:
        scan = load_scan(folder, settings)  # capture order is by mtime: compare by name
        order = [[f.name for f in scan.files].index(n) for n in names]
        return scan.stage_px[order]

    np.testing.assert_allclose(stage_px(), expected)
    ofstitch.stitch(folder, settings)
    assert (folder / "OFMTileConfiguration.txt").is_file()
    np.testing.assert_allclose(stage_px(), expected)


# ----------------------------------------------------------------------------- user errors


def _disconnected(tmp_path: Path, source: np.ndarray) -> Path:
    folder = tmp_path / "disconnected"
    write_filename_tiles(folder, source, [(0, 0), (100, 0), (0, 80), (100, 80)])
    (folder / "tile_100000_0.png").write_bytes((folder / "tile_0_0.png").read_bytes())
    return folder


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _non_images(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a tile")
    (folder / "positions.csv").write_text("x,y\n0,0\n")
    (folder / "tile_0_0.json").write_text("{}")
    return folder


ERROR_CASES = {
    # name: (arguments from tmp_path, the small scan and the source image; message fragments)
    "missing-folder": (lambda t, s, src: [t / "missing", "-o", t / "out"], ["does not exist"]),
    "file-not-folder": (lambda t, s, src: [s / "tile_0_0.png", "-o", t / "out"],
                        ["not a folder"]),
    "empty-folder": (lambda t, s, src: [_empty(t), "-o", t / "out"], ["no tile images"]),
    "only-non-images": (lambda t, s, src: [_non_images(t), "-o", t / "out"],
                        ["no tile images"]),
    "disconnected": (lambda t, s, src: [_disconnected(t, src), "-o", t / "out"],
                     ["do not overlap", "tile_100000_0.png"]),
    "csm-not-a-matrix": (lambda t, s, src: [s, "-o", t / "out", "--csm-matrix", "[[1, 2, 3]]"],
                         ["--csm-matrix"]),
    "csm-garbage": (lambda t, s, src: [s, "-o", t / "out", "--csm-matrix", "rotate please"],
                    ["--csm-matrix"]),
    "csm-singular": (lambda t, s, src: [s, "-o", t / "out", "--csm-matrix", "[[1,1],[1,1]]"],
                     ["singular"]),
    "resize-0": (lambda t, s, src: [s, "-o", t / "out", "--resize", "0"], ["--resize"]),
    "resize-2": (lambda t, s, src: [s, "-o", t / "out", "--resize", "2"], ["--resize"]),
    "output-inside-file": (lambda t, s, src: [s, "-o", s / "tile_0_0.png" / "out"],
                           ["cannot write", "-o/--output-dir"]),
    "use-cached-settings-without-cache": (
        lambda t, s, src: [s, "-o", t / "out", "--use-cached-settings"],
        ["--use-cached-settings"]),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors(case, tmp_path, small_scan, source_image, capsys):
    make_args, fragments = ERROR_CASES[case]
    args = make_args(tmp_path, small_scan, source_image)
    before = tile_hashes(small_scan)
    result = run_main(*args, capsys=capsys)
    assert_user_error(result, *fragments)
    assert result.stdout == ""
    assert tile_hashes(small_scan) == before


def test_user_errors_from_a_real_process(tmp_path, source_image):
    """The console entry point itself: exit code 2, one line, no traceback."""
    assert_user_error(run_cli(_disconnected(tmp_path, source_image), "-o", tmp_path / "out"),
                      "tile_100000_0.png")


def test_unwritable_output_folder(tmp_path, small_scan, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        try:
            (locked / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("permissions are not enforced here (running as root)")
        assert_user_error(run_main(small_scan, "-o", locked, capsys=capsys), "cannot write")
        assert_user_error(run_main(small_scan, "-o", locked / "sub", capsys=capsys),
                          "cannot write")
    finally:
        locked.chmod(0o700)


def test_device_cuda_without_cupy(small_scan, tmp_path, capsys):
    if cuda_usable():
        pytest.skip("CUDA is usable here")
    line = assert_user_error(run_main(small_scan, "-o", tmp_path / "out", "--device", "cuda",
                                      capsys=capsys))
    assert "CuPy" in line or "CUDA" in line
    if importlib.util.find_spec("cupy") is None:
        assert "ofstitch[cuda12]" in line  # the extra to install, not eaten as markup


def test_missing_folder_is_not_created(tmp_path, capsys):
    """Without -o the outputs go into FOLDER: a typo must not create it."""
    missing = tmp_path / "typo" / "scan"
    assert_user_error(run_main(missing, capsys=capsys), "does not exist")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("name", ["scan[/x]", "scan[x]", "scan[red]"])
def test_error_message_with_brackets_in_path(tmp_path, name, capsys):
    """Paths are not rich markup: '[/x]' must not crash the error printer, '[x]' must stay."""
    assert_user_error(run_main(tmp_path / name, "-o", tmp_path / "out", capsys=capsys),
                      "does not exist", name)


def test_show_cached_settings_with_brackets_in_path(tmp_path, source_image, capsys):
    folder = tmp_path / "scan[/x]"
    write_filename_tiles(folder, source_image, [(0, 0), (100, 0)])
    result = ok(run_main(folder, "--show-cached-settings", capsys=capsys))
    assert "scan[/x]" in result.stdout


def test_show_cached_settings_on_a_missing_folder(tmp_path, capsys):
    assert_user_error(run_main(tmp_path / "missing", "--show-cached-settings", capsys=capsys),
                      "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli(tmp_path / "missing", "-o", tmp_path / "out", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "OfstitchError" in result.stderr
    assert "does not exist" in result.stderr


# ----------------------------------------------------------------------------- help, devices


@pytest.fixture(scope="module")
def stitch_help() -> str:
    return ok(run_cli("stitch", "--help")).stdout


def _option_line(help_text: str, option: str) -> str:
    """The --help entry that lists ``option``: its line and the help lines under it."""
    lines = help_text.splitlines()
    for i, line in enumerate(lines):
        tokens = [t for t in re.split(r"[\s,│]+", line) if t]
        indent = len(line) - len(line.lstrip(" │"))
        if indent < 8 and tokens and tokens[0].startswith("-") and option in tokens[:3]:
            entry = [line]
            for more in lines[i + 1:]:
                stripped = more.strip()
                if not stripped or stripped.startswith("-") and not more.startswith(" " * 20):
                    break
                entry.append(more)
            return " ".join(entry)
    raise AssertionError(f"{option} is not listed in --help")


def test_top_level_help_shows_the_default_command_and_lists_the_others():
    text = ok(run_cli("--help")).stdout
    assert "--stitching-mode" in text and "--device" in text  # the options of 'ofstitch FOLDER'
    for command in ("watch", "demo", "devices"):
        assert f"ofstitch {command}" in text, command
    assert "FOLDER" in text


def test_version():
    import ofstitch

    for flag in ("--version", "-V"):
        assert ok(run_cli(flag)).stdout.strip() == ofstitch.__version__


def test_help_lists_every_option_with_help_text(stitch_help):
    assert "FOLDER" in stitch_help.upper()
    for option in STITCH_OPTIONS:
        line = _option_line(stitch_help, option)
        described = re.sub(r"-[\w,-]+|<[^>]*>", " ", line)  # drop option names, metavars
        words = re.findall(r"\b[A-Za-z]{3,}\b", described)
        assert len(words) >= 3, f"{option} has no help text: {line!r}"


def test_every_option_has_help_in_the_command_definition():
    import typer.main

    from ofstitch.cli import app

    stitch = typer.main.get_command(app).commands["stitch"]
    declared = {opt for param in stitch.params for opt in param.opts + param.secondary_opts}
    assert set(STITCH_OPTIONS) <= declared
    for param in stitch.params:
        assert (getattr(param, "help", None) or "").strip(), f"{param.name} has no help"


@pytest.mark.parametrize("option, text", [("--csm-matrix", "[[a, b], [c, d]]"),
                                          ("--high-pass-sigma", "[default: 10]"),
                                          ("--resize", "[default: 1]"),
                                          ("--pad", "[default: --pad]")])
def test_help_keeps_bracketed_text(stitch_help, option, text):
    assert text in " ".join(_option_line(stitch_help, option).split())


def test_devices():
    result = ok(run_cli("devices"))
    assert re.search(r"^cpu\b.*numpy", result.stdout, re.M), result.stdout
    if importlib.util.find_spec("cupy") is None:
        cuda = [line for line in result.stdout.splitlines() if line.startswith("cuda")]
        assert cuda and "ofstitch[cuda12]" in cuda[0], result.stdout


def test_malloc_tuning_keeps_what_the_environment_sets(monkeypatch):
    """The command line tunes glibc's allocator, except where the user's environment
    says otherwise (and it is a no-op where there is no glibc)."""
    import ctypes

    from ofstitch import allocator

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    allocator.tune_malloc()
    assert sorted(calls) == sorted([(-8, allocator.ARENAS), (-1, allocator.TRIM_THRESHOLD)])

    def no_libc(name):
        raise OSError(name)

    calls.clear()
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    allocator.tune_malloc()  # musl, say: nothing to tune, no error
    assert calls == []
