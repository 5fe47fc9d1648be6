"""adapters/compose.py against the real peft ``add_weighted_adapter``: every method, adapters of
different ranks and targets, rsLoRA, and DARE's seeded masks, compared tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adapters.compose import METHODS, Recipe, compose
from adapters.errors import CompositionError
from adapters.format import PROJECTIONS, LoRAWeights, read_peft_dir
from tests.engine.tiny import write_tiny_llama

MAX_RANK = 64
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name → LoraConfig fields: two rank-4 adapters on different targets, a rank-8 rsLoRA one on all
ADAPTERS = {
    "a4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b4": dict(r=4, lora_alpha=16, target_modules=[*ATTENTION, "down_proj"]),
    "c8": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=list(PROJECTIONS)),
}
SEED = 1234


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("compose") / "base")


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-adapters")
    dirs = {}
    for seed, (name, fields) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(init_lora_weights=False, **fields))  # fmt: skip
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.2)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def peft_composition(base_dir: Path, adapter_dirs: dict[str, Path], names: list[str], weights: list[float],
                     seed: int = SEED, **kwargs) -> tuple[dict, float]:  # fmt: skip
    """peft's composed adapter: ({(layer, proj): (A, B)}, its scaling). torch's global RNG is
    seeded with ``seed`` just before the merging starts (after peft initialises the new adapter),
    the point loraplex's DARE seed stands for."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[names[0]],
                                      adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    tuner = model.base_model
    inject = tuner.inject_adapter

    def inject_then_seed(*args, **inject_kwargs):
        inject(*args, **inject_kwargs)
        torch.manual_seed(seed)

    tuner.inject_adapter = inject_then_seed
    model.add_weighted_adapter(names, weights, "mix", **kwargs)
    tensors, scaling = {}, None
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            layer, proj = int(module_name.split(".layers.")[1].split(".")[0]), module_name.rsplit(".", 1)[1]
            tensors[(layer, proj)] = (
                module.lora_A["mix"].weight.detach(),
                module.lora_B["mix"].weight.detach(),
            )
            scaling = module.scaling["mix"]
    return tensors, scaling


def ours(adapter_dirs: dict[str, Path], names: list[str], recipe: Recipe) -> LoRAWeights:
    return compose([read_peft_dir(adapter_dirs[n], MAX_RANK) for n in names], recipe)


def assert_same_adapter(got: LoRAWeights, expected: dict, expected_scaling: float) -> None:
    assert set(got.tensors) == set(expected)
    assert got.config.scale == pytest.approx(expected_scaling)
    for key, (a, b) in expected.items():
        torch.testing.assert_close(got.tensors[key][0], a, rtol=1e-5, atol=1e-6, msg=f"A of {key}")
        torch.testing.assert_close(got.tensors[key][1], b, rtol=1e-5, atol=1e-6, msg=f"B of {key}")
        assert got.tensors[key][0].shape == (got.config.rank, a.shape[1])


def assert_same_svd_adapter(got: LoRAWeights, expected: dict, expected_scaling: float) -> None:
    """An *svd composition without svd_clamp (adapters/svd.py's fast paths): peft's ΔW at its rank,
    and its factors up to the sign of each singular pair; a pair whose σ is ~0 (past ΔW's rank) has
    a zero column in B in both and a zero row in A in ours (an arbitrary unit row in peft's).

    The tolerances are peft's: its float32 SVD is up to ~3e-6 off the exact rank-r cut of these ΔW
    (ours ~3e-8: float64 work), and its singular vectors up to ~eps·σ₁/gap (≲ 5e-5 here)."""
    assert set(got.tensors) == set(expected)
    assert got.config.scale == pytest.approx(expected_scaling)
    for key, (a_peft, b_peft) in expected.items():
        a, b = got.tensors[key]
        assert a.shape == a_peft.shape and b.shape == b_peft.shape, key
        torch.testing.assert_close(b @ a, b_peft @ a_peft, rtol=1e-5, atol=1e-5, msg=f"ΔW of {key}")
        sigma = b_peft.norm(dim=0)  # [rank]: peft's S
        real = sigma > 1e-4 * sigma.max()
        sign = torch.where((a * a_peft).sum(dim=1) >= 0, 1.0, -1.0)  # [rank]
        torch.testing.assert_close(b * sign, b_peft, rtol=1e-4, atol=1e-4, msg=f"B of {key}")
        torch.testing.assert_close((a * sign[:, None])[real], a_peft[real], rtol=1e-4, atol=1e-4,
                                   msg=f"A of {key}")  # fmt: skip
        assert torch.equal(a[~real], torch.zeros_like(a[~real])), key


def assert_equal_to_peft(method: str, got: LoRAWeights, expected: dict, scaling: float, **kwargs) -> None:
    """peft's factors exactly, but those of the *svd methods without svd_clamp only up to sign."""
    if method.endswith("svd") and kwargs.get("svd_clamp") is None:
        assert_same_svd_adapter(got, expected, scaling)
    else:
        assert_same_adapter(got, expected, scaling)


def method_kwargs(method: str) -> dict:
    kwargs: dict = {"combination_type": method}
    if method not in ("cat", "linear", "svd"):
        kwargs["density"] = 0.5
    if "ties" in method:
        kwargs["majority_sign_method"] = "frequency" if "dare" in method else "total"
    return kwargs


def recipe_of(weights: list[float], kwargs: dict) -> Recipe:
    fields = {k: v for k, v in kwargs.items() if k != "combination_type"}
    seed = SEED if kwargs["combination_type"].startswith("dare") else None
    return Recipe(kwargs["combination_type"], tuple(weights), seed=seed, **fields)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_peft_over_same_rank_adapters_with_different_targets(
    method, base_dir, adapter_dirs
):
    names, weights = ["a4", "b4"], [0.7, -0.4]
    kwargs = method_kwargs(method)
    expected, scaling = peft_composition(base_dir, adapter_dirs, names, weights, **kwargs)
    got = ours(adapter_dirs, names, recipe_of(weights, kwargs))
    assert_equal_to_peft(method, got, expected, scaling)
    assert set(got.config.target_modules) == set(
        ADAPTERS["a4"]["target_modules"] + ADAPTERS["b4"]["target_modules"]
    )


@pytest.mark.parametrize("method", [m for m in METHODS if m == "cat" or m.endswith("svd")])
def test_methods_that_allow_different_ranks_equal_peft_with_rslora_first(method, base_dir, adapter_dirs):
    """c8 (rank 8, rsLoRA) first: the result is an rsLoRA adapter, as peft makes it."""
    names, weights = ["c8", "a4", "b4"], [0.5, 1.0, 0.3]
    kwargs = method_kwargs(method)
    expected, scaling = peft_composition(base_dir, adapter_dirs, names, weights, **kwargs)
    got = ours(adapter_dirs, names, recipe_of(weights, kwargs))
    assert_equal_to_peft(method, got, expected, scaling)
    assert got.config.use_rslora and got.config.rank == (16 if method == "cat" else 8)


@pytest.mark.parametrize("method", ["svd", "ties_svd", "dare_linear_svd"])
def test_svd_rank_and_clamp_equal_peft_factor_for_factor(method, base_dir, adapter_dirs):
    """svd_clamp's quantile depends on the factors' signs: these are peft's, bitwise or to rounding."""
    names, weights = ["c8", "b4"], [1.0, 1.0]
    kwargs = {**method_kwargs(method), "svd_rank": 3, "svd_clamp": 0.9}
    if method != "svd":
        kwargs["density"] = 0.7
    expected, scaling = peft_composition(base_dir, adapter_dirs, names, weights, **kwargs)
    got = ours(adapter_dirs, names, recipe_of(weights, kwargs))
    assert_same_adapter(got, expected, scaling)
    assert got.config.rank == 3
    unclamped = ours(adapter_dirs, names, recipe_of(weights, {**kwargs, "svd_clamp": None}))
    key = (0, "q_proj")
    assert not torch.allclose(unclamped.tensors[key][1], got.tensors[key][1], atol=1e-3), "a clamp that bites"


@pytest.mark.parametrize("method", ["svd", "magnitude_prune_svd"])
def test_svd_rank_past_the_rank_of_delta_equals_peft(method, base_dir, adapter_dirs):
    """Rank 12 from two rank-4 adapters: plain svd's ΔW has rank 8 (4 where one adapter targets the
    module), so peft's last pairs have σ ≈ 0; ours are zero."""
    names, weights = ["a4", "b4"], [0.9, -0.6]
    kwargs = {**method_kwargs(method), "svd_rank": 12}
    expected, scaling = peft_composition(base_dir, adapter_dirs, names, weights, **kwargs)
    got = ours(adapter_dirs, names, recipe_of(weights, kwargs))
    assert_same_svd_adapter(got, expected, scaling)
    assert got.config.rank == 12


def test_svd_never_decomposes_a_full_delta_without_clamp(adapter_dirs, monkeypatch):
    """The cost contract of adapters/svd.py: plain svd decomposes [Σr, Σr] matrices, the pruned
    *_svd methods the [m, m] Gram matrix of the smaller side (m = min(out, in)), never [out, in]."""
    decomposed: list[tuple[str, torch.Size]] = []

    def recording(name: str):
        original = getattr(torch.linalg, name)

        def decompose(matrix, *args, **kwargs):
            decomposed.append((name, matrix.shape))
            return original(matrix, *args, **kwargs)

        return decompose

    for name in ("svd", "eigh"):
        monkeypatch.setattr(torch.linalg, name, recording(name))
    components = [read_peft_dir(adapter_dirs[n], MAX_RANK) for n in ("c8", "b4")]
    compose(components, Recipe("svd", (1.0, 0.5)))
    assert decomposed and all(n == "svd" and max(shape) <= 8 + 4 for n, shape in decomposed), decomposed
    decomposed.clear()
    compose(components, Recipe("ties_svd", (1.0, 0.5), density=0.5))
    smallest_side = 32  # the tiny Llama's k/v out; hidden 64, intermediate 128
    assert decomposed and all(n == "eigh" and shape[0] <= 64 for n, shape in decomposed), decomposed
    assert any(shape[0] == smallest_side for _, shape in decomposed)


def test_dare_masks_follow_the_seed(adapter_dirs):
    names = ["a4", "b4"]
    first, again, other = (ours(adapter_dirs, names, Recipe("dare_linear", (1.0, 1.0), density=0.5, seed=s))
                           for s in (7, 7, 8))  # fmt: skip
    key = (0, "q_proj")
    assert torch.equal(first.tensors[key][0], again.tensors[key][0])
    assert not torch.equal(first.tensors[key][0], other.tensors[key][0])


def test_one_adapter_is_linear_whatever_the_method_as_in_peft(base_dir, adapter_dirs):
    expected, scaling = peft_composition(
        base_dir, adapter_dirs, ["b4"], [0.6], combination_type="ties", density=0.2
    )
    assert_same_adapter(ours(adapter_dirs, ["b4"], Recipe("ties", (0.6,), density=0.2)), expected, scaling)


def test_peft_refuses_linear_over_different_ranks_and_so_do_we(base_dir, adapter_dirs):
    with pytest.raises(ValueError, match="same r value"):
        peft_composition(base_dir, adapter_dirs, ["a4", "c8"], [1.0, 1.0], combination_type="linear")
    with pytest.raises(CompositionError, match="one rank") as refused:
        ours(adapter_dirs, ["a4", "c8"], Recipe("linear", (1.0, 1.0)))
    assert refused.value.param == "combination"


@pytest.mark.parametrize(
    ("recipe", "num", "param"),
    [
        (Recipe("linear", ()), 0, "adapters"),
        (Recipe("mean", (1.0, 1.0)), 2, "combination"),
        (Recipe("linear", (1.0, float("nan"))), 2, "adapters"),
        (Recipe("linear", (1.0, float("inf"))), 2, "adapters"),
        (Recipe("linear", (1.0,)), 2, "adapters"),
        (Recipe("ties", (1.0, 1.0)), 2, "density"),
        (Recipe("dare_linear", (1.0, 1.0), density=1.5), 2, "density"),
        (Recipe("ties", (1.0, 1.0), density=0.5, majority_sign_method="median"), 2, "majority_sign_method"),
        (Recipe("svd", (1.0, 1.0), svd_rank=0), 2, "svd_rank"),
        (Recipe("svd", (1.0, 1.0), svd_clamp=2.0), 2, "svd_clamp"),
        (Recipe("linear", (1.0, 1.0), density=0.5), 2, "density"),
        (
            Recipe("dare_linear", (1.0, 1.0), density=0.5, majority_sign_method="total"),
            2,
            "majority_sign_method",
        ),
        (Recipe("cat", (1.0, 1.0), svd_rank=4), 2, "svd_rank"),
        (Recipe("ties", (1.0, 1.0), density=0.5, seed=3), 2, "composition_seed"),
    ],
)
def test_bad_recipes_name_the_parameter(recipe, num, param):
    with pytest.raises(CompositionError) as refused:
        recipe.check(num)
    assert refused.value.param == param and str(refused.value)
