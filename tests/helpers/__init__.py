"""Shared test helpers, importable from any test module (`from helpers.workers import start_worker`).

`workers`: in-process workers. `faults`: worker subprocesses, stats, steady load and the fault figures.
`bridge`: the HTTP bridge on a free port, cancel watching, SSE parsing. `gateway_fixtures`: the bridge fixtures
(loaded by conftest). `otlp_receiver`: a tiny OTLP/HTTP trace collector that records the spans sent to it.
"""
