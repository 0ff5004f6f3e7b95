"""issuer key algorithm: Ed25519 or SM2 per key (issue 17); SM2 public keys are 65 bytes

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 14:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issuer_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("algorithm", sa.String(length=16), server_default="Ed25519", nullable=False))
        batch_op.alter_column(
            "public_key",
            existing_type=sa.LargeBinary(length=32),
            type_=sa.LargeBinary(length=65),
            existing_nullable=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("issuer_keys", schema=None) as batch_op:
        batch_op.alter_column(
            "public_key",
            existing_type=sa.LargeBinary(length=65),
            type_=sa.LargeBinary(length=32),
            existing_nullable=False,
        )
        batch_op.drop_column("algorithm")
