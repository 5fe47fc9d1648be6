"""The HTTP app: health probes, the model list, and the OpenAI-compatible generation endpoints.

Callers are authenticated by ``server.api.auth`` (single-tenant without a keys file); adapter
administration lives in ``server.api.admin``. Route handlers only wire things together: request →
engine input is ``server.api.convert``, engine output → OpenAI bodies is ``server.api.output``,
failures → error bodies is ``server.api.errors``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from adapters.compositions import Compositions
from adapters.format import FormatLimits
from adapters.registry import AdapterRegistry
from adapters.tenants import KeyRing, Principal
from server import metrics
from server.api import admin, compose, convert, dashboard
from server.api.auth import Authenticator, caller
from server.api.auth import admin as admin_key
from server.api.connections import BodyGuard
from server.api.errors import ApiError, install_error_handlers
from server.api.limits import (
    DEFAULT_MAX_BODY_BYTES,
    UPLOAD_OVERHEAD_BYTES,
    Admission,
    BodySizeLimit,
    Reservation,
)
from server.api.output import (
    ChatFormatter,
    ClientDisconnected,
    CompletionFormatter,
    EventStreamResponse,
    Formatter,
    collect,
    merge_streams,
    sse_events,
)
from server.api.quotas import BothObservers, QuotaTicket, TenantQuotas
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from server.engine.engine import Engine

DEFAULT_MAX_QUEUE = 256
DEFAULT_REQUEST_TIMEOUT_S = 30.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the response"
router = APIRouter()


Caller = Annotated[Principal, Depends(caller)]


@dataclass
class AppState:
    engine: Engine
    served_model_name: str
    registry: AdapterRegistry | None
    auth: Authenticator
    admission: Admission  # max_num_seqs + max_queue requests in flight; more get 429
    quotas: TenantQuotas  # each tenant's limits (server.api.quotas); over one: 429
    draining: bool = False  # set by the first SIGTERM (server.api.shutdown)
    created: int = field(default_factory=lambda: int(time.time()))
    settings: dict[str, object] = field(default_factory=dict)  # GET /v1/stats' config echo
    compositions: Compositions | None = None  # requests' composed adapters (None: no registry)


def create_app(engine: Engine, served_model_name: str, registry: AdapterRegistry | None = None,
               keyring: KeyRing | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics_auth: str = "none",
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, *,
               settings: dict[str, object] | None = None,
               compositions: Compositions | None = None) -> FastAPI:  # fmt: skip
    """The app serving ``engine``: ``model`` = ``served_model_name`` is the base model; any other
    ``model`` names an adapter of ``registry`` in the caller's tenant. ``keyring`` None: single-tenant.
    ``metrics_auth`` "admin": ``/metrics`` needs an admin key (see ``ServerConfig``).
    ``request_timeout``: a body that stalls that long between chunks is a 408; one still arriving
    when the server drains is a 503 (``server.api.connections.BodyGuard``). ``settings``: what
    ``GET /v1/stats`` reports as ``config`` (``server.settings.settings_echo``; None: {}).
    ``compositions``: where composed adapters are built (None: in a temporary directory)."""
    app = FastAPI(title="loraplex", summary="OpenAI-compatible multi-LoRA inference server")
    auth = Authenticator(keyring, on_reload=lambda ring: engine.set_tenant_weights(tenant_weights(ring)))
    quotas = TenantQuotas()
    app.state.loraplex = AppState(engine, served_model_name, registry, auth, Admission(max_queue), quotas)
    max_adapter_bytes = registry.limits.max_weights_bytes if registry else FormatLimits().max_weights_bytes
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes,
                       max_upload_bytes=max_adapter_bytes + UPLOAD_OVERHEAD_BYTES)  # fmt: skip
    state = app.state.loraplex
    state.settings = settings or {}
    if registry is not None:
        state.compositions = compositions or Compositions(registry)
    app.add_middleware(BodyGuard, timeout_s=request_timeout, is_draining=lambda: state.draining)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    server_metrics = metrics.install(app, engine, guard=admin_key if metrics_auth == "admin" else None)
    quotas.on_limit = server_metrics.record_limit_hit
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
    """Readiness: 200 when requests can be served (the model is loaded before the app exists);
    503 while draining for shutdown or when the engine loop stopped."""
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    running = state.engine.is_running
    return JSONResponse(
        {"status": "ready" if running else "unavailable"}, status_code=200 if running else 503
    )


@router.get("/v1/models")
async def list_models(request: Request, principal: Caller) -> ModelList:
    """The base model first, then the adapters the caller may use (admins: every tenant's)."""
    state = _state(request)
    cards = [ModelCard(id=state.served_model_name, created=state.created, root=state.served_model_name)]
    if state.registry is not None:
        scope = None if principal.is_admin else principal.tenant
        records = await run_in_threadpool(state.registry.list, scope)
        for record in records:
            info = admin.adapter_info(state.registry, record, principal, state.engine.is_merged,
                                      state.engine.makes_merged_copies)  # fmt: skip
            cards.append(ModelCard(id=info.id, created=info.created, parent=state.served_model_name))
    return ModelList(data=cards)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, principal: Caller) -> Response:
    state = _state(request)
    with state.admission.reserve(state.engine, state.draining, convert.num_requests(body)) as reservation:
        make_input = convert.completion_input
        inputs = await run_in_threadpool(_engine_input, make_input, body, state, principal)
        quota = _admit(state, principal, inputs)
        formatter = CompletionFormatter(
            f"cmpl-{uuid.uuid4().hex}", body.model, state.engine.tokenizer, inputs.sampling.logprobs,
            inputs.choices_per_prompt, echoes=[r.echo for r in inputs.requests] if body.echo else None,
        )  # fmt: skip
        return await _generate(request, body, inputs, formatter, principal, reservation, quota)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Caller) -> Response:
    state = _state(request)
    with state.admission.reserve(state.engine, state.draining, convert.num_requests(body)) as reservation:
        inputs = await run_in_threadpool(_engine_input, convert.chat_input, body, state, principal)
        quota = _admit(state, principal, inputs)
        formatter = ChatFormatter(
            f"chatcmpl-{uuid.uuid4().hex}", body.model, state.engine.tokenizer, inputs.sampling.logprobs,
            inputs.choices_per_prompt, tools=inputs.tools,
        )  # fmt: skip
        return await _generate(request, body, inputs, formatter, principal, reservation, quota)


def tenant_weights(keyring: KeyRing) -> dict[str, float]:
    return {tenant: limits.weight for tenant, limits in keyring.tenant_limits.items()}


def _admit(state: AppState, principal: Principal, inputs: convert.GenerationInput) -> QuotaTicket:
    """The tenant's quota for these engine requests, counted at prompt + max_tokens each (429 over a
    limit, ``server.api.quotas``)."""
    num_tokens = sum(len(one.prompt_token_ids) + one.sampling.max_tokens for one in inputs.requests)
    limits = state.auth.limits(principal.tenant)
    return state.quotas.admit(principal.tenant, limits, len(inputs.requests), num_tokens)


def _engine_input(make_input, body, state: AppState, principal: Principal) -> convert.GenerationInput:
    """Resolve the adapter ``body.model`` names (404 if none), then check the body into engine input.
    Off the event loop: over a shared adapter store the lookup asks the database."""
    return make_input(body, state.engine, _adapter(body, state, principal))


def _adapter(body: SamplingFields, state: AppState, principal: Principal) -> str | None:
    """The engine id ``model`` names, or of the composition ``adapters`` asks for (built if new)."""
    if not compose.requested(body, state.served_model_name):
        return convert.resolve_adapter(body.model, state.served_model_name, state.registry, principal)
    if state.compositions is None:
        raise ApiError(400, "this server has no adapter registry to compose from", param="adapters")
    parts = compose.components(body, principal)
    return state.compositions.resolve(principal.tenant, parts, compose.recipe(body)).adapter_id


async def _generate(
    request: Request,
    body: SamplingFields,
    inputs: convert.GenerationInput,
    formatter: Formatter,
    principal: Principal,
    reservation: Reservation,
    quota: QuotaTicket,
) -> Response:
    """Submit (EngineError → 4xx), then stream SSE chunks or return one body with usage.

    ``reservation`` (the request's admitted place) is released once the engine counts the streams;
    ``quota`` (its tenant's) when the response path lets go of them.
    """
    state = _state(request)
    engine = state.engine
    timer = metrics.request_observer(request, inputs.adapter or state.served_model_name, principal.tenant)
    observer = BothObservers(timer, quota)
    n = len(inputs.requests)
    ids = [formatter.request_id] if n == 1 else [f"{formatter.request_id}-{i}" for i in range(n)]
    streams = []
    # its tenant's share and its place among that tenant's requests; whose cached prefixes it may reuse
    who = {"tenant": principal.tenant, "cache_salt": body.cache_salt, "priority": body.priority or 0}
    try:
        for request_id, one in zip(ids, inputs.requests, strict=True):
            streams.append(
                await engine.submit(one.prompt_token_ids, one.sampling, inputs.adapter, request_id, **who)
            )
    except BaseException:
        quota.release()
        for stream in streams:
            await stream.aclose()
        raise
    finally:
        reservation.release()  # submitted streams are in engine.num_unfinished from here on
    merged = merge_streams(streams)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = sse_events(merged, formatter, include_usage, observer, n)
        on_close = lambda: [engine.abort(i) for i in ids] + [quota.release()]  # noqa: E731
        return _with_headers(EventStreamResponse(events, on_close=on_close), quota)
    try:
        choices = await collect(merged, request, observer, n)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    failed = next((g for g in choices if g.failed), None)
    if failed is not None:
        raise failed.failure()
    return _with_headers(JSONResponse(formatter.response(choices)), quota)


def _with_headers(response: Response, quota: QuotaTicket) -> Response:
    response.headers.update(quota.headers)
    return response
