"""The web dashboard of one experiment, read from its journal: live over HTTP or as a static report.

What lives here: `data` (DashboardData: the journal read into revisioned JSON rows, read-only,
with a short-lived connection per refresh), `server` (DashboardServer: the HTTP server of the
page, its static assets and the JSON API, with optional Bearer tokens), `report` (report.html:
the same page with the data and every asset inlined, for offline viewing) and `static/` (the
page: index.html, app.js, style.css, and Apache ECharts vendored with its LICENSE and NOTICE).

`morphml dashboard runs/<name>` serves a local run's journal; `morphml master --dashboard-port`
serves the same page from the master (docs/observability.md, "Dashboard").

Layer: beside morphml.distributed (the master starts the server). May import the standard
library, morphml.distributed.journal/states, morphml.graph and morphml.pareto; never grpc,
never torch, never morphml.results or morphml.cli.
"""
