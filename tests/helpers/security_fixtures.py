"""Fixtures for the security tests (loaded by conftest): secured nats-servers shared by the session, one per kind
of login, and a recorder of every log line the secured parts write.

- `secure_bus`: mutual TLS; user/password and nkey users, each with the permissions `llmbus nats-permissions`
  prints for its role. Every user the security tests need is made here, so one server serves them all.
- `token_bus`: mutual TLS and one token (a token cannot share a server with a users list).
- `operator_bus`: mutual TLS, operator (JWT) mode, users with `.creds` files whose JWTs carry the role permissions.
- `secure_worker`: one durable SmolLM2 worker on `secure_bus` (subject prefix `llm`), logged in as `worker`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from helpers.nats_auth import (
    RoleUser,
    SecureServer,
    TlsFiles,
    make_tls,
    operator_server,
    token_server,
    users_server,
)
from helpers.workers import RunningWorker, start_worker
from inference_worker.model_loader import LoadedModel
from llmbus.permissions import grants, server_permissions

RECORDED_LOGGERS = ("llmbus", "nats", "uvicorn", "litestar", "bus_gateway", "inference_worker")
WORKER_LIMITS = {"max_batch_size": 8, "max_seq_len": 1024, "max_tokens_cap": 256}


def bus_replier(name: str, responses: object) -> RoleUser:
    """A worker on subject prefix `bus` whose allow_responses is replaced, to show what each setting does."""
    block = server_permissions(grants("worker", "bus")) | {"allow_responses": responses}
    return RoleUser(name, custom=block)


PASSWORD_USERS = [
    RoleUser("worker", "worker", durable=True, inbox_prefix="_INBOX.worker"),
    RoleUser("gateway", "gateway", durable=True, inbox_prefix="_INBOX.gateway"),
    RoleUser("alice", "client", inbox_prefix="_INBOX.alice"),
    RoleUser("bob", "client", inbox_prefix="_INBOX.bob"),
    RoleUser("dave", "client", durable=True, inbox_prefix="_INBOX.dave"),
    RoleUser("tiny-worker", "worker", subject_prefix="tiny", inbox_prefix="_INBOX.tiny-worker"),
    RoleUser("carol", "client", subject_prefix="tiny", inbox_prefix="_INBOX.carol"),
    RoleUser("replier", "worker", subject_prefix="bus", inbox_prefix="_INBOX.replier"),
    bus_replier("replier-true", True),  # `allow_responses: true`, as often written: ONE reply per request
    bus_replier("replier-short", {"max": -1, "expires": "1s"}),
    RoleUser("asker", "client", subject_prefix="bus", inbox_prefix="_INBOX.asker"),
]
NKEY_USERS = [
    RoleUser("worker-nk", "worker", subject_prefix="nk", inbox_prefix="_INBOX.worker-nk"),
    RoleUser("gateway-nk", "gateway", subject_prefix="nk", inbox_prefix="_INBOX.gateway-nk"),
]
CREDS_USERS = [
    RoleUser("worker", "worker", inbox_prefix="_INBOX.worker"),
    RoleUser("gateway", "gateway", inbox_prefix="_INBOX.gateway"),
    RoleUser("client", "client", inbox_prefix="_INBOX.client"),
]


class LogRecorder(logging.Handler):
    """Every line the llmbus, nats-py, uvicorn and litestar loggers write, at DEBUG, formatted as a log shows it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session")
def log_recorder() -> Iterator[LogRecorder]:
    recorder = LogRecorder()
    loggers = [logging.getLogger(name) for name in RECORDED_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(recorder)
    yield recorder
    logging.getLogger().removeHandler(recorder)
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _dir(factory: pytest.TempPathFactory, name: str) -> Path:
    return factory.mktemp(name)


@pytest.fixture(scope="session")
def secure_bus(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles, log_recorder: LogRecorder
) -> Iterator[SecureServer]:
    server = users_server(_dir(tmp_path_factory, "users-bus"), tls_files, PASSWORD_USERS, NKEY_USERS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_bus(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles, log_recorder: LogRecorder
) -> Iterator[SecureServer]:
    server = token_server(_dir(tmp_path_factory, "token-bus"), tls_files)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def operator_bus(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles, log_recorder: LogRecorder
) -> Iterator[SecureServer]:
    server = operator_server(_dir(tmp_path_factory, "operator-bus"), tls_files, CREDS_USERS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def secure_worker(secure_bus: SecureServer, smollm: LoadedModel) -> AsyncIterator[RunningWorker]:
    running = await start_worker(secure_bus.config("worker", durable=True, jobs_ack_wait=10.0, **WORKER_LIMITS), smollm)
    yield running
    await running.shutdown()
