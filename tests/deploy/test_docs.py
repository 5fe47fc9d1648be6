"""docs/operations.md lists every metric the server exposes and every alert in alerts.yml."""

from __future__ import annotations

import re

from tests.deploy.files import ALERTS, REPO_ROOT, load_yaml

OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def documented_names() -> set[str]:
    """Names in backticks at the start of a table row: | `name` | ..."""
    return set(re.findall(r"^\| `([^`]+)` \|", OPERATIONS.read_text(), flags=re.MULTILINE))


def test_every_exposed_metric_is_documented(served):
    documented = {name.removesuffix("_total") for name in documented_names()}  # families: no _total
    missing = sorted(served.family_names - documented)
    assert not missing, f"{OPERATIONS.name} does not list {missing}"
    stale = sorted({name for name in documented if name.startswith("loraplex_")} - served.family_names)
    assert not stale, f"{OPERATIONS.name} lists metrics the server does not expose: {stale}"


def test_every_alert_is_documented():
    alerts = {rule["alert"] for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]}
    assert alerts <= documented_names()
