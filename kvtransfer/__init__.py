"""kvtransfer: moving a sequence's KV from prefill to decode instances (node-local pool; transports)."""
