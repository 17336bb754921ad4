"""llmbus wire contract (msgspec): messages, subjects, and pure encode/decode functions."""

from schemas.codec import (
    WireError,
    check_chat_request,
    content_type,
    conversation,
    decode,
    decode_batch,
    decode_chat_request,
    encode,
    stop_strings,
)
from schemas.messages import (
    BatchItemError,
    BatchRequest,
    BatchResponse,
    BatchResult,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    Message,
    Usage,
)
from schemas.subjects import DEFAULT_PREFIX, DEFAULT_QUEUE_GROUP, SERVICE_NAME, Subjects

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_QUEUE_GROUP",
    "SERVICE_NAME",
    "BatchItemError",
    "BatchRequest",
    "BatchResponse",
    "BatchResult",
    "ChatChunk",
    "ChatRequest",
    "ChatResponse",
    "ErrorBody",
    "Message",
    "Subjects",
    "Usage",
    "WireError",
    "check_chat_request",
    "content_type",
    "conversation",
    "decode",
    "decode_batch",
    "decode_chat_request",
    "encode",
    "stop_strings",
]
