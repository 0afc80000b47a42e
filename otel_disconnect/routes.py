"""Route templates for metric labels: ``/items/{item_id}``, never the raw path."""

from __future__ import annotations

from typing import Any

from ._types import Scope

UNMATCHED = "unmatched"

# Starlette before 1.0 does not put the matched route in the scope, only the endpoint. Endpoints
# are few and fixed, so the endpoint -> template map is bounded by the app's routes.
_by_endpoint: dict[int, str] = {}
_MAX_CACHED = 4096


def route_template(scope: Scope) -> str:
    """The matched route's template, prefixed with the mount path; ``unmatched`` otherwise."""
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else None
    if isinstance(path, str):
        # Inside a Mount the route's path is relative; the mount added its path to root_path.
        root_path = scope.get("root_path", "")
        app_root_path = scope.get("app_root_path")
        if app_root_path is not None and root_path.startswith(app_root_path):
            path = root_path[len(app_root_path) :] + path
        return path or "/"
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return UNMATCHED
    # The search starts at the top-level app, so it already includes mount prefixes.
    return _path_for_endpoint(scope.get("app"), endpoint) or UNMATCHED


def _path_for_endpoint(app: Any, endpoint: Any) -> str | None:
    key = id(endpoint)
    found = _by_endpoint.get(key)
    if found is not None:
        return found
    found = _search(getattr(app, "routes", None) or (), endpoint, "", depth=0)
    if found is not None and len(_by_endpoint) < _MAX_CACHED:
        _by_endpoint[key] = found
    return found


def _search(routes: Any, endpoint: Any, prefix: str, depth: int) -> str | None:
    if depth > 8:
        return None
    for route in routes:
        path = getattr(route, "path", "")
        if getattr(route, "endpoint", None) is endpoint or getattr(route, "app", None) is endpoint:
            return prefix + path
        sub = getattr(route, "routes", None)
        if sub:
            found = _search(sub, endpoint, prefix + path, depth + 1)
            if found is not None:
                return found
    return None
