"""The HTTP app: health probes, the model list, and the OpenAI-compatible generation endpoints.

Single tenant, no authentication yet: whoever can reach the socket can use every model. Route
handlers only wire things together: request → engine input is ``server.api.convert``, engine
output → OpenAI bodies is ``server.api.output``, failures → error bodies is ``server.api.errors``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.api import convert
from server.api.errors import ApiError, install_error_handlers
from server.api.output import (
    ChatFormatter,
    ClientDisconnected,
    CompletionFormatter,
    EventStreamResponse,
    Formatter,
    collect,
    sse_events,
)
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from server.engine.engine import Engine

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the response"
router = APIRouter()


@dataclass
class AppState:
    engine: Engine
    served_model_name: str
    adapter_ids: list[str] = field(default_factory=list)  # adapters this app knows, listed by /v1/models
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, served_model_name: str, adapter_ids: Iterable[str] = ()) -> FastAPI:
    """The app serving ``engine``: ``model`` = ``served_model_name`` is the base model, a registered
    adapter id selects that adapter; ``adapter_ids`` (already loaded) are listed by /v1/models."""
    app = FastAPI(title="loraplex", summary="OpenAI-compatible multi-LoRA inference server")
    app.state.loraplex = AppState(engine, served_model_name, list(adapter_ids))
    install_error_handlers(app)
    app.include_router(router)
    return app


def _state(request: Request) -> AppState:
    return request.app.state.loraplex


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the engine loop runs, else 503."""
    running = _state(request).engine.is_running
    return JSONResponse({"status": "ok" if running else "unavailable"}, status_code=200 if running else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when requests can be served (the model is loaded before the app exists)."""
    running = _state(request).engine.is_running
    return JSONResponse(
        {"status": "ready" if running else "unavailable"}, status_code=200 if running else 503
    )


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The base model first, then the adapters that are still registered."""
    state = _state(request)
    cards = [ModelCard(id=state.served_model_name, created=state.created, root=state.served_model_name)]
    for adapter_id in state.adapter_ids:
        if state.engine.core.adapters.is_registered(adapter_id):
            cards.append(ModelCard(id=adapter_id, created=state.created, parent=state.served_model_name))
    return ModelList(data=cards)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    generation_input = convert.completion_input(body, state.engine, state.served_model_name)
    formatter = CompletionFormatter(
        f"cmpl-{uuid.uuid4().hex}", body.model, state.engine.tokenizer, generation_input.sampling.logprobs
    )
    return await _generate(request, body, generation_input, formatter)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    generation_input = convert.chat_input(body, state.engine, state.served_model_name)
    formatter = ChatFormatter(
        f"chatcmpl-{uuid.uuid4().hex}", body.model, state.engine.tokenizer, generation_input.sampling.logprobs
    )
    return await _generate(request, body, generation_input, formatter)


async def _generate(
    request: Request, body: SamplingFields, inputs: convert.GenerationInput, formatter: Formatter
) -> Response:
    """Submit (EngineError → 4xx), then stream SSE chunks or return one body with usage."""
    engine = _state(request).engine
    if not engine.is_running:
        raise ApiError(503, "The engine is not running.", type="server_error")
    stream = await engine.submit(
        inputs.prompt_token_ids, inputs.sampling, inputs.adapter, formatter.request_id
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = sse_events(stream, formatter, include_usage)
        return EventStreamResponse(events, on_close=lambda: engine.abort(formatter.request_id))
    try:
        generation = await collect(stream, request)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if generation.failed:
        raise generation.failure()
    return JSONResponse(formatter.response(generation))
