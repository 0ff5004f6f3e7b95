"""Holder API: activation, sessions, the card, loss reports, devices, PIN, credentials and QR images."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

from litestar import Controller, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import as_utc
from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.cards.citizen_id import mask_citizen_id, mask_name
from app.domain.cards.lifecycle import LOSS_BY_HOLDER, report_loss, undo_loss
from app.domain.cards.mirroring import MirrorOutbox
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD, normalise_card_number
from app.domain.holders.credentials import issue_credentials, render_qr
from app.domain.holders.devices import list_devices, remove_device, rename_device
from app.domain.holders.pin import MAX_PIN_ATTEMPTS, set_pin, verify_pin
from app.domain.holders.schemas import (
    ActivationRequest,
    CredentialBundle,
    CredentialOut,
    CredentialRequest,
    DeviceOut,
    DeviceRename,
    HolderCardOut,
    LossReport,
    LossUndo,
    PinChange,
    PinVerification,
    QrRequest,
    RefreshRequest,
    SessionResponse,
    StepUp,
    UsageOut,
)
from app.domain.holders.services import IssuedSession, activate, own_card, refresh_session
from app.domain.verification.directory import VerifierDirectory
from app.domain.verification.events import card_usage
from app.http.auth import DEVICE_PROOF_SECURITY, HOLDER_SECURITY, AuthenticatedHolder, Callers, scope_uri
from app.http.hot_paths import HotRoute, body_decoder
from app.http.pending import mirror_answer, pending_response
from app.http.problems import problem_responses
from app.observability import metrics
from app.security.pii import PiiCipher
from app.security.tokens import HolderSession, InvalidToken, SessionTokens
from app.settings import Settings
from crypto.credential import Purpose
from crypto.dpop import Proof
from crypto.keys import b64url, b64url_decode

if TYPE_CHECKING:
    from litestar.types import Scope

QR_MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml"}
STEP_UP_TTL = 300
LOSS_UNDO_WINDOW = timedelta(days=7)
HOLDER_BODY_MAX_BYTES = 4096


def _epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _session_response(issued: IssuedSession) -> SessionResponse:
    return SessionResponse(
        access_token=issued.access_token,
        refresh_token=issued.refresh_token,
        token_type="DPoP",
        expires_in=issued.expires_in,
        ecard_id=issued.ecard_id,
        device_id=issued.device_id,
    )


def _stepped_up(tokens: SessionTokens, holder: HolderSession, token: str | None) -> bool:
    if token is None:
        return False
    try:
        tokens.check_step_up(token, holder)
    except InvalidToken:
        return False
    return True


class HolderAuthController(Controller):
    """Activation and token refresh: the two holder calls made without an access token."""

    path = "/v1/holder"
    tags = ["holder"]
    request_max_body_size = HOLDER_BODY_MAX_BYTES

    @post(
        "/activation",
        status_code=201,
        summary="Activate the eCard on this device",
        responses=problem_responses(401, 409, 413),
        security=DEVICE_PROOF_SECURITY,
    )
    async def activation(
        self,
        device_proof: NamedDependency[Proof],
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        tokens: NamedDependency[SessionTokens],
        session: NamedDependency[AsyncSession],
        data: JSONBody[ActivationRequest],
    ) -> SessionResponse:
        """Check the card number and one-time activation code, bind the device key, open a session.

        The `DPoP` header carries a proof signed by `device_public_key` (the device holds the key it
        registers); the tokens answered are bound to that key (`token_type` "DPoP"). Every failure
        about the card or the code gets the same 401 answer, so the endpoint tells a guesser nothing;
        each try counts against that code's five.
        """
        issued = await activate(
            session,
            pii,
            tokens,
            outbox,
            settings,
            card_number=normalise_card_number(data.card_number),
            activation_code=data.activation_code,
            device_public_key=b64url_decode(data.device_public_key),
            device_proof=device_proof,
            device_name=data.device_name.strip() or "phone",
        )
        return _session_response(issued)

    @post(
        "/token",
        status_code=200,
        summary="Refresh the session",
        responses=problem_responses(401, 413),
        security=DEVICE_PROOF_SECURITY,
    )
    async def token(
        self,
        device_proof: NamedDependency[Proof],
        settings: NamedDependency[Settings],
        tokens: NamedDependency[SessionTokens],
        session: NamedDependency[AsyncSession],
        data: JSONBody[RefreshRequest],
    ) -> SessionResponse:
        """Rotate the refresh token, with a DPoP proof by the device's registered key (a copied refresh token
        alone is refused, nothing rotated). Presenting an already used one revokes that sign-in's whole token family."""
        return _session_response(await refresh_session(session, tokens, settings, data.refresh_token, device_proof))


class HolderCardController(Controller):
    """The holder's card, its loss report, devices and PIN."""

    path = "/v1/holder"
    tags = ["holder"]
    security = HOLDER_SECURITY
    request_max_body_size = HOLDER_BODY_MAX_BYTES

    @get("/card", summary="The holder's card", responses=problem_responses(401, 503))
    async def card(
        self,
        pii: NamedDependency[PiiCipher],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
    ) -> HolderCardOut:
        """Card and eCard state, personal data masked."""
        card, ecard, person = await own_card(session, holder.session)
        return HolderCardOut(
            ecard_id=ecard.id,
            ecard_state=ecard.state,
            card_number="*****" + card.card_number[-4:],
            card_state=card.state,
            region=card.region_code,
            holder_name=mask_name(pii.decrypt(person.name_encrypted, NAME_FIELD)),
            citizen_id=mask_citizen_id(pii.decrypt(person.citizen_id_encrypted, CITIZEN_ID_FIELD)),
            pin_set=ecard.pin_hash is not None,
            pin_locked=ecard.pin_attempts >= MAX_PIN_ATTEMPTS,
        )

    @post(
        "/card/loss",
        status_code=204,
        summary="Report the card lost",
        responses=problem_responses(401, 409, 503) | pending_response(),
    )
    async def report_loss(
        self,
        outbox: NamedDependency[MirrorOutbox],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[LossReport],
    ) -> Response[None]:
        """Suspend the eCard at once: from this moment no gate accepts its credentials (202: once the store is back)."""
        card, ecard, _person = await own_card(session, holder.session)
        mirrored = await report_loss(
            session, outbox, Actor.holder(holder.session), card, ecard, LOSS_BY_HOLDER, data.reason
        )
        return mirror_answer(None, mirrored, 204)

    @post(
        "/card/loss/undo",
        status_code=204,
        summary="Undo a loss report",
        responses=problem_responses(401, 403, 409, 503) | pending_response(),
    )
    async def undo_loss(
        self,
        tokens: NamedDependency[SessionTokens],
        outbox: NamedDependency[MirrorOutbox],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[LossUndo],
    ) -> Response[None]:
        """The card was found: within 7 days of the holder's own report, with a PIN step-up if a PIN is set."""
        card, ecard, _person = await own_card(session, holder.session)
        if ecard.pin_hash is not None and not _stepped_up(tokens, holder.session, data.step_up_token):
            raise errors.Forbidden("undoing a loss report needs a fresh PIN step-up", code="step_up_required")
        mirrored = await undo_loss(
            session,
            outbox,
            Actor.holder(holder.session),
            card,
            ecard,
            holder_window=LOSS_UNDO_WINDOW,
            reason="found by the holder",
        )
        return mirror_answer(None, mirrored, 204)

    @get("/usage", summary="Where the card was used", responses=problem_responses(401, 503))
    async def usage(
        self,
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=200)] = 50,
        before: Annotated[datetime | None, QueryParameter(name="before", required=False)] = None,
        before_id: Annotated[str | None, QueryParameter(name="before_id", required=False, max_length=32)] = None,
    ) -> list[UsageOut]:
        """The card's verifications, newest first: when, which organisation, purpose and result.

        Page back with `before` = the last entry's `occurred_at` and `before_id` = its
        `verification_id` (scans uploaded together share a time). Entries appear a few seconds
        after the scan (they are drained from the event stream).
        """
        entries = await card_usage(
            session,
            holder.session.card_ref,
            limit=limit,
            before=as_utc(before) if before else None,
            before_id=before_id if before else None,
        )
        return [
            UsageOut(
                verification_id=entry.verification_id,
                occurred_at=entry.occurred_at,
                organisation=entry.organisation,
                business_type=entry.business_type,
                purpose=entry.purpose,
                result=entry.result,
                scanned_at=entry.scanned_at,
            )
            for entry in entries
        ]

    @get("/devices", summary="List devices", responses=problem_responses(401, 503))
    async def devices(
        self, session: NamedDependency[AsyncSession], holder: NamedDependency[AuthenticatedHolder]
    ) -> list[DeviceOut]:
        """Devices bound to the card; `current` marks the one asking."""
        return [
            DeviceOut(id=d.id, name=d.name, created_at=d.created_at, current=d.id == holder.session.device_id)
            for d in await list_devices(session, holder.session)
        ]

    @patch("/devices/{device_id:uuid}", summary="Rename a device", responses=problem_responses(401, 404, 503))
    async def rename_device(
        self,
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        device_id: FromPath[uuid.UUID],
        data: JSONBody[DeviceRename],
    ) -> DeviceOut:
        """Give a device a recognisable name."""
        device = await rename_device(session, holder.session, device_id, data.name)
        return DeviceOut(
            id=device.id, name=device.name, created_at=device.created_at, current=device.id == holder.session.device_id
        )

    @delete(
        "/devices/{device_id:uuid}",
        summary="Remove a device",
        responses=problem_responses(401, 404, 503) | pending_response(),
    )
    async def remove_device(
        self,
        outbox: NamedDependency[MirrorOutbox],
        settings: NamedDependency[Settings],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        device_id: FromPath[uuid.UUID],
    ) -> Response[None]:
        """Unbind a device (a lost phone): its sessions end at once, on every worker."""
        mirrored = await remove_device(session, outbox, holder.session, device_id, settings.access_token_ttl)
        return mirror_answer(None, mirrored, 204)

    @put("/pin", status_code=204, summary="Set or change the PIN", responses=problem_responses(401, 403, 503))
    async def set_pin(
        self,
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[PinChange],
    ) -> None:
        """Six digits, not trivial; changing it needs the current one (which counts as a try)."""
        _card, ecard, _person = await own_card(session, holder.session)
        await set_pin(session, holder.session, ecard, data.pin, data.current_pin)

    @post(
        "/pin/verification",
        status_code=200,
        summary="Step up with the PIN",
        responses=problem_responses(401, 403, 409, 503),
    )
    async def verify_pin(
        self,
        tokens: NamedDependency[SessionTokens],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[PinVerification],
    ) -> StepUp:
        """A step-up token valid for 5 minutes on this device; 5 wrong PINs lock it until the office resets it."""
        _card, ecard, _person = await own_card(session, holder.session)
        await verify_pin(session, ecard, data.pin)
        return StepUp(step_up_token=tokens.issue_step_up(holder.session, STEP_UP_TTL), expires_in=STEP_UP_TTL)


async def credential_bundle(
    directory: VerifierDirectory,
    settings: Settings,
    tokens: SessionTokens,
    holder: AuthenticatedHolder,
    data: CredentialRequest,
) -> CredentialBundle:
    """The credentials asked for, signed (the routed handler and the hot path share this)."""
    purpose = Purpose.from_label(data.purpose)
    started = time.perf_counter()
    kid, issued = await issue_credentials(
        holder.session,
        holder.card_status,
        directory.keys.signing_keys,
        directory.keys.seals,
        settings,
        purpose,
        data.count,
        stepped_up=_stepped_up(tokens, holder.session, data.step_up_token),
        store_epoch_ms=holder.store_epoch_ms,
    )
    metrics.count_issued(data.purpose, len(issued), time.perf_counter() - started)
    return CredentialBundle(
        kid=b64url(kid),
        purpose=data.purpose,
        server_time=datetime.now(UTC),
        credentials=[
            CredentialOut(
                credential=item.text,
                not_before=_epoch(item.not_before),
                expires_at=_epoch(item.expires_at),
                refresh_at=_epoch(item.refresh_at),
            )
            for item in issued
        ],
    )


_credential_request = body_decoder(CredentialRequest)


async def _hot_issue(
    credential: str,
    body: bytes,
    headers: dict[bytes, str],
    scope: Scope,
    callers: Callers,
    directory: VerifierDirectory,
    settings: Settings,
) -> CredentialBundle | None:
    data = _credential_request(body)
    if data is None:
        return None
    # The routed dependency's check, from the same headers: once the proof is used, this answers.
    uri = scope_uri(scope, headers.get(b"host"), callers.public_url)
    holder = await callers.holder(credential, headers.get(b"dpop"), "POST", uri)
    return await credential_bundle(directory, settings, callers.tokens, holder, data)


class HolderCredentialController(Controller):
    """Credentials for the holder's own card."""

    path = "/v1/holder/credentials"
    tags = ["holder"]
    security = HOLDER_SECURITY
    request_max_body_size = HOLDER_BODY_MAX_BYTES

    @post("/", status_code=200, summary="Issue QR credentials", responses=problem_responses(401, 403, 409, 503))
    async def issue(
        self,
        directory: NamedDependency[VerifierDirectory],
        settings: NamedDependency[Settings],
        tokens: NamedDependency[SessionTokens],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[CredentialRequest],
    ) -> CredentialBundle:
        """Sign `count` credentials with consecutive windows (one per `refresh_at` step)."""
        return await credential_bundle(directory, settings, tokens, holder, data)

    @post(
        "/qr",
        status_code=200,
        summary="Render a credential as a QR image",
        response_description="PNG or SVG image of the QR code (error level M, 4-module quiet zone)",
        responses=problem_responses(401, 403),
    )
    async def qr(
        self,
        directory: NamedDependency[VerifierDirectory],
        holder: NamedDependency[AuthenticatedHolder],
        data: JSONBody[QrRequest],
    ) -> Response[bytes]:
        """The QR image of one of this card's credentials, for clients that do not draw QR codes themselves."""
        image = render_qr(holder.session, directory.keys, data.credential, data.format, data.scale)
        return Response(image, media_type=QR_MEDIA_TYPES[data.format], headers={"Cache-Control": "no-store"})


# Every open QR screen refreshes through this: served in front of the router (app.http.hot_paths).
HOT_ISSUE = HotRoute(HolderCredentialController.issue, b"authorization", _hot_issue, (b"dpop", b"host"))
