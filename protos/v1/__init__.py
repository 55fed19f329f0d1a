"""tokenpool.v1: the public API."""
