"""offline kits built once for the deployment (shared, leased), a partial index of non-active eCards, directory versions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 14:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NOT_ACTIVE = sa.text("state <> 'active'")


def upgrade() -> None:
    op.create_table(
        "offline_kits",
        sa.Column("region_code", sa.String(length=6), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=True),
        sa.Column("etag", sa.String(length=64), nullable=True),
        sa.Column("generation", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("entries", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("build_ms", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["region_code"], ["regions.code"], name=op.f("fk_offline_kits_region_code_regions")),
        sa.PrimaryKeyConstraint("region_code", name=op.f("pk_offline_kits")),
    )
    op.create_index(
        "ix_ecards_not_active",
        "ecards",
        ["region_code", "status_index", "state"],
        unique=False,
        postgresql_where=NOT_ACTIVE,
        sqlite_where=NOT_ACTIVE,
    )
    for table in ("terminals", "verifier_organisations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("directory_version", sa.BigInteger(), server_default="0", nullable=False))
            batch_op.create_index(batch_op.f(f"ix_{table}_directory_version"), ["directory_version"], unique=False)


def downgrade() -> None:
    for table in ("verifier_organisations", "terminals"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_directory_version"))
            batch_op.drop_column("directory_version")
    op.drop_index("ix_ecards_not_active", table_name="ecards", postgresql_where=NOT_ACTIVE, sqlite_where=NOT_ACTIVE)
    op.drop_table("offline_kits")
