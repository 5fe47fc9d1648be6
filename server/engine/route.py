"""The route a sequence's tokens take through the model this step: one typed value, decided once.

    BASE    the bare base model (the request names no adapter)
    SIDE    the base weights plus the LoRA side path of the adapter in device slot ``slot``
    MERGED  merged copy ``copy`` of the adapter's weights (W + s·B·A), no side path

The scheduler decides each sequence's route when it schedules it; the runner groups the step
by ``forward_copy`` (one forward for BASE and SIDE tokens, one per merged copy) and hands the
model the per-token ``token_slot``; the merge policy and the metrics count tokens by ``kind``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.ops.lora_torch import NO_SLOT


class RouteKind(enum.Enum):
    BASE = "base"
    SIDE = "side"
    MERGED = "merged"


# which of (slot, copy) each kind carries: checked once per Route, so once per scheduled sequence
_HAS_SLOT_AND_COPY = {
    RouteKind.BASE: (False, False),
    RouteKind.SIDE: (True, False),
    RouteKind.MERGED: (False, True),
}


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    slot: int | None = None  # the device slot of a SIDE route, else None
    copy: int | None = None  # the merged copy (MergedCopy.index) of a MERGED route, else None

    def __post_init__(self) -> None:
        if (self.slot is not None, self.copy is not None) != _HAS_SLOT_AND_COPY[self.kind]:
            raise ValueError(f"a {self.kind.value} route cannot have slot={self.slot}, copy={self.copy}")

    @classmethod
    def base(cls) -> Route:
        return BASE_ROUTE

    @classmethod
    def side(cls, slot: int) -> Route:
        return cls(RouteKind.SIDE, slot=slot)

    @classmethod
    def merged(cls, copy: int) -> Route:
        return cls(RouteKind.MERGED, copy=copy)

    @property
    def forward_copy(self) -> int | None:
        """The merged copy whose weights this token's forward runs with; None: the base weights."""
        return self.copy

    @property
    def token_slot(self) -> int:
        """The slot index the LoRA kernels see for this token (``NO_SLOT``: no side path)."""
        return NO_SLOT if self.slot is None else self.slot

    @property
    def batch_order(self) -> tuple[int, int]:
        """Sort key of a step: the base forward first, then each merged copy; within the base
        forward, base-only tokens first, then slot by slot (each slot's tokens contiguous)."""
        return (-1 if self.copy is None else self.copy, self.token_slot)


BASE_ROUTE = Route(RouteKind.BASE)
