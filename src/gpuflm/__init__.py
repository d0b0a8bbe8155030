"""gpuflm: rotation-method diffraction data processing in the manner of MOSFLM, on GPUs and CPUs.

Importing gpuflm probes no GPU and reads no environment variable; choose an
array backend per call or per session with :func:`gpuflm.backends.get_backend`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpuflm")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Session", "__version__"]


def __getattr__(name: str):
    """``gpuflm.Session`` (the Python API) without importing the processing code at ``import gpuflm``."""
    if name == "Session":
        from .api import Session

        return Session
    raise AttributeError(f"module 'gpuflm' has no attribute {name!r}")
