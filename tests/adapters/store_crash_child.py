"""Writer processes for tests/adapters/test_store.py.

``python -m tests.adapters.store_crash_child SOURCE_DIR`` is a small fork server, so each crash costs
a fork rather than a torch import: it prints ``READY``, then for each ``RUN <kill_at> <data_dir>``
line on stdin forks a writer, prints ``PID <pid>``, waits for it and prints ``DIED <signal>``.

The writer opens the store on ``data_dir`` and commits ``t/crash`` in a tight loop until it is
killed, printing ``ACK <version> <sha256>`` (flushed) after each commit returns. Each version's
weights differ (two values are the pid and the loop index), so a mix-up between versions shows as a
hash mismatch. Every third turn it also commits and deletes ``t/scratch``, so crashes land in deletes.

With ``kill_at > 0`` the writer SIGKILLs itself at its ``kill_at``-th step: a step is the moment just
before or just after a call of rename, fsync, mkdir, rmdir, unlink or a SQL ``execute``, anywhere,
the store's startup recovery included. Sweeping ``kill_at`` = 1, 2, 3… puts a crash between every two
durable operations in turn, with no test hooks in the store. ``kill_at = 0`` runs until the parent
kills it.

``commit_many`` is the worker of the two-process test (spawned, so it lives in an importable module).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from adapters.format import CONFIG_FILE, WEIGHTS_FILE, LoRAConfig, read_peft_dir
from adapters.store import AdapterRecord, SQLiteAdapterStore

_STEPS = frozenset({"rename", "fsync", "mkdir", "rmdir", "unlink", "execute"})


@functools.cache
def _config(source: Path) -> LoRAConfig:
    return read_peft_dir(source, 64).config


def commit_copy(
    store: SQLiteAdapterStore, tenant: str, name: str, source: Path, marker: tuple[float, ...] = ()
) -> AdapterRecord:
    """Stage a copy of the adapter in ``source`` and commit it; ``marker`` overwrites its first weights."""
    config = _config(source)
    with store.staging_dir() as staged:
        shutil.copyfile(source / CONFIG_FILE, staged / CONFIG_FILE)
        if not marker:
            shutil.copyfile(source / WEIGHTS_FILE, staged / WEIGHTS_FILE)
        else:
            tensors = load_file(source / WEIGHTS_FILE)
            first = next(iter(tensors.values())).view(-1)
            for i, value in enumerate(marker):
                first[i] = value
            save_file(tensors, staged / WEIGHTS_FILE, metadata={"format": "pt"})
        return store.commit(tenant, name, staged, config)


def commit_many(data_dir: str, source: str, count: int, barrier, results) -> None:
    """Open the store, wait for the other process at ``barrier``, commit ``t/shared`` ``count`` times."""
    store = SQLiteAdapterStore(Path(data_dir))
    barrier.wait()
    versions = [commit_copy(store, "t", "shared", Path(source)).version for _ in range(count)]
    results.put(versions)


def _kill_at_step(kill_at: int) -> None:
    steps = 0

    def profile(frame, event: str, arg) -> None:
        nonlocal steps
        if event in ("c_call", "c_return") and getattr(arg, "__name__", "") in _STEPS:
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(profile)


def _write_until_killed(data_dir: Path, source: Path, kill_at: int) -> None:
    if kill_at:
        _kill_at_step(kill_at)
    store = SQLiteAdapterStore(data_dir)
    turn = 0
    while True:
        turn += 1
        record = commit_copy(store, "t", "crash", source, marker=(turn, os.getpid()))
        print(f"ACK {record.version} {record.sha256}", flush=True)
        if turn % 3 == 0:
            commit_copy(store, "t", "scratch", source)
            store.delete("t", "scratch")


def main(source: Path) -> None:
    _config(source)
    print("READY", flush=True)
    for line in sys.stdin:
        _, kill_at, data_dir = line.split(maxsplit=2)
        pid = os.fork()
        if pid == 0:
            try:
                _write_until_killed(Path(data_dir.strip()), source, int(kill_at))
            finally:
                os._exit(1)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"DIED {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
