"""JSON Schema for every wire message, so a Go or JS user can read the contract (`llmbus schema`)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.messages import (
    BatchDone,
    BatchItemDone,
    BatchRequest,
    BatchResponse,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ErrorBody,
    WorkerLeft,
)

MESSAGES: dict[str, type] = {
    "chat_request": ChatRequest,
    "chat_response": ChatResponse,
    "chat_chunk": ChatChunk,
    "batch_request": BatchRequest,
    "batch_response": BatchResponse,
    "batch_item_done": BatchItemDone,
    "batch_done": BatchDone,
    "error": ErrorBody,
    "worker_left": WorkerLeft,
}

JSON_DIR = Path(__file__).parent / "json"


def json_schemas() -> dict[str, dict]:
    return {name: msgspec.json.schema(type_) for name, type_ in MESSAGES.items()}


def write_json_schemas(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths
