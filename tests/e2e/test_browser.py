"""The holder's page and the gate console in real headless Chromium, driven as people use them.

A uvicorn server (one worker) on a fresh SQLite database and Redis under a prefix of its own; an
admin made with the CLI; cards and gates through the operator API. Then, in the browser: activate,
show a QR code, read it from a screenshot (zxing-cpp), see the next window's code replace it when
its time comes, verify it on one gate console (accepted; again on the same console: the same
answer, shown as a repeat), on another terminal's console from an uploaded picture (replayed), see
the uses on the holder's page, report the card lost and see the page offer no code, and the gate
reject a code fetched earlier but never used (card_suspended). A second holder, in a browser whose
WebCrypto has no Ed25519, activates with the fallback key, sets a PIN for a medical code that a
hospital desk accepts, renames the device and signs out. Debian's chromium is launched through
`executable_path`: Playwright's own browsers cannot be downloaded here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import zxingcpp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head
from app.settings import PROJECT_ROOT
from crypto.base45 import b45decode, b45encode
from crypto.cose import COSE_SIGN1_TAG, protected_header, sig_structure
from crypto.credential import PREFIX, parse_sign1
from crypto.keys import ALG_EDDSA, ALG_SM2_SM3, PrivateKey, SigningKey
from crypto.offline import OfflineKit, verify_offline
from crypto.sm import Sm2SigningKey
from tests import factories
from tests.factories import bearer
from tests.servers import free_port

VENV_BIN = Path(sys.executable).parent
# Run in the holder page: a DPoP proof by its device key for GET /v1/holder/card with the given access token.
SIGN_CARD_REQUEST = """async (token) => {
  const keys = await import("/app/device-key.js");
  return keys.dpopProof(await keys.loadDeviceKey(), "GET", "/v1/holder/card", token);
}"""
CHROMIUM = Path(os.environ.get("ECARD_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
START_TIMEOUT = 30.0
SCREENSHOTS = os.environ.get("ECARD_BROWSER_SCREENSHOTS", "")
REGION = "510000"
SM2_REGION = "500000"  # registered with an SM2 issuer key by the offline test
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}

# Makes WebCrypto refuse Ed25519, as browsers without it do, so the page takes its fallback.
WITHOUT_WEBCRYPTO_ED25519 = """
(() => {
  const generateKey = SubtleCrypto.prototype.generateKey;
  SubtleCrypto.prototype.generateKey = function (algorithm, ...rest) {
    const name = typeof algorithm === "string" ? algorithm : algorithm && algorithm.name;
    if (String(name).toLowerCase() === "ed25519") {
      return Promise.reject(new DOMException("Ed25519 is not supported", "NotSupportedError"));
    }
    return generateKey.call(this, algorithm, ...rest);
  };
})();
"""

# Signs a probe with the stored device key, to check the pair the page keeps is a real Ed25519 pair.
SIGN_PROBE = """
async () => {
  const keys = await import("/app/device-key.js");
  const key = await keys.loadDeviceKey();
  const signature = await keys.signWithDeviceKey(key, new TextEncoder().encode("probe"));
  return { kind: key.kind, publicKey: key.publicKey, signature: keys.base64url(signature) };
}
"""


@pytest.fixture(scope="module")
async def server_env(
    redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """Environment of a server on a fresh SQLite database, draining its own verification events."""
    path = tmp_path_factory.mktemp("browser") / "ecard.sqlite3"
    database_url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
    yield {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ECARD_REDIS_PREFIX": f"{redis_prefix}browser:",  # removed with the run's prefix
        "ECARD_DRAIN_EVENTS": "true",
        "WEB_CONCURRENCY": "1",
    }
    _remove_database(path)


def _remove_database(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def base_url(server_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One uvicorn worker serving the app (its log goes to a file, shown if it does not start)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("browser-server") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "uvicorn"), "--factory", "app.asgi:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            cwd=PROJECT_ROOT, env=server_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
async def admin(server_env: dict[str, str], base_url: str) -> str:
    """An admin made with the CLI and signed in over HTTP; the region registered."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        return await factories.cli_admin(server_env, client)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium. Missing, it is a failure: these tests must not pass unseen."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM}: apt-get install -y chromium "
            "(`make test` installs it through scripts/ensure-browser; ECARD_CHROMIUM names another binary)",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """Chromium, headless, for the module's tests."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def contexts(browser: Browser) -> AsyncIterator[list[BrowserContext]]:
    """Browser contexts a test opens (each its own storage), closed at the end."""
    opened: list[BrowserContext] = []
    yield opened
    for context in opened:
        await context.close()


def _screenshot_path(name: str) -> Path:
    directory = Path(SCREENSHOTS)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.png"


async def snap(page: Page, name: str) -> None:
    """With ECARD_BROWSER_SCREENSHOTS=DIR, keep a screenshot of the page there (to look at what people see)."""
    if SCREENSHOTS:
        await page.screenshot(path=_screenshot_path(name), full_page=True)


def watch(page: Page) -> list[str]:
    """Script errors and CSP refusals of a page (failed requests are the API's answers, not errors)."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            errors.append(f"console: {message.text}")
            if message.type == "error" and "Failed to load resource" not in message.text
            else None
        ),
    )
    return errors


async def open_holder(
    contexts: list[BrowserContext], browser: Browser, base_url: str, init_script: str = "", fake_clock: bool = False
) -> Page:
    """The holder's page on a phone-sized screen (with a clock the test can move forward)."""
    context = await browser.new_context(**PHONE)
    contexts.append(context)
    if init_script:
        await context.add_init_script(init_script)
    page = await context.new_page()
    if fake_clock:
        await page.clock.install()
    await page.goto(f"{base_url}/app/")
    return page


async def activate(page: Page, issued: dict[str, Any]) -> None:
    """Activate with the card number and code, as the holder types them."""
    await page.fill("#card-number", issued["card"]["card_number"])
    await page.fill("#activation-code", issued["activation_code"])
    await page.click("#activate-submit")
    await expect(page.locator("#view-main")).to_be_visible()


async def read_qr(page: Page) -> str:
    """The text of the QR code on screen, read from a screenshot of it."""
    await expect(page.locator("#qr")).to_have_attribute("data-state", "live")
    png = await page.locator("#qr-image").screenshot()
    codes = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)), formats=zxingcpp.BarcodeFormat.QRCode)
    assert len(codes) == 1, f"expected one QR code in the screenshot, found {len(codes)}"
    text: str = codes[0].text
    return text


async def next_qr(page: Page, previous: str) -> str:
    """The QR code on screen once it is no longer `previous`."""
    for _ in range(50):
        text = await read_qr(page)
        if text != previous:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError("the QR code on screen did not change")


async def open_gate(contexts: list[BrowserContext], browser: Browser, base_url: str, api_key: str) -> Page:
    """A gate console signed in with a terminal's API key."""
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    contexts.append(context)
    page = await context.new_page()
    await page.goto(f"{base_url}/gate/")
    await page.fill("#api-key", api_key)
    await page.click("#signin-submit")
    await expect(page.locator("#view-console")).to_be_visible()
    return page


async def paste(gate: Page, text: str, outcome: str) -> None:
    """Paste a code's text into the console and wait for the answer."""
    result = gate.locator("#result")
    await gate.fill("#scan-text", text)
    await gate.click("#scan-submit")
    await expect(result).to_have_attribute("data-outcome", outcome)


async def check_device_key(page: Page, kind: str) -> None:
    """The page keeps a real Ed25519 pair of the expected kind."""
    probe = await page.evaluate(SIGN_PROBE)
    assert probe["kind"] == kind
    public = base64.urlsafe_b64decode(probe["publicKey"] + "=")
    Ed25519PublicKey.from_public_bytes(public).verify(base64.urlsafe_b64decode(probe["signature"] + "=="), b"probe")


async def test_pages_are_served_with_a_strict_policy_and_stay_out_of_the_api(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        holder, gate = await client.get("/app/"), await client.get("/gate/")
        for page in (holder, gate):
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            policy = page.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
            assert page.headers["x-content-type-options"] == "nosniff"
        assert "camera=()" in holder.headers["permissions-policy"]
        assert "camera=(self)" in gate.headers["permissions-policy"]
        for script in ("/app/holder.js", "/gate/console.js", "/web/api.js", "/web/vendor/jsQR.js"):
            response = await client.get(script)
            assert response.status_code == 200 and "javascript" in response.headers["content-type"], script
        paths = (await client.get("/schema/openapi.json")).json()["paths"]
        assert not [path for path in paths if path.startswith(("/app", "/gate", "/web"))]


async def test_activate_show_verify_replay_and_report_loss(
    browser: Browser, contexts: list[BrowserContext], base_url: str, admin: str
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        issued = await factories.issue_card(client, admin, REGION)
        gate = await factories.new_gate(client, admin, REGION, "transit", ["transit"])
        other = await factories.new_terminal(client, admin, gate.organisation_id, ["transit"])

    holder = await open_holder(contexts, browser, base_url, fake_clock=True)
    holder_errors = watch(holder)
    await snap(holder, "holder-activate")
    await activate(holder, issued)
    await expect(holder.locator("#card-state")).to_contain_text("Active")
    await expect(holder.locator("#card-name")).to_contain_text("*")  # masked
    await expect(holder.locator("#qr-countdown")).to_contain_text("refreshes in")
    await check_device_key(holder, "webcrypto")
    assert holder.url == f"{base_url}/app/"  # no secret ever in the address
    first = await read_qr(holder)
    assert first.startswith("EC1:")
    photo = await holder.locator("#qr-image").screenshot()  # someone takes a picture of the code
    await snap(holder, "holder-code")
    # Thirty seconds on, the page shows the bundle's next code by itself (the phone's clock runs ahead of
    # the service's here, so that code is not valid yet: the first one is scanned).
    await holder.clock.fast_forward(30_500)
    await next_qr(holder, first)
    await expect(holder.locator("#qr-countdown")).to_contain_text("refreshes in")

    gate_a = await open_gate(contexts, browser, base_url, gate.api_key)
    gate_errors = watch(gate_a)
    await paste(gate_a, first, "accepted")
    await expect(gate_a.locator("#result-title")).to_contain_text("Accepted")
    await expect(gate_a.locator("[data-claim=card_pseudonym]")).to_be_visible()
    await snap(gate_a, "gate-accepted")
    await paste(gate_a, first, "repeat")  # the same terminal asking again: the same answer
    await expect(gate_a.locator("#result-title")).to_contain_text("Already accepted (repeat)")
    await expect(gate_a.locator("#count-accepted")).to_have_text("1")
    await expect(gate_a.locator("#count-repeats")).to_have_text("1")

    # Another terminal is shown the picture of the same code.
    gate_b = await open_gate(contexts, browser, base_url, other.api_key)
    gate_errors += watch(gate_b)
    await gate_b.set_input_files("#scan-file", files=[{"name": "qr.png", "mimeType": "image/png", "buffer": photo}])
    await expect(gate_b.locator("#result")).to_have_attribute("data-outcome", "rejected")
    await expect(gate_b.locator("#result")).to_have_attribute("data-reason", "replayed")
    await expect(gate_b.locator("#result-reason")).to_contain_text("replayed")
    await expect(gate_b.locator("#count-rejected")).to_have_text("1")
    await snap(gate_b, "gate-replayed")

    # The holder sees where the card was used (events are drained within about a second).
    await holder.click("[data-tab=usage]")
    uses = holder.locator("#usage-list li")
    for _ in range(40):
        if await uses.count() >= 2:
            break
        await asyncio.sleep(0.25)
        await holder.click("#usage-reload")
    await snap(holder, "holder-usage")
    await expect(holder.locator("#usage-list li[data-result=accepted]")).to_have_count(1)
    await expect(holder.locator("#usage-list li[data-result=replayed]")).to_have_count(1)

    # A new code, fetched and shown but never scanned.
    await holder.click("[data-tab=code]")
    shown = await read_qr(holder)
    await holder.click("#qr-refresh")
    unused = await next_qr(holder, shown)
    assert unused != first

    await holder.click("[data-tab=card]")
    await holder.click("#report-loss")
    await holder.click("#confirm-yes")
    await expect(holder.locator("#card-suspended")).to_be_visible()
    await expect(holder.locator("#code-panel")).to_be_hidden()
    await expect(holder.locator("#card-state")).to_contain_text("Suspended")
    await snap(holder, "holder-suspended")
    await holder.reload()  # a fresh start of the page offers no code either
    await expect(holder.locator("#card-suspended")).to_be_visible()
    await expect(holder.locator("#code-panel")).to_be_hidden()
    assert await holder.locator("#qr-image").get_attribute("src") is None

    await paste(gate_a, unused, "rejected")
    await expect(gate_a.locator("#result")).to_have_attribute("data-reason", "card_suspended")
    await expect(gate_a.locator("#count-rejected")).to_have_text("1")
    assert holder_errors == [] and gate_errors == []


async def test_medical_code_after_the_pin_with_the_fallback_device_key(
    browser: Browser, contexts: list[BrowserContext], base_url: str, admin: str
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        issued = await factories.issue_card(client, admin, REGION)
        hospital = await factories.new_gate(client, admin, REGION, "hospital", ["medical"])

    holder = await open_holder(contexts, browser, base_url, WITHOUT_WEBCRYPTO_ED25519)
    errors = watch(holder)
    await activate(holder, issued)
    await check_device_key(holder, "noble")
    await holder.click("[data-tab=card]")
    await snap(holder, "holder-card")
    await expect(holder.locator("#key-kind")).to_contain_text("compatibility")
    await holder.click("[data-tab=code]")
    await expect(holder.locator("#qr")).to_have_attribute("data-state", "live")

    await holder.click("[data-purpose=medical]")
    await expect(holder.locator("#pin-dialog")).to_be_visible()
    await expect(holder.locator("#pin-title")).to_contain_text("Set a PIN first")
    await snap(holder, "holder-pin")
    await holder.fill("#pin-input", factories.HOLDER_PIN)
    await holder.fill("#pin-confirm", factories.HOLDER_PIN)
    await holder.click("#pin-submit")
    await expect(holder.locator("#pin-dialog")).to_be_hidden()
    code = await read_qr(holder)

    desk = await open_gate(contexts, browser, base_url, hospital.api_key)
    errors += watch(desk)
    await paste(desk, code, "accepted")
    await expect(desk.locator("#result-reason")).to_contain_text("Medical")
    await expect(desk.locator("[data-claim=holder_name]")).to_contain_text("张三")  # a hospital sees the name
    await expect(desk.locator("[data-claim=citizen_id_masked]")).to_contain_text("*")
    await snap(desk, "desk-medical")

    await holder.click("[data-tab=devices]")
    this_device = holder.locator("#device-list li[data-current]")
    await this_device.locator("[data-action=rename]").click()
    await holder.fill("#rename-input", "测试手机")
    await holder.click("#rename-submit")
    await expect(this_device).to_contain_text("测试手机")
    await holder.click("[data-tab=card]")
    token = await holder.evaluate("JSON.parse(localStorage.getItem('ecard.holder.session')).access_token")
    # A proof the page's device key signs for a later call: with it the token is good until the device goes.
    proof = await holder.evaluate(SIGN_CARD_REQUEST, token)
    await holder.click("#sign-out")  # unbinds the device: its tokens stop working at once
    await expect(holder.locator("#view-activate")).to_be_visible()
    assert await holder.evaluate("localStorage.getItem('ecard.holder.session')") is None
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        signed_out = await client.get("/v1/holder/card", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert signed_out.status_code == 401, signed_out.text
        assert "removed" in signed_out.json()["detail"]
    assert errors == []


def _camera_feed(png: bytes, path: Path) -> Path:
    """A Motion-JPEG file showing the QR code, for Chromium's fake camera."""
    code = Image.open(io.BytesIO(png)).convert("RGB")
    frame = Image.new("RGB", (640, 480), "white")
    code.thumbnail((440, 440))
    frame.paste(code, ((640 - code.width) // 2, (480 - code.height) // 2))
    jpeg = io.BytesIO()
    frame.save(jpeg, format="JPEG", quality=90)
    path.write_bytes(jpeg.getvalue() * 5)
    return path


async def test_gate_console_reads_a_code_from_the_camera(
    chromium: Path, base_url: str, admin: str, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        holder = await factories.activated_holder(client, admin, REGION)
        gate = await factories.new_gate(client, admin, REGION, "library", ["library"])
        [credential] = await factories.credentials(client, holder, "library")
        image = await client.post(
            "/v1/holder/credentials/qr",
            json={"credential": credential, "format": "png", "scale": 6},
            auth=holder.auth,
        )
        assert image.status_code == 200
    feed = _camera_feed(image.content, tmp_path / "camera.mjpeg")
    camera_args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                   f"--use-file-for-fake-video-capture={feed}"]  # fmt: skip
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS + camera_args
        )
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 900})
            await context.grant_permissions(["camera"], origin=base_url)
            page = await context.new_page()
            errors = watch(page)
            await page.goto(f"{base_url}/gate/")
            await page.fill("#api-key", gate.api_key)
            await page.click("#signin-submit")
            await page.click("#camera-start")
            await expect(page.locator("#result")).to_have_attribute("data-outcome", "accepted", timeout=10_000)
            await expect(page.locator("[data-claim=member_id]")).to_be_visible()
            await page.click("#camera-stop")
            # The code stayed in front of the lens: it was sent once.
            await expect(page.locator("#count-accepted")).to_have_text("1")
            await expect(page.locator("#count-repeats")).to_have_text("0")
            assert errors == []
        finally:
            await browser.close()


async def test_api_docs_render_with_every_other_host_blocked(browser: Browser, base_url: str) -> None:
    """The docs page of an air-gapped intranet: Swagger UI from this origin, no request to another host."""
    context = await browser.new_context()
    foreign: list[str] = []

    async def same_origin_only(route: Any) -> None:
        if httpx.URL(route.request.url).host != "127.0.0.1":
            foreign.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    try:
        await context.route("**/*", same_origin_only)
        page = await context.new_page()
        errors = watch(page)
        await page.goto(f"{base_url}/schema/swagger")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("eCard API", timeout=15_000)
        await expect(page.locator(".opblock-summary-path").filter(has_text="/v1/verify").first).to_be_visible()
        await snap(page, "api-docs")
        assert foreign == [] and errors == [], (foreign, errors)
    finally:
        await context.close()


def _forged(code: str, alg: int, signer: PrivateKey, kid: bytes | None = None) -> str:
    """The code's claims under a header naming `alg` and `kid` (default: the code's), signed by `signer`."""
    parts = parse_sign1(code)
    protected = protected_header(kid or parts.kid, alg=alg)
    signature = signer.sign(sig_structure(protected, parts.payload))
    return PREFIX + b45encode(cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, parts.payload, signature])))


async def test_gate_verifies_sm2_and_ed25519_codes_offline_by_the_kids_key(
    browser: Browser, contexts: list[BrowserContext], base_url: str, admin: str, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        created = await client.post(
            "/v1/operator/regions",
            json={"code": SM2_REGION, "name": "重庆市", "key_algorithm": "SM2"},
            headers=bearer(admin),
        )
        assert created.status_code == 201, created.text
        sm2_holder = await factories.activated_holder(client, admin, SM2_REGION)
        ed_holder = await factories.activated_holder(client, admin, REGION)
        gate = await factories.new_gate(client, admin, REGION, "transit", ["transit"])
        sm2_codes = await factories.credentials(client, sm2_holder, count=1)
        [ed_code] = await factories.credentials(client, ed_holder)
        kits = {region: (await client.get(f"/v1/offline-kits/{region}")).json() for region in (REGION, SM2_REGION)}
    [sm2_code] = sm2_codes
    assert parse_sign1(sm2_code).alg == ALG_SM2_SM3 and parse_sign1(ed_code).alg == ALG_EDDSA
    ed_kid, sm2_kid = parse_sign1(ed_code).kid, parse_sign1(sm2_code).kid
    # An Ed25519 key's kid under an SM2 header with a valid SM2 signature, and the reverse; a bit flipped.
    sm2_on_ed_kid = _forged(ed_code, ALG_SM2_SM3, Sm2SigningKey.generate(), ed_kid)
    ed_on_sm2_kid = _forged(sm2_code, ALG_EDDSA, SigningKey.generate(), sm2_kid)
    body = b45decode(sm2_code[len(PREFIX) :])
    tampered = PREFIX + b45encode(body[:-1] + bytes([body[-1] ^ 1]))
    # The same decisions from crypto.offline, the reference the console must agree with.
    reference = [OfflineKit.from_json(json.dumps(kit)) for kit in kits.values()]
    now = int(time.time())
    # name: (outcome, reason, the detail shown): the crossed headers are refused before any signature check.
    crossed = "the header's algorithm is not the kid's key's"
    expected = {
        "sm2": ("accepted", None, "SM2"),
        "sm2 again": ("rejected", "replayed", "this console accepted the code before"),
        "ed25519": ("accepted", None, "Ed25519"),
        "sm2 header, ed25519 kid": ("rejected", "bad_signature", crossed),
        "ed25519 header, sm2 kid": ("rejected", "bad_signature", crossed),
        "tampered sm2": ("rejected", "bad_signature", "signature does not verify"),
    }
    for name, code in (("sm2 header, ed25519 kid", sm2_on_ed_kid), ("ed25519 header, sm2 kid", ed_on_sm2_kid),
                       ("tampered sm2", tampered), ("sm2", sm2_code)):  # fmt: skip
        decided = verify_offline(code, reference, now, 5)
        assert (decided.reason.value if decided.reason else None) == expected[name][1], (name, decided)
        if expected[name][1] is not None:
            assert decided.detail == expected[name][2], (name, decided)

    page = await open_gate(contexts, browser, base_url, gate.api_key)
    errors = watch(page)
    await expect(page.locator("#offline-mode")).to_be_disabled()
    # A kit file whose SM2 key claims the Ed25519 key's kid is refused: kids are recomputed from the keys.
    rebound = json.loads(json.dumps(kits[SM2_REGION]))
    [sm2_jwk] = [jwk for jwk in rebound["jwks"]["keys"] if jwk["crv"] == "SM2"]
    sm2_jwk["kid"] = base64.urlsafe_b64encode(ed_kid).rstrip(b"=").decode()
    (tmp_path / "rebound.json").write_text(json.dumps(rebound))
    await page.set_input_files("#kit-file", str(tmp_path / "rebound.json"))
    await expect(page.locator("#kit-message")).to_contain_text("does not match its key's thumbprint")
    await expect(page.locator("#offline-mode")).to_be_disabled()
    await page.fill("#kit-region", SM2_REGION)
    await page.click("#kit-fetch")
    await expect(page.locator(f"#kits [data-region='{SM2_REGION}']")).to_contain_text("(SM2)")
    await page.fill("#kit-region", REGION)
    await page.click("#kit-fetch")
    await expect(page.locator(f"#kits [data-region='{REGION}']")).to_contain_text("(Ed25519)")
    await page.check("#offline-mode")
    result = page.locator("#result")
    for name, code in (("sm2", sm2_code), ("sm2 again", sm2_code), ("ed25519", ed_code),
                       ("sm2 header, ed25519 kid", sm2_on_ed_kid), ("ed25519 header, sm2 kid", ed_on_sm2_kid),
                       ("tampered sm2", tampered)):  # fmt: skip
        outcome, reason, shown = expected[name]
        await paste(page, code, outcome)
        await expect(result).to_have_attribute("data-mode", "offline")
        await expect(result).to_have_attribute("data-reason", reason or "")
        await expect(page.locator("#result-reason")).to_contain_text(shown)
        if reason is None:
            await expect(result).to_have_attribute("data-alg", shown)
            await expect(page.locator("#result-title")).to_contain_text("Accepted (offline)")
    await snap(page, "gate-offline-sm2")
    assert (
        await page.locator("#count-accepted").text_content(),
        await page.locator("#count-rejected").text_content(),
    ) == ("2", "4")
    # Offline decisions never reached the service: the SM2 code is still unused there (at a gate of its region).
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        sm2_gate = await factories.new_gate(client, admin, SM2_REGION, "transit", ["transit"])
        online = await factories.verify(client, sm2_gate, sm2_code)
        assert (online["result"], online.get("reason")) == ("accepted", None), online
    assert errors == []
