"""Entitlements a card carries beyond identity, such as a park annual pass."""
