"""The HTTP edge that controllers build on: problem details, callers, strict bodies, the fast paths."""
