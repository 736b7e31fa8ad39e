"""Serving users' adapters on one base model with Ray Serve.

`cache` (which user sits in which bank slot, LRU by count and bytes),
`adapters` (store -> slots, version TTL, invalidation), `scheduler` (the
continuous step loop: rows of any users join and leave the running batch),
`batcher` (the static batcher, and the job queue both share), `engine` (one
replica's model, bank and scheduler over `peftu.inference`), `pplug` (PPlug's soft tokens for
users without an adapter), `api` (OpenAI-compatible request and answer
shapes, errors), `auth` (per-user HMAC tokens, admin key), `metrics`
(Prometheus), `server` (the `PeftuServer` deployment) and `local` (the app on
this machine's Ray, for the demo). The settings are `peftu.config.ServeConfig`.
A replica only reads: it never trains, nor builds a base.
"""
