"""bulk import without status indexes: the status-list positions and the indexes no query reads are dropped

Since issue 13 a credential names no status index and the offline kit lists no card, so
`ecards.status_index`, its unique index, the partial index of non-active eCards (the kit's former
query) and `regions.next_status_index` are written for every eCard and read by nothing. Nor does any
query select persons, cards or eCards by region alone (`ix_*_region_code`, made with the foreign
keys). Together they were 5 of a bulk-imported row's 13 index insertions, and the region counter a
row lock every chunk took.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

NOT_ACTIVE = sa.text("state <> 'active'")


def upgrade() -> None:
    op.drop_index("ix_ecards_not_active", table_name="ecards")
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_ecards_region_code"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_ecards_region_code"))
        batch_op.drop_column("status_index")
    with op.batch_alter_table("cards", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cards_region_code"))
    with op.batch_alter_table("persons", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_persons_region_code"))
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.drop_column("next_status_index")


def downgrade() -> None:
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_status_index", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("persons", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_persons_region_code"), ["region_code"], unique=False)
    with op.batch_alter_table("cards", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cards_region_code"), ["region_code"], unique=False)
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_index", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_ecards_region_code"), ["region_code"], unique=False)
    # Positions as 0004 gave them: per region, in id order; the counter after the last.
    op.execute(
        "UPDATE ecards SET status_index = (SELECT COUNT(*) FROM ecards AS earlier "
        "WHERE earlier.region_code = ecards.region_code AND earlier.id < ecards.id)"
    )
    op.execute(
        "UPDATE regions SET next_status_index = (SELECT COUNT(*) FROM ecards WHERE ecards.region_code = regions.code)"
    )
    with op.batch_alter_table("ecards", schema=None) as batch_op:
        batch_op.alter_column("status_index", existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_ecards_region_code"), ["region_code", "status_index"])
    op.create_index(
        "ix_ecards_not_active",
        "ecards",
        ["region_code", "status_index", "state"],
        unique=False,
        postgresql_where=NOT_ACTIVE,
        sqlite_where=NOT_ACTIVE,
    )
