"""The HTML report opened in a real headless browser (the system's Chromium, driven by
Playwright): its tables have the leaderboard's rows and its plots render with a size."""
from __future__ import annotations

import shutil

import pytest

from .test_results import _seeded_store


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on this machine (scripts/setup_env.sh test installs Debian's chromium where "
                    "it may install packages)")
    return path


def test_the_report_renders_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    from harness.store.html_report import write_report
    df = _seeded_store(3)
    _, page_file = write_report(df, tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(page_file.as_uri())
        rows = page.locator("table.leaderboard tbody tr")
        assert rows.count() == 3                                # teacher, student alone, fgd
        assert rows.nth(2).locator("td").first.inner_text() == "fgd"
        assert "yes" in rows.nth(2).inner_text()
        plots = page.locator("figure.plot svg")
        assert plots.count() == 3
        for i in range(3):
            box = plots.nth(i).bounding_box()
            assert box is not None and box["width"] > 100 and box["height"] > 100
        assert page.locator("h1").inner_text() == "Leaderboard"
        browser.close()
