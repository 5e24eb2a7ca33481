"""``/openapi.json`` as the service really answers: ErrorResponse for every 422, domains from the bundle.

FastAPI documents schema violations as its own ``HTTPValidationError`` ``{"detail": [...]}``; the
service answers them as ``ErrorResponse`` (``service/errors.py``), so the generated document is
rewritten to say so. ``MatchRequest.domain`` is a free string in the model (the domains are only known
once a bundle is loaded); here it becomes an enum of the serving bundle's domains, recomputed after a
reload.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_FASTAPI_422 = "#/components/schemas/HTTPValidationError"
_OURS = "#/components/schemas/ErrorResponse"


def _replace_refs(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("$ref") == _FASTAPI_422:
            node["$ref"] = _OURS
        for value in node.values():
            _replace_refs(value)
    elif isinstance(node, list):
        for item in node:
            _replace_refs(item)


def base_schema(app: FastAPI) -> dict[str, Any]:
    """The generated document with FastAPI's validation-error schema replaced by ErrorResponse."""
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    _replace_refs(doc.get("paths", {}))
    schemas = doc.get("components", {}).get("schemas", {})
    if "ErrorResponse" in schemas:
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return doc


def with_domains(doc: dict[str, Any], domains: list[str] | None) -> dict[str, Any]:
    """A copy of ``doc`` whose ``MatchRequest.domain`` lists ``domains`` (unchanged when None)."""
    if not domains:
        return doc
    out = copy.deepcopy(doc)
    prop = out.get("components", {}).get("schemas", {}).get("MatchRequest", {}).get("properties", {}).get("domain")
    if prop is not None:
        prop["enum"] = list(domains)
    return out


def install_openapi(app: FastAPI) -> None:
    """Serve the rewritten document; the base is generated once, the domain enum per serving bundle."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "base" not in cache:
            cache["base"] = base_schema(app)
        state = getattr(app.state, "unimatch", None)
        serving = getattr(state, "serving", None)
        if serving is None:
            return cache["base"]
        key = serving.version
        if cache.get("version") != key:
            cache["doc"], cache["version"] = with_domains(cache["base"], list(serving.schema.domains)), key
        return cache["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
