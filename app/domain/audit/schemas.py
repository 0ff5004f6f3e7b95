"""Wire format of the audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from app.http.schema import WireModel


class AuditEventOut(WireModel):
    """One audited action."""

    id: uuid.UUID
    occurred_at: datetime
    actor_type: str
    actor_id: str
    actor_name: str
    action: str
    subject_type: str
    subject_id: str
    region: str | None = None
    reason: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
