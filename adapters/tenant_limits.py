"""Per-tenant limits and scheduling weight, as the keys file stores them (adapters/tenants.py).

In the keys file, beside ``keys``, an optional ``tenants`` object maps a tenant to its limits::

    {"keys": [...], "tenants": {"acme": {"max_concurrent": 4, "rpm": 60, "tpm": 20000, "weight": 2}}}

Every field is optional: a limit not given does not apply, a weight not given is 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

LIMIT_FIELDS = ("max_concurrent", "rpm", "tpm")
MAX_LIMIT = 10**12
MAX_WEIGHT = 1e6


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may use; construction validates (ValueError naming the field)."""

    max_concurrent: int | None = None  # generation requests (each choice counts) in flight at once
    rpm: int | None = None  # generation requests per minute
    tpm: int | None = None  # tokens per minute: prompt + max_tokens at admission, actual afterwards
    weight: float = 1.0  # its share of the engine under fair scheduling

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
            if not ok or (value is not None and not 1 <= value <= MAX_LIMIT):
                raise ValueError(f"{name} must be an integer in [1, {MAX_LIMIT}] or unset, got {value!r}")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be a number in (0, {MAX_WEIGHT:g}], got {weight!r}")
        if math.isnan(weight):
            raise ValueError("weight must be a number, got NaN")

    @property
    def is_default(self) -> bool:
        return self == TenantLimits()

    def changed(self, changes: Mapping[str, object]) -> TenantLimits:
        """These limits with ``changes`` applied (a field changed to None goes back to its default: a
        limit is removed, the weight is 1); ValueError for an unknown field or a bad value."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown tenant limits {unknown}")
        default = TenantLimits()
        values = {name: getattr(default, name) if value is None else value for name, value in changes.items()}
        return replace(self, **values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        """The keys file's object: only what differs from the default."""
        default = asdict(TenantLimits())
        return {name: value for name, value in asdict(self).items() if value != default[name]}


def parse_limits(raw: object) -> TenantLimits:
    """One tenant's limits object from the keys file (ValueError naming what is wrong)."""
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object")
    return TenantLimits().changed(raw)


def describe(limits: TenantLimits) -> str:
    """``max_concurrent=4,rpm=60,weight=2`` (what is set), or ``-``: for ``keys list``."""
    shown = [
        f"{name}={value:g}" if name == "weight" else f"{name}={value}"
        for name, value in limits.to_json().items()
    ]
    return ",".join(shown) or "-"
