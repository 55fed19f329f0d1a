"""The OpenAI-compatible HTTP gateway: /v1/chat/completions, /v1/completions, /v1/models,
/tokenize, /detokenize, /health and /metrics, translated to the proxy's public gRPC API.

It runs as its own process beside the proxy and talks to it over tokenpool.v1.Inference,
like any other client, rather than sharing the proxy's servicer in process: the gRPC API
stays the one contract (validation, the request table, overload shedding, cancellation and
failover are the proxy's, unchanged), the gateway can be restarted, scaled or left out
without touching the proxy, and an HTTP stack's event loop and JSON work never delay the
proxy's token relay. The cost is one loopback hop per message (tens of microseconds against
the milliseconds of a decode step). The public API's bearer token applies: the gateway
forwards the client's `Authorization` header to the proxy, which checks it.

It holds no model files: the models are the proxy's catalogue as it changes, and tokenizers
and chat templates run at the proxy (its Tokenize and Detokenize RPCs); see catalogue.py.
"""
