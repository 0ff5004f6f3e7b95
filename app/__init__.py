"""The eCard service (Litestar)."""
