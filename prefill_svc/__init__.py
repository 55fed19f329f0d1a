"""prefill_svc: a prefill instance process — prompts to their first token, KV handed on."""
