"""Serving users' adapters on one base model with Ray Serve.

`config` (the deployment's settings), `cache` (which user sits in which bank
slot, LRU by count and bytes), `adapters` (store -> slots, version TTL,
invalidation), `generate` (KV-cached generation and label scoring over rows of
different users), `batcher` (the in-replica batcher that mixes users), `engine`
(one replica's model, bank and batcher), `api` (OpenAI-compatible request and
answer shapes, errors), `auth` (per-user HMAC tokens, admin key), `metrics`
(Prometheus), `server` (the `PeftuServer` deployment), `local` (the app on this
machine's Ray, for the demo), `fake_adapters` (many random adapters published
for benchmarks and tests) and `bench` (the serving benchmark).
"""
