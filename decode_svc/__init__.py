"""decode_svc: a decode instance process — co-located models, continuous batching, token streams."""
