"""Accuracy on real microscope tiles (../shared/data) against positions from other tools.

The reference positions are other programs' results, not ground truth: Fiji's Grid/Collection
stitching (lscm-speckle-3x4, fiji-graph-paper-strip) and stitch2d's test-suite
(stitch2d-sem-2x3). They are compared through the relative displacement of every pair of
tiles whose nominal footprints overlap, so the mosaic's overall offset does not matter.

Where ofstitch misses Fiji by more than 2 px the test is marked xfail with the measured error,
provided a second, tool-independent check shows Fiji is the one off: the normalised cross-
correlation (NCC) of the raw overlap at each tool's displacement (whole pixels, no
interpolation). On both Fiji sets ofstitch's overlaps match at least as well as Fiji's on every
neighbour pair; the openflexure-stitching 0.3.1 reference agrees with ofstitch there (see
benchmarks/compare_reference.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pyvips

import ofstitch
from ofstitch import StitchSettings

BOUND_PX = 2.0
_FIJI_LINE = re.compile(r"^\s*([^;#]+?)\s*;\s*[^;]*;\s*\(\s*([^,]+?)\s*,\s*([^,)]+?)\s*\)")


def read_fiji(path: Path) -> dict[str, tuple[float, float]]:
    """``{file name: (row, col)}`` from a Fiji TileConfiguration (which stores ``(x, y)``)."""
    out = {}
    for line in path.read_text().splitlines():
        match = _FIJI_LINE.match(line)
        if match:
            out[match.group(1)] = (float(match.group(3)), float(match.group(2)))
    return out


def overlapping_pairs(nominal: dict, tile_shape: tuple[int, int], min_fraction: float = 0.0
                      ) -> list[tuple[str, str]]:
    """Pairs whose nominal footprints overlap by more than ``min_fraction`` of a tile."""
    names = sorted(nominal)
    size = np.asarray(tile_shape, dtype=float)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            extent = np.clip(size - np.abs(np.subtract(nominal[b], nominal[a])), 0, None)
            if extent.prod() / size.prod() > min_fraction:
                out.append((a, b))
    return out


def pair_errors(positions: dict, reference: dict, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Error (px) of each pair's displacement ``pos[b] - pos[a]`` against the reference."""
    got = np.array([np.subtract(positions[b], positions[a]) for a, b in pairs])
    want = np.array([np.subtract(reference[b], reference[a]) for a, b in pairs])
    return np.linalg.norm(got - want, axis=1)


def grey(path: Path) -> np.ndarray:
    return pyvips.Image.new_from_file(str(path)).extract_band(0).numpy().astype(np.float64)


def overlap_ncc(a: np.ndarray, b: np.ndarray, shift) -> float:
    """NCC of the overlap when ``b``'s top-left sits at ``shift`` (rounded) from ``a``'s."""
    h, w = a.shape
    dy, dx = (int(round(v)) for v in shift)
    pa = a[max(0, dy):min(h, dy + h), max(0, dx):min(w, dx + w)]
    pb = b[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)]
    pa, pb = pa - pa.mean(), pb - pb.mean()
    return float((pa * pb).sum() / np.sqrt((pa * pa).sum() * (pb * pb).sum()))


def check_against(positions: dict, reference: dict, pairs: list, explained_px: float,
                  why: str) -> float:
    """Pass within BOUND_PX; xfail with the measured error up to ``explained_px``; else fail."""
    errors = pair_errors(positions, reference, pairs)
    worst = int(np.argmax(errors))
    measured = (f"max pairwise error {errors.max():.2f} px (RMS "
                f"{np.sqrt(np.mean(errors ** 2)):.2f} px, worst pair {pairs[worst]})")
    assert errors.max() <= max(BOUND_PX, explained_px), measured
    if errors.max() > BOUND_PX:
        pytest.xfail(f"{measured} > {BOUND_PX} px: {why}")
    return float(errors.max())


def assert_overlaps_match_at_least_as_well(folder: Path, positions: dict, reference: dict,
                                           pairs: list, tolerance: float = 0.005) -> None:
    tiles = {n: grey(folder / n) for pair in pairs for n in pair}
    worse = []
    for a, b in pairs:
        ours = overlap_ncc(tiles[a], tiles[b], np.subtract(positions[b], positions[a]))
        theirs = overlap_ncc(tiles[a], tiles[b], np.subtract(reference[b], reference[a]))
        if ours < theirs - tolerance:
            worse.append(f"{a}->{b}: NCC {ours:.3f} < {theirs:.3f}")
    assert not worse, "overlaps match worse than the reference's: " + "; ".join(worse)


# ----------------------------------------------------------------------------- LSCM 3x4


LSCM_WHY = (
    "Fiji's horizontal steps are ~1.9 px shorter than ofstitch's (e.g. A001->A002: Fiji "
    "920.5 px, ofstitch 922.2 px, openflexure-stitching 0.3.1 922.2 px, overlap-NCC optimum "
    "~922.5 px); on every neighbour pair ofstitch's overlap NCC is >= Fiji's "
    "(test_lscm_overlaps_match_better_than_fiji), so Fiji is the one off here")


@pytest.fixture(scope="module")
def lscm(shared_data, tmp_path_factory):
    src = shared_data / "lscm-speckle-3x4"
    if not src.is_dir():
        pytest.skip("lscm-speckle-3x4 is not in the shared data")
    folder = tmp_path_factory.mktemp("lscm")
    for tile in src.glob("*.tif"):
        shutil.copyfile(tile, folder / tile.name)
    shutil.copyfile(src / "TileConfiguration.txt", folder / "TileConfiguration.txt")
    # 10% overlap in one direction is ~10% of the tile area: below the 0.2 default.
    reg = ofstitch.register(folder, StitchSettings(minimum_overlap=0.05), use_cache=False)
    nominal = read_fiji(src / "TileConfiguration.txt")
    fiji = read_fiji(src / "TileConfiguration.registered.txt")
    return folder, reg, nominal, fiji


def test_lscm_all_pairs_correlated(lscm):
    _, reg, nominal, _ = lscm
    assert sorted(reg.names) == sorted(nominal)
    assert len(reg.graph.pairs) == 17  # 4x3 grid: 17 neighbours (edges only, no corners)
    assert reg.placement.accepted.all()


def test_lscm_matches_fiji(lscm):
    _, reg, nominal, fiji = lscm
    pairs = overlapping_pairs(nominal, (1024, 1024))
    check_against(reg.positions(), fiji, pairs, explained_px=3.0, why=LSCM_WHY)


def test_lscm_overlaps_match_better_than_fiji(lscm):
    folder, reg, nominal, fiji = lscm
    pairs = overlapping_pairs(nominal, (1024, 1024), min_fraction=0.05)
    assert len(pairs) == 17
    assert_overlaps_match_at_least_as_well(folder, reg.positions(), fiji, pairs)


# ----------------------------------------------------------------------------- graph paper


PAPER_WHY = (
    "Fiji is not a 2 px reference on this periodic, low-texture strip: its 7->8 step (334 px) "
    "has overlap NCC 0.52 where ofstitch's 352 px has 0.61 (the raw-overlap NCC optimum is "
    "~351 px), and on 8->9 / 10->9 Fiji is 2.5-3 px from ofstitch with lower NCC as well "
    "(test_graph_paper_overlaps_match_better_than_fiji)")


@pytest.fixture(scope="module")
def graph_paper(shared_data, tmp_path_factory):
    src = shared_data / "fiji-graph-paper-strip"
    if not src.is_dir():
        pytest.skip("fiji-graph-paper-strip is not in the shared data")
    folder = tmp_path_factory.mktemp("paper")
    for tile in src.glob("*.tif"):
        shutil.copyfile(tile, folder / tile.name)
    shutil.copyfile(src / "tile_config.txt", folder / "tile_config.txt")
    # The nominal 297 px step is off by up to 61 px and the graph paper repeats every
    # ~290 px, so unrestricted correlation locks onto the grid's alias (errors ~290 px, also
    # in openflexure-stitching). Restricting the peak search to 70 px around the stage
    # prediction is what a user would do; radii of 80 px and more still alias on pair 7->8.
    settings = StitchSettings().with_correlation(corr_mask_radius=70)
    reg = ofstitch.register(folder, settings, use_cache=False)
    nominal = read_fiji(src / "tile_config.txt")
    fiji = read_fiji(src / "tile_config.registered.txt")
    return folder, reg, nominal, fiji


def test_graph_paper_matches_fiji(graph_paper):
    _, reg, nominal, fiji = graph_paper
    pairs = overlapping_pairs(nominal, (929, 594))
    assert len(pairs) == 9
    check_against(reg.positions(), fiji, pairs, explained_px=19.0, why=PAPER_WHY)


def test_graph_paper_overlaps_match_better_than_fiji(graph_paper):
    folder, reg, nominal, fiji = graph_paper
    pairs = overlapping_pairs(nominal, (929, 594))
    assert_overlaps_match_at_least_as_well(folder, reg.positions(), fiji, pairs)


# ----------------------------------------------------------------------------- SEM 2x3


def test_sem_matches_stitch2d(shared_data, tmp_path):
    src = shared_data / "stitch2d-sem-2x3"
    if not src.is_dir():
        pytest.skip("stitch2d-sem-2x3 is not in the shared data")
    info = json.loads((src / "reference_positions_stitch2d.json").read_text())
    reference = {name: tuple(yx) for name, yx in info["coords_yx"].items()}
    nominal, lines = {}, ["dim = 2"]
    for name in reference:
        col, row = map(int, re.search(r"Grid@(\d+) (\d+)", name).groups())
        shutil.copyfile(src / "tiles" / name, tmp_path / name)
        # Grid steps from PROVENANCE.txt: columns ~385 px, rows ~396 px apart.
        nominal[name] = (row * 396.0, col * 385.0)
        lines.append(f"{name}; ; ({col * 385.0}, {row * 396.0})")
    (tmp_path / "TileConfiguration.txt").write_text("\n".join(lines) + "\n")

    # Rows overlap by ~10% of the tile: below the 0.2 default.
    reg = ofstitch.register(tmp_path, StitchSettings(minimum_overlap=0.05), use_cache=False)
    assert sorted(reg.names) == sorted(reference)
    pairs = overlapping_pairs(nominal, tuple(info["tile_shape_hw"]))
    assert len(pairs) == 11
    errors = pair_errors(reg.positions(), reference, pairs)
    assert errors.max() <= BOUND_PX, f"max pairwise error {errors.max():.2f} px"
