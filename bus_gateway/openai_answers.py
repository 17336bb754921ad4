"""Bus answers as OpenAI answers: a `chat.completion`, the `chat.completion.chunk`s of a stream, and an answer that
was cut off.

OpenAI's finish reasons (of those llmbus can give) are `stop` and `length`. A bus answer that ends `cancelled` was
cut off before it finished: by the bridge stopping (it cancels the streams still open after `STREAM_GRACE`), or by
a cancel on the bus that this client did not send (a client that cancels goes away, and reads nothing more). OpenAI
has no reason for that, and reporting `stop` would pass half an answer off as a whole one, so a cut-off answer is an
error that SDKs raise: a non-streaming one is a 503 (`server_error`, code `shutting_down`), a stream ends with that
error as its last event and no `data: [DONE]`. The native `/chat` API keeps `finish_reason: "cancelled"`.
"""

from __future__ import annotations

from bus_gateway.openai_translate import ApiFailure
from bus_gateway.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
)
from schemas import ChatChunk, ChatResponse, Usage

BRIDGE_STOPPED = "the bridge stopped before the answer finished; send the request again"
CANCELLED_ON_THE_BUS = (
    "the generation was cancelled on the bus (not by this client) before the answer finished; send the request again"
)


def is_cut_off(finish_reason: str | None) -> bool:
    """Whether an answer that ended this way is incomplete (it was cancelled)."""
    return finish_reason == "cancelled"


def cut_off(bridge_stopping: bool) -> ApiFailure:
    """The error for an answer cut off; its message says whether the bridge was stopping."""
    message = BRIDGE_STOPPED if bridge_stopping else CANCELLED_ON_THE_BUS
    return ApiFailure(503, message, "server_error", None, "shutting_down")


def openai_finish_reason(reason: str | None) -> str:
    """OpenAI's value for an answer that finished (`is_cut_off` is false): `length`, else `stop`."""
    return "length" if reason == "length" else "stop"


def usage_of(usage: Usage) -> CompletionUsage:
    return CompletionUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def to_completion(reply: ChatResponse, completion_id: str, created: int) -> ChatCompletion:
    """A finished answer as a `chat.completion` (check `is_cut_off` first)."""
    choice = Choice(0, AssistantMessage(reply.response), openai_finish_reason(reply.finish_reason))
    return ChatCompletion(
        id=completion_id, created=created, model=reply.model, choices=[choice], usage=usage_of(reply.usage)
    )


class ChunkRenderer:
    """Bus chunks as OpenAI `chat.completion.chunk`s: a role chunk first, content deltas, a finish chunk,
    then (with `stream_options.include_usage`) a usage chunk with no choices. The last chunk of an answer cut off
    gives its text delta only (no finish chunk, no usage chunk): the caller ends the stream with `cut_off`."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.started = False

    def chunk(self, choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def render(self, chunk: ChatChunk) -> list[ChatCompletionChunk]:
        out = []
        if not self.started:
            self.started = True
            out.append(self.chunk([ChunkChoice(0, ChunkDelta(role="assistant", content=""))]))
        if chunk.delta:
            out.append(self.chunk([ChunkChoice(0, ChunkDelta(content=chunk.delta))]))
        if chunk.done and not is_cut_off(chunk.finish_reason):
            out.append(self.chunk([ChunkChoice(0, ChunkDelta(), openai_finish_reason(chunk.finish_reason))]))
            if self.include_usage and chunk.usage is not None:
                out.append(self.chunk([], usage_of(chunk.usage)))
        return out
