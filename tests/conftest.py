"""Shared fixtures: array backends, the shared data folder and synthetic scans."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from ofstitch.backends import Backend, backend_of

SHARED_DATA = Path(os.environ.get("OFSTITCH_SHARED_DATA",
                                  Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


REQUIRE_CUPY = os.environ.get("OFSTITCH_REQUIRE_CUPY") == "1"  # benchmarks/gpu_check.sh


def _backends() -> list:
    params = [pytest.param("numpy", id="numpy")]
    params.append(pytest.param("array_api_strict", id="array_api_strict", marks=pytest.mark.skipif(
        importlib.util.find_spec("array_api_strict") is None,
        reason="array-api-strict is not installed (pip install -e '.[test]')")))
    cupy_ok = False
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            cupy_ok = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            cupy_ok = False
    if REQUIRE_CUPY and not cupy_ok:
        raise RuntimeError("OFSTITCH_REQUIRE_CUPY=1 but CuPy with a CUDA GPU is not usable "
                           "(see 'ofstitch devices')")
    params.append(pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(
        not cupy_ok, reason="CuPy with a CUDA GPU is not available")))
    return params


@pytest.fixture(params=_backends())
def backend(request) -> Backend:
    """Each array backend: numpy, array-api-strict on a non-default device, and cupy."""
    name = request.param
    if name == "numpy":
        return backend_of(np.empty(0))
    if name == "array_api_strict":
        import array_api_strict as xps

        xps.set_array_api_strict_flags(api_version="2024.12")
        device = xps.Device("device1")  # not the default: catches hidden host transfers
        return Backend("array_api_strict", xps, device)
    import cupy

    return backend_of(cupy.empty(0))


@pytest.fixture
def xp(backend):
    return backend.xp


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is not present ({SHARED_DATA})")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def source_image() -> np.ndarray:
    """The real H&E image synthetic scans are cut from (shared copy, else the bundled one)."""
    from ofstitch.synthetic import load_source

    shared = SHARED_DATA / "cmu1-he" / "CMU-1-Small-Region.jpg"
    return load_source(shared if shared.is_file() else None)


@pytest.fixture
def make_synthetic(tmp_path, source_image):
    """Factory: ``make_synthetic(name="scan", **make_scan_kwargs)`` -> SyntheticScan."""
    from ofstitch.synthetic import make_scan

    def factory(name: str = "scan", **kwargs):
        kwargs.setdefault("source", source_image)
        return make_scan(tmp_path / name, **kwargs)

    return factory
