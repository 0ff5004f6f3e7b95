"""`GET /.well-known/jwks.json` (every issuer key) and `GET /v1/offline-kits/{region}` for offline gates."""

from __future__ import annotations

from typing import Annotated

from litestar import Response, get
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, PathParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.issuers.trust_list import sign_trust_list
from app.domain.verification.directory import VerifierDirectory
from app.domain.verification.offline import OfflineKits
from app.http.problems import problem_responses
from app.http.schema import WireModel
from app.security.keyring import Keyring
from app.settings import Settings
from crypto.jwk import jwks
from crypto.trust_list import signer_jwk


@get(
    "/.well-known/jwks.json",
    tags=["keys"],
    summary="Issuer public keys (JWKS)",
    cache_control=CacheControlHeader(max_age=300, public=True),
)
async def issuer_jwks(directory: NamedDependency[VerifierDirectory]) -> dict[str, list[dict[str, str]]]:
    """Ed25519 OKP keys (RFC 8037) with `kid` and the `region` each signs for."""
    return jwks(directory.keys.verify_keys.values())


class OfflineKitOut(WireModel):
    """A region's keys and signed kit period (IETF Token Status List, CWT, base64url), for offline gates.

    Check a credential with `python -m crypto.offline --kit kit.json CREDENTIAL`, or any COSE
    library: the token is a COSE_Sign1 by a key in `jwks` whose list has no entries (codes are
    unlinkable and carry no status index); its `iat` and `exp` say how long the kit may be used.
    """

    region: str
    jwks: dict[str, list[dict[str, str]]]
    status_list: str


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names this ETag (or `*`); weak and strong forms alike (RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


@get(
    "/v1/offline-kits/{region:str}",
    tags=["keys"],
    summary="Offline kit of a region",
    responses={
        304: ResponseSpec(None, description="The kit named by If-None-Match is still the current one (no body)"),
        **problem_responses(404, 503),
    },
)
async def offline_kit(
    directory: NamedDependency[VerifierDirectory],
    offline_kits: NamedDependency[OfflineKits],
    settings: NamedDependency[Settings],
    session: NamedDependency[AsyncSession],
    region: Annotated[str, PathParameter(pattern=r"^[1-9][0-9]{5}$")],
    if_none_match: Annotated[
        str | None,
        HeaderParameter(
            name="If-None-Match", required=False, description="The ETag of the kit the gate holds", max_length=1024
        ),
    ] = None,
) -> Response[OfflineKitOut]:
    """The region's public keys and signed kit period; refetch after the token's `ttl` (Cache-Control).

    The kit is signed once per interval for the deployment; a gate that sends the ETag it holds in
    If-None-Match gets 304 while it is current. Single use cannot be checked offline across gates:
    a gate keeps its own record of the nonces it saw and uploads its scans with
    `POST /v1/verify/batch` when it is back online.
    """
    kit = await offline_kits.kit(session, directory.keys, region)
    headers = {"Cache-Control": f"public, max-age={settings.status_list_ttl}", "ETag": kit.etag}
    if _matches(if_none_match, kit.etag):
        return Response(None, status_code=304, headers=headers)  # type: ignore[arg-type]
    document = kit.document
    return Response(
        OfflineKitOut(region=document["region"], jwks=document["jwks"], status_list=document["status_list"]),
        headers=headers,
    )


class TrustListOut(WireModel):
    """The signed trust list (compact JWS: EdDSA, or "SM2" under the national profile) and, for
    convenience, the key that signed it.

    Pin `signer` once, out of band (it changes only with the deployment's key directory), and
    check every later list against the pinned key, not against the copy in the answer.
    """

    trust_list: str
    signer: dict[str, str]


@get(
    "/v1/trust-list",
    tags=["keys"],
    summary="Signed trust list of every region's keys",
    cache_control=CacheControlHeader(max_age=300, public=True),
)
async def trust_list(
    keyring: NamedDependency[Keyring],
    directory: NamedDependency[VerifierDirectory],
    settings: NamedDependency[Settings],
) -> TrustListOut:
    """Every region's issuer keys with their rotation state (published, active, retired), signed.

    A key is listed before it signs and after it stops, so a relying party that refetches this
    list every few minutes never rejects a genuine credential during a rotation.
    """
    signer = keyring.trust_signer(settings.crypto_profile)
    token = sign_trust_list(signer, directory.keys, settings.trust_list_lifetime)
    return TrustListOut(trust_list=token, signer=signer_jwk(signer))
