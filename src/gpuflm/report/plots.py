"""The report's plots: small matplotlib figures as PNG bytes (no file reading, no session knowledge).

Every plot has labelled axes with units, a legend when it shows more than
one series, and ranges that fit the data (a constant series gets a visible
band round its value instead of a flat line on the frame). Resolution axes
are drawn linear in 1/d^2 (equal steps in reciprocal-space volume, as
crystallographers read them) and labelled in Angstrom.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

#: Width and height (inches, at 100 dpi) of a standard plot.
FIGSIZE = (5.4, 2.7)
#: Series colours, in order (colour-blind-safe tableau).
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _finite(a: Sequence[float]) -> np.ndarray:
    return np.asarray(a, dtype=float)


def _pad_constant(ax, values: list[np.ndarray]) -> None:
    """Give a flat series a band (1 % of its value) so that it is drawn mid-plot, not on the frame."""
    v = np.concatenate([x[np.isfinite(x)] for x in values]) if values else np.zeros(0)
    if v.size and np.ptp(v) == 0:
        c = float(v[0])
        pad = 0.01 * abs(c) or 0.01
        ax.set_ylim(c - pad, c + pad)


def line_plot(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    markers: bool | None = None,
    hlines: Mapping[str, float] | None = None,
    vlines: Mapping[str, float] | None = None,
    ylim_zero: bool = False,
    figsize: tuple[float, float] = FIGSIZE,
) -> bytes:
    """Series against a common x as a PNG.

    Parameters
    ----------
    x : sequence of float
    series : mapping label -> sequence of float
        NaN values leave gaps.
    xlabel, ylabel : str
        Axis labels, with units.
    title : str, optional
    markers : bool, optional
        Draw points (default: when there are fewer than 60).
    hlines, vlines : mapping label -> float, optional
        Labelled reference lines.
    ylim_zero : bool
        Start the y axis at 0 (counts, completeness).
    """
    plt = _pyplot()
    xs = _finite(x)
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    show_markers = markers if markers is not None else xs.size < 60
    ys = []
    for i, (label, y) in enumerate(series.items()):
        yv = _finite(y)
        ys.append(yv)
        ax.plot(xs, yv, label=label, color=COLOURS[i % len(COLOURS)], marker="o" if show_markers else None,
                markersize=3.5, linewidth=1.3)
    for i, (label, v) in enumerate((hlines or {}).items()):
        ax.axhline(v, color="0.35", linestyle="--", linewidth=1.0, label=label)
    for i, (label, v) in enumerate((vlines or {}).items()):
        ax.axvline(v, color="tab:red", linestyle=":", linewidth=1.3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if ylim_zero:
        top = max((float(np.nanmax(v)) for v in ys if np.isfinite(v).any()), default=1.0)
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    else:
        _pad_constant(ax, ys)
    ax.grid(True, alpha=0.3)
    if len(series) + len(hlines or {}) + len(vlines or {}) > 1:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def resolution_plot(
    d: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str | None = None,
    mark_d: Mapping[str, float] | None = None,
    hlines: Mapping[str, float] | None = None,
    ylim_zero: bool = False,
) -> bytes:
    """Series against resolution: x linear in 1/d^2, ticks labelled in Angstrom (low resolution on the left).

    Parameters
    ----------
    d : sequence of float
        Resolution (A) of each point (e.g. the middle of a shell in 1/d^2).
    series : mapping label -> sequence of float
    ylabel : str
    mark_d : mapping label -> d, optional
        Resolutions to mark with a vertical line (e.g. the estimated limit).
    hlines : mapping label -> float, optional
    ylim_zero : bool
    """
    plt = _pyplot()
    dv = _finite(d)
    s = 1.0 / dv**2
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    ys = []
    for i, (label, y) in enumerate(series.items()):
        yv = _finite(y)
        ys.append(yv)
        ax.plot(s, yv, label=label, color=COLOURS[i % len(COLOURS)], marker="o", markersize=3.5, linewidth=1.3)
    for label, v in (mark_d or {}).items():
        ax.axvline(1.0 / v**2, color="tab:red", linestyle=":", linewidth=1.3, label=f"{label} {v:.2f} Å")
    for label, v in (hlines or {}).items():
        ax.axhline(v, color="0.35", linestyle="--", linewidth=1.0, label=label)
    finite = s[np.isfinite(s)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.03 * (hi - lo or hi or 1.0)
        ax.set_xlim(max(lo - pad, 0.0), hi + pad)
        ticks = np.linspace(max(lo - pad, 0.0), hi + pad, 6)[1:]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{1.0 / np.sqrt(t):.2f}" for t in ticks])
    ax.set_xlabel("resolution (Å), linear in 1/d²")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if ylim_zero:
        top = max((float(np.nanmax(v)) for v in ys if np.isfinite(v).any()), default=1.0)
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    else:
        _pad_constant(ax, ys)
    ax.grid(True, alpha=0.3)
    if len(series) + len(mark_d or {}) + len(hlines or {}) > 1:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def profile_grid(
    profiles: Sequence[np.ndarray],
    peaks: Sequence[np.ndarray] | None = None,
    titles: Sequence[str] | None = None,
    *,
    columns: int = 5,
    panel_inches: float = 1.5,
) -> bytes:
    """Spot profiles (2D arrays, rows = slow) side by side, each with its peak/background boundary outlined.

    Parameters
    ----------
    profiles : sequence of 2D arrays
    peaks : sequence of 2D bool arrays, optional
        True in the peak (foreground) region; its outline is drawn in red.
    titles : sequence of str, optional
    columns : int
        Profiles per row.
    """
    plt = _pyplot()
    n = len(profiles)
    if n == 0:
        raise ValueError("no profiles to draw")
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(panel_inches * cols, panel_inches * rows + 0.2),
                             squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        p = np.asarray(profiles[k], dtype=float)
        ax.imshow(p, cmap="viridis", interpolation="nearest", vmin=min(0.0, float(np.nanmin(p))))
        if peaks is not None and peaks[k] is not None:
            m = np.asarray(peaks[k], dtype=float)
            if 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors="red", linewidths=1.0)
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
    return _png(fig)


__all__ = ["COLOURS", "FIGSIZE", "line_plot", "profile_grid", "resolution_plot"]
