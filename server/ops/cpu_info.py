"""The CPU the kernels run on, as /proc/cpuinfo describes it: what kernel choices and built
libraries are keyed by (the dev and CI CPU changes from one session to the next)."""

from __future__ import annotations

from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_identity() -> str:
    """CPU model name, family/model and the ISA flags that decide kernel speed."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    family = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{info.get('model name', 'unknown CPU')} ({family}; {' '.join(isa) or 'no AVX2'})"


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpuinfo_flags_line() -> str:
    """The first ``flags`` (x86) or ``Features`` (arm) line of /proc/cpuinfo ('' if none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")
