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


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, CPU seconds busy on the whole machine, CPU seconds of this process) now; the busy
    seconds are 0 where /proc/stat is missing, so ``other_load`` reads 0 there."""
    import os
    import resource
    import time

    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf(
            "SC_CLK_TCK"
        )  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        busy = 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime


def other_load(since: tuple[float, float, float]) -> float:
    """Cores that other processes kept busy on average since ``since`` (a ``cpu_snapshot``)."""
    now = cpu_snapshot()
    if since[1] == 0.0 or now[0] <= since[0]:
        return 0.0
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])
