"""Pages as a browser shows them (the report, the dashboard): Debian's chromium through Playwright.

Every visit records the console errors and page errors, and every request that leaves the page's own origin (the
machine is offline: nothing may be fetched from outside), runs a script that reports what the page draws, and
leaves a screenshot under test-artifacts/ for a human to look at."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conftest import ARTIFACTS
from playwright.sync_api import Browser, Page

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DRAWN = """() => ({
    charts: [...document.querySelectorAll('.chart svg')].map(svg => svg.querySelectorAll('circle, path, use').length),
    tables: [...document.querySelectorAll('table')].map(t => t.rows.length - 1),
    overflow: document.scrollingElement.scrollWidth > innerWidth,
    text: document.body.innerText})"""
"""What a page draws: marks per chart, rows per table, whether it is wider than the screen, and its text."""


@dataclass
class Visit:
    page: Page
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def drawn(self) -> dict[str, Any]:
        return self.page.evaluate(DRAWN)

    def screenshot(self, folder: str, name: str) -> None:
        (ARTIFACTS / folder).mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / folder / f"{name}.png"), full_page=True)


def visit(browser: Browser, url: str, viewport: dict[str, int] = DESKTOP) -> Visit:
    page = browser.new_page(viewport=viewport)
    seen = Visit(page)
    origin = urlsplit(url)[:2]
    page.on("console", lambda message: seen.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    page.on("request", lambda request: None if urlsplit(request.url)[:2] == origin or request.url.startswith("data:")
            else seen.outside.append(request.url))
    page.goto(url)
    return seen


def open_report(browser: Browser, path: Path, name: str) -> dict[str, Any]:
    """The report as a colleague's browser shows it, with a screenshot under test-artifacts/report/."""
    seen = visit(browser, path.as_uri())
    drawn = seen.drawn()
    seen.screenshot("report", name)
    return drawn | {"errors": seen.errors, "outside": seen.outside}


def dashboard_page(browser: Browser, url: str, name: str, viewport: dict[str, int] = DESKTOP) -> dict[str, Any]:
    """A dashboard page once its script has drawn it (a page that fails to load shows no heading), with a
    screenshot under test-artifacts/dashboard/."""
    seen = visit(browser, url, viewport)
    seen.page.wait_for_selector("main h2", timeout=20_000)
    drawn = seen.drawn()
    seen.screenshot("dashboard", name)
    seen.page.close()
    return drawn | {"errors": seen.errors, "outside": seen.outside}


def watch_live_run(browser: Browser, base: str, run_id: str, name: str) -> dict[str, Any]:
    """The live page until the run's card is there and its loss curve has grown by a server-sent update."""
    seen = visit(browser, f"{base}/live")
    curve = f'[data-run="{run_id}"] path.curve'
    seen.page.wait_for_selector(curve, timeout=30_000)
    before = int(seen.page.get_attribute(curve, "data-points") or 0)
    seen.page.wait_for_function(f"document.querySelector('{curve}').dataset.points > {before}", timeout=30_000)
    after = int(seen.page.get_attribute(curve, "data-points") or 0)
    seen.screenshot("dashboard", name)
    seen.page.close()
    return {"before": before, "after": after, "errors": seen.errors, "outside": seen.outside}


def live_card(browser: Browser, base: str, run_id: str, name: str) -> dict[str, Any]:
    """A run's card on the live page: its curve, the evaluator's forecasts, threshold and abort mark."""
    seen = visit(browser, f"{base}/live")
    card = f'[data-run="{run_id}"]'
    seen.page.wait_for_selector(f"{card} svg", timeout=30_000)
    drawn = seen.page.evaluate(f"""() => {{
        const card = document.querySelector('{card}');
        const count = (selector) => card.querySelectorAll(selector).length;
        return {{curve: count('path.curve'), forecasts: count('circle.forecast'), band: count('polygon.band'),
                 interval: count('line.interval'), threshold: count('line.threshold'), abort: count('line.abort-mark'),
                 text: card.innerText}};
    }}""")
    seen.screenshot("dashboard", name)
    seen.page.close()
    return drawn | {"errors": seen.errors, "outside": seen.outside}
