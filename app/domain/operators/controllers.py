"""Operator sign-in."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.domain.operators.schemas import OperatorToken, SignInRequest
from app.domain.operators.services import authenticate
from app.http.problems import problem_responses
from app.security.tokens import SessionTokens

OPERATOR_TOKEN_TTL = 8 * 3600


class OperatorSessionController(Controller):
    """Sign-in for card-office staff."""

    path = "/v1/operator/session"
    tags = ["operator"]
    request_max_body_size = 4096

    @post("/", status_code=200, summary="Sign in", responses=problem_responses(401, 413))
    async def sign_in(
        self,
        tokens: NamedDependency[SessionTokens],
        session: NamedDependency[AsyncSession],
        data: JSONBody[SignInRequest],
    ) -> OperatorToken:
        """Exchange username and password for an operator token (one answer for every failure)."""
        operator = await authenticate(session, data.username, data.password)
        return OperatorToken(
            access_token=tokens.issue_operator(operator, OPERATOR_TOKEN_TTL),
            token_type="Bearer",
            expires_in=OPERATOR_TOKEN_TTL,
            role=operator.role,
            regions=list(operator.regions),
        )
