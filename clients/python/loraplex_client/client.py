"""``Client``: the synchronous client (generation, models, adapter administration)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx
from pydantic import BaseModel

from loraplex_client._base import (
    ADAPTERS_PATH,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    Composition,
    Message,
    Prompt,
    RetryPolicy,
    Settings,
    adapter_path,
    chat_body,
    completion_body,
    compose_body,
    retry_after_s,
    tenant_params,
)
from loraplex_client.errors import error_from_response, transport_error
from loraplex_client.streaming import Stream
from loraplex_client.types import (
    Adapter,
    AdapterDeleted,
    AdapterList,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    ModelList,
)
from loraplex_client.upload import MultipartBody, progress_bar

ResponseT = TypeVar("ResponseT", bound=BaseModel)
STREAM_HEADERS = {"Accept": "text/event-stream"}


class Client:
    """A client of one loraplex server.

    ``base_url`` defaults to ``$LORAPLEX_BASE_URL``, else ``http://127.0.0.1:8000``; ``api_key`` to
    ``$LORAPLEX_API_KEY``. A request refused with 429/503, or that could not connect, is sent again
    up to ``max_retries`` times (see ``RetryPolicy``); ``sleep`` is how the client waits between
    attempts. ``http_client`` replaces the ``httpx.Client`` the client would make (its own base URL
    and headers are not used). Failures raise ``loraplex_client.errors.LoraplexError`` subclasses.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sleep: Callable[[float], object] = time.sleep,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.settings = Settings.resolve(base_url, api_key, timeout)
        self.retry = RetryPolicy(max_retries)
        self._sleep = sleep
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.settings.timeout)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def close(self) -> None:
        """Close the connection pool (not an ``http_client`` passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- transport ----
    def _build(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Request:
        """One request to ``path`` with our headers (plus ``headers``) and timeout."""
        return self._http.build_request(
            method, self.settings.url(path), headers=self.settings.headers(headers),
            timeout=self.settings.timeout, **kwargs,
        )  # fmt: skip

    def _send(self, build: Callable[[], httpx.Request], stream: bool = False) -> httpx.Response:
        """Send ``build()`` with retries; the response (not yet read when ``stream``) or a typed error."""
        for attempt in itertools.count():
            try:
                response = self._http.send(build(), stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(attempt, exc)
                if delay is None:
                    raise transport_error(exc) from exc
            else:
                delay = self.retry.after_response(attempt, response)
                if delay is None:
                    return self._checked(response)
                response.close()
            self._sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            response.read()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            response.close()
        raise error_from_response(response, retry_after_s(response))

    def _call(self, response_type: type[ResponseT], method: str, path: str, **kwargs: Any) -> ResponseT:
        response = self._send(lambda: self._build(method, path, **kwargs))
        return response_type.model_validate(response.json())

    # ---- generation ----
    @overload
    def completions(
        self, model: str, prompt: Prompt, *, stream: Literal[False] = False, **sampling: Any
    ) -> Completion: ...
    @overload
    def completions(
        self, model: str, prompt: Prompt, *, stream: Literal[True], **sampling: Any
    ) -> Stream[CompletionChunk]: ...
    def completions(
        self, model: str, prompt: Prompt, *, stream: bool = False, **sampling: Any
    ) -> Completion | Stream[CompletionChunk]:
        """``POST /v1/completions``; ``sampling``: any request field (max_tokens, temperature...),
        and ``compose=`` ({name: weight} or (name, weight) pairs) with ``combination=`` and its
        parameters to compose adapters over the base model ``model`` names."""
        body = completion_body(model, prompt, stream, sampling)
        if stream:
            return self._stream("/v1/completions", body, CompletionChunk)
        return self._call(Completion, "POST", "/v1/completions", json=body)

    @overload
    def chat(
        self, model: str, messages: Sequence[Message], *, stream: Literal[False] = False, **sampling: Any
    ) -> ChatCompletion: ...
    @overload
    def chat(
        self, model: str, messages: Sequence[Message], *, stream: Literal[True], **sampling: Any
    ) -> Stream[ChatCompletionChunk]: ...
    def chat(
        self, model: str, messages: Sequence[Message], *, stream: bool = False, **sampling: Any
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """``POST /v1/chat/completions`` with ``messages`` as ``{"role", "content"}`` mappings."""
        body = chat_body(model, messages, stream, sampling)
        if stream:
            return self._stream("/v1/chat/completions", body, ChatCompletionChunk)
        return self._call(ChatCompletion, "POST", "/v1/chat/completions", json=body)

    def _stream(self, path: str, body: dict, chunk_type: type[ResponseT]) -> Stream[ResponseT]:
        response = self._send(lambda: self._build("POST", path, STREAM_HEADERS, json=body), stream=True)
        return Stream(response, chunk_type)

    def models(self) -> list[Model]:
        """The base model first, then the adapters this key may use."""
        return self._call(ModelList, "GET", "/v1/models").data

    # ---- adapter administration ----
    def compose_adapter(
        self, name: str, compose: Composition, *, tenant: str | None = None, **recipe: Any
    ) -> Adapter:
        """Save a composition (``compose=`` as in ``completions``; ``recipe``: combination, density...)
        as the next version of ``name`` (``POST /v1/adapters/compose``)."""
        body = compose_body(name, compose, tenant, recipe)
        return self._call(Adapter, "POST", "/v1/adapters/compose", json=body)

    def upload(
        self, name: str, path: str | Path, *, tenant: str | None = None, progress: bool = True
    ) -> Adapter:
        """Upload a peft adapter directory as the next version of ``name`` (tqdm bar on stderr)."""
        body = MultipartBody.for_adapter(name, path, tenant)
        with progress_bar(body.content_length, name, progress) as bar:

            def build() -> httpx.Request:
                bar.reset(total=body.content_length)
                return self._build("POST", ADAPTERS_PATH, body.headers, content=body.iter_bytes(bar.update))

            return Adapter.model_validate(self._send(build).json())

    def list_adapters(self, tenant: str | None = None) -> list[Adapter]:
        """This tenant's adapters (an admin key without ``tenant``: every tenant's)."""
        return self._call(AdapterList, "GET", ADAPTERS_PATH, params=tenant_params(tenant)).data

    def get_adapter(self, name: str, *, tenant: str | None = None) -> Adapter:
        return self._call(Adapter, "GET", adapter_path(name), params=tenant_params(tenant))

    def delete_adapter(self, name: str, *, tenant: str | None = None) -> AdapterDeleted:
        """Delete every version of ``name``; requests already running finish on theirs."""
        return self._call(AdapterDeleted, "DELETE", adapter_path(name), params=tenant_params(tenant))

    def pin(self, name: str, *, tenant: str | None = None) -> Adapter:
        """Keep the adapter resident in a device slot until unpinned (admin keys only)."""
        return self._action(name, "pin", tenant)

    def unpin(self, name: str, *, tenant: str | None = None) -> Adapter:
        return self._action(name, "unpin", tenant)

    def merge(self, name: str, *, tenant: str | None = None) -> Adapter:
        """Serve the adapter from a merged copy of the base weights (admin keys only)."""
        return self._action(name, "merge", tenant)

    def unmerge(self, name: str, *, tenant: str | None = None) -> Adapter:
        return self._action(name, "unmerge", tenant)

    def _action(self, name: str, action: str, tenant: str | None) -> Adapter:
        return self._call(Adapter, "POST", adapter_path(name, action), params=tenant_params(tenant))
