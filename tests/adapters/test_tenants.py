"""API keys → tenant and role (hashed keys file, constant-time compare, atomic appends) and name scoping."""

from __future__ import annotations

import hmac
import json
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.errors import KeysFileError, UnknownAdapterError
from adapters.tenant_limits import TenantLimits
from adapters.tenants import (
    SINGLE_TENANT,
    KeyRing,
    Principal,
    add_key,
    can_see,
    hash_key,
    parse_model_name,
    set_tenant_limits,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ACME_USER = Principal(tenant="acme", role="user")
ROOT = Principal(tenant="ops", role="admin")


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


def write_keys(path: Path, entries: object) -> Path:
    path.write_text(json.dumps(entries))
    return path


def entry(tenant: str = "acme", role: str = "user", key: str = "k", **extra) -> dict:
    return {"sha256": hash_key(key), "tenant": tenant, "role": role, **extra}


def test_add_load_authenticate_round_trip(keys_file):
    user_key = add_key(keys_file, "acme", "user", label="alice")
    admin_key = add_key(keys_file, "ops", "admin")
    ring = KeyRing.load(keys_file)
    assert len(ring) == 2 and user_key.startswith("lpx-") and user_key != admin_key
    assert ring.authenticate(user_key) == ACME_USER and not ring.authenticate(user_key).is_admin
    assert ring.authenticate(admin_key) == ROOT and ring.authenticate(admin_key).is_admin
    assert [e.label for e in ring.entries] == ["alice", None]


@pytest.mark.parametrize("presented", [None, "", "lpx-wrong", "k", "lpx-é\x00"])
def test_unknown_empty_or_missing_keys_authenticate_as_nobody(keys_file, presented):
    add_key(keys_file, "acme")
    assert KeyRing.load(keys_file).authenticate(presented) is None


def test_the_file_stores_hashes_only_with_mode_0600(keys_file):
    key = add_key(keys_file, "acme")
    raw = keys_file.read_bytes()
    assert key.encode() not in raw and key[4:].encode() not in raw
    assert json.loads(raw)["keys"][0]["sha256"] == hash_key(key)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    add_key(keys_file, "acme")  # a rewrite keeps the mode
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


def test_authenticate_compares_against_every_entry(keys_file, monkeypatch):
    keys = [add_key(keys_file, f"t{i}") for i in range(5)]
    ring = KeyRing.load(keys_file)
    calls = []
    original = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert ring.authenticate(keys[0]) == Principal(tenant="t0", role="user")  # first entry matches
    assert len(calls) == len(ring) == 5
    assert ring.authenticate("lpx-unknown") is None
    assert len(calls) == 10


def test_concurrent_add_key_from_threads_all_land(keys_file):
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda i: add_key(keys_file, f"tenant-{i}"), range(8)))
    ring = KeyRing.load(keys_file)
    assert len(ring) == 8
    assert {ring.authenticate(key).tenant for key in keys} == {f"tenant-{i}" for i in range(8)}


def test_concurrent_add_key_from_processes_all_land(keys_file):
    script = textwrap.dedent(f"""
        import sys
        from adapters.tenants import add_key
        for i in range(20):
            print(add_key({str(keys_file)!r}, sys.argv[1]), flush=True)
    """)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, tenant], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for tenant in ("acme", "globex")
    ]
    outputs = [worker.communicate(timeout=120)[0].split() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    ring = KeyRing.load(keys_file)
    assert len(ring) == 40
    for tenant, keys in zip(("acme", "globex"), outputs, strict=True):
        assert len(keys) == 20 and all(ring.authenticate(key).tenant == tenant for key in keys)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", '"keys" list'),
        ('{"keys": {}}', '"keys" list'),
        ('{"keys": [], "extra": 1}', "unknown top-level fields"),
        ([entry(), "x"], r"keys\[1\]: must be a JSON object"),
        ([{"tenant": "a", "role": "user"}], r"keys\[0\]: missing fields \['sha256'\]"),
        ([entry(sha256="ab" * 31)], r"keys\[0\]: sha256 must be 64 lowercase hex"),
        ([entry(sha256=hash_key("k").upper())], r"keys\[0\]: sha256 must be 64 lowercase hex"),
        ([entry(), entry(role="root", key="k2")], r"keys\[1\]: role must be one of user, admin"),
        ([entry(tenant="a/b")], r"keys\[0\]: tenant 'a/b' may only contain"),
        ([entry(tenant="")], r"keys\[0\]: tenant must be a non-empty string"),
        ([entry(), entry()], r"keys\[1\]: sha256 duplicates keys\[0\]"),
        ([entry(teant="x")], r"keys\[0\]: unknown fields \['teant'\]"),
        ([entry(label=7)], r"keys\[0\]: label must be a string"),
        ('{"keys": [], "tenants": []}', '"tenants" must be a JSON object'),
        ('{"keys": [], "tenants": {"a/b": {}}}', r"tenants\['a/b'\]: tenant 'a/b' may only contain"),
        ('{"keys": [], "tenants": {"acme": 5}}', r"tenants\['acme'\]: must be a JSON object"),
        ('{"keys": [], "tenants": {"acme": {"rpm": 0}}}', r"tenants\['acme'\]: rpm must be an integer"),
        ('{"keys": [], "tenants": {"acme": {"tpm": 1.5}}}', r"tpm must be an integer"),
        ('{"keys": [], "tenants": {"acme": {"max_concurrent": true}}}', r"max_concurrent must be an integer"),
        ('{"keys": [], "tenants": {"acme": {"weight": 0}}}', r"weight must be a number in \(0"),
        ('{"keys": [], "tenants": {"acme": {"weight": "2"}}}', r"weight must be a number"),
        ('{"keys": [], "tenants": {"acme": {"burst": 2}}}', r"unknown tenant limits \['burst'\]"),
    ],
)
def test_malformed_keys_files_are_refused_naming_the_problem(keys_file, content, message):
    keys_file.write_text(content if isinstance(content, str) else json.dumps({"keys": content}))
    with pytest.raises(KeysFileError, match=message) as info:
        KeyRing.load(keys_file)
    assert str(keys_file) in str(info.value)


def test_a_missing_file_is_a_keys_file_error(keys_file):
    with pytest.raises(KeysFileError, match="cannot be read"):
        KeyRing.load(keys_file)


def test_optional_label_and_created_at_are_tolerated(keys_file):
    write_keys(keys_file, {"keys": [entry(label="ci", created_at="2025-01-01T00:00:00+00:00")]})
    assert KeyRing.load(keys_file).authenticate("k") == ACME_USER


def test_add_key_refuses_bad_arguments_and_leaves_a_broken_file_alone(keys_file):
    with pytest.raises(ValueError, match="tenant"):
        add_key(keys_file, "../x")
    with pytest.raises(ValueError, match="role"):
        add_key(keys_file, "acme", "root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label"):
        add_key(keys_file, "acme", label="a\nb")
    assert not keys_file.exists()
    keys_file.write_text("{broken")
    with pytest.raises(KeysFileError, match="not valid JSON"):
        add_key(keys_file, "acme")
    assert keys_file.read_text() == "{broken"


def test_maybe_reload_picks_up_a_key_added_after_load(keys_file):
    first = add_key(keys_file, "acme")
    ring = KeyRing.load(keys_file)
    assert ring.maybe_reload() is False
    second = add_key(keys_file, "globex")
    assert ring.authenticate(second) is None
    assert ring.maybe_reload() is True
    assert ring.authenticate(second).tenant == "globex" and ring.authenticate(first) == ACME_USER
    assert ring.maybe_reload() is False


def test_a_bad_reload_keeps_the_old_keys_and_reports_once(keys_file):
    key = add_key(keys_file, "acme")
    ring = KeyRing.load(keys_file)
    keys_file.write_text('{"keys": "oops"}')
    with pytest.raises(KeysFileError):
        ring.maybe_reload()
    assert ring.maybe_reload() is False  # same bad file: not reported again
    assert ring.authenticate(key) == ACME_USER
    os.unlink(keys_file)
    with pytest.raises(KeysFileError):
        ring.reload()
    assert ring.authenticate(key) == ACME_USER


@pytest.mark.parametrize(
    ("principal", "model", "expected"),
    [
        (ACME_USER, "support-bot", ("acme", "support-bot")),
        (ACME_USER, "acme/support-bot", ("acme", "support-bot")),
        (ROOT, "support-bot", ("ops", "support-bot")),
        (ROOT, "globex/support-bot", ("globex", "support-bot")),
        (SINGLE_TENANT, "bot", ("default", "bot")),
    ],
)
def test_parse_model_name_resolves_visible_names(principal, model, expected):
    assert parse_model_name(principal, model) == expected


@pytest.mark.parametrize(
    "model", ["globex/support-bot", "a/b/c", "../x", "", "/x", "acme/", ".hidden", "x" * 65]
)
def test_parse_model_name_hides_other_tenants_and_invalid_names(model):
    with pytest.raises(UnknownAdapterError) as info:
        parse_model_name(ACME_USER, model)
    # the API's message for any unknown model (server/api/errors.py model_not_found)
    assert str(info.value) == f"The model {model!r} does not exist."
    assert info.value.model == model and isinstance(info.value, LookupError)


def test_another_tenants_adapter_reads_like_an_unknown_one():
    with pytest.raises(UnknownAdapterError) as other:
        parse_model_name(ACME_USER, "globex/bot")
    with pytest.raises(UnknownAdapterError) as unknown:
        parse_model_name(ACME_USER, "acme/bot/")
    assert str(other.value).replace("globex/bot", "X") == str(unknown.value).replace("acme/bot/", "X")


def test_can_see():
    assert can_see(ACME_USER, "acme") and not can_see(ACME_USER, "globex")
    assert can_see(ROOT, "acme") and can_see(SINGLE_TENANT, "anyone")


def test_principal_validates_itself():
    assert SINGLE_TENANT.is_admin and SINGLE_TENANT.tenant == "default"
    with pytest.raises(ValueError, match="role"):
        Principal(tenant="acme", role="owner")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tenant"):
        Principal(tenant="a b", role="user")


def test_tenant_limits_are_kept_beside_the_keys_and_reload(keys_file):
    """add_key and set_tenant_limits write a tenant's limits; a reload sees the change; a limit set
    to None goes, and a tenant back at the defaults leaves no entry."""
    key = add_key(keys_file, "acme", limits={"rpm": 60, "weight": 2.0})
    add_key(keys_file, "globex")
    ring = KeyRing.load(keys_file)
    assert ring.limits("acme") == TenantLimits(rpm=60, weight=2.0)
    assert ring.limits("globex") == ring.limits("nobody") == TenantLimits()
    assert set_tenant_limits(keys_file, "acme", {"rpm": None, "tpm": 1000}) == TenantLimits(
        tpm=1000, weight=2.0
    )
    assert ring.maybe_reload() and ring.limits("acme") == TenantLimits(tpm=1000, weight=2.0)
    assert ring.authenticate(key) == ACME_USER
    set_tenant_limits(keys_file, "acme", {"tpm": None, "weight": 1.0})
    assert "tenants" not in json.loads(keys_file.read_text())


def test_set_tenant_limits_refuses_bad_changes_and_leaves_the_file_alone(keys_file):
    add_key(keys_file, "acme", limits={"rpm": 5})
    before = keys_file.read_text()
    for tenant, changes, message in (
        ("ghost", {"rpm": 1}, "has no key"),
        ("acme", {"rpm": -1}, "rpm must be"),
        ("acme", {"weight": float("nan")}, "weight must be"),
        ("acme", {"speed": 1}, "unknown tenant limits"),
    ):
        with pytest.raises(ValueError, match=message):
            set_tenant_limits(keys_file, tenant, changes)
    assert keys_file.read_text() == before
