"""The native launcher of the local stack (the docker compose files sit beside it)."""
