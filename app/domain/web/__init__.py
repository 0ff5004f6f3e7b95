"""The browser clients served by the service: the holder's page and the gate console."""
