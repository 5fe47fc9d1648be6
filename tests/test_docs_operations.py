"""docs/operations.md: the Configuration tables and the Sizing section agree with the code.

Configuration: the two tables are the ones ``python -m server.settings --markdown`` renders from
the declarations in ``server/config.py``. Beyond that, every ``loraplex serve`` flag is documented
with its env var, config-file key, type, default and range, nothing else is, and every config
field is either behind a flag or in the table of settings with no flag. Ranges are checked by
building the configs the way ``loraplex serve`` does: the boundary is accepted, one step beyond
it is a ValueError.

Sizing: the byte formulas (below, as code) are checked against a real peft adapter, real slot
buffers, real merged copies, a real host tier and the real KV cache of a tiny Llama, and the doc's
tables are recomputed from them. SmolLM2's shape is confirmed from the embedded GGUF's metadata.

``python -m tests.test_docs_operations`` prints the sizing tables as the doc should hold them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from server import settings
from server.cli import build_parser
from server.config import (
    ALL_TARGET_MODULES,
    SUPPORTED_DTYPES,
    EngineConfig,
    ModelConfig,
    ProcessConfig,
    ServerConfig,
)
from server.settings import SERVE_OPTIONS, build_configs, configuration_tables, resolve_options

DOC = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
CHECKED_CLASSES = (ModelConfig, EngineConfig, ServerConfig)  # built, so range-checked, before the model loads
CONFIG_CLASSES = (*CHECKED_CLASSES, ProcessConfig)
EXTRA_FLAGS = {"adapter": "LORAPLEX_ADAPTER", "config": "LORAPLEX_CONFIG"}  # serve flags not in SERVE_OPTIONS
TYPE_NAMES = {str: "str", int: "int", float: "float", Path: "path"}
# values a documented list of allowed strings is checked against: it must hold exactly those accepted
STRING_CANDIDATES = (*SUPPORTED_DTYPES, "float64", "int8", "auto", "off", "on", "cpu", "cuda", "cuda:0", "x",
                     "cudafoo", "cuda:", "cuda:x", "cpu:0")  # fmt: skip
FIELD_TYPES = {"int": int, "str": str, "tuple": tuple, "float": float}
KiB, MiB, GiB = 1024, 1024**2, 1024**3


# ---- reading the doc ----
def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, flags=re.M | re.S)
    assert match, f"docs/operations.md has no '## {title}' section"
    return match[1]


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with ``| first_header |``, keyed by header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = _cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), f"row has {len(cells)} cells, header {len(header)}: {line}"
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


OPTIONS = {option.flag: option for option in SERVE_OPTIONS}


@functools.cache
def flag_rows() -> dict[str, dict[str, str]]:
    return {ticked(row["flag"])[0].removeprefix("--"): row for row in table(section("Configuration"), "flag")}


@functools.cache
def no_flag_rows() -> dict[str, dict[str, str]]:
    return {ticked(row["setting"])[0]: row for row in table(section("Configuration"), "setting")}


# ---- building the configs as `loraplex serve` does (server/settings.py: resolve_options, build_configs) ----
def serve_configs(*argv: str, environ: dict[str, str] | None = None):
    options = resolve_options(build_parser().parse_args(["serve", *argv]), environ or {})
    return options, *build_configs(options)


def effective_defaults() -> dict[str, object]:
    """Each serve option's value with nothing given: as the built configs hold it, else as resolved."""
    options, *configs = serve_configs()
    values = {}
    for option in SERVE_OPTIONS:
        holders = [config for config in configs if hasattr(config, option.dest)]
        values[option.flag] = getattr(holders[0], option.dest) if holders else options[option.dest]
    return values


def doc_table(first_header: str) -> str:
    """The doc's Markdown table whose header starts with ``| first_header |``, as text."""
    lines = section("Configuration").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_the_configuration_tables_are_the_rendered_ones():
    flags, unflagged = configuration_tables()
    hint = "regenerate it: python -m server.settings --markdown"
    assert doc_table("flag") == flags, f"docs/operations.md's flag table is stale; {hint}"
    assert doc_table("setting") == unflagged, (
        f"docs/operations.md's table of settings with no flag is stale; {hint}"
    )
    assert {extra.flag: extra.env for extra in settings.EXTRA_FLAGS} == EXTRA_FLAGS


def test_every_serve_flag_is_documented_and_nothing_else():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser_flags = {
        action.option_strings[0].removeprefix("--")
        for action in commands.choices["serve"]._actions
        if action.option_strings and action.dest != "help"
    }
    rows = [ticked(row["flag"])[0] for row in table(section("Configuration"), "flag")]
    assert len(rows) == len(set(rows)), "a flag is documented twice"
    assert set(flag_rows()) == set(OPTIONS) | set(EXTRA_FLAGS) == parser_flags


def test_env_var_config_key_and_type_of_every_option(tmp_path):
    samples = {str: "x", int: "7", float: "0.5", Path: "/srv/x"}
    for flag, option in OPTIONS.items():
        row = flag_rows()[flag]
        assert ticked(row["env var"]) == [option.env], flag
        assert ticked(row["config key"]) == [flag], flag
        assert row["type"] == TYPE_NAMES[option.type], flag
        sample = samples[option.type]
        options = _resolve_only(environ={option.env: sample})
        assert options[option.dest] == option.type(sample), f"{option.env} does not set {flag}"
        config_file = tmp_path / f"{option.dest}.json"
        config_file.write_text(json.dumps({flag: sample}))
        options = _resolve_only(f"--config={config_file}")
        assert options[option.dest] == option.type(sample), f"config key {flag} does not set it"
    for flag, env in EXTRA_FLAGS.items():
        assert ticked(flag_rows()[flag]["env var"]) == [env], flag
    assert _resolve_only(environ={"LORAPLEX_ADAPTER": "a=/x,b=/y"})["adapters"] == {"a": "/x", "b": "/y"}
    config_file = tmp_path / "adapters.json"
    config_file.write_text(json.dumps({"adapter": {"a": "/x"}, "max_loras": 3}))
    options = _resolve_only(environ={"LORAPLEX_CONFIG": str(config_file)})
    assert options["adapters"] == {"a": "/x"} and options["max_loras"] == 3  # underscores work too
    assert ticked(flag_rows()["adapter"]["config key"]) == ["adapter"]


def _resolve_only(*argv: str, environ: dict[str, str] | None = None) -> dict[str, object]:
    return resolve_options(build_parser().parse_args(["serve", *argv]), environ or {})


def test_documented_defaults_are_the_effective_defaults():
    for flag, value in effective_defaults().items():
        cell = flag_rows()[flag]["default"]
        if value in (None, ""):
            assert cell == "none", f"--{flag}: documented default {cell!r}, real default {value!r}"
            continue
        documented = ticked(cell)[0]
        assert OPTIONS[flag].type(documented) == value, f"--{flag}: documented {documented}, real {value!r}"
        human = re.search(r"\((\d+) GiB\)", cell)
        assert human is None or int(human[1]) * GiB == value, f"--{flag}: {cell}"
    for flag in EXTRA_FLAGS:
        assert flag_rows()[flag]["default"] == "none"
    assert _resolve_only()["adapters"] == {}


def test_precedence_flag_then_env_then_file_then_default(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"max-loras": 3, "max-queue": 9}))
    file = f"--config={config_file}"
    assert _resolve_only(file, "--max-loras=5", environ={"LORAPLEX_MAX_LORAS": "4"})["max_loras"] == 5
    assert _resolve_only(file, environ={"LORAPLEX_MAX_LORAS": "4"})["max_loras"] == 4
    assert _resolve_only(file, environ={"LORAPLEX_MAX_LORAS": ""})["max_loras"] == 3  # empty = unset
    assert _resolve_only(environ={"LORAPLEX_MAX_LORAS": ""})["max_loras"] == EngineConfig.max_loras  # default
    assert _resolve_only(file)["max_queue"] == 9
    assert _resolve_only()["max_queue"] == OPTIONS["max-queue"].default
    order = (
        "in this order: its flag, its environment variable (an empty value counts as unset), "
        "the `--config` file, its default"
    )
    assert order in " ".join(section("Configuration").split())


def test_the_example_config_file_is_valid(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    blocks = re.findall(r"```toml\n(.*?)```", section("Configuration"), flags=re.S)
    assert len(blocks) == 1
    config_file = tmp_path / "loraplex.toml"
    config_file.write_text(blocks[0])
    options, *_ = serve_configs(f"--config={config_file}")  # the configs build: every value is in range
    adapters = {"support-bot": "/adapters/support-bot", "acme/summarizer": "/adapters/summarizer"}
    assert options["adapters"] == adapters
    for key, value in tomllib.loads(blocks[0]).items():
        if key != "adapter":
            assert options[key.replace("-", "_")] == value, key


# ---- ranges ----
def _bound(text: str, defaults: dict[str, object]) -> float:
    return defaults[text] if text in defaults else float(text)


def check_range(name: str, cell: str, kind: type, build: Callable[[object], object], defaults: dict) -> None:
    """The documented range of one setting against what ``build(value)`` accepts (ValueError = refused)."""

    def accepted(value) -> bool:
        try:
            build(value)
        except ValueError:
            return False
        return True

    tokens = ticked(cell)
    step = 1 if kind is int else 1e-6
    if cell == "—":  # not range-checked: numbers on both sides of zero, and empty strings, go through
        unchecked = {int: (-1, 0), float: (-1.0, 0.0), str: ("",)}.get(kind, ())
        assert all(map(accepted, unchecked)), f"{name} is range-checked: document its range"
    elif cell.startswith("non-empty"):
        empty, good = ((), ("q_proj",)) if kind is tuple else ("", "x")
        assert accepted(good) and not accepted(empty), name
        assert kind is not tuple or not accepted(("lm_head",)), name
    elif len(tokens) > 1:  # one of these values
        values = {kind(t.replace(":N", ":0")) for t in tokens}
        candidates = range(max(values) + 2) if kind is int else STRING_CANDIDATES
        assert {v for v in candidates if accepted(v)} | values == values, f"{name} accepts more than {values}"
        assert all(map(accepted, values)), f"{name}: not every one of {values} is accepted"
    elif match := re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", tokens[0]):
        low, high = _bound(match[2], defaults), _bound(match[3], defaults)
        closed_low, closed_high = match[1] == "[", match[4] == "]"
        assert accepted(kind(low)) == closed_low and accepted(kind(high)) == closed_high, f"{name}: {cell}"
        assert accepted(kind(low + step)) and accepted(kind(high - step)), f"{name}: {cell}"
        assert not accepted(kind(low - step)) and not accepted(kind(high + step)), f"{name}: {cell}"
    elif match := re.fullmatch(r"(>=|>) (\S+)", tokens[0]):
        low = _bound(match[2], defaults)
        assert accepted(kind(low)) == (match[1] == ">="), f"{name}: {cell}"
        assert accepted(kind(low + step)) and not accepted(kind(low - step)), f"{name}: {cell}"
    else:
        raise AssertionError(f"{name}: cannot read the range {cell!r}")


def test_documented_ranges_are_what_the_configs_accept():
    defaults = effective_defaults()
    for flag, option in OPTIONS.items():
        cell = flag_rows()[flag]["range"]
        if option.config not in CHECKED_CLASSES:
            assert cell == "—", f"--{flag} is not checked at start; its range must be —"
            continue
        kind = option.type
        check_range(f"--{flag}", cell, kind, lambda v, f=flag: serve_configs(f"--{f}={v}"), defaults)
    for flag in EXTRA_FLAGS:
        assert flag_rows()[flag]["range"] == "—"


def test_every_config_field_has_a_flag_or_a_row_without_one():
    fields = {f.name: f for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)}
    with_flag = {option.dest for option in SERVE_OPTIONS}
    assert with_flag <= set(fields), "every flag sets a config field"
    assert set(no_flag_rows()) == set(fields) - with_flag, "document exactly the fields no flag sets"
    for name, row in no_flag_rows().items():
        default = fields[name].default
        if default is None:
            assert row["default"] == "none", name
        else:
            kind = type(default)
            documented = tuple(ticked(row["default"])) if kind is tuple else kind(ticked(row["default"])[0])
            assert documented == default, f"{name}: documented {documented}, real {default!r}"
        cls = next(c for c in CONFIG_CLASSES if name in {f.name for f in dataclasses.fields(c)})
        kind = FIELD_TYPES[re.match(r"\w+", fields[name].type)[0]]  # "int | None" → int
        check_range(name, row["range"], kind, lambda v, n=name, c=cls: c(**{n: v}), {})


def test_numbers_in_the_text_match_the_code():
    from server.engine.kv_cache import DEFAULT_CPU_KV_BYTES_CAP
    from server.engine.merging import MergePolicyConfig

    policy = MergePolicyConfig()
    merge_row, unmerge_row = flag_rows()["merge-share"]["meaning"], flag_rows()["unmerge-share"]["meaning"]
    assert f"over the last {policy.window_steps} steps" in merge_row
    assert f"for {policy.merge_after_steps} steps" in merge_row
    assert f"at least {policy.merge_min_requests} requests" in merge_row
    assert f"below this for {policy.unmerge_after_steps} steps" in unmerge_row
    caps = re.findall(r"capped at (\d+) MiB on CPU", DOC)
    assert caps and all(int(cap) * MiB == DEFAULT_CPU_KV_BYTES_CAP for cap in caps)


# ---- sizing: the formulas, as code ----
FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int  # h
    layers: int  # L
    heads: int  # H
    kv_heads: int  # H_kv
    head_dim: int  # D
    intermediate: int  # I

    @classmethod
    def of(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size)  # fmt: skip

    def in_out(self) -> dict[str, tuple[int, int]]:
        h, inter = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip


def adapter_bytes(shape: Shape, rank: int, dtype_bytes: int, targets=ALL_TARGET_MODULES) -> int:
    """Σ over layers and targets of r·(in + out)·dtype_bytes: A [r, in] + B [out, r]."""
    per_layer = sum(rank * (i + o) for name, (i, o) in shape.in_out().items() if name in targets)
    return shape.layers * per_layer * dtype_bytes


def with_fused(targets) -> tuple[str, ...]:
    """Every slice of each fused module (q|k|v, gate|up) that one of ``targets`` belongs to."""
    return tuple(name for group in FUSED if set(group) & set(targets) for name in group)


def slot_bytes(shape: Shape, max_loras: int, max_lora_rank: int, dtype_bytes: int, targets=ALL_TARGET_MODULES
               ) -> int:  # fmt: skip
    """``max_loras`` slots padded to ``max_lora_rank``, in the serving dtype, fused modules whole."""
    return max_loras * adapter_bytes(shape, max_lora_rank, dtype_bytes, with_fused(targets))


def merged_bytes(shape: Shape, dtype_bytes: int, targets=ALL_TARGET_MODULES) -> int:
    """Σ over layers and touched modules (fused ones whole) of out·in·dtype_bytes."""
    sizes = shape.in_out()
    return shape.layers * sum(sizes[n][0] * sizes[n][1] for n in with_fused(targets)) * dtype_bytes


def kv_bytes_per_token(shape: Shape, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


# ---- sizing: the formulas against real objects of a tiny Llama ----
@pytest.fixture(scope="module")
def tiny(tiny_llama_factory) -> Path:
    return tiny_llama_factory(seed=0, head_dim=32)  # H·D = 128 ≠ hidden 64: q and o sizes differ


@pytest.fixture(scope="module")
def peft_adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    from tests.engine.test_engine_parity import save_peft_adapter

    root = tmp_path_factory.mktemp("sizing-adapters")
    return {
        "all": save_peft_adapter(tiny, root / "all", seed=1, r=8, target_modules=list(ALL_TARGET_MODULES)),
        "q": save_peft_adapter(tiny, root / "q", seed=2, r=4, target_modules=["q_proj"]),
    }


def load_tiny(tiny: Path, dtype: str, **engine):
    from server.model.factory import load_model

    config = EngineConfig(max_loras=3, max_lora_rank=16, merge_policy="off", **engine)
    return load_model(ModelConfig(model=str(tiny), dtype=dtype, device="cpu"), config)


def test_a_real_adapter_file_and_its_host_copy_match_the_formula(tiny, peft_adapters, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from adapters.format import read_peft_dir

    shape = Shape.of(AutoConfig.from_pretrained(tiny))
    path = peft_adapters["all"]
    weights_file = path / "adapter_model.safetensors"
    expected = adapter_bytes(shape, 8, 4)
    assert read_peft_dir(path, 64).num_bytes == expected  # peft writes fp32
    raw = weights_file.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) == 8 + header_len + expected  # disk: the tensors plus the JSON header
    num_tensors = 2 * shape.layers * len(ALL_TARGET_MODULES)
    assert 100 <= header_len / num_tensors <= 150, "the doc says about 120 bytes of header per tensor"
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    shutil.copy(path / "adapter_config.json", bf16)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(weights_file).items()}
    save_file(tensors, bf16 / "adapter_model.safetensors")
    assert read_peft_dir(bf16, 64).num_bytes == adapter_bytes(shape, 8, 2)  # kept in the file's dtype
    assert read_peft_dir(peft_adapters["q"], 64).num_bytes == adapter_bytes(shape, 4, 4, ("q_proj",))


@pytest.mark.parametrize(
    ("dtype", "dtype_bytes", "targets"),
    [
        ("float32", 4, ALL_TARGET_MODULES),
        ("bfloat16", 2, ALL_TARGET_MODULES),
        ("float32", 4, ("q_proj", "down_proj")),  # q_proj alone allocates the whole fused q|k|v
    ],
)
def test_slot_buffers_match_the_formula(tiny, dtype, dtype_bytes, targets):
    loaded = load_tiny(tiny, dtype, target_modules=targets)
    shape = Shape.of(loaded.checkpoint.config)
    allocated = sum(m.lora_a.nbytes + m.lora_b.nbytes for _, m in loaded.model.lora_layers())
    assert allocated == slot_bytes(shape, 3, 16, dtype_bytes, targets)
    if targets != ALL_TARGET_MODULES:  # q_proj alone still allocates the whole fused q|k|v
        assert allocated > 3 * adapter_bytes(shape, 16, dtype_bytes, targets)


def test_merged_copies_match_the_formula(tiny, peft_adapters):
    from adapters.format import read_peft_dir
    from server.model.lora_binding import LoRASlotWriter

    loaded = load_tiny(tiny, "bfloat16")
    shape = Shape.of(loaded.checkpoint.config)
    writer = LoRASlotWriter(loaded.model, 16)
    for name, targets in (("all", ALL_TARGET_MODULES), ("q", ("q_proj",))):
        copy = writer.merged_weights(read_peft_dir(peft_adapters[name], 16))
        assert sum(w.nbytes for w in copy.values()) == merged_bytes(shape, 2, targets), name


def test_the_host_tier_holds_its_budget_over_the_adapter_size(tiny, peft_adapters):
    from adapters.cache import AdapterCache, AdapterState
    from adapters.format import read_peft_dir
    from server.model.lora_binding import LoRASlotWriter

    loaded = load_tiny(tiny, "float32")
    weights = read_peft_dir(peft_adapters["all"], 16)
    budget = 2 * weights.num_bytes + weights.num_bytes // 2
    writer = LoRASlotWriter(loaded.model, 16)
    cache = AdapterCache(writer, 3, lambda path: read_peft_dir(path, 16), max_host_bytes=budget)
    try:
        for i in range(5):
            cache.register(f"a{i}", peft_adapters["all"], weights)
        in_host = [i for i in cache.registered_ids() if cache.state(i) is AdapterState.IN_HOST]
        assert len(in_host) == budget // weights.num_bytes == 2
        assert cache.host_bytes() == 2 * weights.num_bytes
    finally:
        cache.close()


def test_kv_cache_bytes_match_the_formula(tiny):
    import torch

    from server.engine import kv_cache

    loaded = load_tiny(tiny, "bfloat16")
    shape, config = Shape.of(loaded.checkpoint.config), loaded.checkpoint.config
    assert kv_cache.kv_bytes_per_token(config, torch.bfloat16) == kv_bytes_per_token(shape, 2)
    cache = kv_cache.KVCache.sized(config, 100 * kv_bytes_per_token(shape, 2), 16, torch.bfloat16, "cpu")
    allocated = sum(k.nbytes + v.nbytes for k, v in cache.layers)
    assert allocated == cache.num_bytes == 6 * 16 * kv_bytes_per_token(shape, 2)  # 100 tokens → 6 blocks


# ---- sizing: the doc's tables ----
SHAPES = {
    "SmolLM2-135M": Shape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536),
    "Llama-3-8B": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
}
RANKS = (8, 16, 64)
GGUF_SCALARS = dict(enumerate(("<B", "<b", "<H", "<h", "<I", "<i", "<f", "<?")))  # type id → struct format
GGUF_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def human(num_bytes: int) -> str:
    if num_bytes < MiB:
        return f"{num_bytes / KiB:.1f} KiB"
    return f"{num_bytes / MiB:.1f} MiB" if num_bytes < GiB else f"{num_bytes / GiB:.2f} GiB"


def size_cell(num_bytes: int) -> str:
    return f"{num_bytes:,} ({human(num_bytes)})"


def expected_adapter_rows() -> dict[tuple[str, str, str], list[str]]:
    engine = EngineConfig()
    rows = {}
    for model, shape in SHAPES.items():
        for rank in RANKS:
            for dtype, nbytes in DTYPE_BYTES.items():
                one = adapter_bytes(shape, rank, nbytes)
                slots = slot_bytes(shape, engine.max_loras, rank, nbytes)
                rows[model, str(rank), dtype] = [size_cell(one), size_cell(slots),
                                                 str(engine.max_cpu_adapters_bytes // one)]  # fmt: skip
    return rows


def expected_model_rows() -> dict[tuple[str, str], list[str]]:
    return {
        (model, dtype): [size_cell(merged_bytes(shape, nbytes)), size_cell(kv_bytes_per_token(shape, nbytes))]
        for model, shape in SHAPES.items()
        for dtype, nbytes in DTYPE_BYTES.items()
    }


def render_tables() -> str:
    engine = EngineConfig()
    lines = [
        "| model | rank | dtype | one adapter | "
        f"`--max-loras {engine.max_loras}` slots at this rank | adapters in "
        f"{engine.max_cpu_adapters_bytes // GiB} GiB of host memory |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {' | '.join([*key, *cells])} |" for key, cells in expected_adapter_rows().items()]
    lines += ["", "| model | dtype | one merged copy (all 7 targets) | KV cache per token |",
              "| --- | --- | ---: | ---: |"]  # fmt: skip
    lines += [f"| {' | '.join([*key, *cells])} |" for key, cells in expected_model_rows().items()]
    return "\n".join(lines)


def test_the_shape_table_holds_the_shapes_used():
    for row in table(section("Sizing"), "model | h"):
        numbers = [int(row[k]) for k in ("h", "L", "H", "H_kv", "D", "I")]
        assert SHAPES[row["model"]] == Shape(*numbers), row["model"]
    assert {row["model"] for row in table(section("Sizing"), "model | h")} == set(SHAPES)


def test_the_adapter_table_follows_from_the_formula():
    engine = EngineConfig()
    rows = table(section("Sizing"), "model | rank")
    header = list(rows[0])
    assert header[4] == f"`--max-loras {engine.max_loras}` slots at this rank"
    assert header[5] == f"adapters in {engine.max_cpu_adapters_bytes // GiB} GiB of host memory"
    expected = expected_adapter_rows()
    documented = {(r["model"], r["rank"], r["dtype"]): list(r.values())[3:] for r in rows}
    assert set(documented) == set(expected), "rows: one per model, rank and dtype"
    for key, cells in expected.items():
        assert documented[key] == cells, f"{key}: expected | {' | '.join(cells)} |"


def test_the_model_table_follows_from_the_formula():
    expected = expected_model_rows()
    rows = table(section("Sizing"), "model | dtype")
    documented = {(r["model"], r["dtype"]): list(r.values())[2:] for r in rows}
    assert documented == expected, f"expected:\n{render_tables()}"


def gguf_metadata(path: Path, wanted: set[str]) -> dict[str, object]:
    """The wanted key/value pairs of a GGUF file's header (arrays are skipped, not decoded)."""
    found: dict[str, object] = {}
    with open(path, "rb") as file:
        magic, version, _, num_kv = struct.unpack("<4sIQQ", file.read(24))
        assert magic == b"GGUF" and version >= 2

        def read(fmt: str):
            return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]

        def value(kind: int):
            if kind == GGUF_STRING:
                return file.read(read("<Q")).decode()
            if kind == GGUF_ARRAY:
                item_kind, count = read("<I"), read("<Q")
                if item_kind in GGUF_SCALARS:
                    file.seek(count * struct.calcsize(GGUF_SCALARS[item_kind]), 1)
                else:
                    for _ in range(count):
                        value(item_kind)
                return None
            return read(GGUF_SCALARS[kind])

        for _ in range(num_kv):
            key = file.read(read("<Q")).decode()
            found[key] = value(read("<I"))
            if wanted <= set(found):
                break
    return {key: found[key] for key in wanted}


def test_the_smollm2_shape_is_the_embedded_models():
    from server.model.loader import EMBEDDED_MODELS

    embedded = EMBEDDED_MODELS["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(embedded.package)
    if spec is None:
        pytest.skip(f"the embedded model is not installed ({embedded.install_command})")
    gguf = Path(next(iter(spec.submodule_search_locations))) / embedded.gguf_file
    keys = {
        "hidden": "llama.embedding_length",
        "layers": "llama.block_count",
        "heads": "llama.attention.head_count",
        "kv_heads": "llama.attention.head_count_kv",
        "head_dim": "llama.rope.dimension_count",
        "intermediate": "llama.feed_forward_length",
    }
    metadata = gguf_metadata(gguf, {"general.architecture", *keys.values()})
    assert metadata["general.architecture"] == "llama"
    assert Shape(**{field: metadata[key] for field, key in keys.items()}) == SHAPES["SmolLM2-135M"]


if __name__ == "__main__":
    print(render_tables())
