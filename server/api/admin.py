"""Adapter administration routes: upload, list, get, delete, pin/unpin, and vLLM's load/unload.

Every route acts within the caller's tenant. Admins may name another tenant with ``?tenant=``
(or a form field ``tenant`` on upload); a user who names another tenant gets 403. Another tenant's
adapter looks exactly like an unknown one (404). Pins and vLLM's load/unload (local paths inside
``--adapter-roots``) are admin-only. Slow work (validating, hashing, fsync) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from adapters.compositions import Compositions
from adapters.errors import AdapterFormatError, StoreError, UnknownAdapterError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, validate_name
from adapters.registry import AdapterRegistry
from adapters.store import AdapterRecord
from adapters.tenants import Principal
from server.api import compose
from server.api.auth import admin, caller
from server.api.errors import ApiError, from_adapter_error, model_not_found
from server.api.schemas import (
    AdapterDeleted,
    AdapterInfo,
    AdapterList,
    ComposeAdapterRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from server.engine.engine import Engine
from server.engine.merging import CopyState

router = APIRouter()
_MERGE_POLL_S = 0.02
_LOAD_TIMEOUT_S = 60.0
Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin)]
_ADAPTER_ERRORS = (AdapterFormatError, StoreError, ValueError, OSError)


def _registry(request: Request) -> AdapterRegistry:
    return request.app.state.loraplex.registry


def _engine(request: Request) -> Engine:
    return request.app.state.loraplex.engine


def _info(request: Request, record: AdapterRecord, principal: Principal) -> AdapterInfo:
    engine = _engine(request)
    return adapter_info(_registry(request), record, principal, engine.is_merged, engine.makes_merged_copies)


def acting_tenant(principal: Principal, tenant: str | None) -> str:
    """The tenant a request acts in: the caller's own, or for admins the one they name."""
    if tenant is None or tenant == principal.tenant:
        return principal.tenant
    if not principal.is_admin:
        message = "Only admins may act for another tenant."
        raise ApiError(403, message, param="tenant", code="permission_denied")
    try:
        return validate_name(tenant, "tenant")
    except AdapterFormatError as exc:
        raise ApiError(400, str(exc), param="tenant") from exc


def adapter_info(registry: AdapterRegistry, record: AdapterRecord, principal: Principal,
                 is_merged: Callable[[str], bool] | None = None,
                 mergeable: bool = True) -> AdapterInfo:  # fmt: skip
    """``is_merged(adapter_id)``: whether a merged copy serves it (None: never); ``mergeable``:
    whether this server makes merged copies at all."""
    status = registry.status(record)
    merged = is_merged is not None and is_merged(record.adapter_id)
    model_id = record.name if record.tenant == principal.tenant else f"{record.tenant}/{record.name}"
    return AdapterInfo(
        id=model_id, name=record.name, tenant=record.tenant, version=record.version, sha256=record.sha256,
        rank=record.rank, alpha=record.alpha, use_rslora=record.use_rslora,
        target_modules=list(record.target_modules), base_model_name_or_path=record.base_model_name_or_path,
        size_bytes=record.size_bytes, created=int(record.created_at), source=record.source,
        tier=None if status is None else status.state.value, pinned=bool(status and status.is_pinned),
        merged=merged, mergeable=mergeable,
    )  # fmt: skip


async def _find(registry: AdapterRegistry, tenant: str, name: str) -> AdapterRecord:
    """The newest version, else 404; off the event loop (a shared store's lookup asks its database)."""
    try:
        return await run_in_threadpool(registry.resolve, tenant, name)
    except UnknownAdapterError:
        raise model_not_found(name) from None


async def _call(function, *args):
    """Run a registry write off the event loop; its refusals become 4xx errors."""
    try:
        return await run_in_threadpool(function, *args)
    except (UnknownAdapterError, KeyError) as exc:
        raise model_not_found(str(args[-1])) from exc
    except _ADAPTER_ERRORS as exc:
        raise from_adapter_error(exc) from exc


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(
    request: Request, principal: Caller, name: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File()], tenant: Annotated[str | None, Form()] = None,
) -> AdapterInfo:  # fmt: skip
    """Store ``adapter_config.json`` + ``adapter_model.safetensors`` as the next version of ``name``."""
    target = acting_tenant(principal, tenant)
    by_name = {upload.filename or "": upload.file for upload in files}
    if len(by_name) != len(files):
        raise ApiError(422, "the same file name was sent twice", param="files", code="invalid_adapter")
    record = await _call(_registry(request).upload, target, name, by_name)
    return _info(request, record, principal)


@router.post("/v1/adapters/compose", status_code=201)
async def compose_adapter(request: Request, principal: Caller, body: ComposeAdapterRequest) -> AdapterInfo:
    """Save the composition ``body`` describes (as a request's ``adapters`` would compose it) as the
    next version of ``body.name``: a plain peft adapter from then on, served and listed like uploads."""
    target = acting_tenant(principal, body.tenant)
    state = request.app.state.loraplex
    if body.adapters is None or state.compositions is None:
        raise ApiError(400, "adapters must name the adapters to compose", param="adapters")
    parts = compose.components(body, principal, target)
    record = await _call(_save_composition, state.compositions, _registry(request), target, body, parts)
    return _info(request, record, principal)


def _save_composition(compositions: Compositions, registry: AdapterRegistry, tenant: str,
                      body: ComposeAdapterRequest, parts: list) -> AdapterRecord:  # fmt: skip
    composed = compositions.resolve(tenant, parts, compose.recipe(body))
    with ExitStack() as files:
        streams = {f: files.enter_context(open(composed.path / f, "rb")) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        return registry.upload(tenant, body.name, streams)


@router.get("/v1/adapters")
async def list_adapters(request: Request, principal: Caller, tenant: str | None = None) -> AdapterList:
    """The caller's adapters (admins: every tenant's, unless ``?tenant=`` narrows it)."""
    registry = _registry(request)
    scope = acting_tenant(principal, tenant) if tenant or not principal.is_admin else None
    records = await run_in_threadpool(registry.list, scope)
    return AdapterList(data=[_info(request, r, principal) for r in records])


@router.get("/v1/adapters/{name}")
async def get_adapter(
    request: Request, principal: Caller, name: str, tenant: str | None = None
) -> AdapterInfo:
    return _info(request, await _find(_registry(request), acting_tenant(principal, tenant), name), principal)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(
    request: Request, principal: Caller, name: str, tenant: str | None = None
) -> AdapterDeleted:
    """Delete every version; requests already running finish on theirs."""
    target = acting_tenant(principal, tenant)
    removed = await _call(_registry(request).delete, target, name)
    return AdapterDeleted(id=name, versions=[r.version for r in removed])


@router.post("/v1/adapters/{name}/pin")
async def pin_adapter(
    request: Request, principal: Admin, name: str, tenant: str | None = None
) -> AdapterInfo:
    """Keep the adapter in a device slot and in host memory until unpinned."""
    return await _set_pin(request, principal, name, tenant, pinned=True)


@router.post("/v1/adapters/{name}/unpin")
async def unpin_adapter(
    request: Request, principal: Admin, name: str, tenant: str | None = None
) -> AdapterInfo:
    return await _set_pin(request, principal, name, tenant, pinned=False)


async def _set_pin(request: Request, principal: Principal, name: str, tenant: str | None, pinned: bool):
    registry = _registry(request)
    record = await _find(registry, acting_tenant(principal, tenant), name)
    cache = registry.cache
    await _call(cache.pin if pinned else cache.unpin, record.adapter_id)
    return _info(request, record, principal)


@router.post("/v1/adapters/{name}/merge")
async def merge_adapter(
    request: Request, principal: Admin, name: str, tenant: str | None = None
) -> AdapterInfo:
    """Serve the adapter from a merged copy until unmerged (the traffic policy will not drop it)."""
    registry = _registry(request)
    record = await _find(registry, acting_tenant(principal, tenant), name)
    await _in_host_memory(registry, record)
    try:
        state = await _engine(request).merge(record.adapter_id, timeout_s=_LOAD_TIMEOUT_S)
    except ValueError as exc:
        raise ApiError(409, str(exc), code="cannot_merge") from exc
    except TimeoutError as exc:
        message = "the merged copy is still being built; retry"
        raise ApiError(503, message, type="server_error", code="merge_in_progress") from exc
    if state is not CopyState.READY:
        raise ApiError(
            409, f"adapter {name!r} could not be merged (over the memory budget?)", code="cannot_merge"
        )
    return _info(request, record, principal)


@router.post("/v1/adapters/{name}/unmerge")
async def unmerge_adapter(
    request: Request, principal: Admin, name: str, tenant: str | None = None
) -> AdapterInfo:
    """Back to the side path for new requests; running ones finish on the copy, then it is freed."""
    record = await _find(_registry(request), acting_tenant(principal, tenant), name)
    try:
        await _engine(request).unmerge(record.adapter_id)
    except KeyError as exc:
        raise ApiError(409, f"adapter {name!r} is not merged", code="not_merged") from exc
    return _info(request, record, principal)


async def _in_host_memory(registry: AdapterRegistry, record: AdapterRecord) -> None:
    """Start the adapter's disk read if needed and wait until its weights are in host memory."""
    cache = registry.cache
    cache.prefetch(record.adapter_id)
    deadline = time.monotonic() + _LOAD_TIMEOUT_S
    while cache.host_weights(record.adapter_id) is None:
        status = cache.status(record.adapter_id)
        if status.error is not None:
            raise ApiError(422, f"adapter failed to load: {status.error}", code="invalid_adapter")
        if time.monotonic() > deadline:
            raise ApiError(
                503, "the adapter is still loading; retry", type="server_error", code="adapter_loading"
            )
        await asyncio.sleep(_MERGE_POLL_S)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(request: Request, principal: Admin, body: LoadLoRAAdapterRequest) -> str:
    """vLLM-compatible: serve a local peft directory (inside --adapter-roots) as ``lora_name``."""
    registry = _registry(request)
    try:
        await run_in_threadpool(registry.resolve, principal.tenant, body.lora_name)
        exists = True
    except UnknownAdapterError:
        exists = False
    if exists and not body.load_inplace:
        message = f"The lora adapter '{body.lora_name}' has already been loaded."
        raise ApiError(400, message, param="lora_name")
    await _call(registry.register_local, principal.tenant, body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(request: Request, principal: Admin, body: UnloadLoRAAdapterRequest) -> str:
    """vLLM-compatible: stop serving ``lora_name`` (a local directory's files are left alone)."""
    await _call(_registry(request).delete, principal.tenant, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
