"""The ops dashboard in a real headless browser (Debian's chromium, driven by Playwright).

A real ``loraplex serve`` process with API keys and a preloaded peft adapter gets real traffic;
then the page is opened, refuses to show data until an admin key is typed in, and shows non-zero
figures, drawn charts and the adapter that was used. A screenshot is written to
``$LORAPLEX_TEST_OUTPUT`` (default: ``test-output/`` in the repository) for a human to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters.tenants import add_key
from tests.api.server_process import REPO_ROOT, ServerProcess, running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
CHROMIUM_ARGS = [  # no background traffic: this machine's network is closed
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
ADAPTER = "support-bot"
OUTPUT_DIR = Path(os.environ.get("LORAPLEX_TEST_OUTPUT", REPO_ROOT / "test-output"))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("dashboard-browser")
    model = write_tiny_llama(root / "model")
    adapter = save_peft_adapter(model, root / "adapter", seed=9, r=4, target_modules=["q_proj", "v_proj"])
    keys = {
        "admin": add_key(root / "keys.json", "ops", "admin"),
        "user": add_key(root / "keys.json", "acme", "user"),
    }
    args = [
        "--model", str(model), "--served-model-name", "tiny", "--keys-file", str(root / "keys.json"),
        "--adapter", f"{ADAPTER}={adapter}", "--data-dir", str(root / "data"), "--max-lora-rank", "8",
        "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    with running_server(args, root / "server.log") as server:
        yield server, keys


def send_traffic(server: ServerProcess, key: str) -> int:
    """A few completions on the adapter and the base model; the tokens they generated."""
    tokens = 0
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        adapter_id = next(m for m in models if m.endswith(ADAPTER))
        for model in (adapter_id, adapter_id, adapter_id, "tiny"):
            body = {"model": model, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            tokens += response.json()["usage"]["completion_tokens"]
    return tokens


def number_in(text: str) -> float:
    match = re.search(r"[\d.]+", text)
    assert match, f"no number in {text!r}"
    return float(match.group())


def test_dashboard_shows_live_traffic_and_the_adapter_used(served):
    server, keys = served
    assert send_traffic(server, keys["admin"]) == 32
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{server.url}/dashboard")

            # No key: the page asks for one and shows nothing. A user's key is refused.
            sync_api.expect(page.locator("#key-form")).to_be_visible()
            page.fill("#key-input", keys["user"])
            page.click("#key-form button[type=submit]")
            sync_api.expect(page.locator("#key-error")).to_contain_text("admin")
            assert page.locator("#tokens-per-s").inner_text() == "–"

            page.fill("#key-input", keys["admin"])
            page.click("#key-form button[type=submit]")
            sync_api.expect(page.locator("#status")).to_have_text("live")
            sync_api.expect(page.locator("#key-form")).to_be_hidden()
            row = page.locator("#busiest-adapters tbody tr", has_text=ADAPTER)
            sync_api.expect(row).to_have_count(1)
            cells = row.locator("td").all_inner_texts()
            assert cells[3:5] == ["3", "24"], cells  # 3 requests, 24 tokens on the adapter

            assert number_in(page.locator("#tokens-per-s").inner_text()) > 0
            assert number_in(page.locator("#requests-per-s").inner_text()) > 0
            assert "ms" in page.locator("#ttft").inner_text() or " s" in page.locator("#ttft").inner_text()
            assert page.locator("#tokens-total").inner_text() == "32 tokens"
            assert page.locator("#adapters-registered").inner_text() == "1"
            assert page.locator("#chart-tokens polyline, #chart-tokens circle").count() >= 1
            sync_api.expect(page.locator("#busiest-tenants tbody")).to_contain_text("ops")

            page.fill("#search", "SUPPORT")
            sync_api.expect(page.locator("#search-count")).to_have_text("1 match")
            sync_api.expect(page.locator("#search-results tbody tr", has_text=ADAPTER)).to_have_count(1)

            OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
            shot = OUTPUT_DIR / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")
            assert shot.stat().st_size > 10_000
            assert not [e for e in console_errors if "401" not in e and "403" not in e], console_errors
        finally:
            browser.close()
