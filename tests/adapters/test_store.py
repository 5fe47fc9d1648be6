"""adapters/store.py: versions, hashes, restarts, the local allow-list, concurrency and kill -9 safety."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.errors import StoreError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, LoRAConfig, read_peft_dir
from adapters.store import DB_FILE, SQLiteAdapterStore
from tests.adapters.store_crash_child import commit_copy, commit_many

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_KILL_STEPS = 160  # past a store open plus a full writer cycle (commit, commit, commit + delete)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft LoRA (r=4, α=8, q_proj + v_proj) of the tiny Llama, saved once; read-only."""
    import peft
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_factory(seed=0))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft-adapter")
    peft.get_peft_model(base, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def config(adapter_dir: Path) -> LoRAConfig:
    return read_peft_dir(adapter_dir, 64).config


@pytest.fixture
def store(tmp_path: Path) -> SQLiteAdapterStore:
    return SQLiteAdapterStore(tmp_path / "data")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_dirs(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "adapters").glob("*/*/v*") if p.is_dir()}


def assert_consistent(data_dir: Path) -> SQLiteAdapterStore:
    """Open the store and check every invariant a restart must find; return the opened store."""
    store = SQLiteAdapterStore(data_dir)
    assert store.problems == []
    records = [r for top in store.list() for r in store.versions(top.tenant, top.name)]
    for record in records:
        assert sha256_of(record.path / WEIGHTS_FILE) == record.sha256
        assert read_peft_dir(record.path, 64).config.rank == record.rank
    assert version_dirs(data_dir) == {r.path for r in records if r.source == "upload"}  # no orphans
    assert os.listdir(data_dir / "staging") == []
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILE)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return store


# ---- commit and reads


def test_commit_is_readable_and_survives_restart(store, adapter_dir, config):
    record = commit_copy(store, "acme", "support", adapter_dir)

    assert (record.tenant, record.name, record.version, record.source) == ("acme", "support", 1, "upload")
    assert record.adapter_id == "acme/support@1"
    assert record.sha256 == sha256_of(adapter_dir / WEIGHTS_FILE) == sha256_of(record.path / WEIGHTS_FILE)
    assert record.size_bytes == sum((adapter_dir / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    assert (record.rank, record.alpha, record.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert record.path == store.data_dir / "adapters" / "acme" / "support" / "v1"
    assert read_peft_dir(record.path, 64).config == config
    assert store.latest("acme", "support") == store.get("acme", "support", 1) == record
    assert store.versions("acme", "support") == store.list() == [record]
    assert store.get("acme", "support", 2) is None and store.latest("acme", "other") is None
    store.close()

    reopened = assert_consistent(store.data_dir)
    assert reopened.list() == [record]


def test_versions_increase_and_are_never_reused_after_delete(store, adapter_dir):
    first, second = (commit_copy(store, "t", "a", adapter_dir) for _ in range(2))
    assert (first.version, second.version) == (1, 2)

    assert store.delete("t", "a") == [first, second]
    assert not first.path.exists() and not second.path.exists()
    assert store.latest("t", "a") is None and store.versions("t", "a") == [] and store.list() == []
    assert commit_copy(store, "t", "a", adapter_dir).version == 3
    assert SQLiteAdapterStore(store.data_dir).latest("t", "a").version == 3
    assert commit_copy(SQLiteAdapterStore(store.data_dir), "t", "a", adapter_dir).version == 4


def test_list_is_latest_per_name_sorted_and_per_tenant(store, adapter_dir):
    for tenant, name in [("b", "z"), ("a", "y"), ("a", "x"), ("a", "x")]:
        commit_copy(store, tenant, name, adapter_dir)

    assert [r.adapter_id for r in store.list()] == ["a/x@2", "a/y@1", "b/z@1"]
    assert [r.adapter_id for r in store.list("a")] == ["a/x@2", "a/y@1"]
    assert store.list("nobody") == []


def test_delete_unknown_raises_key_error(store, adapter_dir):
    commit_copy(store, "t", "a", adapter_dir)
    with pytest.raises(KeyError):
        store.delete("t", "b")
    with pytest.raises(KeyError):
        store.delete("u", "a")


@pytest.mark.parametrize(
    ("tenant", "name"),
    [
        ("../etc", "a"),
        ("t", "../../x"),
        ("t", "a/b"),
        ("", "a"),
        ("t", ".hidden"),
        ("t", "x" * 65),
        ("t", "a\n"),
    ],
)
def test_bad_names_are_refused_and_nothing_is_written(tmp_path, store, adapter_dir, config, tenant, name):
    with store.staging_dir() as staged:
        shutil.copytree(adapter_dir, staged, dirs_exist_ok=True)
        with pytest.raises(StoreError):
            store.commit(tenant, name, staged, config)
        assert (staged / WEIGHTS_FILE).is_file()  # not moved
    for call in (store.latest, store.versions, store.delete):
        with pytest.raises(StoreError):
            call(tenant, name)
    assert list((store.data_dir / "adapters").iterdir()) == [] and store.list() == []
    assert os.listdir(tmp_path) == ["data"]


def test_commit_refuses_a_dir_not_from_staging(store, adapter_dir, config, tmp_path):
    elsewhere = shutil.copytree(adapter_dir, tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="staging"):
        store.commit("t", "a", elsewhere, config)
    assert (elsewhere / WEIGHTS_FILE).is_file() and store.list() == []


def test_staging_dir_is_removed_on_exception_and_on_exit(store):
    with pytest.raises(RuntimeError), store.staging_dir() as staged:
        assert staged.is_dir() and list(staged.iterdir()) == []
        assert staged.is_relative_to(store.data_dir)  # same filesystem: the commit is a rename
        (staged / "partial").write_bytes(b"x" * 100)
        raise RuntimeError("upload broke")
    assert not staged.exists()
    with store.staging_dir() as staged:
        (staged / "file").write_text("x")
    assert os.listdir(store.data_dir / "staging") == []


# ---- local directories


@pytest.fixture
def local_root(tmp_path: Path, adapter_dir: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(adapter_dir, root / "mine")
    return root


def test_register_local_inside_root_records_in_place(tmp_path, local_root, config):
    store = SQLiteAdapterStore(tmp_path / "data", allowed_roots=[local_root])
    record = store.register_local("t", "loc", local_root / "mine", config)

    assert (record.source, record.path, record.version) == ("local", local_root / "mine", 1)
    assert record.sha256 == sha256_of(local_root / "mine" / WEIGHTS_FILE)
    assert version_dirs(store.data_dir) == set()  # nothing copied
    assert SQLiteAdapterStore(store.data_dir).latest("t", "loc") == record
    assert store.delete("t", "loc") == [record]
    assert (local_root / "mine" / WEIGHTS_FILE).is_file() and (local_root / "mine" / CONFIG_FILE).is_file()


def _outside(root: Path) -> str:
    shutil.copytree(root / "mine", root.parent / "outside")
    return str(root.parent / "outside")


def _dot_dot(root: Path) -> str:
    _outside(root)
    return f"{root}/mine/../../outside"


def _symlinked_dir(root: Path) -> str:
    (root / "link").symlink_to(root / "mine")  # a symlink even to a dir inside the root is refused
    return str(root / "link")


def _symlinked_parent(root: Path) -> str:
    (root / "alias").symlink_to(root)
    return str(root / "alias" / "mine")


def _symlinked_file(root: Path) -> str:
    weights = root / "mine" / WEIGHTS_FILE
    weights.rename(root / "real.safetensors")
    weights.symlink_to(root / "real.safetensors")
    return str(root / "mine")


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (_outside, "outside the allowed roots"),
        (_dot_dot, "outside the allowed roots"),
        (_symlinked_dir, "symlink"),
        (_symlinked_parent, "symlink"),
        (_symlinked_file, "symlink"),
        (lambda root: "models/mine", "absolute"),
        (lambda root: str(root / "missing"), "not a directory"),
    ],
)
def test_register_local_refusals(tmp_path, local_root, config, make_path, message):
    store = SQLiteAdapterStore(tmp_path / "data", allowed_roots=[local_root])
    path = make_path(local_root)
    with pytest.raises(StoreError, match=message):
        store.register_local("t", "loc", path, config)
    assert store.list() == []


def test_register_local_refused_without_roots(tmp_path, local_root, config):
    store = SQLiteAdapterStore(tmp_path / "data")
    with pytest.raises(StoreError, match="no allowed roots"):
        store.register_local("t", "loc", local_root / "mine", config)


def test_register_local_refuses_the_stores_own_files(tmp_path, adapter_dir, config):
    store = SQLiteAdapterStore(tmp_path / "data", allowed_roots=[tmp_path])
    uploaded = commit_copy(store, "t", "up", adapter_dir)
    with pytest.raises(StoreError, match="data directory"):
        store.register_local("t", "loc", uploaded.path, config)


# ---- concurrency


def test_threads_committing_one_name_get_distinct_consecutive_versions(store, adapter_dir):
    barrier, records, errors = threading.Barrier(8), [], []

    def commit(i: int) -> None:
        try:
            barrier.wait()
            records.append(commit_copy(store, "t", "hot", adapter_dir, marker=(i,)))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(r.version for r in records) == list(range(1, 9))
    assert len({r.sha256 for r in records}) == 8
    assert store.versions("t", "hot") == sorted(records, key=lambda r: r.version)
    assert_consistent(store.data_dir)


def test_two_processes_committing_at_once(tmp_path, adapter_dir):
    data_dir = tmp_path / "data"
    SQLiteAdapterStore(data_dir)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=commit_many, args=(str(data_dir), str(adapter_dir), 4, barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    versions = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    assert sorted(versions[0] + versions[1]) == list(range(1, 9))
    store = assert_consistent(data_dir)
    assert [r.version for r in store.versions("t", "shared")] == list(range(1, 9))


def test_a_second_store_open_leaves_live_staging_dirs_alone(store, adapter_dir, config):
    with store.staging_dir() as staged:
        shutil.copytree(adapter_dir, staged, dirs_exist_ok=True)
        SQLiteAdapterStore(store.data_dir)  # its startup sweep must not take our upload
        assert (staged / WEIGHTS_FILE).is_file()
        assert store.commit("t", "a", staged, config).version == 1


# ---- crash safety


def test_open_removes_crash_leftovers_and_reports_missing_files(store, adapter_dir):
    kept = commit_copy(store, "t", "a", adapter_dir)
    gone = commit_copy(store, "t", "b", adapter_dir)
    orphan = shutil.copytree(kept.path, kept.path.parent / "v2")  # renamed in, never committed
    stale = store.data_dir / "staging" / "deadbeef"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half")
    (store.data_dir / "staging" / "deadbeef.lock").touch()
    shutil.rmtree(gone.path)
    store.close()

    reopened = SQLiteAdapterStore(store.data_dir)
    assert not orphan.exists() and kept.path.is_dir()
    assert os.listdir(store.data_dir / "staging") == []
    assert len(reopened.problems) == 1 and "t/b@1" in reopened.problems[0]
    assert commit_copy(reopened, "t", "a", adapter_dir).version == 2  # the orphan's number was never acked


class CrashWriter:
    """Drives the fork server of ``store_crash_child``: one writer at a time, each one killed."""

    def __init__(self, adapter_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.adapters.store_crash_child", str(adapter_dir)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        assert self.lines.get(timeout=60) == "READY\n"

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def run(self, data_dir: Path, kill_at: int = 0, kill_after_s: float = 0.0) -> list[tuple[int, str]]:
        """One writer, killed at its ``kill_at``-th step or ``kill_after_s`` after it starts; its ACKs."""
        self.process.stdin.write(f"RUN {kill_at} {data_dir}\n")
        self.process.stdin.flush()
        acks = []
        while True:
            kind, *rest = self.lines.get(timeout=60).split()
            if kind == "PID" and not kill_at:
                time.sleep(kill_after_s)
                os.kill(int(rest[0]), signal.SIGKILL)
            elif kind == "ACK":
                acks.append((int(rest[0]), rest[1]))
            elif kind == "DIED":
                assert int(rest[0]) == signal.SIGKILL
                return acks

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.pump.join(timeout=30)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def crash_writer(adapter_dir: Path) -> Iterator[CrashWriter]:
    writer = CrashWriter(adapter_dir)
    yield writer
    writer.close()


def assert_crash_state_is_whole(data_dir: Path, acked: list[tuple[int, str]]) -> None:
    """Right after a kill, before any recovery: every row points at whole files; every ACK has its row."""
    rows = []
    if (data_dir / DB_FILE).exists():  # not yet if the writer died early in its first open
        db = sqlite3.connect(data_dir / DB_FILE)
        with contextlib.closing(db), contextlib.suppress(sqlite3.OperationalError):  # no schema yet, maybe
            rows = db.execute("SELECT tenant, name, version, sha256, path FROM adapters").fetchall()
    for tenant, name, version, sha, path in rows:
        directory = data_dir / path
        assert (directory / CONFIG_FILE).is_file(), f"{tenant}/{name}@{version} lost its config"
        assert sha256_of(directory / WEIGHTS_FILE) == sha, f"{tenant}/{name}@{version} weights are not whole"
    crash_rows = {
        (version, sha) for tenant, name, version, sha, _ in rows if (tenant, name) == ("t", "crash")
    }
    assert set(acked) <= crash_rows, "an acknowledged version is lost"
    versions = [v for v, _ in acked]
    assert versions == sorted(set(versions))
    assert len({sha for _, sha in acked}) == len(acked)  # each version's content differs


def test_sigkill_at_random_times_loses_nothing_acknowledged(tmp_path, crash_writer):
    data_dir, rng, acked = tmp_path / "data", random.Random(1234), []
    for _ in range(5):
        acked += crash_writer.run(data_dir, kill_after_s=rng.uniform(0.0, 1.5))
        assert_crash_state_is_whole(data_dir, acked)
        assert_consistent(data_dir).close()
        assert_crash_state_is_whole(data_dir, acked)
    assert len(acked) > 5


def test_sigkill_at_every_step_of_commit_delete_and_recovery(tmp_path, crash_writer):
    """Each writer dies one step later than the last, so some writer dies between every two steps."""
    data_dir, acked = tmp_path / "data", []
    for kill_at in range(1, NUM_KILL_STEPS + 1):
        acked += crash_writer.run(data_dir, kill_at=kill_at)
        assert_crash_state_is_whole(data_dir, acked)  # no recovery in between: the next writer's open does it
    assert_consistent(data_dir)
    assert_crash_state_is_whole(data_dir, acked)
    assert len(acked) > 3
