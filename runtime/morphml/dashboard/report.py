"""report.html: the dashboard as one self-contained file (data, page script, styles and ECharts
inlined), written beside trials.csv at the end of `morphml run`.

It opens from disk with no network request: the page reads its data from an inline
`<script id="morphml-snapshot" type="application/json">` instead of polling, and a
Content-Security-Policy meta tag (`default-src 'none'`, inline scripts and styles only) stops
the browser from loading anything, should a future change add a URL by mistake.

Imports: the standard library, morphml.dashboard.data/server (for the packaged static files).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import DashboardData
from .server import static_file

REPORT_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
              "base-uri 'none'; form-action 'none'")


def _inline_script(code: str) -> str:
    # A script element ends at the first "</script" whatever the JavaScript means by it.
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def render_report(data: DashboardData) -> str:
    """The report's HTML for a DashboardData (refreshed here)."""
    data.refresh(force=True)
    page = (static_file("index.html") or b"").decode()
    css = (static_file("style.css") or b"").decode()
    echarts = (static_file("vendor/echarts/echarts.min.js") or b"").decode()
    app = (static_file("app.js") or b"").decode()
    # JSON inside HTML: "<" escaped so no "</script>" or "<!--" can end the element early.
    snapshot = json.dumps(data.everything(), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    head = f'<meta http-equiv="Content-Security-Policy" content="{REPORT_CSP}">\n<style>{css}</style>'
    scripts = (f'<script id="morphml-snapshot" type="application/json">{snapshot}</script>\n'
               + _inline_script(echarts) + "\n" + _inline_script(app))
    page = _replace_block(page, "head", head)
    return _replace_block(page, "scripts", scripts)


def _replace_block(page: str, name: str, content: str) -> str:
    start, end = f"<!--morphml:{name}-->", f"<!--/morphml:{name}-->"
    i, j = page.index(start), page.index(end)
    return page[:i] + content + page[j + len(end):]


def write_report(journal_path: str | Path, out_dir: str | Path, metric: str | None = None,
                 goal: str | None = None, budget: int | None = None) -> Path:
    """Writes out_dir/report.html from the journal (read-only); returns its path."""
    path = Path(out_dir) / "report.html"
    html = render_report(DashboardData(journal_path, metric=metric, goal=goal, budget=budget))
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
