"""Operators: card-office accounts, sign-in, roles and region scope."""
