"""Decoding and rendering: the floor (decode every tile once) against ofstitch's grey
decode for correlation, and the full-resolution mosaic render + JPEG encode."""

from __future__ import annotations

import os

import numpy as np
import pytest
import pyvips

from ofstitch import formats, render, tiles


@pytest.mark.parametrize("shape", [(624, 832), (1232, 1640)], ids=["832x624", "1640x1232"])
@pytest.mark.parametrize("how", ["rgb-pyvips", "grey-ofstitch"])
def test_decode_tile(benchmark, scans, shape, how):
    """One JPEG tile: full RGB decode (the floor's) or ofstitch's grey decode."""
    scan = scans((2, 2), shape)
    path = scan.folder / scan.names[0]
    if how == "rgb-pyvips":
        arr = benchmark(lambda: pyvips.Image.new_from_file(os.fspath(path),
                                                          access="sequential").numpy())
    else:
        arr = benchmark(tiles.read_grey, path)
    assert arr.shape[:2] == shape


@pytest.mark.parametrize("grid", [(3, 3), (5, 5)], ids=["9", "25"])
def test_render_full_mosaic(benchmark, scans, tmp_path, grid):
    """Full-resolution mosaic of 832x624 tiles at their true positions, JPEG-encoded."""
    scan = scans(grid, (624, 832))
    paths = [scan.folder / n for n in scan.names]
    positions = scan.truth_px - scan.truth_px.min(axis=0)
    out = tmp_path / "mosaic.jpg"

    def run():
        mosaic = render.Mosaic(paths, positions, scan.tile_shape)
        mosaic.write(lambda image: formats.write_jpeg(image, out))

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert pyvips.Image.new_from_file(os.fspath(out)).width >= positions[:, 1].max() + 832
    assert np.isfinite(positions).all()
