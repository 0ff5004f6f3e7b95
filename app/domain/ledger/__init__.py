"""Money that moves exactly once: a double-entry ledger, idempotent requests, fares and settlements."""
