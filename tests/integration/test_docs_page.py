"""The API docs page names no other host: its scripts, styles and document come from this origin."""

from __future__ import annotations

import re

import httpx

from app.server.docs_page import DOCS_CONTENT_SECURITY_POLICY

_URL_ATTRIBUTE = re.compile(r"""(?:src|href|data-url)="([^"]*)\"""")


async def test_docs_page_references_only_this_origin(client: httpx.AsyncClient) -> None:
    for path in ("/schema", "/schema/swagger"):
        page = await client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        urls = _URL_ATTRIBUTE.findall(page.text)
        assert "/web/vendor/swagger-ui-bundle.js" in urls and "/schema/openapi.json" in urls, urls
        assert all(url.startswith("/") or url == "data:," for url in urls), urls
        assert "//" not in "".join(url for url in urls if url != "data:,"), urls
        # No inline code: every <script> has a src, which the policy's script-src 'self' requires.
        assert page.text.count("<script") == page.text.count("<script src="), page.text
        assert f'content="{DOCS_CONTENT_SECURITY_POLICY}"' in page.text
        policy = DOCS_CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in policy and "script-src 'self'" in policy and "http" not in policy
        for asset in urls:
            if asset.startswith("/"):
                answer = await client.get(asset)
                assert answer.status_code == 200, asset
    init = await client.get("/schema/swagger-init.js")
    assert "javascript" in init.headers["content-type"] and "validatorUrl: null" in init.text
