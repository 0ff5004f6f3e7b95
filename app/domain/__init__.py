"""Domain packages: each holds its rules (services), wire schemas and thin controllers."""
