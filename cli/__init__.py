"""The `tokenpool` command line."""
