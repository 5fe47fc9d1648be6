"""docs/adapters.md states the limits and rules the code enforces."""

from __future__ import annotations

import re
from pathlib import Path

from adapters.format import _REFUSED_FIELDS, MAX_NAME_LENGTH, FormatLimits
from server.config import EngineConfig

DOC = (Path(__file__).resolve().parents[2] / "docs" / "adapters.md").read_text()


def _bytes(text: str) -> int:
    number, unit = text.split()
    return int(number) * {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]


def test_the_limits_table_matches_format_limits():
    rows = dict(re.findall(r"^\s*\| (.+?) \| ([0-9]+(?: [KMG]iB)?) \|$", DOC, flags=re.M))
    limits = FormatLimits()
    assert _bytes(rows["`adapter_model.safetensors` size"]) == limits.max_weights_bytes
    assert _bytes(rows["safetensors header (JSON) size"]) == limits.max_header_bytes
    assert int(rows["tensors in the file"]) == limits.max_num_tensors
    assert _bytes(rows["`adapter_config.json` size"]) == limits.max_config_bytes


def test_names_rank_and_refused_fields_match_the_code():
    assert f"1–{MAX_NAME_LENGTH} characters" in DOC
    assert f"`[1, --max-lora-rank]` (default {EngineConfig().max_lora_rank}" in DOC
    named = set(re.findall(r"`(\w+)`", DOC))
    listed = {"use_dora", "modules_to_save", "auto_map", "layers_to_transform", "fan_in_fan_out"}
    assert listed <= named and listed <= set(_REFUSED_FIELDS)
