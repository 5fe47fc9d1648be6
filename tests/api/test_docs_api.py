"""docs/api.md documents exactly the routes the app serves, each with a curl example."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.routing import APIRoute

from server.api.app import create_app

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


class _NoEngine:
    """Building the route table runs no engine; the metrics only add their observers to it."""

    def add_step_observer(self, observer) -> None:
        pass

    add_load_observer = add_step_observer


def served_routes() -> set[tuple[str, str]]:
    """The OpenAPI schema's operations plus the routes left out of it (/metrics, /dashboard)."""
    app = create_app(_NoEngine(), "base")
    routes = {(m.upper(), path) for path, item in app.openapi()["paths"].items() for m in item}
    routes |= {(m, r.path) for r in api_routes(app.routes) for m in r.methods if m != "HEAD"}
    return routes


def api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, looking inside included routers (FastAPI ≥ 0.165 keeps them nested; none of
    ours has a prefix), so routes left out of the schema (/metrics, /dashboard) are seen too."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found.extend(api_routes(route.original_router.routes))
    return found


def documented_routes(text: str) -> set[tuple[str, str]]:
    """Routes named in headings: ``### `POST /v1/adapters/{name}/pin`, `/unpin` (admin)``."""
    routes = set()
    for heading in re.findall(r"^### (.+)$", text, flags=re.M):
        previous = None
        for method, path in re.findall(r"`(?:(GET|POST|DELETE) )?(/[^`\s]*)`", heading):
            if method:
                routes.add((method, path))
                previous = (method, path)
            elif previous is not None:  # `/unpin` after `POST /v1/adapters/{name}/pin`
                base = previous[1].rsplit("/", 1)[0]
                routes.add((previous[0], base + path))
    return routes


def test_every_served_route_is_documented_and_nothing_else():
    text = API_DOC.read_text()
    assert documented_routes(text) == served_routes()


def test_every_documented_section_has_a_curl_example():
    sections = re.split(r"^### ", API_DOC.read_text(), flags=re.M)[1:]
    for section in sections:
        assert "```bash\ncurl" in section, f"no curl example under: {section.splitlines()[0]}"


def _documented_fields() -> dict[str, set[str]]:
    """The Request fields table: {field: endpoints ("completions", "chat")}."""
    section = API_DOC.read_text().split("#### Request fields", 1)[1].split("\n### ", 1)[0]
    fields: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`.+?) \| (both|completions|chat) \|", section, re.M):
        names = re.findall(r"`([a-z_.]+)`", row[0])
        for name in names:
            fields[name] = {"completions", "chat"} if row[1] == "both" else {row[1]}
    return fields


def test_the_request_fields_table_lists_exactly_the_fields_the_bodies_accept():
    from server.api.schemas import ChatCompletionRequest, CompletionRequest

    documented = _documented_fields()
    for endpoint, body in (("completions", CompletionRequest), ("chat", ChatCompletionRequest)):
        accepted = set(body.model_fields) | {"stream_options.include_usage"}
        accepted.discard("stream_options")
        listed = {name for name, where in documented.items() if endpoint in where}
        assert listed == accepted, f"{endpoint}: documented {listed ^ accepted} wrongly"
