"""Versioned .proto files and the code generated from them (`python -m tokenpool.protos.generate`)."""
