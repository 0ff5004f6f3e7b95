"""Holder API: activation, token refresh, credentials and QR images."""

from __future__ import annotations

from datetime import UTC, datetime

from litestar import Controller, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import ServiceContext
from app.dependencies import HOLDER_SECURITY, provide_holder
from app.domain.cards.services import normalise_card_number
from app.domain.holders.credentials import issue_credentials, render_qr
from app.domain.holders.schemas import (
    ActivationRequest,
    CredentialBundle,
    CredentialOut,
    CredentialRequest,
    QrRequest,
    RefreshRequest,
    SessionResponse,
)
from app.domain.holders.services import IssuedSession, activate, refresh_session
from app.problems import problem_responses
from app.tokens import HolderSession
from crypto.credential import Purpose
from crypto.keys import b64url, b64url_decode

QR_MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml"}


def _epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _session_response(issued: IssuedSession) -> SessionResponse:
    return SessionResponse(
        access_token=issued.access_token,
        refresh_token=issued.refresh_token,
        token_type="Bearer",
        expires_in=issued.expires_in,
        ecard_id=issued.ecard_id,
        device_id=issued.device_id,
    )


class HolderAuthController(Controller):
    """Activation and token refresh: the two holder calls made without an access token."""

    path = "/v1/holder"
    tags = ["holder"]
    request_max_body_size = 4096

    @post(
        "/activation",
        status_code=201,
        summary="Activate the eCard on this device",
        responses=problem_responses(401, 409, 413),
    )
    async def activation(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        data: JSONBody[ActivationRequest],
    ) -> SessionResponse:
        """Check the card number and one-time activation code, bind the device key, open a session.

        Every failure about the card or the code gets the same 401 answer, so the endpoint
        tells a guesser nothing; each wrong code counts against that code's attempts.
        """
        issued = await activate(
            session,
            ctx.pii,
            ctx.tokens,
            ctx.mirror,
            ctx.settings,
            card_number=normalise_card_number(data.card_number),
            activation_code=data.activation_code,
            device_public_key=b64url_decode(data.device_public_key),
            device_name=data.device_name.strip() or "phone",
        )
        return _session_response(issued)

    @post("/token", status_code=200, summary="Refresh the session", responses=problem_responses(401, 413))
    async def token(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        data: JSONBody[RefreshRequest],
    ) -> SessionResponse:
        """Rotate the refresh token. Presenting an already used one revokes the device's whole session family."""
        return _session_response(await refresh_session(session, ctx.tokens, ctx.settings, data.refresh_token))


class HolderCredentialController(Controller):
    """Credentials for the holder's own card."""

    path = "/v1/holder/credentials"
    tags = ["holder"]
    security = HOLDER_SECURITY
    dependencies = {"holder": provide_holder}
    request_max_body_size = 4096

    @post("/", status_code=200, summary="Issue QR credentials", responses=problem_responses(401, 409, 503))
    async def issue(
        self,
        ctx: NamedDependency[ServiceContext],
        holder: NamedDependency[HolderSession],
        data: JSONBody[CredentialRequest],
    ) -> CredentialBundle:
        """Sign `count` credentials with consecutive windows (one per `refresh_at` step)."""
        purpose = Purpose.from_label(data.purpose)
        kid, issued = await issue_credentials(
            holder, ctx.mirror, ctx.directory.keys.signing_keys, ctx.settings, purpose, data.count
        )
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

    @post(
        "/qr",
        status_code=200,
        summary="Render a credential as a QR image",
        responses=problem_responses(401, 403),
        response_description="PNG or SVG image of the QR code (error level M, 4-module quiet zone)",
    )
    async def qr(
        self, ctx: NamedDependency[ServiceContext], holder: NamedDependency[HolderSession], data: JSONBody[QrRequest]
    ) -> Response[bytes]:
        """The QR image of one of this card's credentials, for clients that do not draw QR codes themselves."""
        image = render_qr(holder, ctx.directory.keys.verify_keys, data.credential, data.format, data.scale)
        return Response(image, media_type=QR_MEDIA_TYPES[data.format], headers={"Cache-Control": "no-store"})
