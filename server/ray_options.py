"""``loraplex serve-ray``'s own settings, as plain data (importing this does not import Ray).

Every other setting is a ``loraplex serve`` setting, resolved once by the driver and handed to each
replica as explicit flags (``serve_argv``), so replicas never depend on the driver's environment
for them.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from server.settings import ADAPTER, SERVE_OPTIONS

# flag: (default, meaning); a default of None is computed as the meaning says
RAY_FLAGS: dict[str, tuple[object, str]] = {
    "num-replicas": (2, "engine replicas (each loads the base model and serves every adapter)"),
    "min-replicas": (None, "autoscaling: the fewest replicas (give with --max-replicas)"),
    "max-replicas": (None, "autoscaling: the most replicas; given, Ray Serve scales on ongoing requests"),
    "target-ongoing-requests": (
        None,
        "autoscaling: ongoing requests per replica to aim for; none: --max-num-seqs",
    ),
    "replica-cpus": (1.0, "CPUs Ray reserves for each engine replica (fractions allowed)"),
    "replica-gpus": (0.0, "GPUs Ray reserves for each engine replica"),
    "max-adapters-per-replica": (
        1024,
        "adapters Ray Serve remembers a replica holding when it routes by adapter (its LRU of "
        "multiplexed model ids): a new adapter goes to the replica remembered holding fewest, later "
        "ones follow it, so the catalogue is split between replicas and each replica's tiers hold its "
        "share; a small value (--max-loras) forgets placements and moves adapters between replicas",
    ),
    "ray-address": (None, "the Ray cluster to join (e.g. auto); none: start a local one"),
    "route-by-adapter": ("on", "on: a completion goes to a replica holding its adapter; off: by load alone"),
}


@dataclass(frozen=True)
class RayOptions:
    num_replicas: int = 2
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_adapters_per_replica: int = 1024
    ray_address: str | None = None
    route_by_adapter: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, options: Mapping[str, object]) -> RayOptions:
        """From parsed flags; ``options`` (the resolved serve settings) fill the computed defaults.
        ValueError naming the flag for a bad value."""
        raw = {flag: getattr(args, flag.replace("-", "_"), None) for flag in RAY_FLAGS}
        return cls.from_mapping(raw, options)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object], options: Mapping[str, object]) -> RayOptions:
        """From ``{flag: value or None}`` (flags or a RayService's ``args``)."""
        defaults = {"target-ongoing-requests": options.get("max_num_seqs") or 8}
        value = {flag: raw.get(flag) if raw.get(flag) is not None else defaults.get(flag, d)
                 for flag, (d, _) in RAY_FLAGS.items()}  # fmt: skip
        made = cls(
            num_replicas=_number(value, "num-replicas", int, 1),
            min_replicas=_number(value, "min-replicas", int, 0),
            max_replicas=_number(value, "max-replicas", int, 1),
            target_ongoing_requests=_number(value, "target-ongoing-requests", float, 0.1),
            replica_cpus=_number(value, "replica-cpus", float, 0.0),
            replica_gpus=_number(value, "replica-gpus", float, 0.0),
            max_adapters_per_replica=_number(value, "max-adapters-per-replica", int, 1),
            ray_address=None if value["ray-address"] in (None, "") else str(value["ray-address"]),
            route_by_adapter=_on_off(value["route-by-adapter"], "route-by-adapter"),
        )
        if (made.min_replicas is None) != (made.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together (autoscaling)")
        if made.max_replicas is not None and (made.min_replicas or 0) > made.max_replicas:
            raise ValueError("--min-replicas must be at most --max-replicas")
        return made

    def check_store(self, options: Mapping[str, object]) -> None:
        """ValueError unless every replica can see the same adapters: one replica, or a shared
        catalogue (several processes on one SQLite data dir would each keep their own index)."""
        if (self.num_replicas > 1 or self.max_replicas is not None) and not options.get("adapter_store"):
            raise ValueError(
                "serve-ray with several replicas needs a shared adapter catalogue: --adapter-store "
                "postgresql://... and --adapter-blobs s3://... (or --num-replicas 1)"
            )

    def autoscaling_config(self) -> dict[str, object] | None:
        if self.max_replicas is None:
            return None
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}  # fmt: skip


def _number(values: Mapping[str, object], flag: str, kind: type, minimum: float):
    raw = values[flag]
    if raw is None:
        return None
    try:
        number = kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag}: invalid {kind.__name__} value {raw!r}") from None
    if number < minimum:
        raise ValueError(f"--{flag} must be at least {minimum}, got {raw!r}")
    return number


def _on_off(raw: object, flag: str) -> bool:
    if str(raw).lower() not in ("on", "off"):
        raise ValueError(f"--{flag} must be on or off, got {raw!r}")
    return str(raw).lower() == "on"


def serve_argv(options: Mapping[str, object]) -> list[str]:
    """Resolved serve settings as explicit ``loraplex serve`` flags (defaults left out)."""
    argv: list[str] = []
    for option in SERVE_OPTIONS:
        value = options.get(option.dest, option.default)
        if value is not None and value != option.default:
            argv += [f"--{option.flag}", str(value)]
    for name, path in dict(options.get("adapters", {})).items():  # type: ignore[call-overload]
        argv += [f"--{ADAPTER.flag}", f"{name}={path}"]
    return argv
