"""The append-only audit log of state-changing actions."""
