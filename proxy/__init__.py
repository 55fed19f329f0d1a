"""The proxy: the front door that validates, tracks and dispatches requests (DESIGN.md, "Services")."""
