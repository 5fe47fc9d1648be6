"""loraplex on Ray Serve: N replicas of the whole server, each request routed by its adapter.

    client ──HTTP──► OpenAIIngress (Ray Serve's proxy + a thin FastAPI app, no model)
                        │  reads ``model`` from a completion body; a DeploymentHandle call with
                        │  ``multiplexed_model_id=model``: Ray Serve prefers a replica that holds it
                        ▼
                     LoraplexServer × N (each: engine, adapter registry, the loraplex FastAPI app)
                        the request runs through the very app ``loraplex serve`` runs, called in
                        process over ASGI, and its response streams back chunk by chunk

The OpenAI API, its errors, auth and the admin endpoints are therefore unchanged for clients;
routing is Ray Serve's model multiplexing (the mechanism Ray Serve LLM uses for LoRA). Requests
for the base model, and everything but completions, go to any replica. With more than one replica
the adapter catalogue must be shared (``--adapter-store`` + ``--adapter-blobs``), or each replica
serves only the ``--adapter`` directories it was started with.

``build_app(args)`` is the Ray Serve application builder (``serve run server.ray_serve:build_app``,
or a KubeRay RayService's ``import_path``), ``args`` being ``loraplex serve`` config keys plus
``serve-ray``'s (``server/ray_options.py``). ``run`` is ``loraplex serve-ray``.
"""

# No ``from __future__ import annotations``: Ray Serve's class-based FastAPI routes need the
# parameter annotations (``request: Request``) as real types, not strings.
import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.ray_options import RAY_FLAGS, RayOptions, serve_argv

log = logging.getLogger("loraplex.ray")

ROUTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
REPLICA_HEADER = "x-loraplex-replica"  # which replica served a response (for operators and tests)
FORWARDED_ENV_PREFIXES = ("AWS_", "PG", "LORAPLEX_CACHE_DIR", "HF_", "OMP_")
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"host"})


def routed_model(path: str, body: bytes) -> str | None:
    """The ``model`` a completion body names (its adapter, or the base model's name), else None."""
    if path not in ROUTED_PATHS:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None  # the replica answers the bad body with loraplex's own error
    return model if isinstance(model, str) and model else None


async def call_asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> AsyncIterator[Any]:  # fmt: skip
    """Run one HTTP request through an ASGI ``app`` in process: yields (status, headers) first,
    then each body chunk as the app sends it. Closing the iterator early tells the app the client
    went away (``http.disconnect``), so a streamed generation is aborted as over a socket."""
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 0), "server": ("loraplex", 80),
    }  # fmt: skip
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], [(k, v) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
        await task  # the app's own exception, if it raised one
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class LoraplexServer:
    """One engine replica: what ``loraplex serve`` runs, minus uvicorn (``serve_argv``: its flags)."""

    def __init__(self, argv: list[str]) -> None:
        from server.cli import build_parser, start_app
        from server.settings import resolve_options

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        options = resolve_options(build_parser().parse_args(["serve", *argv]), dict(os.environ))
        self.app, self.engine, _ = start_app(options)
        self.served_name = self.app.state.loraplex.served_model_name
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> AsyncIterator[Any]:  # fmt: skip
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.get_adapter(model_id)  # type: ignore[attr-defined]  # see _server_class
        first = True
        async for item in call_asgi(self.app, method, path, query, headers, body):
            if first:
                status, response_headers = item
                item = (status, [*response_headers, (REPLICA_HEADER.encode(), self.replica.encode())])
                first = False
            yield item

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()  # the client left (or the body ended): stop the replica's generation


# Ray Serve pickles the ingress class when it is decorated: what its methods use is defined above.
ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(ingress_app)
class OpenAIIngress:
    """The HTTP front: forwards every request to a LoraplexServer replica, a completion's to one
    that holds its ``model`` where Ray Serve has one."""

    def __init__(self, server: DeploymentHandle, route_by_adapter: bool = True) -> None:
        self.server = server.options(method_name="handle", stream=True)
        self.route_by_adapter = route_by_adapter

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        model = routed_model(request.url.path, body) if self.route_by_adapter else None
        handle = self.server if model is None else self.server.options(multiplexed_model_id=model)
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_BY_HOP]
        stream = handle.remote(request.method, request.url.path, request.url.query.encode(), headers, body)
        try:
            status, response_headers = await stream.__anext__()
        except StopAsyncIteration:
            error = {"message": "the replica sent no response", "type": "server_error", "param": None,
                     "code": "internal_error"}  # fmt: skip
            return JSONResponse({"error": error}, status_code=502)
        kept = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in response_headers
            if k.lower() not in _HOP_BY_HOP
        }
        return StreamingResponse(_chunks(stream), status_code=status, headers=kept)


def _server_class(max_adapters: int) -> type[LoraplexServer]:
    """LoraplexServer with Ray Serve's multiplexed ``get_adapter`` holding ``max_adapters`` ids."""

    class Server(LoraplexServer):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, model_id: str) -> str:
            """The first request for an adapter on this replica lands here; Ray Serve then routes
            that adapter's requests here while it is among this replica's ``max_adapters`` most
            recent. The weights are loaded by the engine's cache on first use, off the request path."""
            return model_id

    return Server


def build_app(args: Mapping[str, object]) -> Any:
    """The Ray Serve application for ``args``: ``loraplex serve`` config keys (``model``,
    ``adapter-store``, ...) plus ``serve-ray``'s (``num-replicas``, ...). ValueError for a bad one."""
    from server.cli import build_parser, check_settings
    from server.settings import resolve_options

    ray_keys = {k: v for k, v in args.items() if k in RAY_FLAGS}
    argv: list[str] = []
    for key, value in args.items():
        if key in RAY_FLAGS:
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{key}", str(item)]
    options = resolve_options(build_parser().parse_args(["serve", *argv]), dict(os.environ))
    check_settings(options)
    ray = RayOptions.from_mapping(ray_keys, options)
    ray.check_store(options)
    return application(options, ray)


def application(options: Mapping[str, object], ray: RayOptions) -> Any:
    """The bound deployments for resolved serve ``options``."""
    server_class = _server_class(ray.max_adapters_per_replica)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    server = serve.deployment(
        server_class, name="LoraplexServer",
        num_replicas=None if ray.max_replicas is not None else ray.num_replicas,
        autoscaling_config=ray.autoscaling_config(),
        max_ongoing_requests=max(int(ray.target_ongoing_requests) * 4, 16),
        ray_actor_options={"num_cpus": ray.replica_cpus, "num_gpus": ray.replica_gpus,
                           "runtime_env": {"env_vars": env}},
        health_check_period_s=10, graceful_shutdown_timeout_s=30,
    )  # fmt: skip
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(server.bind(serve_argv(options)), ray.route_by_adapter)


def run(options: Mapping[str, object], ray_options: RayOptions) -> int:
    """``loraplex serve-ray``: start (or join) Ray, deploy, serve until SIGINT/SIGTERM."""
    import ray

    ray.init(address=ray_options.ray_address, include_dashboard=False, log_to_driver=True)
    host, port = str(options["host"]), int(str(options["port"]))
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(options, ray_options), name="loraplex", route_prefix="/")
    log.info(
        "serving on http://%s:%s: %d engine replicas behind Ray Serve", host, port, ray_options.num_replicas
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down the Ray Serve application")
    serve.shutdown()
    ray.shutdown()
    return 0
