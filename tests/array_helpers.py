"""Helpers shared by the array tests: a texture to cut tiles from, and one assert for
where an array lives."""

from __future__ import annotations

import array_api_compat
import numpy as np
import scipy.ndimage as ndi

from ofstitch.backends import Backend


def texture(shape=(320, 360), sigma=1.0, seed=0) -> np.ndarray:
    """Smooth random texture (float32, unit-ish variance).

    ``sigma`` ~ 1 px keeps the correlation peak sharp, so that the overlap-area
    slope of an unnormalised correlation biases the parabolic sub-pixel fit by
    only a few hundredths of a pixel.
    """
    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.normal(size=shape), sigma)
    return (tex / tex.std()).astype(np.float32)


def assert_array(backend: Backend, *arrays, dtype=None, shape=None) -> None:
    """Each array is of ``backend``'s namespace and on its device, and (when given) of
    ``dtype`` and ``shape``."""
    want = array_api_compat.array_namespace(backend.asarray(np.zeros(1)))
    for arr in arrays:
        assert array_api_compat.array_namespace(arr) is want, (type(arr), want)
        if backend.device is not None:
            got = array_api_compat.device(arr)
            assert got == backend.device, f"on {got}, not {backend.device}"
        if dtype is not None:
            assert arr.dtype == dtype, (arr.dtype, dtype)
        if shape is not None:
            assert tuple(arr.shape) == tuple(shape), (arr.shape, shape)
