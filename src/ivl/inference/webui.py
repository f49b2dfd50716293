"""The browser chat page served at ``/``: plain HTML/CSS/JS shipped as package data (no build step, no CDN).

The page talks only to the OpenAI-compatible ``/v1/chat/completions`` endpoint of the same origin (streaming),
so it needs no extra server. The server's limits are embedded in the page as JSON so that it can refuse an
oversized upload before sending it; a strict Content-Security-Policy keeps the page from loading or
contacting anything outside its own origin (the machine may be offline).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ivl.errors import ConfigError
from ivl.inference.protocol import APIError

if TYPE_CHECKING:
    from ivl.inference.server import ServerLimits

STATIC_DIR = Path(__file__).with_name("static")
#: URL prefix of the page's assets; relative links in index.html keep the page working behind a path prefix.
ASSET_PREFIX = "/ui/static/"
_ROUTE_NAMES = ("ivl_chat_page", "ivl_chat_asset")
_CONFIG_SLOT = "{{IVL_CONFIG}}"
_TITLE_SLOT = "{{IVL_TITLE}}"
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

#: Only same-origin scripts, styles and requests; images and video frames come from data:/blob: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class PageConfig:
    """What the page needs to know about the server; ``None`` limits mean "unknown, let the server decide"."""

    model: str
    api_key_required: bool = False
    max_body_bytes: int | None = None
    max_images: int | None = None
    max_tiles_per_image: int | None = None
    max_tokens: int | None = None
    default_max_tokens: int | None = None

    @classmethod
    def from_limits(cls, model: str, limits: ServerLimits | None, api_key_required: bool) -> PageConfig:
        if not model:
            raise ConfigError("mount_chat_page: model_name must be a non-empty string")
        if limits is None:
            return cls(model=model, api_key_required=api_key_required)
        return cls(
            model=model,
            api_key_required=api_key_required,
            max_body_bytes=limits.max_body_bytes,
            max_images=limits.max_images,
            max_tiles_per_image=limits.max_tiles_per_image,
            max_tokens=limits.max_tokens,
            default_max_tokens=min(limits.default_max_tokens, limits.max_tokens),
        )

    def to_json(self) -> str:
        """camelCase JSON for the page, safe to place inside a ``<script type="application/json">`` block."""
        data: dict[str, Any] = {
            "model": self.model,
            "apiKeyRequired": self.api_key_required,
            "maxBodyBytes": self.max_body_bytes,
            "maxImages": self.max_images,
            "maxTilesPerImage": self.max_tiles_per_image,
            "maxTokens": self.max_tokens,
            "defaultMaxTokens": self.default_max_tokens,
        }
        # "</script>" or "<!--" inside a string must not end the block: escape every '<', '>' and '&'
        text = json.dumps(data)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_index(config: PageConfig) -> str:
    """index.html with the page config and title filled in."""
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if _CONFIG_SLOT not in template or _TITLE_SLOT not in template:
        raise ConfigError(f"{STATIC_DIR / 'index.html'} lacks the {_CONFIG_SLOT} or {_TITLE_SLOT} placeholder")
    return template.replace(_TITLE_SLOT, html.escape(f"{config.model} · ivl chat")).replace(
        _CONFIG_SLOT, config.to_json()
    )


def _assets() -> dict[str, tuple[bytes, str]]:
    """Every servable asset (name → bytes, media type), read once: requests can never reach other files."""
    assets = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            assets[path.name] = (path.read_bytes(), media_type)
    if "app.js" not in assets:
        raise ConfigError(f"the chat page's assets are missing from {STATIC_DIR} (is the package data installed?)")
    return assets


def mount_chat_page(
    app: FastAPI,
    *,
    model_name: str,
    limits: ServerLimits | None = None,
    api_key_required: bool = False,
) -> None:
    """Serve the chat page at ``/`` and its assets under ``/ui/static/`` on ``app``.

    ``limits`` (the server's ``ServerLimits``) let the page check uploads and settings before sending;
    ``api_key_required`` makes it ask for the key up front (it also asks whenever the server answers 401).
    Mounting again replaces the page (e.g. with other limits); a foreign route at ``/`` is an error.
    """
    app.router.routes = [r for r in app.router.routes if getattr(r, "name", None) not in _ROUTE_NAMES]
    if any(getattr(route, "path", None) == "/" for route in app.router.routes):
        raise ConfigError("mount_chat_page: the app already has a route at '/'")
    index = render_index(PageConfig.from_limits(model_name, limits, api_key_required))
    assets = _assets()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, name=_ROUTE_NAMES[0])
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(index, headers=SECURITY_HEADERS)

    @app.get(ASSET_PREFIX + "{name}", include_in_schema=False, name=_ROUTE_NAMES[1])
    async def chat_asset(name: str) -> Response:
        if name not in assets:
            missing = APIError(404, f"GET {ASSET_PREFIX}{name}: no such asset", code="not_found")
            return JSONResponse(missing.body(), status_code=404)
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
