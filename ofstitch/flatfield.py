"""Flat-field correction: divide out the illumination profile the tiles share.

A microscope camera sees the same vignetting in every tile (OpenFlexure's
Raspberry Pi cameras strongly), so a nearest-centre mosaic shows steps at its
seams. ``--flat-field auto`` estimates the profile from the scan itself: the
per-pixel median of up to 48 tiles spread over the scan (the specimen varies
from tile to tile, the illumination does not), decoded grey at a quarter of
their size, smoothed with a Gaussian of 1/16 of the tile's longer side, and
normalised to a mean of 1. ``--flat-field FILE`` takes the profile from an
image of an empty field (normalised the same way, not smoothed). Each output
pixel is divided by the profile, the same gain for every colour band.

The correction is applied to the mosaic only (every output and preview),
never to the tiles that registration correlates. Off by default.

References: the retrospective median approach of ASHLAR and of BaSiC
(Peng et al., Nat. Commun. 8, 14836 (2017), doi:10.1038/ncomms14836) without
BaSiC's sparse low-rank model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyvips

from . import tiles
from .errors import OfstitchError

log = logging.getLogger(__name__)

SAMPLE_TILES = 48
MIN_GAIN = 0.05  # a darker profile pixel is taken as this (no division blow-up)


class FlatField:
    """An illumination profile (mean 1) and its images at the scales a mosaic needs."""

    def __init__(self, gain: np.ndarray, source: str) -> None:
        gain = np.asarray(gain, dtype=np.float32)
        gain = np.maximum(gain / float(np.mean(gain)), MIN_GAIN)
        self.gain, self.source = gain, source
        self._images: dict[tuple[int, int], pyvips.Image] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # for the workers of a cluster: the profile only
        return {"gain": self.gain, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.gain, self.source = state["gain"], state["source"]
        self._images, self._lock = {}, threading.Lock()

    @property
    def shape(self) -> tuple[int, int]:
        return self.gain.shape

    def image(self, out_shape: tuple[int, int]) -> pyvips.Image:
        """The profile resized to ``out_shape`` = ``(h, w)``, as a one-band float image."""
        with self._lock:
            cached = self._images.get(tuple(out_shape))
        if cached is not None:
            return cached
        image = pyvips.Image.new_from_array(self.gain)
        h, w = out_shape
        if (image.height, image.width) != (h, w):
            image = image.resize(w / image.width, vscale=h / image.height, kernel="linear")
        image = image.copy_memory()
        with self._lock:
            self._images[tuple(out_shape)] = image
        return image

    def describe(self) -> str:
        return (f"flat field from {self.source}: gain {self.gain.min():.2f} to "
                f"{self.gain.max():.2f} (mean 1)")


def estimate(paths: Sequence[Path], tile_shape: tuple[int, int], *,
             sample: int = SAMPLE_TILES, scale: float = 0.25) -> FlatField:
    """The illumination profile of a scan from its own tiles (see the module docstring)."""
    from scipy.ndimage import gaussian_filter

    picks = np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).astype(int))
    shape = tiles.scaled_shape(tile_shape, scale)
    stack = []
    for i in picks:
        try:
            stack.append(tiles.read_grey(paths[int(i)], scale, shape=tile_shape))
        except tiles.TileReadError:
            continue
    if len(stack) < 3:
        raise OfstitchError("--flat-field auto needs at least 3 readable tiles; give an image "
                            "of an empty field with --flat-field FILE")
    profile = np.median(np.stack(stack), axis=0)
    profile = gaussian_filter(profile, sigma=max(shape) / 16, mode="nearest")
    if not np.isfinite(profile).all() or profile.mean() <= 0:
        raise OfstitchError("--flat-field auto found no usable illumination profile (dark or "
                            "signed tiles); give one with --flat-field FILE")
    flat = FlatField(profile, f"the median of {len(stack)} tiles")
    log.info("%s", flat.describe())
    return flat


def load(path: Path, tile_shape: tuple[int, int]) -> FlatField:
    """The illumination profile in the image ``path`` (any size: resized to the tiles)."""
    path = Path(path)
    try:
        grey = tiles.read_grey(path)
    except tiles.TileReadError as exc:
        raise OfstitchError(f"--flat-field: {exc}") from None
    if grey.mean() <= 0:
        raise OfstitchError(f"--flat-field: {path.name} is dark: it cannot be a flat field")
    flat = FlatField(grey, path.name)
    if grey.shape != tuple(tile_shape):
        log.info("flat field %s is %dx%d, the tiles %dx%d: resized", path.name, grey.shape[1],
                 grey.shape[0], tile_shape[1], tile_shape[0])
    return flat


def resolve(setting: str | None, paths: Sequence[Path], tile_shape: tuple[int, int]
            ) -> FlatField | None:
    """The flat field that ``--flat-field`` asks for: ``None``, ``"auto"`` or a file."""
    if not setting:
        return None
    if setting == "auto":
        return estimate(paths, tile_shape)
    return load(Path(setting), tile_shape)
