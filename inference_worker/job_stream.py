"""The JetStream side of durable jobs (`--durable`): the `LLM_JOBS` work-queue stream and its durable consumers,
created when missing, and followed when they exist. A worker's `--jobs-*` flags make them; a worker that finds them
made by another (other flags, an older llmbus) follows their `ack_wait` and attempts, logs what differs, and reads
them again every minute (`JobConsumer`): workers that start together may each make a consumer, the last one wins. A
stream made under another subject prefix stops the worker at start (`JobStreamMismatch`). `durable.py` is the jobs
themselves."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from schemas import Subjects
from schemas.subjects import JOBS_CONSUMER, JOBS_STREAM, model_token

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from llmbus.config import Config

log = logging.getLogger("llmbus.jobs")

STREAM_NAME = JOBS_STREAM
CONSUMER_NAME = JOBS_CONSUMER


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The explicit limits of the stream and its consumer (created with them when missing)."""

    subjects: str = "llm.jobs.>"
    stream: str = STREAM_NAME
    max_age: float = 3600.0
    max_msgs: int = 10_000
    max_attempts: int = 3
    ack_wait: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> JobLimits:
        return cls(
            subjects=Subjects(config.subject_prefix).jobs,
            max_age=config.jobs_max_age,
            max_msgs=config.jobs_max_msgs,
            max_attempts=config.jobs_max_deliver,
            ack_wait=config.jobs_ack_wait,
        )

    @property
    def max_deliver(self) -> int:
        """The consumer's limit: the attempts, plus one delivery that only answers the error."""
        return self.max_attempts + 1

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.subjects],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,  # a full queue refuses new jobs rather than dropping queued ones
            max_age=self.max_age,
            max_msgs=self.max_msgs,
            duplicate_window=self.max_age,  # a job re-published while the stream can hold it is stored once
        )

    def consumer_config(self, name: str, filters: list[str]) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subjects=filters,
        )


def job_consumers(subjects: Subjects, model: str) -> dict[str, list[str]]:
    """The durable consumers a worker of `model` pulls from: the model-less jobs (shared by every worker, which
    forwards a job for another model to that model's queue) and its own model's jobs. A work-queue stream lets no
    two consumers share a subject, so their filters do not overlap."""
    return {
        CONSUMER_NAME: [subjects.jobs_chat, subjects.jobs_chat_batched],
        f"{CONSUMER_NAME}-{model_token(model)}": [subjects.model_jobs(model)],
    }


class JetStreamUnavailable(RuntimeError):
    pass


class JobStreamMismatch(JetStreamUnavailable):
    """The job stream on the server does not take this worker's job subjects (another subject prefix made it)."""


async def ensure_jobs_stream(
    js: JetStreamContext, limits: JobLimits, consumers: dict[str, list[str]]
) -> dict[str, JobLimits]:
    """Create the work-queue stream and the durable consumers if they do not exist; a consumer whose filter is not
    `consumers`' (an older llmbus's `llm.jobs.>`, which would overlap the per-model consumers) is updated. Returns
    each consumer's `ack_wait` and attempts as the server has them, which the worker follows (its in-progress acks,
    when it gives up); settings that differ from this worker's flags are logged. A consumer this worker made is read
    back from the server: another worker that found none at the same moment may have made it with its own flags
    after this one (the last write holds), and the worker re-reads the terms later too (`JobConsumer`)."""
    try:
        info = await js.stream_info(limits.stream)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise JetStreamUnavailable(
            "durable mode needs JetStream on the NATS server: run nats-server with -js (`llmbus up` enables it)"
        ) from None
    except nats.js.errors.NotFoundError:
        with contextlib.suppress(nats.js.errors.BadRequestError):  # another worker created it in between
            await js.add_stream(limits.stream_config())
    else:
        check_stream(info.config, limits)
    terms = {}
    for name, filters in consumers.items():
        try:
            consumer = await js.consumer_info(limits.stream, name)
        except nats.js.errors.NotFoundError:
            consumer = None
        config = None if consumer is None else consumer.config
        if config is None or sorted(config.filter_subjects or [config.filter_subject]) != sorted(filters):
            await js.add_consumer(limits.stream, limits.consumer_config(name, filters))
            config = (await js.consumer_info(limits.stream, name)).config
        terms[name] = terms_of(name, config, limits)
    return terms


async def consumer_terms(js: JetStreamContext, limits: JobLimits, name: str) -> JobLimits:
    """Consumer `name`'s `ack_wait` and attempts as the server has them now (`limits` where it does not say).
    Raises `nats.js.errors.NotFoundError` when the consumer or the stream is gone."""
    return terms_of(name, (await js.consumer_info(limits.stream, name)).config, limits, quiet=True)


def check_stream(config: StreamConfig, limits: JobLimits) -> None:
    taken = config.subjects or []
    if not any(subject_covers(pattern, limits.subjects) for pattern in taken):
        raise JobStreamMismatch(
            f"the JetStream stream {limits.stream} takes {', '.join(taken) or 'no subjects'}, not this worker's job "
            f"subjects {limits.subjects}: another llmbus bus (another subject prefix) made it on this NATS server; "
            f"use that bus's prefix, or add {limits.subjects} to the stream's subjects"
        )
    stream = (
        ("max_age", config.max_age, limits.max_age),
        ("max_msgs", config.max_msgs, limits.max_msgs),
        ("duplicate_window", config.duplicate_window, limits.max_age),
    )
    warn_differences(f"stream {limits.stream}", stream)


def terms_of(name: str, config: ConsumerConfig, limits: JobLimits, quiet: bool = False) -> JobLimits:
    """The terms a consumer's `config` sets; those that differ from `limits` (this worker's flags) are logged unless
    `quiet`."""
    ack_wait = config.ack_wait or limits.ack_wait
    attempts = config.max_deliver - 1 if config.max_deliver and config.max_deliver > 0 else limits.max_attempts
    settings = (("ack_wait", ack_wait, limits.ack_wait), ("max_deliver", attempts + 1, limits.max_deliver))
    if not quiet:
        warn_differences(f"consumer {name}", settings)
    return dataclasses.replace(limits, ack_wait=ack_wait, max_attempts=attempts)


def warn_differences(what: str, settings: tuple[tuple[str, object, object], ...]) -> None:
    differing = [f"{name} {theirs} (this worker's flag: {ours})" for name, theirs, ours in settings if theirs != ours]
    if differing:
        log.warning("the JetStream %s was made with other settings; following it: %s", what, "; ".join(differing))


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject that `subject` (which may end in `>`) matches is matched by `pattern`."""
    wanted, given = subject.split("."), pattern.split(".")
    for index, token in enumerate(given):
        if token == ">":
            return index < len(wanted)
        if index >= len(wanted) or wanted[index] == ">" or (token != "*" and token != wanted[index]):
            return False
    return len(given) == len(wanted)
