"""The registry end to end: real peft files uploaded, validated, stored, served by a real engine."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from adapters.cache import AdapterState
from adapters.errors import AdapterFormatError, AdapterTooLargeError, UnknownAdapterError
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, FormatLimits
from adapters.registry import AdapterRegistry
from adapters.store import SQLiteAdapterStore
from server.engine.sampler import SamplingParams
from tests.adapters.hostile import CASES, MAX_LORA_RANK, tiny_base_model
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import make_core, run_to_completion

GREEDY = dict(temperature=0.0)


def files_of(directory: Path) -> dict[str, io.BytesIO]:
    return {name: io.BytesIO((directory / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}


@functools.cache
def _saved(seed: int) -> Path:
    out = Path(tempfile.mkdtemp(prefix=f"registry-adapter-{seed}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return save_peft_adapter(tiny_base_model(), out, seed=seed, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip


def adapter(tmp_path: Path, label: str, seed: int = 0) -> Path:
    """A real peft adapter (random non-zero A and B drawn from ``seed``) copied to tmp_path/label."""
    return Path(shutil.copytree(_saved(seed), tmp_path / label))


def stored_files(data_dir: Path) -> list[Path]:
    """Adapter files under the data dir (the metadata database aside)."""
    return [p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith("loraplex.sqlite3")]


@pytest.fixture
def core():
    return make_core(tiny_base_model(), max_loras=2, max_lora_rank=MAX_LORA_RANK)


@pytest.fixture
def registry(tmp_path, core) -> AdapterRegistry:
    store = SQLiteAdapterStore(tmp_path / "data", allowed_roots=[tmp_path / "roots"])
    reg = AdapterRegistry(store, MAX_LORA_RANK, check=core.slot_writer.validate)
    reg.attach(core.adapters)
    return reg


def generate(core, adapter_id: str | None, request_id: str = "r") -> list[int]:
    core.add_request(request_id, [256, 5, 6, 7], SamplingParams(max_tokens=6, **GREEDY), adapter_id)
    return [t for d in run_to_completion(core)[request_id] for t in d.token_ids]


def test_upload_stores_a_version_and_serves_it(registry, core, tmp_path):
    source = adapter(tmp_path, "a", seed=1)
    record = registry.upload("acme", "bot", files_of(source))
    assert (record.tenant, record.name, record.version, record.rank) == ("acme", "bot", 1, 4)
    assert registry.resolve("acme", "bot") == record and registry.list() == [record]
    assert core.adapters.state(record.adapter_id) is AdapterState.IN_HOST
    served = generate(core, record.adapter_id)
    core.add_adapter("direct", source)
    assert served == generate(core, "direct", "r2"), "an upload serves exactly what the files say"
    assert served != generate(core, None, "r3")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_upload_is_rejected_and_leaves_nothing_behind(core, tmp_path, case):
    store = SQLiteAdapterStore(tmp_path / "data")
    limits = FormatLimits(max_weights_bytes=16 * 1024**2)  # the sparse 2 GiB case stops after 16 MiB
    registry = AdapterRegistry(store, MAX_LORA_RANK, check=core.slot_writer.validate, limits=limits)
    bad = tmp_path / "bad"
    bad.mkdir()
    case.build(bad)
    with contextlib.ExitStack() as stack:  # streamed from disk: one case is a sparse 2 GiB file
        sent = [p for p in bad.iterdir() if p.is_file() and p.name != "README.md"]  # peft writes one
        files = {p.name: stack.enter_context(open(p, "rb")) for p in sent}
        with pytest.raises(AdapterFormatError) as error:
            registry.upload("acme", "bot", files)
    if case.id == "weights-too-large":
        assert isinstance(error.value, AdapterTooLargeError)
    elif set(files) == {CONFIG_FILE, WEIGHTS_FILE}:
        assert case.reason in str(error.value)
    assert registry.list() == [] and stored_files(tmp_path / "data") == []


def test_adapter_for_another_base_model_is_rejected(registry, tmp_path):
    from tests.engine.tiny import write_tiny_llama

    other_base = write_tiny_llama(tmp_path / "wide", seed=1, hidden_size=96, intermediate_size=128)
    wrong = save_peft_adapter(other_base, tmp_path / "wrong", seed=0, r=4, target_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match="do not match the base model"):
        registry.upload("acme", "bot", files_of(wrong))
    assert registry.list() == [] and stored_files(tmp_path / "data") == []


@pytest.mark.parametrize(
    "names, reason",
    [
        ({CONFIG_FILE}, "missing file"),
        ({CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"}, "pickle files are refused"),
        ({CONFIG_FILE, WEIGHTS_FILE, "../../etc/passwd"}, "unexpected file"),
    ],
)
def test_upload_file_set_is_exactly_the_two_peft_files(registry, tmp_path, names, reason):
    source = adapter(tmp_path, "a")
    files = {n: io.BytesIO((source / n).read_bytes() if (source / n).exists() else b"x") for n in names}
    with pytest.raises(AdapterFormatError, match=reason):
        registry.upload("acme", "bot", files)
    assert stored_files(tmp_path / "data") == []


def test_oversized_upload_is_cut_off_while_streaming(tmp_path, core):
    store = SQLiteAdapterStore(tmp_path / "data")
    limits = FormatLimits(max_weights_bytes=1024)
    registry = AdapterRegistry(store, MAX_LORA_RANK, check=core.slot_writer.validate, limits=limits)
    with pytest.raises(AdapterTooLargeError, match="over the limit of 1024 bytes"):
        registry.upload("acme", "bot", files_of(adapter(tmp_path, "a")))
    assert stored_files(tmp_path / "data") == []


@pytest.mark.parametrize("tenant, name", [("acme", "../x"), ("a/b", "bot"), ("acme", ""), ("", "bot")])
def test_bad_names_are_refused(registry, tmp_path, tenant, name):
    with pytest.raises(AdapterFormatError, match=r"may only contain|non-empty"):
        registry.upload(tenant, name, files_of(adapter(tmp_path, "a")))


def test_tenants_are_isolated(registry, tmp_path):
    acme = registry.upload("acme", "bot", files_of(adapter(tmp_path, "a", seed=1)))
    globex = registry.upload("globex", "bot", files_of(adapter(tmp_path, "b", seed=2)))
    assert acme.sha256 != globex.sha256 and acme.adapter_id != globex.adapter_id
    assert registry.list("acme") == [acme] and registry.list("globex") == [globex]
    registry.delete("acme", "bot")
    with pytest.raises(UnknownAdapterError):
        registry.resolve("acme", "bot")
    assert registry.resolve("globex", "bot") == globex


def test_new_version_while_in_use_running_request_finishes_on_the_old(registry, core, tmp_path):
    old_dir, new_dir = adapter(tmp_path, "old", seed=1), adapter(tmp_path, "new", seed=2)
    core.add_adapter("ref-old", old_dir)
    core.add_adapter("ref-new", new_dir)
    expected_old, expected_new = generate(core, "ref-old", "x"), generate(core, "ref-new", "y")
    v1 = registry.upload("acme", "bot", files_of(old_dir))
    core.add_request("running", [256, 5, 6, 7], SamplingParams(max_tokens=6, **GREEDY), v1.adapter_id)
    tokens = [t for d in core.step() for t in d.token_ids]  # prefill on version 1
    v2 = registry.upload("acme", "bot", files_of(new_dir))
    assert registry.resolve("acme", "bot") == v2 and not core.adapters.is_registered(v1.adapter_id)
    fresh = SamplingParams(max_tokens=6, **GREEDY)
    core.add_request("fresh", [256, 5, 6, 7], fresh, v2.adapter_id)  # runs alongside "running"
    results = run_to_completion(core)
    tokens += [t for d in results["running"] for t in d.token_ids]
    assert tokens == expected_old, "the running request finished on version 1"
    assert [t for d in results["fresh"] for t in d.token_ids] == expected_new
    assert [v.version for v in registry.versions("acme", "bot")] == [1, 2]


def test_delete_while_in_use_lets_running_request_finish(registry, core, tmp_path):
    source = adapter(tmp_path, "a", seed=3)
    core.add_adapter("ref", source)
    expected = generate(core, "ref", "x")
    record = registry.upload("acme", "bot", files_of(source))
    core.add_request("running", [256, 5, 6, 7], SamplingParams(max_tokens=6, **GREEDY), record.adapter_id)
    tokens = [t for d in core.step() for t in d.token_ids]
    registry.delete("acme", "bot")
    assert stored_files(tmp_path / "data") == [], "the uploaded files are gone"
    tokens += [t for d in run_to_completion(core)["running"] for t in d.token_ids]
    assert tokens == expected
    assert core.adapters.host_bytes() == core.adapters.status("ref").host_bytes, "version freed"


def test_parallel_uploads_of_one_name_each_get_a_version(registry, core, tmp_path):
    sources = [adapter(tmp_path, f"a{i}", seed=i) for i in range(6)]
    records, errors = [], []

    def upload(source: Path) -> None:
        try:
            records.append(registry.upload("acme", "bot", files_of(source)))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(s,)) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.version for r in records) == list(range(1, 7))
    latest = registry.resolve("acme", "bot")
    assert latest.version == 6
    served = [i for i in core.adapters.registered_ids() if i.startswith("acme/bot@")]
    assert served == [latest.adapter_id], "only the newest version takes requests"


def test_restart_finds_every_adapter_and_loads_it_lazily(registry, tmp_path):
    records = [
        registry.upload("acme", f"bot{i}", files_of(adapter(tmp_path, f"a{i}", seed=i))) for i in range(3)
    ]
    core = make_core(tiny_base_model(), max_loras=2, max_lora_rank=MAX_LORA_RANK)
    again = AdapterRegistry(SQLiteAdapterStore(tmp_path / "data"), MAX_LORA_RANK, core.slot_writer.validate)
    again.attach(core.adapters)
    assert again.list() == records
    assert all(core.adapters.state(r.adapter_id) is AdapterState.ON_DISK for r in records)
    assert generate(core, records[0].adapter_id) != generate(core, None, "base")


def test_register_local_stays_inside_the_allowed_roots(registry, tmp_path):
    inside = adapter(tmp_path / "roots", "mine", seed=4)
    record = registry.register_local("acme", "local-bot", inside)
    assert record.source == "local" and record.path == inside.resolve()
    outside = adapter(tmp_path, "elsewhere")
    with pytest.raises(ValueError, match="allowed"):
        registry.register_local("acme", "x", outside)
    with pytest.raises(ValueError, match="allowed"):
        registry.register_local("acme", "x", tmp_path / "roots" / ".." / "elsewhere")
    registry.delete("acme", "local-bot")
    assert (inside / WEIGHTS_FILE).exists(), "a registered local directory is never deleted"
