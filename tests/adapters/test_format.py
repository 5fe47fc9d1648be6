"""adapters/format.py against real peft output and the hostile catalogue in tests/adapters/hostile.py."""

from __future__ import annotations

import gc
import json
import pickle
import re
import tracemalloc
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import adapters.safetensors_check
from adapters.errors import AdapterFormatError
from adapters.format import FormatLimits, LoRAWeights, parse_config, read_peft_dir, validate_name
from tests.adapters.hostile import CASES, MAX_LORA_RANK, WEIGHTS, HostileCase, clean_adapter, tiny_base_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_LAYERS = 2


def adapter_dir(tmp_path: Path, **lora_kwargs) -> Path:
    return clean_adapter(tmp_path / "adapter", **lora_kwargs)


def assert_matches_file(weights: LoRAWeights, directory: Path) -> None:
    """Every tensor we return is the one peft saved under the matching key, and nothing else is."""
    saved = load_file(directory / WEIGHTS)
    assert len(saved) == 2 * len(weights.tensors)
    for (layer, proj), (lora_a, lora_b) in weights.tensors.items():
        block = "self_attn" if proj in ALL_PROJECTIONS[:4] else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
        assert torch.equal(lora_a, saved[f"{prefix}.lora_A.weight"])
        assert torch.equal(lora_b, saved[f"{prefix}.lora_B.weight"])


def test_catalogue_is_large_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 24


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_hostile_adapter_is_refused_with_a_clear_message(tmp_path: Path, case: HostileCase):
    directory = tmp_path / "adapter"
    directory.mkdir()
    case.build(directory)
    with pytest.raises(AdapterFormatError) as error:
        read_peft_dir(directory, MAX_LORA_RANK)
    assert case.reason in str(error.value)


def test_clean_peft_adapter_reads_with_its_scale(tmp_path: Path):
    directory = adapter_dir(tmp_path)
    weights = read_peft_dir(directory, MAX_LORA_RANK)  # the positional form existing callers use
    config = weights.config
    assert (config.rank, config.alpha, config.use_rslora) == (4, 8.0, False)
    assert config.scale == 2.0
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.base_model_name_or_path == str(tiny_base_model())
    assert set(weights.tensors) == {(layer, p) for layer in range(NUM_LAYERS) for p in ("q_proj", "v_proj")}
    assert weights.tensors[(0, "v_proj")][1].shape == (32, 4)  # GQA: 2 kv heads × 16
    assert_matches_file(weights, directory)
    assert weights.num_bytes == sum(t.nbytes for t in load_file(directory / WEIGHTS).values())


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path: Path):
    weights = read_peft_dir(adapter_dir(tmp_path, r=16, lora_alpha=8, use_rslora=True), MAX_LORA_RANK)
    assert weights.config.use_rslora
    assert weights.config.scale == pytest.approx(8 / 4)
    assert weights.tensors[(1, "q_proj")][0].shape == (16, 64)


def test_all_seven_projections(tmp_path: Path):
    directory = adapter_dir(tmp_path, r=8, lora_alpha=32, target_modules=ALL_PROJECTIONS)
    weights = read_peft_dir(directory, MAX_LORA_RANK)
    assert weights.config.scale == 4.0
    assert set(weights.tensors) == {(layer, p) for layer in range(NUM_LAYERS) for p in ALL_PROJECTIONS}
    assert weights.tensors[(0, "down_proj")][0].shape == (8, 128)
    assert weights.tensors[(0, "gate_proj")][1].shape == (128, 8)
    assert_matches_file(weights, directory)


def test_peft_all_linear_is_saved_as_full_module_paths_and_read(tmp_path: Path):
    weights = read_peft_dir(adapter_dir(tmp_path, target_modules="all-linear"), MAX_LORA_RANK)
    assert "model.layers.1.mlp.down_proj" in weights.config.target_modules  # peft expanded the shorthand
    assert len(weights.config.target_modules) == NUM_LAYERS * len(ALL_PROJECTIONS)
    assert set(weights.tensors) == {(layer, p) for layer in range(NUM_LAYERS) for p in ALL_PROJECTIONS}


def set_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_all_linear_shorthand_in_config_matches_any_projection(tmp_path: Path):
    directory = adapter_dir(tmp_path)
    set_config(directory, target_modules="all-linear")
    weights = read_peft_dir(directory, MAX_LORA_RANK)
    assert weights.config.target_modules == ("all-linear",)
    assert len(weights.tensors) == 4


def test_full_module_paths_as_targets_must_match_exactly(tmp_path: Path):
    directory = adapter_dir(tmp_path)
    paths = [
        f"model.layers.{layer}.self_attn.{p}" for layer in range(NUM_LAYERS) for p in ("q_proj", "v_proj")
    ]
    set_config(directory, target_modules=paths)
    assert len(read_peft_dir(directory, MAX_LORA_RANK).tensors) == 4
    set_config(directory, target_modules=paths[1:])  # layer 0 q_proj has tensors but is no longer targeted
    with pytest.raises(AdapterFormatError, match=r"model\.layers\.0\.self_attn\.q_proj has LoRA tensors"):
        read_peft_dir(directory, MAX_LORA_RANK)
    set_config(directory, target_modules=[*paths, "model.layers.7.self_attn.q_proj"])
    with pytest.raises(
        AdapterFormatError, match=re.escape("'model.layers.7.self_attn.q_proj' matches no tensor")
    ):
        read_peft_dir(directory, MAX_LORA_RANK)


def test_peft_regex_target_modules_are_refused(tmp_path: Path):
    """Documented choice: peft keeps a regex string as is; we refuse it rather than run the pattern."""
    directory = adapter_dir(tmp_path, target_modules=r".*\.layers\.1\.self_attn\.(q_proj|v_proj)")
    with pytest.raises(AdapterFormatError, match="target_modules as a regex string"):
        read_peft_dir(directory, MAX_LORA_RANK)


def test_peft_exclude_modules_list_is_honoured(tmp_path: Path):
    directory = adapter_dir(tmp_path, exclude_modules=["model.layers.0.self_attn.q_proj"])
    weights = read_peft_dir(directory, MAX_LORA_RANK)
    assert set(weights.tensors) == {(0, "v_proj"), (1, "q_proj"), (1, "v_proj")}
    assert weights.config.exclude_modules == ("model.layers.0.self_attn.q_proj",)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_keep_their_dtype(tmp_path: Path, dtype: torch.dtype):
    directory = adapter_dir(tmp_path)
    named = {k: v.to(dtype) for k, v in load_file(directory / WEIGHTS).items()}
    save_file(named, directory / WEIGHTS)
    weights = read_peft_dir(directory, MAX_LORA_RANK)
    assert {t.dtype for pair in weights.tensors.values() for t in pair} == {dtype}


def test_keys_with_the_adapter_name_are_accepted(tmp_path: Path):
    directory = adapter_dir(tmp_path)
    named = load_file(directory / WEIGHTS)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in named.items()}, directory / WEIGHTS)
    assert len(read_peft_dir(directory, MAX_LORA_RANK).tensors) == 4


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        pytest.fail("a pickle loader was called")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)


def test_pickle_next_to_safetensors_is_ignored(tmp_path: Path, no_pickle: None):
    directory = adapter_dir(tmp_path)
    (directory / "training_args.bin").write_bytes(b"\x80\x04 not even a valid pickle")
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04 not even a valid pickle")
    (directory / "optimizer.pt").write_bytes(b"\x80\x04")
    assert (directory / "README.md").is_file()
    assert len(read_peft_dir(directory, MAX_LORA_RANK).tensors) == 4


def test_pickle_only_is_refused_without_loading_it(tmp_path: Path, no_pickle: None):
    directory = adapter_dir(tmp_path)
    (directory / WEIGHTS).rename(directory / "adapter_model.bin")
    with pytest.raises(
        AdapterFormatError, match=r"adapter_model\.bin refused: pickle files are never loaded"
    ):
        read_peft_dir(directory, MAX_LORA_RANK)


@pytest.fixture
def library_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call into the safetensors library's readers (they still run)."""
    calls: list[str] = []

    def recording(name: str, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(adapters.safetensors_check, "load_file", recording("load_file", load_file))
    monkeypatch.setattr(safetensors.torch, "load_file", recording("load_file", load_file))
    monkeypatch.setattr(safetensors.torch, "load", recording("load", safetensors.torch.load))
    monkeypatch.setattr(adapters.safetensors_check, "load", recording("load", safetensors.torch.load))
    monkeypatch.setattr(safetensors, "safe_open", recording("safe_open", safetensors.safe_open))
    return calls


BEFORE_PARSE = [
    "weights-too-large", "header-length-over-limit", "header-over-limit", "too-many-tensors",
    "header-length-past-file", "weights-truncated", "offsets-overlap", "offsets-beyond-file",
    "offsets-gap-at-end", "dtype-i64", "shape-offset-mismatch", "header-duplicate-key", "header-not-json",
]  # fmt: skip


@pytest.mark.parametrize("case", [c for c in CASES if c.id in BEFORE_PARSE], ids=lambda case: case.id)
def test_limits_and_layout_are_checked_before_the_library_parses(tmp_path, case, library_calls):
    directory = tmp_path / "adapter"
    directory.mkdir()
    case.build(directory)
    library_calls.clear()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: "):
        read_peft_dir(directory, MAX_LORA_RANK)
    assert library_calls == []


def test_the_library_is_called_for_a_valid_file(tmp_path: Path, library_calls: list[str]):
    read_peft_dir(adapter_dir(tmp_path), MAX_LORA_RANK)
    assert library_calls == ["load_file"]


def test_before_parse_cases_exist():
    assert set(BEFORE_PARSE) <= {case.id for case in CASES}


@pytest.mark.parametrize(
    "limits, reason",
    [
        (FormatLimits(max_num_tensors=7), "header lists 8 tensors, over the limit of 7"),
        (FormatLimits(max_weights_bytes=8191), "file is 8192 bytes, over the limit of 8191"),
        (FormatLimits(max_header_bytes=1000), "over the limit of 1000 bytes"),
        (FormatLimits(max_config_bytes=100), "adapter_config.json is over the limit of 100 bytes"),
    ],
)
def test_custom_limits_apply(tmp_path: Path, limits: FormatLimits, reason: str):
    directory = adapter_dir(tmp_path)
    assert (directory / WEIGHTS).stat().st_size == 8192  # the reasons above depend on it
    read_peft_dir(directory, MAX_LORA_RANK)  # within the defaults
    with pytest.raises(AdapterFormatError) as error:
        read_peft_dir(directory, MAX_LORA_RANK, limits)
    assert reason in str(error.value)


def test_limits_at_the_exact_sizes_pass(tmp_path: Path):
    directory = adapter_dir(tmp_path)
    exact = FormatLimits(
        max_weights_bytes=(directory / WEIGHTS).stat().st_size,
        max_num_tensors=8,
        max_config_bytes=(directory / "adapter_config.json").stat().st_size,
    )
    assert len(read_peft_dir(directory, MAX_LORA_RANK, exact).tensors) == 4


@pytest.mark.parametrize(
    "field", ["max_weights_bytes", "max_header_bytes", "max_num_tensors", "max_config_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_format_limits_refuse_nonsense(field: str, value: object):
    with pytest.raises(ValueError, match=f"FormatLimits.{field} must be a positive integer"):
        FormatLimits(**{field: value})


def test_format_limits_defaults():
    limits = FormatLimits()
    assert limits.max_weights_bytes == 2 * 1024**3
    assert limits.max_header_bytes == 1024**2
    assert limits.max_num_tensors == 4096
    assert limits.max_config_bytes == 64 * 1024


def test_missing_alpha_defaults_to_peft_default():
    config = parse_config(dict(peft_type="LORA", r=4, target_modules=["q_proj"]), MAX_LORA_RANK)
    assert (config.alpha, config.scale, config.use_rslora) == (8.0, 2.0, False)


def test_harmless_training_fields_are_ignored():
    raw = dict(
        peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.1,
        init_lora_weights="gaussian", inference_mode=False, task_type="CAUSAL_LM", revision="main",
        auto_mapping={"base_model_class": "LlamaForCausalLM"}, peft_version="0.21.2", use_dora=False,
        modules_to_save=None, rank_pattern={}, megatron_core="megatron.core", qalora_group_size=16,
        some_future_flag=None,
    )  # fmt: skip
    config = parse_config(raw, MAX_LORA_RANK)
    assert (config.rank, config.alpha, config.target_modules) == (4, 8.0, ("q_proj",))


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A" * 64, "0", "_x", "x..y"])
def test_valid_names(name: str):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "..", "a/b", "a\\b", "a b", "a\n", "x" * 65, "ü", None, 5, b"ab"]
)
def test_invalid_names(name: object):
    with pytest.raises(AdapterFormatError, match="tenant name"):
        validate_name(name, what="tenant name")


def test_reading_adapters_again_and_again_keeps_no_memory(tmp_path: Path):
    """The host tier re-reads evicted adapters from disk all day: a read must leave nothing behind.

    safetensors' default mmap loader keeps ~56 bytes per tensor for good (0.8.0): 2,000 reads of a
    60-tensor file kept 6.5 MiB. Measured with tracemalloc (allocations, not timing).
    """
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({f"layer.{i}.{h}": torch.randn(1, 576) for i in range(30) for h in "AB"}, str(path))
    limits = {"max_file_bytes": 1 << 20, "max_header_bytes": 1 << 16, "max_num_tensors": 64}
    adapters.safetensors_check.load_checked(path, **limits)  # warm-up: one-time caches
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(2000):
            adapters.safetensors_check.load_checked(path, **limits)
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 256 * 1024, f"{retained / 1024:.0f} KiB kept by 2,000 reads"
