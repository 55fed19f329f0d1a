"""Shared model runtime: model code, weights, paged KV cache, sampler, engine."""
