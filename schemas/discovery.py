"""The NATS micro discovery replies (`$SRV.PING|INFO|STATS`) as an llmbus worker fills them, for the AsyncAPI document.

The replies are nats micro's standard JSON (ADR-32): a worker builds them with nats.py's own types, and `nats micro
ls/info/stats` read them as they read any NATS service. These Structs describe that JSON and what llmbus puts in
it: the worker's `metadata` and the `data` of each endpoint's STATS. Fields that a later worker adds are allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct


class WorkerMetadata(Struct, kw_only=True):
    """What a worker says about itself in every discovery reply (all values are strings, as micro requires)."""

    model: str
    default_model: Literal["true", "false"]  # whether requests that name no model are this model's (--default-model)
    subject_prefix: str  # the prefix of the subjects it serves: `$SRV` is shared by every prefix on a NATS server
    device: str
    dtype: str
    max_batch_size: str
    max_tokens_cap: str
    context_window: str
    durable: Literal["true", "false"]
    host: str
    pid: str


class WorkerStats(Struct, kw_only=True):
    """The `data` of each endpoint in a worker's STATS reply: the worker's figures (the same for every endpoint).

    `running` and `waiting` are requests in the engine, `pending` those the worker holds (waiting for a slot too),
    `batches` the batches it coordinates; the counters run since the worker started. `errors_by_code` counts error
    answers by code; `jobs` is there when the worker takes durable jobs."""

    running: int
    waiting: int
    pending: int
    batches: int
    draining: bool
    threads: int
    tokens_generated: int
    prompt_tokens: int
    prefix_tokens_reused: int
    requests_finished: int
    requests_failed: int
    requests_cancelled: int
    decode_batch_sizes: dict[str, int]
    errors_by_code: dict[str, int]
    refused_replies: int  # requests dropped unanswered: their reply subject is under none of --reply-prefixes
    waiting_by_tenant: dict[str, int]
    waiting_by_priority: dict[str, int]
    metrics: dict[str, Any]  # its `/metrics` figures: numbers; histograms as count, sum, quantiles
    jobs: dict[str, int | float] | None = None


class PingResponse(Struct, kw_only=True):
    type: Literal["io.nats.micro.v1.ping_response"]
    name: str
    id: str
    version: str
    metadata: WorkerMetadata


class EndpointInfo(Struct, kw_only=True):
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] | None = None


class InfoResponse(Struct, kw_only=True):
    type: Literal["io.nats.micro.v1.info_response"]
    name: str
    id: str
    version: str
    description: str
    endpoints: list[EndpointInfo]
    metadata: WorkerMetadata


class EndpointStats(Struct, kw_only=True):
    """One endpoint's counts. `processing_time` runs from a request to its final answer (nanoseconds), and every
    error answer counts in `num_errors`."""

    name: str
    subject: str
    queue_group: str
    num_requests: int
    num_errors: int
    last_error: str
    processing_time: int
    average_processing_time: int
    data: WorkerStats


class StatsResponse(Struct, kw_only=True):
    type: Literal["io.nats.micro.v1.stats_response"]
    name: str
    id: str
    version: str
    started: str
    endpoints: list[EndpointStats]
    metadata: WorkerMetadata


DISCOVERY_REPLIES: dict[str, type] = {"PING": PingResponse, "INFO": InfoResponse, "STATS": StatsResponse}
