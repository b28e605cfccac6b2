"""The dashboard page and /docs are served whole by the API: every file they load is ours, none from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit


class Assets(HTMLParser):
    """The URLs a page loads: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"])
        elif tag == "link" and found.get("href"):
            self.urls.append(found["href"])
        elif tag == "img" and found.get("src"):
            self.urls.append(found["src"])


def loaded(html: str) -> list[str]:
    parser = Assets()
    parser.feed(html)
    return parser.urls


MODULE_IMPORT = re.compile(r"""^import\s[^;]*?from\s+"([^"]+)";""", re.M | re.S)


def fetch_all(client, page: str, urls: list[str]) -> dict[str, bytes]:
    """GET every URL (and, for JavaScript modules, what they import); all must be same-origin and 200."""
    bodies: dict[str, bytes] = {}
    todo = [urljoin(page, url) for url in urls]
    while todo:
        url = todo.pop()
        if url in bodies or url.startswith("data:"):
            continue
        parts = urlsplit(url)
        assert not parts.netloc or parts.netloc == "localhost", f"{page} loads {url} from another origin"
        with client.get(parts.path) as response:  # a static file stays open until its response is closed
            assert response.status_code == 200, url
            bodies[url] = response.data
        if url.endswith(".js") and "/dashboard/" in url:
            todo += [urljoin(url, target) for target in MODULE_IMPORT.findall(bodies[url].decode())]
    return bodies


def test_the_dashboard_page_loads_only_files_of_its_own_origin(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    bodies = fetch_all(client, "http://localhost/", loaded(response.text))
    names = {urlsplit(url).path.rsplit("/", 1)[-1] for url in bodies}
    # The charting library, the app and every view it imports.
    assert {"uPlot.iife.min.js", "uPlot.min.css", "app.js", "api.js", "events.js", "session.js",
            "new-session.js", "style.css"} <= names


def test_the_api_docs_load_swagger_ui_from_this_server(client):
    response = client.get("/docs")
    assert response.status_code == 200
    urls = loaded(response.text)
    assert urls, response.text
    bodies = fetch_all(client, "http://localhost/docs", urls)
    assert any(url.endswith("swagger-ui-bundle.js") for url in bodies)
    # The validator badge would load an image from swagger.io.
    assert '"validatorUrl": null' in response.text
    # Browsers ask for /favicon.ico on every page; a 404 there is an error in the page's console.
    with client.get("/favicon.ico") as icon:
        assert icon.status_code == 200 and icon.mimetype == "image/svg+xml"


def test_the_vendored_libraries_keep_their_licences(client):
    for path in ("/static/vendor/uplot/LICENSE", "/static/vendor/swagger-ui/LICENSE"):
        with client.get(path) as response:
            assert response.status_code == 200 and b"License" in response.data
