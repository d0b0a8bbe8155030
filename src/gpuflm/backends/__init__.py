"""Choose and describe the array backend: ``numpy``, ``cupy`` or ``auto``.

This is the only module of gpuflm that imports CuPy. Nothing here runs at
``import gpuflm``: the GPU probe happens the first time a backend is asked
for, and its answer is cached for the life of the process.

A backend is chosen per call or per session (never by an environment
variable read at import time)::

    >>> from gpuflm.backends import get_backend
    >>> be = get_backend("numpy")
    >>> be.name
    'numpy'
    >>> x = be.asarray([1.0, 2.0])
    >>> be.to_host(x).tolist()
    [1.0, 2.0]

``auto`` picks CuPy when it imports and a CUDA device is present, NumPy
otherwise, and records why in :attr:`Backend.reason`. Asking for ``cupy``
where there is no usable GPU raises :class:`BackendUnavailable` with the
cause.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: The names a user may pass wherever a backend is chosen.
BACKEND_CHOICES = ("numpy", "cupy", "auto")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot be used on this machine."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a backend computes on."""

    kind: str  #: "cpu" or "gpu"
    name: str  #: e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    memory_bytes: int | None = None  #: total device memory (GPU) or RAM
    compute_capability: str | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line: ``gpu NVIDIA H100 (79.1 GiB, cc 9.0)``."""
        parts = []
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        if self.compute_capability:
            parts.append(f"cc {self.compute_capability}")
        tail = f" ({', '.join(parts)})" if parts else ""
        return f"{self.kind} {self.name}{tail}"


@dataclass(frozen=True)
class Backend:
    """An array engine: its namespace, its scipy.ndimage and its device.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        The array namespace (``numpy`` or ``cupy``).
    reason : str
        Why this backend was chosen (meaningful for ``auto``).
    """

    name: str
    xp: ModuleType
    reason: str = ""

    # -- namespace-level helpers ---------------------------------------------
    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    @property
    def ndimage(self) -> ModuleType:
        """``scipy.ndimage`` or ``cupyx.scipy.ndimage`` (same API)."""
        if self.is_gpu:
            import cupyx.scipy.ndimage as ndi
        else:
            import scipy.ndimage as ndi
        return ndi

    @property
    def fft(self) -> ModuleType:
        return self.xp.fft

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """Put ``x`` (host or device data) on this backend's device."""
        return to_device(x, self, dtype=dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return to_host(x)

    def empty_host(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A host array for data bound for this backend's device: page-locked (pinned) on a GPU,
        so host-to-device copies run asynchronously at full bus speed; plain NumPy otherwise."""
        if self.is_gpu:
            import cupyx

            return cupyx.empty_pinned(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def device(self) -> DeviceInfo:
        return _describe(self.name)

    def __repr__(self) -> str:  # short, for logs
        return f"Backend({self.name!r})"


class UploadRing:
    """Double-buffered host -> device uploads that overlap the copies with the compute.

    ``slots`` device buffers are allocated once (no memory-pool traffic per
    block). :meth:`upload` copies a host block into the next slot on a copy
    stream of its own, after the compute that last used the slot has finished
    (an event the compute stream recorded in :meth:`release`); :meth:`acquire`
    makes the compute stream wait for the copy. Host buffers must be pinned
    (:meth:`Backend.empty_host`) for the copy to be asynchronous; the producer
    must not refill a host buffer before :meth:`host_free` says so.

    On the CPU it is a no-op wrapper (``upload`` returns the host block).
    """

    def __init__(self, backend: Backend, slots: int):
        self.backend = backend
        self.slots = int(slots)
        self._dev: list[Any] = [None] * self.slots
        self._uploaded: list[Any] = [None] * self.slots
        self._released: list[Any] = [None] * self.slots
        self._stream = backend.xp.cuda.Stream(non_blocking=True) if backend.is_gpu else None

    def host_free(self, slot: int) -> None:
        """Wait until the last upload from host slot ``slot`` has left the host buffer."""
        ev = self._uploaded[slot]
        if ev is not None:
            ev.synchronize()

    def upload(self, slot: int, host: np.ndarray) -> Any:
        """Start copying ``host`` into device slot ``slot``; returns the device array (a view of the slot)."""
        if not self.backend.is_gpu:
            return host
        cp = self.backend.xp
        buf = self._dev[slot]
        if buf is None or buf.shape[1:] != host.shape[1:] or buf.shape[0] < host.shape[0] or buf.dtype != host.dtype:
            buf = self._dev[slot] = cp.empty(host.shape, dtype=host.dtype)
        dev = buf[: host.shape[0]]
        if self._released[slot] is not None:
            self._stream.wait_event(self._released[slot])
        dev.set(host, stream=self._stream)
        self._uploaded[slot] = self._stream.record()
        return dev

    def acquire(self, slot: int) -> None:
        """Make the compute (current) stream wait for slot ``slot``'s upload."""
        if self.backend.is_gpu and self._uploaded[slot] is not None:
            self.backend.xp.cuda.get_current_stream().wait_event(self._uploaded[slot])

    def release(self, slot: int) -> None:
        """The compute stream is done with slot ``slot`` once its queued work finishes."""
        if self.backend.is_gpu:
            self._released[slot] = self.backend.xp.cuda.get_current_stream().record()


# -- probing ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _probe_cupy() -> tuple[ModuleType | None, str]:
    """Import CuPy and check for a device; cached. Returns (module, why-not)."""
    try:
        import cupy  # noqa: PLC0415 - deliberately lazy
    except Exception as exc:  # ImportError or a broken CUDA install
        return None, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return None, f"CuPy imports but no CUDA device is usable ({exc})"
    if n < 1:
        return None, "CuPy imports but there is no CUDA device"
    return cupy, ""


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return _probe_cupy()[0] is not None


def get_backend(name: str | Backend | None = "auto") -> Backend:
    """Return the backend called ``name`` (``numpy``, ``cupy`` or ``auto``).

    Parameters
    ----------
    name : {"numpy", "cupy", "auto"} or Backend or None
        ``None`` means ``auto``. A :class:`Backend` is returned unchanged.

    Raises
    ------
    ValueError
        ``name`` is not one of the choices.
    BackendUnavailable
        ``cupy`` was asked for and there is no usable GPU.
    """
    if isinstance(name, Backend):
        return name
    key = "auto" if name is None else str(name).lower()
    if key not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}; got {name!r}")
    if key == "numpy":
        return Backend("numpy", np, reason="asked for numpy")
    cupy, why = _probe_cupy()
    if key == "cupy":
        if cupy is None:
            raise BackendUnavailable(f"backend 'cupy' asked for but not usable: {why}")
        return Backend("cupy", cupy, reason="asked for cupy")
    if cupy is not None:
        be = Backend("cupy", cupy, reason="auto: CuPy and a CUDA device are present")
    else:
        be = Backend("numpy", np, reason=f"auto: using NumPy because {why}")
    log.info("backend %s (%s)", be.name, be.reason)
    return be


def available_backends() -> list[str]:
    """Backends usable here, NumPy first."""
    return ["numpy"] + (["cupy"] if cupy_available() else [])


# -- arrays -----------------------------------------------------------------


def array_namespace(*arrays: Any) -> ModuleType:
    """The array namespace of ``arrays`` (array-api-compat), NumPy for scalars/lists."""
    import array_api_compat

    arrs = [a for a in arrays if a is not None and not isinstance(a, (int, float, complex, list, tuple))]
    if not arrs:
        return np
    xp = array_api_compat.array_namespace(*arrs)
    # NumPy >= 2 implements the standard itself: use the plain module (the
    # wrapper costs a layer on every call). CuPy keeps array-api-compat's
    # wrapper, which supplies the standard names (atan2, acos, astype, ...).
    if array_api_compat.is_numpy_namespace(xp):
        return np
    return xp


def is_device_array(x: Any) -> bool:
    """True for a CuPy array (data on a GPU)."""
    return type(x).__module__.split(".")[0] == "cupy"


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of ``x`` wherever it lives."""
    if is_device_array(x):
        return x.get()
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__.split(".")[0]
    if mod == "array_api_strict":
        return np.asarray(x._array)  # strict arrays refuse __array__ on purpose
    return np.asarray(x)


def to_device(x: Any, backend: str | Backend | ModuleType | None = "auto", dtype: Any = None) -> Any:
    """Move ``x`` to ``backend``'s device (a no-op when it is already there).

    ``backend`` may be a name, a :class:`Backend` or an array namespace.
    """
    if isinstance(backend, ModuleType):
        xp = backend
    else:
        xp = get_backend(backend).xp
    if xp is np:
        return np.asarray(to_host(x), dtype=dtype)
    if xp.__name__.startswith("cupy") or not is_device_array(x):
        return xp.asarray(x, dtype=dtype)
    return xp.asarray(to_host(x), dtype=dtype)


def erf(x: Any) -> Any:
    """The error function on ``x``'s backend (scipy.special / cupyx.scipy.special).

    The array-API standard has no ``erf``; this is one of the few
    backend-specific calls and stays here.
    """
    if is_device_array(x):
        import cupyx.scipy.special as special
    else:
        import scipy.special as special

        if not isinstance(x, np.ndarray) and not np.isscalar(x):
            raise TypeError(f"erf is available for NumPy and CuPy arrays, not {type(x).__module__}")
    return special.erf(x)


# -- device descriptions ------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _describe(name: str) -> DeviceInfo:
    if name == "cupy":
        cupy = _probe_cupy()[0]
        if cupy is None:
            raise BackendUnavailable(_probe_cupy()[1])
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        raw = props.get("name", b"CUDA device")
        gpu_name = raw.decode() if isinstance(raw, bytes) else str(raw)
        return DeviceInfo(
            kind="gpu",
            name=gpu_name,
            memory_bytes=int(props.get("totalGlobalMem", 0)) or None,
            compute_capability=f"{props.get('major', '?')}.{props.get('minor', '?')}",
            extra={"device_id": dev.id, "cupy": cupy.__version__},
        )
    return DeviceInfo(kind="cpu", name=_cpu_name(), memory_bytes=_ram_bytes(), extra={"numpy": np.__version__})


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe_device(backend: str | Backend = "auto") -> DeviceInfo:
    """Describe the device of ``backend`` (name, memory, compute capability)."""
    return get_backend(backend).device()


__all__ = [
    "BACKEND_CHOICES",
    "Backend",
    "BackendUnavailable",
    "DeviceInfo",
    "UploadRing",
    "array_namespace",
    "erf",
    "available_backends",
    "cupy_available",
    "describe_device",
    "get_backend",
    "is_device_array",
    "to_device",
    "to_host",
]
