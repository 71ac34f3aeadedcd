"""The single device seam: array namespaces, host transfer and the sparse solve.

No module outside this package imports CuPy. The device is chosen once, at the
edge (:func:`select_backend`), and travels down as a :class:`Backend`, which
carries an array namespace ``xp`` and a device. Kernels derive ``xp`` from their
inputs with :func:`array_api_compat.array_namespace`; only the functions here
move arrays between the host and the device.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ofstitch.errors import DeviceUnavailableError

DEVICE_CHOICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class Backend:
    """An array namespace plus the device that arrays are created on.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"cupy"`` or the namespace's module name (tests use
        ``"array_api_strict"``).
    xp : module
        The array-API namespace.
    device : object
        The device new arrays are put on (``None`` means the namespace default).
    """

    name: str
    xp: Any
    device: Any = None

    def asarray(self, host_array: np.ndarray, dtype: Any = None) -> Any:
        """Move a host NumPy array onto this backend's device."""
        return to_device(host_array, self, dtype=dtype)

    def describe(self) -> str:
        """A short human-readable name of the backend, for logs and summaries."""
        if self.name == "cupy":
            return f"cuda ({_cuda_device_name(self.device)})"
        if self.name == "numpy":
            return "cpu (numpy)"
        return f"{self.name} ({self.device})"


NUMPY = Backend("numpy", array_api_compat.array_namespace(np.empty(0)), None)


def _cupy_problem() -> str | None:
    """Return why CUDA cannot be used, or ``None`` when it can."""
    if importlib.util.find_spec("cupy") is None:
        return (
            "CuPy is not installed: install the CUDA extra, e.g. "
            "pip install 'ofstitch[cuda12]' (or [cuda13]), or use --device cpu"
        )
    try:
        import cupy  # noqa: F401

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA runtime/driver errors have many types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "driver" in msg.lower() or "insufficient" in msg.lower():
            return (
                f"the CUDA driver is too old or mismatched for this CuPy ({msg}): "
                "update the driver or install the matching extra ([cuda12] or [cuda13])"
            )
        return f"no usable CUDA GPU ({msg}): use --device cpu"
    if n == 0:
        return "no CUDA GPU is visible: use --device cpu"
    return None


def _cuda_device_name(device: Any) -> str:
    import cupy

    dev_id = getattr(device, "id", 0) or 0
    props = cupy.cuda.runtime.getDeviceProperties(dev_id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def select_backend(device: str = "cpu") -> Backend:
    """Choose the compute backend from a ``--device`` value.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
        ``cpu`` is NumPy. ``cuda`` is CuPy and fails, naming the missing piece,
        when it cannot work; it never falls back silently. ``auto`` picks CUDA
        when it is usable, otherwise the CPU.

    Raises
    ------
    DeviceUnavailableError
        ``device="cuda"`` and CUDA cannot be used.
    ValueError
        ``device`` is not one of the choices.
    """
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, not {device!r}")
    if device == "cpu":
        return NUMPY
    problem = _cupy_problem()
    if problem is None:
        import cupy

        return Backend("cupy", array_api_compat.array_namespace(cupy.empty(0)), cupy.cuda.Device())
    if device == "cuda":
        raise DeviceUnavailableError(f"--device cuda cannot be used: {problem}")
    return NUMPY


def free_memory_bytes(backend: Backend) -> int | None:
    """Free memory of the backend's device (``None`` for the host)."""
    if backend.name != "cupy":
        return None
    import cupy

    with cupy.cuda.Device(getattr(backend.device, "id", 0) or 0):
        free, _ = cupy.cuda.runtime.memGetInfo()
    # Memory CuPy's pool holds but does not use is free for our batches too.
    return int(free + cupy.get_default_memory_pool().free_bytes())


def list_devices() -> list[str]:
    """Describe each usable device, one line each (for ``ofstitch devices``)."""
    lines = ["cpu: numpy (always available)"]
    problem = _cupy_problem()
    if problem is not None:
        lines.append(f"cuda: unavailable ({problem})")
        return lines
    import cupy

    for i in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        name = _cuda_device_name(cupy.cuda.Device(i))
        lines.append(f"cuda:{i}: {name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return lines


def backend_of(x: Any) -> Backend:
    """The backend an existing array lives on."""
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_numpy_namespace(xp):
        return NUMPY
    if array_api_compat.is_cupy_namespace(xp):
        return Backend("cupy", xp, array_api_compat.device(x))
    return Backend(xp.__name__, xp, array_api_compat.device(x))


def to_device(host_array: np.ndarray, backend: Backend, dtype: Any = None) -> Any:
    """Copy a host NumPy array onto ``backend``'s device (the one host-to-device transfer)."""
    host_array = np.asarray(host_array)
    if backend.name == "numpy":
        return host_array if dtype is None else host_array.astype(dtype, copy=False)
    xp = backend.xp
    if backend.name == "cupy":
        arr = xp.asarray(host_array)
    else:
        arr = xp.asarray(host_array, device=backend.device)
    return arr if dtype is None else xp.astype(arr, dtype)


def to_host(x: Any) -> np.ndarray:
    """Copy a device array to host NumPy (the one device-to-host transfer)."""
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_numpy_namespace(xp):
        return np.asarray(x)
    if array_api_compat.is_cupy_namespace(xp):
        return x.get()
    # Generic standard namespaces (array-api-strict in tests): go through the CPU device.
    cpu = getattr(xp, "Device", None)
    if cpu is not None and array_api_compat.device(x) != cpu("CPU_DEVICE"):
        x = xp.asarray(x, device=cpu("CPU_DEVICE"), copy=True)
    return np.asarray(x)


def solve_laplacian(
    idx_a: Any, idx_b: Any, weights: Any, rhs: Any, n_nodes: int
) -> Any:
    """Solve the weighted graph least squares ``min sum w_k |x_b - x_a - d_k|^2``.

    The normal equations are ``L x = B^T W d`` with ``L = B^T W B`` the weighted
    graph Laplacian. The gauge freedom (a common translation) is fixed by a zero
    mean. The graph must be connected.

    Parameters
    ----------
    idx_a, idx_b : array of int, shape (m,)
        The two nodes of each edge.
    weights : array of float, shape (m,)
        Non-negative weight of each edge.
    rhs : array of float, shape (m, k)
        The measured difference ``x_b - x_a`` of each edge, for ``k`` columns.
    n_nodes : int
        Number of nodes.

    Returns
    -------
    array of float, shape (n_nodes, k)
        The positions, with zero mean, on the inputs' device.

    Notes
    -----
    NumPy uses a SciPy sparse factorisation and CuPy ``cupyx.scipy.sparse``;
    any other namespace uses the dense standard ``linalg.solve`` (fine for the
    small graphs of tests).
    """
    xp = array_api_compat.array_namespace(idx_a, idx_b, weights, rhs)
    if array_api_compat.is_numpy_namespace(xp):
        import scipy.sparse
        import scipy.sparse.linalg

        return _solve_sparse(scipy.sparse, scipy.sparse.linalg.spsolve, np,
                             idx_a, idx_b, weights, rhs, n_nodes)
    if array_api_compat.is_cupy_namespace(xp):
        import cupy
        import cupyx.scipy.sparse
        import cupyx.scipy.sparse.linalg

        return _solve_sparse(cupyx.scipy.sparse, cupyx.scipy.sparse.linalg.spsolve, cupy,
                             idx_a, idx_b, weights, rhs, n_nodes)
    return _solve_dense(xp, idx_a, idx_b, weights, rhs, n_nodes)


def _solve_sparse(sparse, spsolve, xnp, idx_a, idx_b, weights, rhs, n_nodes):
    w = xnp.asarray(weights, dtype=xnp.float64)
    ia = xnp.asarray(idx_a, dtype=xnp.int64)
    ib = xnp.asarray(idx_b, dtype=xnp.int64)
    d = xnp.asarray(rhs, dtype=xnp.float64)
    # L = B^T W B: +w on both diagonals, -w off-diagonal; duplicates are summed.
    rows = xnp.concatenate([ia, ib, ia, ib])
    cols = xnp.concatenate([ia, ib, ib, ia])
    vals = xnp.concatenate([w, w, -w, -w])
    lap = sparse.coo_matrix((vals, (rows, cols)), shape=(n_nodes, n_nodes)).tocsr()
    # b = B^T W d: -w d at node a, +w d at node b.
    b = xnp.zeros((n_nodes, d.shape[1]))
    wd = w[:, None] * d
    _scatter_add_rows(xnp, b, ia, -wd)
    _scatter_add_rows(xnp, b, ib, wd)
    # Fix the gauge by pinning node 0, then shift to zero mean.
    x = xnp.zeros((n_nodes, d.shape[1]))
    if n_nodes > 1:
        sub = lap[1:, 1:].tocsr()
        for col in range(d.shape[1]):  # one right-hand side at a time (CuPy's spsolve)
            x[1:, col] = spsolve(sub, b[1:, col])
    return x - x.mean(axis=0, keepdims=True)


def _scatter_add_rows(xnp, target, idx, values):
    """``target[idx] += values`` with repeated indices summed (NumPy or CuPy)."""
    if xnp is np:
        np.add.at(target, idx, values)
    else:
        import cupyx

        cupyx.scatter_add(target, idx, values)


def _solve_dense(xp, idx_a, idx_b, weights, rhs, n_nodes):
    dtype = rhs.dtype
    dev = array_api_compat.device(rhs)
    nodes = xp.arange(n_nodes, device=dev)
    # Incidence matrix from one-hot rows (a scatter-add that handles repeated indices).
    inc = xp.astype(idx_b[:, None] == nodes[None, :], dtype) - xp.astype(
        idx_a[:, None] == nodes[None, :], dtype
    )
    w_inc = inc * xp.astype(weights, dtype)[:, None]
    lap = xp.matmul(xp.matrix_transpose(w_inc), inc)
    b = xp.matmul(xp.matrix_transpose(w_inc), rhs)
    # Zero-mean gauge: L + 1 1^T / n is non-singular for a connected graph and has the
    # zero-mean solution of L x = b (b sums to zero).
    lap = lap + 1.0 / n_nodes
    return xp.linalg.solve(lap, b)
