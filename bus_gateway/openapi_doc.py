"""The OpenAPI document: Litestar's (paths, responses) plus request bodies from the same msgspec Structs.

The POST handlers read the raw body themselves, so that invalid input gets exactly the worker's error message
(`schemas.decode_chat_request`); Litestar therefore cannot see their body type, and it is added here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar.connection import Request
from litestar.openapi.plugins import JsonRenderPlugin

REF_TEMPLATE = "#/components/schemas/{name}"

# (path, method) -> the Struct its JSON body decodes into
RequestBodies = Mapping[tuple[str, str], type]


def with_request_bodies(document: dict[str, Any], bodies: RequestBodies) -> dict[str, Any]:
    """A copy of `document` whose operations in `bodies` declare their JSON request body."""
    out = copy.deepcopy(document)
    types = list(dict.fromkeys(bodies.values()))
    refs, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    schemas = out.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in components.items():
        schemas.setdefault(name, schema)
    ref_of = dict(zip(types, refs, strict=True))
    for (path, method), type_ in bodies.items():
        operation = out.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref_of[type_]}}}
    return out


class WireJsonRenderPlugin(JsonRenderPlugin):
    """Serves the completed document (Litestar's JSON plugin, plus the request bodies)."""

    def __init__(self, bodies: RequestBodies, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bodies = bodies
        self._cache: dict[str, Any] | None = None

    def document(self, openapi_schema: dict[str, Any]) -> dict[str, Any]:
        if self._cache is None:
            self._cache = with_request_bodies(openapi_schema, self.bodies)
        return self._cache

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        return self.render_json(request, self.document(openapi_schema))
