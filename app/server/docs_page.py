"""The API docs page (`/schema`): Swagger UI from this origin, so it works on an intranet with no internet.

Litestar's render plugins load their scripts, styles and favicon from CDNs and start Swagger UI
with an inline script. Ours loads the vendored copy under `/web/vendor/` (`make web-vendor`), starts
it from a script of this origin, turns off the online validator (it calls validator.swagger.io) and
pins a Content-Security-Policy that allows 'self' only.
"""

from __future__ import annotations

import html
from typing import Any

from litestar import Request, Response, Router, get
from litestar.openapi.plugins import OpenAPIRenderPlugin, SwaggerRenderPlugin

VENDOR_PATH = "/web/vendor"
INIT_SCRIPT = "/swagger-init.js"
INIT_NAME = "swagger-init"

# A <meta> policy (the render plugin sets no headers): frame-ancestors is header-only and left out.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Swagger UI's stylesheet draws its icons as data: SVGs.
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)

# Reads the document's URL from the page, so the script is the same file for every mount path.
_INIT_JS = """\
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.url,
    dom_id: "#swagger-ui",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""


def _swagger_init() -> Response[str]:
    """The script that starts Swagger UI: a file of this origin, since the policy forbids inline code."""
    return Response(_INIT_JS, media_type="text/javascript", headers={"X-Content-Type-Options": "nosniff"})


class SameOriginSwaggerPlugin(SwaggerRenderPlugin):
    """Swagger UI whose page names no other host and runs no inline script."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The docs page: vendored Swagger UI, our start script and the document's same-origin URL."""
        title = html.escape(str(openapi_schema["info"]["title"]))
        document_url = html.escape(self.get_openapi_json_route(request))
        init_url = html.escape(request.app.route_reverse(INIT_NAME))
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{DOCS_CONTENT_SECURITY_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{VENDOR_PATH}/swagger-ui.css">
<script src="{VENDOR_PATH}/swagger-ui-bundle.js"></script>
<script src="{init_url}"></script>
</head>
<body>
<div id="swagger-ui" data-url="{document_url}"></div>
</body>
</html>
""".encode()

    def receive_router(self, router: Router) -> None:
        """Serve the start script beside the page; Swagger's OAuth2 redirect page is not needed (no OAuth2)."""
        # A handler per app: the tests build many apps in one process.
        router.register(get(INIT_SCRIPT, sync_to_thread=False, include_in_schema=False, name=INIT_NAME)(_swagger_init))


def docs_render_plugins() -> list[OpenAPIRenderPlugin]:
    """The render plugins of `/schema`: Swagger UI at `/schema` and `/schema/swagger`, from this origin only."""
    return [SameOriginSwaggerPlugin(path=["/swagger", "/"])]
