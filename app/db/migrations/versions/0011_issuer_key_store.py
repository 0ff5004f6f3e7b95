"""issuer key store: where each issuer key's private half lives (software, or a PKCS#11 token and its object)

Existing keys are software keys (the encrypted secret in the row), as before.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 13:19:33.030400
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issuer_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_store", sa.String(length=16), server_default="software", nullable=False))
        batch_op.add_column(sa.Column("key_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("key_label", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # A key in a token cannot go back to a schema without the column: its row would read as a software key
    # whose encrypted secret is only the seal secret. Refuse rather than lose the reference.
    bind = op.get_bind()
    held = bind.execute(sa.text("SELECT count(*) FROM issuer_keys WHERE key_store <> 'software'")).scalar()
    if held:
        raise RuntimeError(f"{held} issuer keys live in a PKCS#11 token: revoke them before downgrading past 0011")
    with op.batch_alter_table("issuer_keys", schema=None) as batch_op:
        batch_op.drop_column("key_label")
        batch_op.drop_column("key_token")
        batch_op.drop_column("key_store")
