"""Driving Chromium (Debian's, through Playwright) for the browser tests: a visit that records what would make a
page wrong for a user; screenshots go to var/screenshots/ (git-ignored)."""

from __future__ import annotations

import json

from settings import ROOT

SCREENSHOTS = ROOT / "var" / "screenshots"
# As root, chromium needs --no-sandbox; the rest keep it from calling home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
# Every change of a chart's point count, recorded from the page's first moment.
RECORD_POINTS = """
window.__points = [];
new MutationObserver((changes) => {
  for (const c of changes) window.__points.push(Number(c.target.dataset.points));
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-points"]});
"""


class Visit:
    """A browser context on the platform that records what would make the page wrong for a user."""

    def __init__(self, browser, base_url: str, viewport: dict, mobile: bool = False, token: str | None = None,
                 refresh: str | None = None) -> None:
        self.base = base_url
        self.context = browser.new_context(viewport=viewport, is_mobile=mobile, has_touch=mobile,
                                           accept_downloads=True)
        self.context.add_init_script(RECORD_POINTS)
        if token:  # signed in already, as after the sign-in form
            saved = json.dumps({"token": token, "username": "ann", "expiresAt": 4102444800000, "refresh": refresh,
                                "refreshExpiresAt": 4102444800000 if refresh else 0})
            self.context.add_init_script(f"localStorage.setItem('peertrain.auth', {json.dumps(saved)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", self._request)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _request(self, request) -> None:
        url = request.url
        if not (url.startswith(self.base + "/") or url.startswith(("data:", "blob:"))):
            self.foreign.append(url)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

    def check(self, *expected: str) -> None:
        """Nothing from other origins; no error in the console but those `expected` (each once)."""
        assert self.foreign == [], f"the page requested other origins: {self.foreign}"
        errors = list(self.errors)
        for text in expected:
            found = [e for e in errors if text in e]
            assert len(found) == 1, (text, errors)
            errors.remove(found[0])
        assert errors == [], f"the page logged errors: {errors}"

    def close(self) -> None:
        self.context.close()
