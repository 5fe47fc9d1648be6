"""A request's composition fields → the components and recipe ``adapters.compositions`` builds from.

Used by the completion endpoints (``adapters`` beside ``model`` = the base model) and by
``POST /v1/adapters/compose``. Refusals are ``CompositionError`` (400 ``invalid_composition``,
naming the parameter) or ``ApiError``.
"""

from __future__ import annotations

from adapters.compose import Recipe
from adapters.compositions import Component
from adapters.errors import CompositionError, UnknownAdapterError
from adapters.tenants import Principal, parse_model_name
from server.api.errors import ApiError
from server.api.schemas import CompositionFields

DEFAULT_COMBINATION = "svd"  # peft's add_weighted_adapter default
RECIPE_FIELDS = (
    "combination",
    "density",
    "majority_sign_method",
    "svd_rank",
    "svd_clamp",
    "composition_seed",
)


def requested(body: CompositionFields, served_model_name: str) -> bool:
    """Whether ``body`` asks for a composition; 400 for composition fields without ``adapters``, or
    ``adapters`` beside a ``model`` that is not the base model."""
    if body.adapters is None:
        for field in RECIPE_FIELDS:
            if getattr(body, field) is not None:
                raise ApiError(400, f"{field} applies only with adapters (a composition)", param=field)
        return False
    model = getattr(body, "model", served_model_name)
    if model != served_model_name:
        raise CompositionError(
            f"with adapters, model must name the base model {served_model_name!r} (got {model!r}): "
            "the composition is applied to it", "model",
        )  # fmt: skip
    return True


def components(body: CompositionFields, principal: Principal, tenant: str | None = None) -> list[Component]:
    """The parts as (tenant, name, weight); a bare name is in ``tenant`` (default: the caller's).
    A name the caller may not see reads as unknown."""
    assert body.adapters is not None
    found = []
    for i, part in enumerate(body.adapters):
        name = part.name if "/" in part.name or tenant is None else f"{tenant}/{part.name}"
        try:
            owner, adapter = parse_model_name(principal, name)
        except UnknownAdapterError:
            raise CompositionError(
                f"adapters[{i}]: the adapter {part.name!r} does not exist", "adapters"
            ) from None
        found.append(Component(owner, adapter, part.weight))
    return found


def recipe(body: CompositionFields) -> Recipe:
    assert body.adapters is not None
    return Recipe(
        method=body.combination or DEFAULT_COMBINATION,
        weights=tuple(part.weight for part in body.adapters),
        density=body.density,
        majority_sign_method=body.majority_sign_method,
        svd_rank=body.svd_rank,
        svd_clamp=body.svd_clamp,
        seed=body.composition_seed,
    )
