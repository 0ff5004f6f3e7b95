"""faults without loss: mirror outbox, mirror versions, status-store epochs, undelivered answers, change counters

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 08:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mirror_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("ecard_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mirror_changes")),
    )
    with op.batch_alter_table("mirror_changes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mirror_changes_ecard_id"), ["ecard_id"], unique=False)

    op.create_table(
        "status_stores",
        sa.Column("prefix", sa.String(length=100), nullable=False),
        sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prefix", name=op.f("pk_status_stores")),
    )
    counters = op.create_table(
        "change_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_counters")),
    )
    op.bulk_insert(counters, [{"name": "directory", "value": 0}])
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mirror_version", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("verification_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("answer_delivered", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("verification_events", schema=None) as batch_op:
        batch_op.drop_column("answer_delivered")
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.drop_column("mirror_version")
    op.drop_table("change_counters")
    op.drop_table("status_stores")
    with op.batch_alter_table("mirror_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mirror_changes_ecard_id"))
    op.drop_table("mirror_changes")
