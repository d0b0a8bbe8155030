"""Strong-pixel thresholds: DIALS' ``dispersion`` and ``dispersion_extended``, MOSFLM's local box.

Every threshold takes one frame ``(ny, nx)`` or a block ``(n, ny, nx)`` with
its mask and returns a boolean array of the same shape (True = strong), in the
image's namespace and on its device. The NumPy/array-API code here is the
specification and runs unchanged on CuPy: every operation is a separate
elementwise kernel, so no fused multiply-add can change a rounding and the
results are DIALS' bit for bit (see :mod:`gpuflm.kernels.local_stats` for the
sums).

Methods (selectable by name through :func:`find_strong_pixels`):

``dispersion``
    DIALS 3.12 ``DispersionThreshold`` exactly (``local.h``): with the window
    statistics ``m, x, y`` of :func:`~gpuflm.kernels.local_stats.local_sums`
    a pixel ``v`` is strong when it is valid, ``m >= min_local``, ``x >= 0``,
    ``v > global_threshold`` and, without a gain map,
    ``((m y - x^2) - x (m - 1)) > (x n_b) sqrt(2 (m - 1))`` and
    ``m v - x > n_s sqrt(x m)``; with a gain ``g`` (scalar or map)
    ``m y - x^2 > (g x) ((m - 1) + n_b sqrt(2 (m - 1)))`` and
    ``m v - x > n_s sqrt((g x) m)``. (The expressions are written, and
    evaluated, in DIALS' order of operations.)
``dispersion_extended``
    DIALS' default since 2019 (``DispersionExtendedThreshold``): the
    dispersion test alone (no strong test, no global threshold) marks a
    dispersion region; it is eroded to the pixels whose Chebyshev distance to
    the nearest background pixel is at least ``min(kernel_size)``; the local
    mean of the remaining valid pixels (not in the eroded core, value below
    ``2**24``) over a window widened by 2 in each direction
    (``kernel_size + 2``) is ``mu`` (0 where fewer than 2 pixels); a pixel is
    strong when it is valid, in the core, ``v > global_threshold``, the
    widened window's sum is ``>= 0`` and ``v >= mu + n_s sqrt(g mu)``.
    **Deviation from DIALS (on purpose).** DIALS computes the erosion
    distance to every pixel outside the dispersion region, masked pixels
    included, so a module gap or bad pixel counts as background and eats the
    signal within ``min(kernel_size) - 1`` (2) pixels of it: spots touching a
    gap lose their edge or vanish. Here the distance is taken to the nearest
    *valid* non-dispersion pixel (the true mask), so such signal is kept.
    ``keep_gap_signal=False`` restores DIALS' behaviour exactly.
``local``
    MOSFLM style: ``v`` is strong when it is valid, ``v > global_threshold``
    and ``v > mu + n_sigma sqrt(g mu)`` with ``mu`` the masked local mean
    over a box (default 50 x 50 px, rounded up to the next odd size so it is
    centred, i.e. 51 x 51). ``mu`` is estimated twice: the second time
    without the pixels the first estimate found strong, so bright spots do
    not raise their own background.
``radial``
    MOSFLM's stripe background, see :mod:`gpuflm.kernels.radial_background`.

The automatic global threshold (DISTL's elbow) is in
:mod:`gpuflm.kernels.global_threshold`.

Cost: the float64 summed-area tables and their temporaries peak at about
100 bytes per pixel and frame (measured with tracemalloc: 0.62 GB for a
PILATUS 6M frame, so about 1.8 GB for an Eiger2 16M frame). On the CPU the work is memory-bound and one frame per
call is fastest (measured: 0.31 s ``dispersion``, 0.55 s
``dispersion_extended`` per 6M frame on one core); on a GPU pass blocks of
frames to amortise kernel launches, sized to the device memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuflm.backends import array_namespace

from .local_stats import check_half_window, local_mean, local_sums, prepare_image, window_sums

#: Threshold methods by name.
THRESHOLD_METHODS = ("dispersion", "dispersion_extended", "local", "radial")


@dataclass(frozen=True)
class ThresholdConfig:
    """Parameters of the strong-pixel thresholds (DIALS and MOSFLM names).

    Parameters
    ----------
    method : {"dispersion", "dispersion_extended", "local", "radial"}
    kernel_size : (int, int)
        Half-widths of the dispersion window in DIALS' order: ``kernel_size[0]``
        along the slow axis (rows), ``kernel_size[1]`` along the fast axis,
        which is how DIALS' C++ uses its ``kernel_size`` (its help text says
        the opposite; the default is symmetric). 3,3 = a 7 x 7 window.
    sigma_background, sigma_strong : float
        DIALS' ``n_b`` (6) and ``n_s`` (3).
    global_threshold : float or "auto"
        Pixels must exceed this; ``"auto"`` uses DISTL's elbow rule per frame.
    min_local : int
        Fewest valid pixels in the window (DIALS' ``min_local``, 2); ``<= 0``
        means the whole window.
    gain : float or None
        Detector gain. None uses DIALS' no-gain formulas (its default); a
        number uses the gain formulas (as DIALS does when given a gain).
        ``local`` and ``radial`` read None as 1.
    keep_gap_signal : bool
        ``dispersion_extended`` only: erode with the true mask (True, gpuflm)
        or exactly as DIALS 3.12 (False).
    local_box : (int, int)
        Full size (slow, fast) of MOSFLM's background box, px.
    n_sigma : float
        Sigmas above the background for ``local`` and ``radial`` (MOSFLM: 5).
    stripe_width, stripe_offset, radial_bin_width : float
        ``radial`` only, px: width of the background stripe, its offset from
        the beam centre along the rotation axis, width of a radial bin.
    """

    method: str = "dispersion"
    kernel_size: tuple[int, int] = (3, 3)
    sigma_background: float = 6.0
    sigma_strong: float = 3.0
    global_threshold: float | str = 0.0
    min_local: int = 2
    gain: float | None = None
    keep_gap_signal: bool = True
    local_box: tuple[int, int] = (50, 50)
    n_sigma: float = 5.0
    stripe_width: float = 50.0
    stripe_offset: float = 0.0
    radial_bin_width: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"method must be one of {', '.join(THRESHOLD_METHODS)}; got {self.method!r}")
        ky, kx = check_half_window(self.kernel_size, "kernel_size")
        if ky < 1 or kx < 1:
            raise ValueError(f"kernel_size must be two positive integers; got {self.kernel_size!r}")
        object.__setattr__(self, "kernel_size", (ky, kx))
        min_count(self.min_local, (ky, kx))
        for name in ("sigma_background", "sigma_strong", "n_sigma"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if isinstance(self.global_threshold, str):
            if self.global_threshold != "auto":
                raise ValueError(f"global_threshold must be a number >= 0 or 'auto'; got {self.global_threshold!r}")
        elif not float(self.global_threshold) >= 0:
            raise ValueError(f"global_threshold must be >= 0 (DIALS' rule) or 'auto'; got {self.global_threshold!r}")
        if self.gain is not None and not float(self.gain) > 0:
            raise ValueError(f"gain must be > 0 or None; got {self.gain!r}")
        by, bx = (int(v) for v in self.local_box)
        if by < 1 or bx < 1:
            raise ValueError(f"local_box must be two positive integers (px); got {self.local_box!r}")
        object.__setattr__(self, "local_box", (by, bx))
        if not float(self.stripe_width) > 0 or not float(self.radial_bin_width) > 0:
            raise ValueError("stripe_width and radial_bin_width must be > 0")


@dataclass(frozen=True)
class ThresholdResult:
    """Strong pixels and the local background the threshold compared them against.

    Attributes
    ----------
    strong : array of bool
    background : array, float64, or None
        Per-pixel background (counts): for ``dispersion`` the mean of the
        valid, non-strong pixels of the window; for ``dispersion_extended``
        DIALS' second-pass mean; for ``local`` the second-pass box mean; for
        ``radial`` the radial profile. None unless asked for.
    global_threshold : float or array
        The global threshold used (per frame with ``"auto"``).
    """

    strong: Any
    background: Any = None
    global_threshold: Any = 0.0


# -- helpers ---------------------------------------------------------------------------------


def min_count(min_local: int, kernel_size: tuple[int, int]) -> int:
    """DIALS' minimum number of valid window pixels: ``min_local``, or the whole window when <= 0."""
    ky, kx = kernel_size
    num_kernel = (2 * ky + 1) * (2 * kx + 1)
    n = int(min_local)
    if n <= 0:
        return num_kernel
    if not 1 < n <= num_kernel:
        raise ValueError(
            f"min_local must be in 2..{num_kernel} for kernel_size {kernel_size} (or <= 0 for all); got {min_local}"
        )
    return n


def frame_threshold(global_threshold: Any, image: Any, xp: Any) -> Any:
    """A scalar threshold, or one per frame of a block shaped to broadcast (n, 1, 1)."""
    if isinstance(global_threshold, (int, float)):
        if not global_threshold >= 0:
            raise ValueError(f"global_threshold must be >= 0; got {global_threshold!r}")
        return float(global_threshold)
    t = xp.asarray(global_threshold, dtype=xp.float64)
    if t.ndim == 0:
        return t
    if image.ndim != 3 or tuple(t.shape) != (image.shape[0],):
        n = image.shape[0] if image.ndim == 3 else 1
        raise ValueError(f"a per-frame global_threshold needs a block of frames and shape ({n},); got {tuple(t.shape)}")
    return t[:, None, None]


def gain_array(gain: Any, xp: Any) -> Any:
    """``gain`` as a number or a float64 array (None stays None)."""
    if gain is None or isinstance(gain, (int, float)):
        return None if gain is None else float(gain)
    return xp.asarray(gain, dtype=xp.float64)


def _dispersion_test(m: Any, x: Any, y: Any, *, n_b: float, gain: Any, xp: Any) -> Any:
    """DIALS' dispersion inequality, in its order of operations.

    Where ``m < 1`` the square root is taken of 0 instead of a negative
    number; those pixels fail ``m >= min_local`` anyway.
    """
    root = xp.sqrt(2 * xp.clip(m - 1, min=0.0))
    if gain is None:
        return m * y - x * x - x * (m - 1) > x * n_b * root
    return m * y - x * x > gain * x * ((m - 1) + n_b * root)


def _strong_test(img: Any, m: Any, x: Any, *, n_s: float, gain: Any, xp: Any) -> Any:
    """DIALS' strong-pixel inequality ``m v - x > n_s sqrt(g x m)`` (square root of 0 where x < 0)."""
    xm = x * m if gain is None else gain * x * m
    return m * img - x > n_s * xp.sqrt(xp.clip(xm, min=0.0))


# -- the methods -----------------------------------------------------------------------------


def dispersion(
    image: Any,
    mask: Any | None,
    *,
    kernel_size: tuple[int, int] = (3, 3),
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    global_threshold: Any = 0.0,
    min_local: int = 2,
    gain: Any = None,
    xp: Any | None = None,
) -> Any:
    """DIALS 3.12 ``dispersion`` threshold, exactly.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
        Pixel values (any real dtype; computed in float64 as DIALS does).
    mask : array of bool or None
        Valid pixels (trusted range and static mask), per frame or shared.
    kernel_size : (int, int)
        Window half-widths (slow, fast), DIALS' order; 3,3 = 7 x 7.
    sigma_background, sigma_strong : float
        ``n_b`` and ``n_s``.
    global_threshold : float or array (n,)
        Strong pixels must exceed it (per frame for a block).
    min_local : int
        Fewest valid pixels in the window; ``<= 0`` = the whole window.
    gain : None, float or array
        None: DIALS' no-gain formulas (its default). Otherwise its gain-map
        formulas with this gain (scalar or per-pixel map).
    xp : namespace, optional

    Returns
    -------
    array of bool, shape of ``image``

    Examples
    --------
    >>> import numpy as np
    >>> img = np.ones((9, 9)); img[4, 4] = 50
    >>> np.argwhere(dispersion(img, None)).tolist()
    [[4, 4]]
    """
    xp, img, mask = prepare_image(image, mask, xp)
    ks = check_half_window(kernel_size, "kernel_size")
    n_min = min_count(min_local, ks)
    thr = frame_threshold(global_threshold, img, xp)
    s = local_sums(img, mask, half_window=ks, xp=xp)
    m, x, y = s.count, s.total, s.total_sq
    g = gain_array(gain, xp)
    disp = _dispersion_test(m, x, y, n_b=float(sigma_background), gain=g, xp=xp)
    strong = _strong_test(img, m, x, n_s=float(sigma_strong), gain=g, xp=xp)
    return mask & (m >= n_min) & (x >= 0) & (img > thr) & disp & strong


def _dispersion_extended(
    img: Any,
    mask: Any,
    *,
    kernel_size: tuple[int, int],
    sigma_background: float,
    sigma_strong: float,
    global_threshold: Any,
    min_local: int,
    gain: Any,
    keep_gap_signal: bool,
    xp: Any,
) -> tuple[Any, Any]:
    """Strong mask and second-pass background mean of ``dispersion_extended`` (prepared inputs)."""
    ky, kx = check_half_window(kernel_size, "kernel_size")
    n_min = min_count(min_local, (ky, kx))
    thr = frame_threshold(global_threshold, img, xp)
    g = gain_array(gain, xp)
    s = local_sums(img, mask, half_window=(ky, kx), xp=xp)
    disp = _dispersion_test(s.count, s.total, s.total_sq, n_b=float(sigma_background), gain=g, xp=xp)
    disp = mask & (s.count >= n_min) & (s.total >= 0) & disp
    # Erosion: Chebyshev distance to the nearest background pixel >= e, i.e.
    # no background pixel within the (2e-1) x (2e-1) box around the pixel
    # (pixels outside the image are not background, as in DIALS).
    e = min(ky, kx)
    background = (mask & ~disp) if keep_gap_signal else ~disp
    n_bg_near = window_sums(xp.astype(background, xp.float64), (e - 1, e - 1), xp=xp)
    core = disp & (n_bg_near == 0)
    # Second pass: mean of the valid pixels outside the core, wider window.
    s2 = local_sums(img, mask & ~core, half_window=(ky + 2, kx + 2), with_squares=False, xp=xp)
    enough = s2.count >= 2
    mean = xp.where(enough, s2.total / xp.where(enough, s2.count, 1.0), 0.0)
    root = xp.sqrt(xp.clip(mean, min=0.0)) if g is None else xp.sqrt(xp.clip(g * mean, min=0.0))
    strong = mask & (s2.total >= 0) & core & (img > thr) & (img >= mean + float(sigma_strong) * root)
    return strong, mean


def dispersion_extended(
    image: Any,
    mask: Any | None,
    *,
    kernel_size: tuple[int, int] = (3, 3),
    sigma_background: float = 6.0,
    sigma_strong: float = 3.0,
    global_threshold: Any = 0.0,
    min_local: int = 2,
    gain: Any = None,
    keep_gap_signal: bool = True,
    xp: Any | None = None,
) -> Any:
    """DIALS' ``dispersion_extended`` threshold, with the erosion defect fixed (see the module notes).

    Parameters
    ----------
    image, mask, kernel_size, sigma_background, sigma_strong, global_threshold, min_local, gain, xp
        As for :func:`dispersion`.
    keep_gap_signal : bool
        True (default): erode the dispersion region against valid background
        pixels only, so spots beside module gaps and bad pixels survive.
        False: DIALS 3.12 exactly (masked pixels count as background).

    Returns
    -------
    array of bool, shape of ``image``

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> img = rng.poisson(2.0, (40, 40)).astype(float)
    >>> img[18:23, 18:23] += 200
    >>> bool(dispersion_extended(img, None)[20, 20])
    True
    """
    xp, img, mask = prepare_image(image, mask, xp)
    return _dispersion_extended(img, mask, kernel_size=kernel_size, sigma_background=sigma_background,
                                sigma_strong=sigma_strong, global_threshold=global_threshold, min_local=min_local,
                                gain=gain, keep_gap_signal=keep_gap_signal, xp=xp)[0]


def _local(
    img: Any,
    mask: Any,
    *,
    box: tuple[int, int],
    n_sigma: float,
    gain: Any,
    global_threshold: Any,
    min_local: int,
    xp: Any,
) -> tuple[Any, Any]:
    """Strong mask and second-pass box mean of the MOSFLM local threshold (prepared inputs)."""
    half = (int(box[0]) // 2, int(box[1]) // 2)
    gain = gain_array(gain, xp)
    thr = frame_threshold(global_threshold, img, xp)
    n_min = max(int(min_local), 1)
    mean1, count1 = local_mean(img, mask, half_window=half, min_count=n_min, xp=xp)
    above = mask & (count1 >= n_min) & (img > mean1 + n_sigma * xp.sqrt(xp.clip(gain * mean1, min=0.0)))
    mean2, count2 = local_mean(img, mask & ~above, half_window=half, min_count=n_min, xp=xp)
    strong = mask & (count2 >= n_min) & (img > thr) & (img > mean2 + n_sigma * xp.sqrt(xp.clip(gain * mean2, min=0.0)))
    return strong, mean2


def local(
    image: Any,
    mask: Any | None,
    *,
    box: tuple[int, int] = (50, 50),
    n_sigma: float = 5.0,
    gain: Any = 1.0,
    global_threshold: Any = 0.0,
    min_local: int = 2,
    xp: Any | None = None,
) -> Any:
    """MOSFLM-style threshold: ``n_sigma`` counting-statistics sigmas above the local box mean.

    Parameters
    ----------
    image, mask, xp
        As for :func:`dispersion`.
    box : (int, int)
        Box size (slow, fast) in px; rounded up to odd (50 -> 51) so that it
        is centred on the pixel, and clipped at the image edges.
    n_sigma : float
        Sigmas above the background; sigma = sqrt(gain * mean).
    gain : float or array
        Detector gain (ADU per photon), a number or a per-pixel map.
    global_threshold : float or array (n,)
    min_local : int
        Fewest valid pixels in the box.

    Returns
    -------
    array of bool, shape of ``image``

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((60, 60), 4.0); img[30, 30] = 30.0
    >>> np.argwhere(local(img, None)).tolist()
    [[30, 30]]
    """
    xp, img, mask = prepare_image(image, mask, xp)
    return _local(img, mask, box=box, n_sigma=float(n_sigma), gain=gain, global_threshold=global_threshold,
                  min_local=min_local, xp=xp)[0]


def local_background(image: Any, mask: Any | None, strong: Any, *, kernel_size: tuple[int, int] = (3, 3),
                     xp: Any | None = None) -> Any:
    """Mean of the valid, non-strong pixels in each pixel's window (0 where there are none).

    The background that :func:`find_strong_pixels` reports for ``dispersion``
    (whose own window mean includes the spot).
    """
    xp, img, mask = prepare_image(image, mask, xp)
    return local_mean(img, mask & ~strong, half_window=check_half_window(kernel_size, "kernel_size"), xp=xp)[0]


# -- selection by name -----------------------------------------------------------------------


def _compiled_path_applies(xp: Any, method: str, gain: Any) -> bool:
    """NumPy frames, a dispersion method and a scalar gain: use the compiled CPU twin when numba imports."""
    import numpy as np

    if xp is not np or method not in ("dispersion", "dispersion_extended"):
        return False
    if gain is not None and not isinstance(gain, (int, float)):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _threshold_cpu(img: Any, mask: Any, cfg: ThresholdConfig, gain: Any, thr: Any,
                   out: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
    """Frame by frame through :mod:`gpuflm.kernels.threshold_cpu` (identical results, one pass each)."""
    import numpy as np

    from . import threshold_cpu as cpu

    frames = img if img.ndim == 3 else img[None]
    if frames.dtype.kind not in "iuf":
        frames = frames.astype(np.float64)
    masks = np.broadcast_to(mask, frames.shape)
    thresholds = np.broadcast_to(np.asarray(thr, dtype=np.float64).reshape(-1), (frames.shape[0],))
    ky, kx = cfg.kernel_size
    n_min = float(min_count(cfg.min_local, cfg.kernel_size))
    g = -1.0 if gain is None else float(gain)
    if out is not None:
        strong, background = (o if o.ndim == 3 else o[None] for o in out)
    else:
        strong = np.empty(frames.shape, dtype=bool)
        background = np.empty(frames.shape, dtype=np.float64)
    for k in range(frames.shape[0]):
        f = np.ascontiguousarray(frames[k])
        m = np.ascontiguousarray(masks[k])
        if cfg.method == "dispersion":
            cpu.dispersion_frame(f, m, ky, kx, float(cfg.sigma_background), float(cfg.sigma_strong),
                                 float(thresholds[k]), n_min, g, strong[k], background[k])
        else:
            cpu.dispersion_extended_frame(f, m, ky, kx, float(cfg.sigma_background), float(cfg.sigma_strong),
                                          float(thresholds[k]), n_min, g, bool(cfg.keep_gap_signal), strong[k],
                                          background[k])
    if img.ndim == 2:
        return strong[0], background[0]
    return strong, background


def find_strong_pixels(
    image: Any,
    mask: Any | None,
    *,
    config: ThresholdConfig = ThresholdConfig(),
    gain: Any = None,
    beam_centre: tuple[float, float] | None = None,
    axis_direction: tuple[float, float] | None = None,
    with_background: bool = False,
    out: tuple[Any, Any] | None = None,
    xp: Any | None = None,
) -> ThresholdResult:
    """Strong pixels of one frame or a block of frames with the method ``config.method``.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
    mask : array of bool or None
    config : ThresholdConfig
    gain : float or array, optional
        A gain map (or number) overriding ``config.gain``.
    beam_centre, axis_direction : (float, float)
        ``radial`` only: beam centre (fast, slow) px and the rotation axis
        direction on the detector (fast, slow).
    with_background : bool
        Also return the per-pixel background.
    out : (array of bool, array of float64), optional
        Buffers of the image's shape that receive the strong mask and the
        background (reused across calls by a caller that streams frames).
    xp : namespace, optional

    Returns
    -------
    ThresholdResult

    Raises
    ------
    ValueError
        ``radial`` without ``beam_centre`` and ``axis_direction``.
    """
    cfg = config
    g = cfg.gain if gain is None else gain
    compiled = _compiled_path_applies(xp or array_namespace(image, mask), cfg.method, g)
    # the compiled twin reads any real dtype as float64 itself: no full-frame copy
    xp, img, mask = prepare_image(image, mask, xp, as_float64=not compiled)
    thr: Any = cfg.global_threshold
    if thr == "auto":
        from .global_threshold import auto_global_threshold

        thr = auto_global_threshold(img, mask, xp=xp)
        if img.ndim == 2:
            thr = float(thr)
    background = None
    if compiled:
        strong, background = _threshold_cpu(img, mask, cfg, g, thr, out)
    elif cfg.method == "dispersion":
        strong = dispersion(img, mask, kernel_size=cfg.kernel_size, sigma_background=cfg.sigma_background,
                            sigma_strong=cfg.sigma_strong, global_threshold=thr, min_local=cfg.min_local, gain=g, xp=xp)
        if with_background:
            background = local_background(img, mask, strong, kernel_size=cfg.kernel_size, xp=xp)
    elif cfg.method == "dispersion_extended":
        strong, background = _dispersion_extended(
            img, mask, kernel_size=cfg.kernel_size, sigma_background=cfg.sigma_background,
            sigma_strong=cfg.sigma_strong, global_threshold=thr, min_local=cfg.min_local, gain=g,
            keep_gap_signal=cfg.keep_gap_signal, xp=xp)
    elif cfg.method == "local":
        strong, background = _local(img, mask, box=cfg.local_box, n_sigma=cfg.n_sigma,
                                    gain=1.0 if g is None else g, global_threshold=thr,
                                    min_local=cfg.min_local, xp=xp)
    else:
        if beam_centre is None or axis_direction is None:
            raise ValueError("the 'radial' threshold needs beam_centre and axis_direction")
        from .radial_background import radial_threshold

        strong, background = radial_threshold(
            img, mask, beam_centre=beam_centre, axis_direction=axis_direction, stripe_width=cfg.stripe_width,
            stripe_offset=cfg.stripe_offset, bin_width=cfg.radial_bin_width, n_sigma=cfg.n_sigma,
            gain=1.0 if g is None else g, global_threshold=thr, xp=xp)
    if out is not None and not compiled:
        out[0][...] = strong
        strong = out[0]
        if background is not None:
            out[1][...] = background
            background = out[1]
    return ThresholdResult(strong=strong, background=background if with_background else None, global_threshold=thr)


__all__ = [
    "THRESHOLD_METHODS",
    "ThresholdConfig",
    "ThresholdResult",
    "dispersion",
    "dispersion_extended",
    "find_strong_pixels",
    "local",
    "local_background",
    "min_count",
]
