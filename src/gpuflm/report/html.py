"""A self-contained HTML page: inline CSS, PNG figures as data URIs, no script, no network.

The building blocks (:func:`table`, :func:`key_values`, :func:`figure`,
:func:`severity_badge`) escape whatever text they are given, so names and
messages from files cannot break the page; :func:`page` puts the sections
together with a table of contents.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header { background: #24425e; color: white; padding: 14px 24px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; font-size: 13px; opacity: 0.85; }
nav { padding: 8px 24px; background: #e8eef3; font-size: 13px; }
nav a { margin-right: 14px; color: #24425e; text-decoration: none; }
main { padding: 8px 24px 40px; max-width: 1400px; }
section { background: white; border: 1px solid #dde3e8; border-radius: 6px; margin: 16px 0; padding: 4px 18px 14px; }
h2 { font-size: 18px; color: #24425e; border-bottom: 1px solid #dde3e8; padding-bottom: 4px; }
h3 { font-size: 15px; color: #333; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0; }
th, td { border: 1px solid #d5dbe0; padding: 3px 8px; text-align: right; }
th { background: #eef2f5; }
td.text, th.text { text-align: left; }
tr.chosen td { background: #fff4c2; font-weight: 600; }
table.kv th { text-align: left; }
figure { display: inline-block; margin: 6px 12px 6px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #e3e7ea; }
figcaption { font-size: 12px; color: #555; max-width: 640px; }
.badge { display: inline-block; border-radius: 3px; padding: 0 6px; font-size: 11.5px; font-weight: 600; color: white; }
.sev-info { background: #5b8db8; } .sev-warning { background: #d99100; } .sev-serious { background: #c0392b; }
.note { color: #666; font-size: 12.5px; }
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 18px; font-size: 13px; }
ul.tree li { margin: 2px 0; }
ul.tree li.head > span.step { font-weight: 700; }
span.failed { color: #c0392b; }
details { margin: 6px 0; } summary { cursor: pointer; color: #24425e; font-size: 13px; }
"""


@dataclass
class Section:
    """One section of the report: an anchor, a title and its HTML."""

    id: str
    title: str
    body: str


def escape(text: Any) -> str:
    """Text made safe for HTML."""
    return html.escape(str(text), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number or value as short text: integers whole, floats to ``digits`` significant figures."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if v == 0:
            return "0"
        if abs(v) >= 1e6 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        decimals = max(digits - 1 - int(math.floor(math.log10(abs(v)))), 0)
        return f"{v:.{decimals}f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
        if len(items) > 12:
            return f"[{len(items)} values]"
        return ", ".join(fmt(v, digits) for v in items)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items())
    return str(value)


def _is_text(value: Any) -> bool:
    return not isinstance(value, (int, float, np.integer, np.floating, bool, np.bool_)) or isinstance(value, bool)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    formats: Mapping[str, Callable[[Any], str]] | None = None,
    chosen: Callable[[Mapping[str, Any]], bool] | None = None,
) -> str:
    """An HTML table of ``rows`` (dicts); columns default to the keys in order of first appearance.

    Parameters
    ----------
    rows : sequence of mappings
    columns : sequence of str, optional
    headers : mapping column -> header text, optional
    formats : mapping column -> callable(value) -> text, optional
        Default :func:`fmt`.
    chosen : callable(row) -> bool, optional
        Rows to highlight (e.g. the preferred indexing solution).
    """
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    headers = headers or {}
    formats = formats or {}
    text_cols = {c for c in columns if all(_is_text(r.get(c)) for r in rows if r.get(c) is not None)}
    out = ["<table><thead><tr>"]
    for c in columns:
        cls = ' class="text"' if c in text_cols else ""
        out.append(f"<th{cls}>{escape(headers.get(c, c))}</th>")
    out.append("</tr></thead><tbody>")
    for r in rows:
        cls = ' class="chosen"' if chosen is not None and chosen(r) else ""
        out.append(f"<tr{cls}>")
        for c in columns:
            v = r.get(c)
            text = formats[c](v) if c in formats and v is not None else fmt(v)
            tcls = ' class="text"' if c in text_cols else ""
            out.append(f"<td{tcls}>{escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def key_values(pairs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """A two-column table of names and values."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    body = "".join(f"<tr><th>{escape(k)}</th><td class=\"text\">{escape(fmt(v))}</td></tr>" for k, v in items)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def figure(png: bytes, *, alt: str, caption: str | None = None, width: int | None = None) -> str:
    """A PNG embedded as a data URI, with its caption."""
    data = base64.b64encode(png).decode("ascii")
    w = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}"{w}>{cap}</figure>'


def severity_badge(severity: str) -> str:
    sev = severity if severity in ("info", "warning", "serious") else "warning"
    return f'<span class="badge sev-{sev}">{escape(severity)}</span>'


def details(summary: str, body: str) -> str:
    """A collapsed block (long tables)."""
    return f"<details><summary>{escape(summary)}</summary>{body}</details>"


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def page(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    """The whole document: header, table of contents, sections."""
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{escape(s.id)}"><h2>{escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


__all__ = ["CSS", "Section", "details", "escape", "figure", "fmt", "key_values", "note", "page", "severity_badge",
           "table"]
