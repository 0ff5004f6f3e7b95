"""Locust scenarios of the eCard service: the fixture they read, the credential supply, the users, the shape."""
