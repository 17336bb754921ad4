"""Python clients and the HTTP bridge for llmbus: `BusClient` (core request-reply) and `JobClient` (durable jobs)
over NATS, and the Litestar app (`bus_gateway.app`: native and OpenAI APIs). Importing the clients does not load
the web framework."""

from bus_gateway.bus_errors import BusError
from bus_gateway.client import BusClient

__all__ = ["BusClient", "BusError"]
