"""The web dashboard: one page at `/` whose script (webapp/static/dashboard/) calls the same API as any client.

Everything it loads is a file of this repository served by the API (the charting library is vendored
under webapp/static/vendor/), so it works offline and needs no build step.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, make_response, render_template

bp = Blueprint("dashboard", __name__)

# The page may load and call nothing but its own origin; the script sets styles only through the DOM.
POLICY = "; ".join([
    "default-src 'self'",
    "img-src 'self' data: blob:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


@bp.get("/")
def index() -> Response:
    """The dashboard's single page; its views are chosen by the URL's #fragment."""
    response = make_response(render_template("dashboard.html"))
    response.headers["Content-Security-Policy"] = POLICY
    return response


@bp.get("/favicon.ico")
def favicon() -> Response:
    """Browsers ask every page's origin for this (the API docs' page too)."""
    return current_app.send_static_file("dashboard/favicon.svg")
