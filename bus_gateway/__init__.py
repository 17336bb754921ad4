"""HTTP bridge and Python client for llmbus: `BusClient` over NATS, a Litestar app (native and OpenAI APIs)."""

from bus_gateway.app import create_app, run_gateway
from bus_gateway.client import BusClient, BusError

__all__ = ["BusClient", "BusError", "create_app", "run_gateway"]
