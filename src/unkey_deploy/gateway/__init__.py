"""gatewayd: the public HTTPS API (deploy, deployments, events, keys, customers).

Entry points: :func:`app.create_app` (the ASGI app, with extra routers), :mod:`.auth` (the
``require_principal`` dependency other routers reuse), :mod:`.client` (the typed HTTP client),
``unkey gatewayd`` (run it as a process).
"""
