"""Progress bars for long steps: images done, frames per second, time left (tqdm, on stderr).

Bars appear only on a terminal (they stay out of pipelines' logs and never
touch stdout, where ``--json`` documents go), and not with ``-q``.
"""

from __future__ import annotations

import sys
from typing import Any


class ProgressBars:
    """One bar per key (e.g. per sector), driven by ``(key, done, total)`` callbacks.

    Examples
    --------
    >>> bars = ProgressBars("find spots", enabled=False)
    >>> bars(1, 5, 10); bars.close()
    """

    def __init__(self, description: str, *, unit: str = "image", enabled: bool | None = None):
        self.description = description
        self.unit = unit
        self.enabled = enabled
        self._bars: dict[Any, Any] = {}

    def __call__(self, key: Any, done: int, total: int) -> None:
        if self.enabled is False:
            return
        bar = self._bars.get(key)
        if bar is None:
            from tqdm import tqdm

            label = self.description if key is None else f"{self.description} [{key}]"
            bar = self._bars[key] = tqdm(total=total, desc=label, unit=self.unit, file=sys.stderr,
                                         disable=None if self.enabled is None else not self.enabled,
                                         dynamic_ncols=True, leave=True)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
