"""tokenpool.internal.v1: between tokenpool services."""
