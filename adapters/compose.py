"""Several adapters → one, with exactly the meaning of peft's ``add_weighted_adapter`` (issue 18).

    cat                      A = [w₁s₁A₁; w₂s₂A₂; …]   B = [B₁ B₂ …]              rank Σ rᵢ
    linear, ties, dare_*,    A = merge(±√|wᵢsᵢ|·Aᵢ)     B = merge(√|wᵢsᵢ|·Bᵢ)      rank r (all equal)
      magnitude_prune        (merge: task arithmetic, TIES, DARE or magnitude pruning, tensor by tensor)
    *svd                     ΔW = merge(wᵢ·sᵢBᵢAᵢ), then B = U·S, A = Vh at rank ``svd_rank`` (default max rᵢ)

How ``*svd`` cuts ΔW (adapters/svd.py): plain ``svd`` never forms it (ΔW = B_cat·A_cat with
B_cat = [w₁s₁B₁ …]: QR of both factors, SVD of a [Σrᵢ, Σrᵢ] matrix); the pruned ones form and
prune it, then take its top singular vectors from the float64 Gram matrix of its smaller side;
with ``svd_clamp`` (its quantile depends on the factors' signs) either runs peft's LAPACK SVD of
the dense ΔW. Without the clamp B·A is peft's to float rounding and the factors are peft's up to
the sign of each pair. (peft's full SVDs took 25.7 s for the default ``svd`` of two SmolLM2-135M
adapters, 210 modules; this takes 0.2 s.)

sᵢ is adapter i's scaling (α/r, or α/√r with rsLoRA). Like peft, the result has ``lora_alpha = r``
and the first adapter's ``use_rslora``, so its scaling is 1 (rsLoRA: √r), and its targets are the
union of the components'; a module only some components target merges those. One component is
``linear`` whatever the method says (peft does the same).

DARE prunes at random: the masks come from a ``torch.Generator`` seeded with ``Recipe.seed`` (the
request's ``composition_seed``, default 0), drawn
module by module in the model's order (layer by layer; q, k, v, o, gate, up, down), A before B,
component by component, exactly the draws peft makes after ``torch.manual_seed(seed)`` is called
as its merging starts (after it initialises the new adapter). So one recipe always makes the same
adapter, and the same one as peft. A parameter the method does not read is refused, not ignored.

Everything here runs on the CPU (the SVD work in float64); the float32 result is a ``LoRAWeights``
the cache serves like any other adapter. Refusals (peft's and ours) are ``CompositionError``
naming the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adapters import svd
from adapters.errors import CompositionError
from adapters.format import PROJECTIONS, LoRAConfig, LoRAWeights

METHODS = (
    "cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
)  # fmt: skip
SAME_RANK_METHODS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
DENSITY_METHODS = tuple(m for m in METHODS if m.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties",
                                                                          "magnitude_prune"))  # fmt: skip
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Recipe:
    """How to combine: ``weights`` one per component, in order; the rest as peft names them."""

    method: str
    weights: tuple[float, ...]
    density: float | None = None  # the fraction kept by the pruning methods, in [0, 1]
    majority_sign_method: str | None = None  # TIES' sign election; None: "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None  # a quantile in [0, 1] the SVD factors are clamped to
    seed: int | None = None  # DARE's masks; None: 0

    def check(self, num_components: int) -> None:
        """CompositionError naming the parameter for a recipe no adapter could be made from."""
        if num_components == 0:
            raise CompositionError("adapters must name at least one adapter", "adapters")
        if self.method not in METHODS:
            raise CompositionError(f"combination must be one of {', '.join(METHODS)}; got {self.method!r}",
                                   "combination")  # fmt: skip
        if len(self.weights) != num_components or not all(math.isfinite(w) for w in self.weights):
            raise CompositionError("every adapter needs a finite weight", "adapters")
        self._check_applies()
        needs_density = self.effective_method(num_components) in DENSITY_METHODS
        if needs_density and (self.density is None or not 0.0 <= self.density <= 1.0):
            raise CompositionError(f"{self.method} needs a density in [0, 1]", "density")
        if self.majority_sign_method not in (None, *SIGN_METHODS):
            raise CompositionError("majority_sign_method must be total or frequency", "majority_sign_method")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise CompositionError("svd_rank must be at least 1", "svd_rank")
        if self.svd_clamp is not None and not 0.0 <= self.svd_clamp <= 1.0:
            raise CompositionError("svd_clamp must be a quantile in [0, 1]", "svd_clamp")

    def _check_applies(self) -> None:
        """A parameter the method does not read is refused (it would be silently ignored)."""
        applies = {
            "density": self.method in DENSITY_METHODS,
            "majority_sign_method": "ties" in self.method,
            "svd_rank": self.method.endswith("svd"),
            "svd_clamp": self.method.endswith("svd"),
            "composition_seed": self.method.startswith("dare"),
        }
        given = {
            "density": self.density, "majority_sign_method": self.majority_sign_method,
            "svd_rank": self.svd_rank, "svd_clamp": self.svd_clamp, "composition_seed": self.seed,
        }  # fmt: skip
        for param, value in given.items():
            if value is not None and not applies[param]:
                raise CompositionError(f"{param} does not apply to the {self.method} combination", param)

    @property
    def key(self) -> dict[str, object]:
        """What makes the adapter, beside its components: the parts of a content key."""
        return {"method": self.method, "weights": list(self.weights), "density": self.density,
                "majority_sign_method": self.majority_sign_method, "svd_rank": self.svd_rank,
                "svd_clamp": self.svd_clamp, "seed": self.seed}  # fmt: skip

    def effective_method(self, num_components: int) -> str:
        return "linear" if num_components == 1 else self.method


def compose(components: Sequence[LoRAWeights], recipe: Recipe, max_rank: int | None = None) -> LoRAWeights:
    """One adapter equal to peft's ``add_weighted_adapter(components, weights, method, ...)``;
    CompositionError (before any work) when its rank would be over ``max_rank``."""
    recipe.check(len(components))
    method = recipe.effective_method(len(components))
    rank = _new_rank(components, method, recipe.svd_rank)
    if max_rank is not None and rank > max_rank:
        raise CompositionError(
            f"the composed adapter would have rank {rank}, over this server's --max-lora-rank {max_rank}: "
            f"use an *_svd combination with svd_rank at most {max_rank}", "combination",
        )  # fmt: skip
    first = components[0].config
    targets = tuple(sorted({t for c in components for t in c.config.target_modules}))
    config = LoRAConfig(rank, float(rank), first.use_rslora, targets, first.base_model_name_or_path)
    generator = torch.Generator().manual_seed(recipe.seed or 0)
    tensors = {}
    for key in sorted({k for c in components for k in c.tensors}, key=_model_order):
        present = [(w, c) for w, c in zip(recipe.weights, components, strict=True) if key in c.tensors]
        tensors[key] = _compose_module(key, present, method, rank, recipe, generator)
    return LoRAWeights(config, tensors)


def _new_rank(components: Sequence[LoRAWeights], method: str, svd_rank: int | None) -> int:
    ranks = [c.config.rank for c in components]
    if method in SAME_RANK_METHODS:
        if len(set(ranks)) != 1:
            raise CompositionError(
                f"{method} needs adapters of one rank (peft refuses it); these have ranks {ranks}: "
                "use cat or an *_svd method", "combination",
            )  # fmt: skip
        return ranks[0]
    if method == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _model_order(key: tuple[int, str]) -> tuple[int, int]:
    """(layer, projection) in the order a Llama's ``named_modules`` visits them."""
    return key[0], PROJECTIONS.index(key[1])


Present = list[tuple[float, LoRAWeights]]


def _compose_module(key: tuple[int, str], present: Present, method: str, rank: int, recipe: Recipe,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A [rank, in], B [out, rank]) of one module."""
    if method == "cat":
        return _cat(key, present, rank)
    if method.endswith("svd"):
        return _svd(key, present, method.removesuffix("_svd"), rank, recipe, generator)
    return _factorwise(key, present, method, recipe, generator)


def _raw(key: tuple[int, str], adapter: LoRAWeights) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = adapter.tensors[key]
    return a.float(), b.float()


def _cat(key: tuple[int, str], present: Present, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft fills the first rows of a zero [rank, in] A (columns of B) with the present adapters."""
    a_parts = [_raw(key, c)[0] * w * c.config.scale for w, c in present]
    b_parts = [_raw(key, c)[1] for _, c in present]
    a = torch.zeros(rank, a_parts[0].shape[1])
    b = torch.zeros(b_parts[0].shape[0], rank)
    a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
    a[: a_cat.shape[0]], b[:, : b_cat.shape[1]] = a_cat, b_cat
    return a, b


def _factorwise(key: tuple[int, str], present: Present, method: str, recipe: Recipe,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """linear, ties, dare_*, magnitude_prune: A and B merged separately, each with √|w·s| (the
    sign on A only, so a negative weight flips ΔW once)."""
    scaled = [w * c.config.scale for w, c in present]
    weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    merge = _MERGES[method]
    a = merge([_raw(key, c)[0] for _, c in present], weights_a, recipe, generator)
    b = merge([_raw(key, c)[1] for _, c in present], weights_b, recipe, generator)
    return a, b


def _svd(key: tuple[int, str], present: Present, base_method: str, rank: int, recipe: Recipe,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ΔW merged, then cut to ``rank`` (adapters/svd.py): B = U·S [out, rank], A = Vh [rank, in]."""
    if base_method == "svd" and recipe.svd_clamp is None:  # ΔW = B_cat·A_cat, never formed
        b_cat = torch.cat([_raw(key, c)[1] * (w * c.config.scale) for w, c in present], dim=1)  # [out, Σr]
        a_cat = torch.cat([_raw(key, c)[0] for _, c in present], dim=0)  # [Σr, in]
        b, a = svd.factored(b_cat, a_cat, rank)
        return a, b
    deltas = [(_raw(key, c)[1] @ _raw(key, c)[0]) * c.config.scale for _, c in present]  # [out, in] each
    weights = torch.tensor([w for w, _ in present])
    delta = _MERGES["linear" if base_method == "svd" else base_method](deltas, weights, recipe, generator)
    if recipe.svd_clamp is None:
        b, a = svd.top_of_dense(delta, rank)
    else:  # the clamp's quantile depends on the factors' signs: peft's own
        b, a = svd.peft_factors(delta, rank, recipe.svd_clamp)
    return a, b


# ---- the merges of tensors (peft.utils.merge_utils' meanings), stacked on a new dim 0 ----
Merge = Callable[[list[torch.Tensor], torch.Tensor, Recipe, torch.Generator], torch.Tensor]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest |values| (ties broken as torch.topk breaks them)."""
    if density >= 1:
        return tensor
    mask = _top_mask(tensor.abs().reshape(-1), int(density * tensor.numel()))
    return tensor * mask.reshape(tensor.shape)


def _top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """[n]: 1 at the ``k`` largest of ``magnitude`` [n] (the ones torch.topk picks), 0 elsewhere.
    A threshold at the k-th largest (kthvalue: a quarter of topk's work at k ~ n/2) picks the same
    ones unless values tie at it (or are NaN): then topk itself."""
    if k > 0:
        above = magnitude >= torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
        if int(torch.count_nonzero(above)) == k:
            return above.to(magnitude.dtype)
    mask = torch.zeros_like(magnitude)
    mask[torch.topk(magnitude, k=k, largest=True)[1]] = 1
    return mask


def _randomly_pruned(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each value with probability ``density``, rescaled by 1/density."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _linear(
    tensors: list[torch.Tensor], weights: torch.Tensor, recipe: Recipe, _: torch.Generator
) -> torch.Tensor:
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def _pruned(
    tensors: list[torch.Tensor], recipe: Recipe, generator: torch.Generator, random: bool
) -> torch.Tensor:
    density = float(recipe.density)  # type: ignore[arg-type]  # Recipe.check: set for these methods
    if random:
        return torch.stack([_randomly_pruned(t, density, generator) for t in tensors])
    return torch.stack([_magnitude_pruned(t, density) for t in tensors])


def _elected(stacked: torch.Tensor, weights: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """TIES: the sign elected over the pruned tensors, then the mean of the weighted ones that agree."""
    mask = _majority_sign_mask(stacked, recipe.majority_sign_method or "total")
    return _disjoint_mean(_weighted(stacked, weights), mask)


_MERGES: dict[str, Merge] = {
    "linear": _linear,
    "magnitude_prune": lambda t, w, r, g: _weighted(_pruned(t, r, g, random=False), w).sum(dim=0),
    "dare_linear": lambda t, w, r, g: _weighted(_pruned(t, r, g, random=True), w).sum(dim=0),
    "ties": lambda t, w, r, g: _elected(_pruned(t, r, g, random=False), w, r),
    "dare_ties": lambda t, w, r, g: _elected(_pruned(t, r, g, random=True), w, r),
}
