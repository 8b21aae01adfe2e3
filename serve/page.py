"""The web page for people: GET / answers serve/static/index.html, GET /ui/<file> its script and style.

Register it on the app from create_app(): `app.register_blueprint(page)`. Every file comes from the one
fixed folder below; werkzeug's safe_join refuses names that would leave it (404). The page loads
nothing from elsewhere, and its Content-Security-Policy says so to the browser.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only this server: scripts and styles from /ui/, the preview from a blob: URL, fetches to the API.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

page = Blueprint("page", __name__, static_folder=str(STATIC_DIR), static_url_path="/ui")


@page.get("/")
def index():
    return page.send_static_file("index.html")


@page.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
