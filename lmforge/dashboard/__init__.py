"""`lmforge dashboard`: watch and compare the runs under one or more dirs in a browser.

A JSON API and a live metrics stream (server-sent events from an incremental tail of each run's
``metrics.jsonl``) over the run dirs under the roots, and the page that draws them (``static/``: plain HTML,
CSS and JS, with uPlot vendored — MIT, see ``static/uPlot.LICENSE``). ``lmforge.dashboard.app.create_app(roots)``
builds the ASGI app; it needs the ``serve`` extra (fastapi, uvicorn)."""
