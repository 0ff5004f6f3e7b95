"""Operator API: regions."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import IssuerKey, Region
from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.issuers.services import activate_key, public_key_of, publish_key, region_keys, revoke_key
from app.domain.operators.services import Role, require_region, require_role
from app.domain.regions.schemas import IssuerKeyOut, KeyPublication, KeyRevocation, RegionCreate, RegionOut
from app.domain.regions.services import list_regions, register_region
from app.http.auth import OPERATOR_SECURITY, provide_operator
from app.http.problems import problem_responses
from app.security.tokens import OperatorSession
from app.server.context import ServiceContext
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
    dependencies = {"operator": provide_operator}
    request_max_body_size = 4096

    @post("/", status_code=201, summary="Register a region", responses=problem_responses(401, 403, 404, 409, 413))
    async def create(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[RegionCreate],
    ) -> RegionOut:
        """Register a region (admins within their scope); its key is published in the JWKS at once."""
        require_role(operator)
        require_region(operator, data.code)
        algorithm = data.key_algorithm or ctx.settings.issuer_algorithm
        region = await register_region(
            session, ctx.pii, Actor.operator(operator), data.code, data.name.strip(), algorithm
        )
        await ctx.directory_changed()
        return _out(region)

    @get("/", summary="List regions", responses=problem_responses(401))
    async def index(
        self, session: NamedDependency[AsyncSession], operator: NamedDependency[OperatorSession]
    ) -> list[RegionOut]:
        """Every registered region."""
        return [_out(region) for region in await list_regions(session)]

    @get(
        "/{code:str}/keys",
        summary="A region's signing keys",
        responses=problem_responses(401, 403, 404),
    )
    async def keys(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
    ) -> list[IssuerKeyOut]:
        """Every key of the region with its rotation state (published, active, retired, revoked)."""
        require_role(operator, Role.AUDITOR)
        require_region(operator, code)
        return [_key_out(row) for row in await region_keys(session, code)]

    @post(
        "/{code:str}/keys",
        status_code=201,
        summary="Publish a new signing key",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def publish(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        data: JSONBody[KeyPublication | None] = None,
    ) -> IssuerKeyOut:
        """Step 1 of a rotation: the key appears in the JWKS and the trust list but does not sign yet.

        Its algorithm is the body's, else the deployment's profile's: a region moves from Ed25519 to
        SM2 (or back) by this same drill, codes of both keys verifying until the old one is revoked.
        """
        require_role(operator)
        require_region(operator, code)
        algorithm = (data.algorithm if data else None) or ctx.settings.issuer_algorithm
        row = await publish_key(session, ctx.pii, Actor.operator(operator), code, algorithm)
        await ctx.directory_changed()
        return _key_out(row)

    @post(
        "/{code:str}/keys/{kid:str}/activation",
        status_code=200,
        summary="Activate a published key",
        responses=problem_responses(401, 403, 404, 409),
    )
    async def activate(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        kid: FromPath[str],
    ) -> IssuerKeyOut:
        """Step 2: the key signs new credentials; the previous one retires and keeps verifying.

        409 until the key has been published for `ECARD_KEY_PUBLISH_LEAD` seconds (default 600:
        twice the JWKS cache time), so no gate meets a credential of a key it does not know.
        """
        require_role(operator)
        require_region(operator, code)
        row = await activate_key(session, Actor.operator(operator), code, _kid(kid), ctx.settings.key_publish_lead)
        await ctx.directory_changed()
        return _key_out(row)

    @post(
        "/{code:str}/keys/{kid:str}/revocation",
        status_code=200,
        summary="Revoke a key",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def revoke(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        code: FromPath[str],
        kid: FromPath[str],
        data: JSONBody[KeyRevocation],
    ) -> IssuerKeyOut:
        """Withdraw a published or retired key now (suspected compromise): its credentials stop verifying."""
        require_role(operator)
        require_region(operator, code)
        row = await revoke_key(session, Actor.operator(operator), code, _kid(kid), data.reason)
        await ctx.directory_changed()
        return _key_out(row)
