"""The device seam: backend selection (with a faked CuPy), memory budgets, and the
pipeline, the streaming correlation and the Laplacian solve on every backend.

No GPU is needed: CuPy is faked either by hiding it from ``importlib.util.find_spec``
or by putting a stand-in ``cupy`` module into ``sys.modules`` whose
``cuda.runtime.getDeviceCount`` returns 0 or raises the errors the real runtime raises.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import array_api_compat
import numpy as np
import pytest
from cli_helpers import run_main

import ofstitch
from ofstitch import backends
from ofstitch.backends import (
    NUMPY,
    Backend,
    free_memory_bytes,
    list_devices,
    select_backend,
    solve_laplacian,
    to_host,
)
from ofstitch.errors import DeviceUnavailableError, OfstitchError
from ofstitch.settings import CorrelationSettings, StitchSettings, parse_memory
from ofstitch.stream import (
    ARRAYS_PER_PAIR,
    DEFAULT_BUDGET_BYTES,
    CorrelationPlan,
    memory_budget,
)
from ofstitch.synthetic import make_scan, pair_errors

CUPY_INSTALLED = importlib.util.find_spec("cupy") is not None


# ----------------------------------------------------------------------------- fake CuPy


class CUDARuntimeError(RuntimeError):
    """Stands in for ``cupy_backends.cuda.api.runtime.CUDARuntimeError``."""


DRIVER_ERROR = ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
                "runtime version")
NO_DEVICE_ERROR = "cudaErrorNoDevice: no CUDA-capable device is detected"


def _fake_cupy(device_count) -> types.ModuleType:
    """A ``cupy`` module whose ``cuda.runtime.getDeviceCount`` is ``device_count``."""
    mod = types.ModuleType("cupy")
    mod.__spec__ = importlib.machinery.ModuleSpec("cupy", loader=None)
    runtime = types.SimpleNamespace(getDeviceCount=device_count)
    mod.cuda = types.SimpleNamespace(runtime=runtime)
    return mod


def _raises(exc: BaseException):
    def count() -> int:
        raise exc

    return count


@pytest.fixture
def hide_cupy(monkeypatch):
    """CuPy is not installed: ``find_spec('cupy')`` is None and it is not imported."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)


@pytest.fixture
def fake_cupy(monkeypatch):
    """Factory: install a fake ``cupy`` whose device count is the given callable."""

    def install(device_count) -> types.ModuleType:
        mod = _fake_cupy(device_count)
        monkeypatch.setitem(sys.modules, "cupy", mod)
        return mod

    return install


@pytest.fixture
def broken_cupy_import(monkeypatch):
    """CuPy is installed but ``import cupy`` fails (missing CUDA libraries)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "cupy":
            return importlib.machinery.ModuleSpec("cupy", loader=None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError


# Each way CUDA can be unusable: (how to fake it, words the message must contain).
FAILURES = {
    "not-installed": ("CuPy is not installed", "ofstitch[cuda12]"),
    "no-gpu": ("no CUDA GPU",),
    "driver": ("driver", "update the driver"),
    "insufficient": ("driver",),
    "no-device-error": ("no usable CUDA GPU", "cudaErrorNoDevice"),
    "generic-error": ("no usable CUDA GPU", "out of cheese"),
    "empty-error": ("no usable CUDA GPU", "CUDARuntimeError"),
    "import-fails": ("no usable CUDA GPU",),
}


@pytest.fixture(params=list(FAILURES))
def cuda_failure(request, make_cuda_unusable) -> tuple[str, ...]:
    """Fake one way CUDA is unusable; return the words its message must contain."""
    make_cuda_unusable(request.param)
    return FAILURES[request.param]


@pytest.fixture
def make_cuda_unusable(request, fake_cupy):
    def make(kind: str) -> None:
        if kind == "not-installed":
            request.getfixturevalue("hide_cupy")
        elif kind == "no-gpu":
            fake_cupy(lambda: 0)
        elif kind == "driver":
            fake_cupy(_raises(CUDARuntimeError(DRIVER_ERROR)))
        elif kind == "insufficient":
            fake_cupy(_raises(CUDARuntimeError("cudaErrorInsufficient: too old")))
        elif kind == "no-device-error":
            fake_cupy(_raises(CUDARuntimeError(NO_DEVICE_ERROR)))
        elif kind == "generic-error":
            fake_cupy(_raises(CUDARuntimeError("out of cheese\nsecond line")))
        elif kind == "empty-error":
            fake_cupy(_raises(CUDARuntimeError()))
        elif kind == "import-fails":
            request.getfixturevalue("broken_cupy_import")
        else:  # pragma: no cover
            raise AssertionError(kind)

    return make


# ----------------------------------------------------------------------------- selection


def test_cpu_is_numpy_without_looking_for_cuda(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("--device cpu must not probe CUDA")

    monkeypatch.setattr(backends, "_cupy_problem", boom)
    backend = select_backend("cpu")
    assert backend is NUMPY
    assert backend.name == "numpy"
    assert array_api_compat.is_numpy_namespace(backend.xp)
    assert backend.describe() == "cpu (numpy)"
    assert select_backend() is NUMPY  # the default is the CPU


def test_auto_falls_back_to_numpy(cuda_failure):
    assert select_backend("auto") is NUMPY


def test_cuda_fails_naming_the_missing_piece(cuda_failure):
    with pytest.raises(DeviceUnavailableError) as info:
        select_backend("cuda")
    message = str(info.value)
    assert isinstance(info.value, OfstitchError)  # a user error: exit code 2 in the CLI
    assert message.startswith("--device cuda cannot be used: ")
    for word in cuda_failure:
        assert word in message, message
    assert "\n" not in message  # one line, even for a multi-line runtime error


def test_cuda_message_without_cupy(hide_cupy):
    with pytest.raises(DeviceUnavailableError, match=r"CuPy is not installed") as info:
        select_backend("cuda")
    assert "pip install 'ofstitch[cuda12]'" in str(info.value)
    assert "--device cpu" in str(info.value)


def test_cuda_message_without_gpu(fake_cupy):
    fake_cupy(lambda: 0)
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
        select_backend("cuda")


def test_cuda_message_driver(fake_cupy):
    fake_cupy(_raises(CUDARuntimeError(DRIVER_ERROR)))
    with pytest.raises(DeviceUnavailableError) as info:
        select_backend("cuda")
    message = str(info.value)
    assert "driver" in message
    assert "CUDA driver version is insufficient" in message  # the runtime's own words
    assert "[cuda12]" in message and "[cuda13]" in message


@pytest.mark.skipif(CUPY_INSTALLED, reason="CuPy is installed here")
def test_cuda_without_cupy_for_real():
    """The real environment, not a fake: CuPy is absent on this machine."""
    with pytest.raises(DeviceUnavailableError, match="CuPy is not installed"):
        select_backend("cuda")
    assert select_backend("auto") is NUMPY


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:0", "", "numpy", None])
def test_unknown_device_is_a_value_error(device):
    with pytest.raises(ValueError, match="device must be one of"):
        select_backend(device)


def test_list_devices_explains_why_cuda_is_missing(cuda_failure):
    lines = list_devices()
    assert lines[0].startswith("cpu:") and "numpy" in lines[0]
    assert len(lines) == 2
    assert lines[1].startswith("cuda: unavailable (")
    for word in cuda_failure:
        assert word in lines[1], lines[1]


def test_list_devices_here():
    lines = list_devices()
    assert lines[0] == "cpu: numpy (always available)"
    assert any(line.startswith("cuda") for line in lines[1:])


def test_free_memory_of_the_host_is_none(backend):
    if backend.name == "cupy":
        assert free_memory_bytes(backend) > 0
    else:
        assert free_memory_bytes(backend) is None


# ----------------------------------------------------------------------------- CLI




def user_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit code 2 and exactly one line on stderr, without a traceback."""
    assert result.returncode == 2, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ofstitch: error:")
    return lines[0]


@pytest.fixture
def tiny_scan(tmp_path, source_image) -> Path:
    """A 2x2 scan of small JPEG tiles with OpenFlexure metadata."""
    return make_scan(tmp_path / "tiny", source=source_image, grid=(2, 2),
                     tile_shape=(96, 128), seed=4).folder


def test_cli_device_cuda_without_cupy(hide_cupy, tiny_scan, tmp_path, capsys):
    line = user_error_line(run_main("--device", "cuda", tiny_scan, "-o", tmp_path / "out",
                                    capsys=capsys))
    assert "CuPy" in line
    assert "ofstitch[cuda12]" in line  # not eaten as rich markup
    assert not list((tmp_path / "out").glob("*.jpg"))  # nothing written on the CPU instead


@pytest.mark.parametrize("kind", ["no-gpu", "driver"])
def test_cli_device_cuda_unusable(kind, make_cuda_unusable, tiny_scan, tmp_path, capsys):
    make_cuda_unusable(kind)
    line = user_error_line(run_main(tiny_scan, "--device", "cuda", "-o", tmp_path / "out",
                                    capsys=capsys))
    assert FAILURES[kind][0] in line


@pytest.mark.skipif(CUPY_INSTALLED, reason="CuPy is installed here")
def test_cli_device_cuda_in_a_real_process(tiny_scan, tmp_path):
    env = dict(os.environ, COLUMNS="1000", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    result = subprocess.run(
        [sys.executable, "-m", "ofstitch.cli", "--device", "cuda", str(tiny_scan),
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120, input="")
    line = user_error_line(result)
    assert "CuPy is not installed" in line
    assert "ofstitch[cuda12]" in line


def test_cli_device_auto_says_which_device(fake_cupy, tiny_scan, tmp_path, capsys):
    fake_cupy(lambda: 0)
    result = run_main(tiny_scan, "--device", "auto", "--stitching-mode", "preview",
                      "-o", tmp_path / "out", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "Using cpu (numpy)" in result.stderr
    assert "on cpu (numpy)" in result.stdout
    assert (tmp_path / "out" / "preview.jpg").is_file()


def test_cli_device_auto_quiet_says_nothing(hide_cupy, tiny_scan, tmp_path, capsys):
    result = run_main(tiny_scan, "--device", "auto", "--quiet", "--stitching-mode",
                      "only-correlate", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "Using" not in result.stderr


def test_cli_devices_lists_cpu_and_why_not_cuda(fake_cupy, capsys):
    fake_cupy(_raises(CUDARuntimeError(DRIVER_ERROR)))
    result = run_main("devices", capsys=capsys)
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("cpu:")
    assert lines[1].startswith("cuda: unavailable") and "driver" in lines[1]


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize(("text", "want"), [
    ("512MB", 512 * 10**6),
    ("512mb", 512 * 10**6),
    (" 512 MB ", 512 * 10**6),
    ("2GiB", 2 * 2**30),
    ("1.5gb", 1.5e9),
    ("64MiB", 64 * 2**20),
    ("100k", 100_000),
    ("1TB", 10**12),
])
def test_parse_memory_amounts(text, want):
    kind, value = parse_memory(text)
    assert kind == "bytes"
    assert value == pytest.approx(want)


@pytest.mark.parametrize(("text", "want"), [("0.5", 0.5), ("1", 1.0), (".25", 0.25),
                                            ("5e-1", 0.5)])
def test_parse_memory_fractions(text, want):
    assert parse_memory(text) == ("fraction", pytest.approx(want))


@pytest.mark.parametrize("text", ["abc", "-1", "0", "", " ", "-0.5", "0GB", "-2GiB", "12XB",
                                  "GB", "nan", "inf", "50%", "1.2.3MB",
                                  "4096"])  # a bare number above 1: which unit? refuse
def test_parse_memory_rejects(text):
    with pytest.raises(OfstitchError, match="^device_memory") as info:
        parse_memory(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["1e999", "1e999GB"])
def test_parse_memory_rejects_infinite_amounts(text):
    with pytest.raises(OfstitchError, match="^device_memory"):
        parse_memory(text)


def test_cli_infinite_device_memory_is_a_user_error(tiny_scan, capsys):
    line = user_error_line(run_main(tiny_scan, "--device-memory", "1e999", "--stitching-mode",
                                    "only-correlate", "--quiet", capsys=capsys))
    assert "--device-memory" in line


@pytest.mark.parametrize("text", ["abc", "0", "-1"])
def test_stitch_settings_check_device_memory(text):
    with pytest.raises(OfstitchError, match="^device_memory"):
        StitchSettings(device_memory=text)
    assert StitchSettings(device_memory="2GiB").device_memory == "2GiB"


@pytest.mark.parametrize("text", ["abc", "-1", "0", "12XB"])
def test_cli_bad_device_memory(text, tiny_scan, tmp_path, capsys):
    line = user_error_line(run_main(tiny_scan, "--device-memory", text, "-o", tmp_path / "out",
                                    capsys=capsys))
    assert "--device-memory" in line
    assert not (tmp_path / "out").exists()  # rejected before anything is written


def test_cli_device_memory_small_budget(tiny_scan, tmp_path, capsys):
    result = run_main(tiny_scan, "--device-memory", "1MB", "--stitching-mode",
                      "only-correlate", "--quiet", capsys=capsys)
    assert result.returncode == 0, result.stderr


def test_memory_budget_defaults_on_the_host():
    assert memory_budget(NUMPY) == DEFAULT_BUDGET_BYTES["time"] == 64 * 2**20
    assert memory_budget(NUMPY, priority="time") == 64 * 2**20
    assert memory_budget(NUMPY, priority="memory") == DEFAULT_BUDGET_BYTES["memory"]
    assert memory_budget(NUMPY, priority="memory") < memory_budget(NUMPY, priority="time")


@pytest.mark.parametrize(("text", "want"), [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30),
                                            ("1.5gb", 1_500_000_000)])
@pytest.mark.parametrize("priority", ["time", "memory"])
def test_memory_budget_explicit_amount(text, want, priority):
    budget = memory_budget(NUMPY, text, priority)
    assert budget == want
    assert isinstance(budget, int)


def test_memory_budget_fraction_of_available_ram(monkeypatch):
    real = os.sysconf
    pages = {"SC_AVPHYS_PAGES": 250_000, "SC_PAGE_SIZE": 4096}

    def sysconf(name):
        return pages[name] if name in pages else real(name)

    monkeypatch.setattr(os, "sysconf", sysconf)
    available = 250_000 * 4096
    assert memory_budget(NUMPY, "0.5") == available // 2
    assert memory_budget(NUMPY, "0.25", "memory") == available // 4
    assert memory_budget(NUMPY, "1") == available


def test_memory_budget_fraction_of_real_ram():
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = memory_budget(NUMPY, "0.5")
    assert 0 < budget
    assert budget == pytest.approx(available / 2, rel=0.2)


def _fake_gpu_backend(monkeypatch, free: int, pooled: int) -> Backend:
    """A ``cupy`` Backend whose device reports ``free`` bytes and ``pooled`` in CuPy's pool."""

    class Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    mod = _fake_cupy(lambda: 1)
    mod.cuda.Device = Device
    mod.cuda.runtime.memGetInfo = lambda: (free, 8 * 2**30)
    pool = types.SimpleNamespace(free_bytes=lambda: pooled)
    mod.get_default_memory_pool = lambda: pool
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return Backend("cupy", None, Device(0))


def test_memory_budget_on_a_gpu(monkeypatch):
    gpu = _fake_gpu_backend(monkeypatch, free=3 * 2**30, pooled=2**30)
    assert free_memory_bytes(gpu) == 4 * 2**30  # the pool's unused bytes count as free
    assert memory_budget(gpu) == 2 * 2**30  # half by default
    assert memory_budget(gpu, priority="memory") == 2**30  # a quarter with priority memory
    assert memory_budget(gpu, "0.1") == int(0.1 * 4 * 2**30)
    assert memory_budget(gpu, "512MiB") == 512 * 2**20


def test_batch_pairs_grows_with_the_budget():
    settings = CorrelationSettings(search_margin=0.0)  # whole tiles
    plan = CorrelationPlan.make((120, 160), settings)
    assert plan.fft_shape[0] >= 240 and plan.fft_shape[1] >= 320  # padded
    per_pair = ARRAYS_PER_PAIR * 4 * plan.fft_shape[0] * plan.fft_shape[1]
    assert plan.batch_pairs(0) == 1
    assert plan.batch_pairs(1) == 1
    assert plan.batch_pairs(per_pair - 1) == 1
    assert plan.batch_pairs(per_pair) == 1
    assert plan.batch_pairs(5 * per_pair) == 5
    budgets = [0, 2**20, 16 * 2**20, 64 * 2**20, 192 * 2**20, 2**30, 16 * 2**30]
    sizes = [plan.batch_pairs(b) for b in budgets]
    assert all(s >= 1 for s in sizes)
    assert sizes == sorted(sizes)
    assert sizes[-1] > sizes[2] > sizes[0]
    assert plan.batch_pairs(memory_budget(NUMPY, priority="memory")) <= \
        plan.batch_pairs(memory_budget(NUMPY))
    # Unpadded spectra are a quarter of the size: about four times the pairs per batch.
    unpadded = CorrelationPlan.make((120, 160), CorrelationSettings(pad=False))
    assert unpadded.batch_pairs(64 * 2**20) >= 3 * plan.batch_pairs(64 * 2**20)
    # Strips of the predicted overlaps need less than whole padded tiles.
    strips = CorrelationPlan.make((120, 160), CorrelationSettings(search_margin=0.1))
    assert strips.margin_px is not None
    assert strips.batch_pairs(64 * 2**20) > plan.batch_pairs(64 * 2**20)


def test_register_passes_the_budget(monkeypatch, tmp_path, source_image):
    """--device-memory and --priority reach the streaming correlation as its budget."""
    from ofstitch import registration

    seen = []
    real = registration.correlate_pairs

    def spy(*args, **kwargs):
        seen.append((kwargs.get("budget_bytes"), kwargs.get("batch_pairs")))
        return real(*args, **kwargs)

    monkeypatch.setattr(registration, "correlate_pairs", spy)
    folder = make_scan(tmp_path / "scan", source=source_image, grid=(2, 2),
                       tile_shape=(96, 128)).folder
    for settings, want in [(StitchSettings(), (64 * 2**20, None)),
                           (StitchSettings(priority="memory"), (32 * 2**20, None)),
                           (StitchSettings(device_memory="3MB"), (3_000_000, None)),
                           (StitchSettings(batch_pairs=2), (64 * 2**20, 2))]:
        seen.clear()
        ofstitch.register(folder, settings, use_cache=False)
        assert seen == [want]


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture
def scan_3x3(make_synthetic):
    return make_synthetic(grid=(3, 3), tile_shape=(120, 160), seed=2)


@pytest.mark.parametrize("correlation", [
    CorrelationSettings(),
    CorrelationSettings(pad=False),
    CorrelationSettings(corr_mask_radius=20.0),
], ids=["pad", "no-pad", "mask"])
def test_register_same_on_every_backend(backend, scan_3x3, correlation):
    settings = StitchSettings(correlation=correlation)
    want = ofstitch.register(scan_3x3.folder, settings, backend=NUMPY, use_cache=False)
    got = ofstitch.register(scan_3x3.folder, settings, backend=backend, use_cache=False)
    assert got.names == want.names
    np.testing.assert_array_equal(got.graph.pairs, want.graph.pairs)
    assert len(got.graph.pairs) >= 12  # the 3x3 grid's right and down neighbours
    assert got.n_correlated == len(got.graph.pairs) and got.n_cached == 0
    np.testing.assert_array_equal(np.isnan(got.shift_px), np.isnan(want.shift_px))
    assert np.isfinite(got.shift_px).all(axis=1).sum() >= 10  # blank overlaps give NaN
    np.testing.assert_allclose(got.shift_px, want.shift_px, atol=0.01)
    np.testing.assert_allclose(got.quality, want.quality, atol=1e-3)
    np.testing.assert_array_equal(got.placement.accepted, want.placement.accepted)
    np.testing.assert_allclose(got.positions_px, want.positions_px, atol=0.05)
    assert isinstance(got.positions_px, np.ndarray)
    assert backend.name in got.device or (backend.name == "numpy" and got.device.startswith("cpu"))
    # And it is right: the trusted pairs are placed as in the ground truth.
    order = [scan_3x3.names.index(n) for n in got.names]
    accepted = got.placement.accepted
    assert accepted.sum() >= 9
    errors = pair_errors(got.positions_px, scan_3x3.truth_px[order], got.graph.pairs)
    assert errors[accepted].max() < 1.5


def test_register_default_backend_comes_from_settings(hide_cupy, scan_3x3):
    reg = ofstitch.register(scan_3x3.folder, StitchSettings(device="auto"), use_cache=False)
    assert reg.device == "cpu (numpy)"
    with pytest.raises(DeviceUnavailableError):
        ofstitch.register(scan_3x3.folder, StitchSettings(device="cuda"), use_cache=False)


# ----------------------------------------------------------------------------- Laplacian


def _dense_lstsq(idx_a, idx_b, weights, rhs, n):
    """Weighted least squares with a zero-mean gauge, by dense NumPy lstsq."""
    inc = np.zeros((len(idx_a), n))
    np.add.at(inc, (np.arange(len(idx_a)), idx_b), 1.0)
    np.add.at(inc, (np.arange(len(idx_a)), idx_a), -1.0)
    sw = np.sqrt(weights)[:, None]
    x, *_ = np.linalg.lstsq(np.vstack([inc * sw, np.ones((1, n))]),
                            np.vstack([rhs * sw, np.zeros((1, rhs.shape[1]))]), rcond=None)
    return x


def _random_graph(n, extra, seed):
    """A connected graph: a random spanning tree plus ``extra`` random (repeated) edges."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    a = [int(perm[rng.integers(0, i)]) for i in range(1, n)]
    b = [int(perm[i]) for i in range(1, n)]
    a += rng.integers(0, n, extra).tolist()
    b += rng.integers(0, n, extra).tolist()
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    swap = rng.random(len(a)) < 0.5  # both edge directions
    a[swap], b[swap] = b[swap], a[swap].copy()
    return a, b, rng


@pytest.mark.parametrize(("n", "extra", "k"), [(2, 0, 1), (2, 3, 4), (3, 0, 2), (9, 6, 1),
                                               (12, 20, 3), (25, 40, 6)])
def test_solve_laplacian_matches_dense_lstsq(backend, n, extra, k):
    idx_a, idx_b, rng = _random_graph(n, extra, seed=n * 100 + k)
    weights = rng.uniform(0.05, 3.0, len(idx_a))
    rhs = rng.normal(0, 20, (len(idx_a), k))
    got = solve_laplacian(backend.asarray(idx_a), backend.asarray(idx_b),
                          backend.asarray(weights), backend.asarray(rhs), n)
    if backend.name != "numpy":
        assert array_api_compat.device(got) == array_api_compat.device(backend.asarray(rhs))
    got = to_host(got)
    assert got.shape == (n, k)
    want = _dense_lstsq(idx_a, idx_b, weights, rhs, n)
    np.testing.assert_allclose(got, want, atol=1e-8)
    np.testing.assert_allclose(got.mean(axis=0), 0, atol=1e-9)


def test_solve_laplacian_columns_are_independent(backend):
    """Solving k columns at once equals solving each column alone."""
    idx_a, idx_b, rng = _random_graph(10, 12, seed=5)
    weights = rng.uniform(0.1, 2.0, len(idx_a))
    rhs = rng.normal(0, 5, (len(idx_a), 4))
    args = [backend.asarray(idx_a), backend.asarray(idx_b), backend.asarray(weights)]
    together = to_host(solve_laplacian(*args, backend.asarray(rhs), 10))
    for col in range(4):
        alone = to_host(solve_laplacian(*args, backend.asarray(rhs[:, col:col + 1]), 10))
        np.testing.assert_allclose(together[:, col:col + 1], alone, atol=1e-9)
    # Columns that differ (not copies of one another) give different solutions.
    assert not np.allclose(together[:, 0], together[:, 1])


def test_solve_laplacian_exact_for_consistent_shifts(backend):
    rng = np.random.default_rng(3)
    n = 15
    truth = rng.normal(0, 50, (n, 3))
    idx_a, idx_b, _ = _random_graph(n, 10, seed=9)
    rhs = truth[idx_b] - truth[idx_a]
    weights = rng.uniform(0.5, 1.5, len(idx_a))
    got = to_host(solve_laplacian(backend.asarray(idx_a), backend.asarray(idx_b),
                                  backend.asarray(weights), backend.asarray(rhs), n))
    np.testing.assert_allclose(got, truth - truth.mean(axis=0), atol=1e-8)
