"""Operator API: regions."""

from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import ServiceContext
from app.db.models import Region
from app.dependencies import OPERATOR_SECURITY, provide_operator
from app.domain.audit.services import Actor
from app.domain.operators.services import require_region, require_role
from app.domain.regions.schemas import RegionCreate, RegionOut
from app.domain.regions.services import list_regions, register_region
from app.problems import problem_responses
from app.tokens import OperatorSession


def _out(region: Region) -> RegionOut:
    return RegionOut(code=region.code, name=region.name, created_at=region.created_at)


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
        region = await register_region(session, ctx.pii, Actor.operator(operator), data.code, data.name.strip())
        await ctx.directory_changed()
        return _out(region)

    @get("/", summary="List regions", responses=problem_responses(401))
    async def index(
        self, session: NamedDependency[AsyncSession], operator: NamedDependency[OperatorSession]
    ) -> list[RegionOut]:
        """Every registered region."""
        return [_out(region) for region in await list_regions(session)]
