"""The chat page in a real headless browser (Debian's chromium, driven by Playwright): it streams an
answer, shows the speed, strategy and acceptance rate, keeps the conversation so the follow-up
hits the prefix cache, and fetches nothing from the internet. The test leaves a screenshot in
results/chat_page.png ($GEARSHIFT_SCREENSHOT overrides)."""

import os
import shutil
from pathlib import Path

import pytest

from gearshift import LLM
from gearshift.server import ServerConfig, create_app
from test_server import running, wait_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt install chromium; .ci/run installs it)")


def test_chat_page_streams_keeps_the_conversation_and_reports(llm):
    from playwright.sync_api import sync_playwright

    app = create_app(lambda: LLM(llm.loaded, max_num_seqs=2, max_model_len=2048), ServerConfig(model_name="smollm2"))
    shot = Path(
        os.environ.get("GEARSHIFT_SCREENSHOT", Path(__file__).resolve().parents[1] / "results" / "chat_page.png")
    )
    shot.parent.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    with running(app) as url, sync_playwright() as pw:
        wait_ready(url)
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('smollm2')")
            page.select_option("#strategy", "lookup")
            page.fill("#max", "40")
            page.fill("#input", "Name three primary colors.")
            page.keyboard.press("Enter")
            page.wait_for_selector(".assistant[data-done='1']", timeout=60_000)
            first = page.locator(".assistant").nth(0)
            stats = first.locator(".stats")
            assert first.locator(".text").inner_text().strip()
            assert stats.get_attribute("data-strategy") == "lookup"
            assert "tok/s" in stats.inner_text() and "acceptance" in stats.inner_text()

            page.fill("#input", "Which one is your favourite?")
            page.click("#send")
            page.wait_for_selector(".assistant:nth-of-type(4)[data-done='1']", timeout=60_000)
            second = page.locator(".assistant").nth(1)
            assert second.locator(".text").inner_text().strip()
            assert int(second.locator(".stats").get_attribute("data-cached")) > 0  # the first turn came from the cache
            assert page.locator(".msg").count() == 4 and page.locator(".error").count() == 0
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert outside == []
