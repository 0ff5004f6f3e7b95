"""mirror rebuild: sealed profiles kept with the eCard, the rebuild's checkpoint and lease

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 14:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed_profile", sa.LargeBinary(), nullable=True))
    op.create_table(
        "mirror_rebuilds",
        sa.Column("prefix", sa.String(length=100), nullable=False),
        sa.Column("filled_epoch_ms", sa.BigInteger(), nullable=True),
        sa.Column("epoch_ms", sa.BigInteger(), nullable=True),
        sa.Column("after_id", sa.Uuid(), nullable=True),
        sa.Column("cards_done", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("holder", sa.String(length=120), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("prefix", name=op.f("pk_mirror_rebuilds")),
    )


def downgrade() -> None:
    op.drop_table("mirror_rebuilds")
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.drop_column("sealed_profile")
