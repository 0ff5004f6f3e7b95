"""Operator API: regions."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import IssuerKey, Region
from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.issuers.key_store import IssuerKeyStore
from app.domain.issuers.services import activate_key, public_key_of, publish_key, region_keys, revoke_key
from app.domain.operators.services import Role, require_region
from app.domain.regions.schemas import IssuerKeyOut, KeyPublication, KeyRevocation, RegionCreate, RegionOut
from app.domain.regions.services import list_regions, register_region
from app.domain.verification.directory import DirectoryChanges
from app.http.auth import OPERATOR_SECURITY, requires, signed_in
from app.http.problems import problem_responses
from app.security.pii import PiiCipher
from app.security.tokens import OperatorSession
from app.settings import Settings
from crypto.algorithms import name_of
from crypto.jwk import public_jwk
from crypto.keys import KID_LENGTH, b64url, b64url_decode


def _out(region: Region) -> RegionOut:
    return RegionOut(code=region.code, name=region.name, created_at=region.created_at)


def _key_out(row: IssuerKey) -> IssuerKeyOut:
    key = public_key_of(row)
    return IssuerKeyOut(
        kid=b64url(row.kid),
        region=row.region_code,
        state=row.state,
        algorithm=name_of(key),
        key_store=row.key_store,
        published_at=row.created_at,
        jwk=public_jwk(key),
    )


def _kid(text: str) -> bytes:
    """A kid from the path, as the JWKS writes it (base64url of 8 bytes); 404 for anything else."""
    try:
        kid = b64url_decode(text)
    except ValueError:
        kid = b""
    if len(kid) != KID_LENGTH:
        raise errors.NotFound("no such key in this region")
    return kid


class RegionController(Controller):
    """Issuing regions; registering one creates its first signing key."""

    path = "/v1/operator/regions"
    tags = ["operator"]
    security = OPERATOR_SECURITY
    request_max_body_size = 4096

    @post(
        "/",
        status_code=201,
        summary="Register a region",
        responses=problem_responses(401, 403, 404, 409, 413, 503),
        guards=[requires()],
    )
    async def create(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        key_store: NamedDependency[IssuerKeyStore],
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[RegionCreate],
    ) -> RegionOut:
        """Register a region (admins within their scope); its key is published in the JWKS at once."""
        require_region(operator, data.code)
        algorithm = data.key_algorithm or settings.issuer_algorithm
        region = await register_region(session, pii, actor, data.code, data.name.strip(), algorithm, key_store)
        await directory_changes.announce()
        return _out(region)

    @get("/", summary="List regions", responses=problem_responses(401), guards=[signed_in])
    async def index(self, session: NamedDependency[AsyncSession]) -> list[RegionOut]:
        """Every registered region."""
        return [_out(region) for region in await list_regions(session)]

    @get(
        "/{code:str}/keys",
        summary="A region's signing keys",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.AUDITOR)],
    )
    async def keys(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
    ) -> list[IssuerKeyOut]:
        """Every key of the region with its rotation state (published, active, retired, revoked)."""
        require_region(operator, code)
        return [_key_out(row) for row in await region_keys(session, code)]

    @post(
        "/{code:str}/keys",
        status_code=201,
        summary="Publish a new signing key",
        responses=problem_responses(401, 403, 404, 409, 503),
        guards=[requires()],
    )
    async def publish(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        key_store: NamedDependency[IssuerKeyStore],
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        data: JSONBody[KeyPublication | None] = None,
    ) -> IssuerKeyOut:
        """Step 1 of a rotation: the key appears in the JWKS and the trust list but does not sign yet.

        Its algorithm is the body's, else the deployment's profile's: a region moves from Ed25519 to
        SM2 (or back) by this same drill, codes of both keys verifying until the old one is revoked.
        `key_store: "pkcs11"` generates it in the deployment's PKCS#11 token (503 when the token fails),
        so a region moves its signing from software into the module by the same drill.
        """
        require_region(operator, code)
        algorithm = (data.algorithm if data else None) or settings.issuer_algorithm
        row = await publish_key(session, pii, actor, code, algorithm, key_store, data.key_store if data else None)
        await directory_changes.announce()
        return _key_out(row)

    @post(
        "/{code:str}/keys/{kid:str}/activation",
        status_code=200,
        summary="Activate a published key",
        responses=problem_responses(401, 403, 404, 409),
        guards=[requires()],
    )
    async def activate(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        kid: FromPath[str],
    ) -> IssuerKeyOut:
        """Step 2: the key signs new credentials; the previous one retires and keeps verifying.

        409 until the key has been published for `ECARD_KEY_PUBLISH_LEAD` seconds (default 600:
        twice the JWKS cache time), so no gate meets a credential of a key it does not know.
        """
        require_region(operator, code)
        row = await activate_key(session, actor, code, _kid(kid), settings.key_publish_lead)
        await directory_changes.announce()
        return _key_out(row)

    @post(
        "/{code:str}/keys/{kid:str}/revocation",
        status_code=200,
        summary="Revoke a key",
        responses=problem_responses(401, 403, 404, 409, 413),
        guards=[requires()],
    )
    async def revoke(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        kid: FromPath[str],
        data: JSONBody[KeyRevocation],
    ) -> IssuerKeyOut:
        """Withdraw a published or retired key now (suspected compromise): its credentials stop verifying."""
        require_region(operator, code)
        row = await revoke_key(session, actor, code, _kid(kid), data.reason)
        await directory_changes.announce()
        return _key_out(row)
