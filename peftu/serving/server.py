"""The Ray Serve deployment `PeftuServer`: HTTP routes over one replica's `Engine`.

One deployment with a FastAPI ingress. A request names a user by its model
(`<model_name>:<user_id>`) or by the `serve_multiplexed_model_id` header; the
header lets Serve route it to a replica that already holds the user's adapter
(`@serve.multiplexed` records which replica holds which model id). The load
itself happens outside Serve's model lock, in `AdapterManager`, so cold loads
of different users overlap and never hold up other users' requests.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' type hints
# at run time, and Serve's ingress wrapper loses the module globals they would name.
import gc
import logging
import time

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from ray import serve

from peftu.config import ServeConfig
from peftu.errors import InvalidIdError, NotFoundError, StoreError
from peftu.serving.adapters import Lease
from peftu.serving.api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    ScoreRequest,
    chat_prompt,
    install_error_handlers,
    resolve_user,
)
from peftu.serving.auth import UserTokens, same_secret
from peftu.serving.completions import Completions
from peftu.serving.control import Broadcast
from peftu.serving.engine import Engine
from peftu.serving.limits import BodyLimits
from peftu.serving.selection import Selections
from peftu.store import validate_id

log = logging.getLogger("peftu.serving")

api = FastAPI(title="peftu", description="Per-user LoRA adapters on one base model (OpenAI-compatible).")
install_error_handlers(api)
api.add_middleware(BodyLimits)  # innermost: _count below sees its 413s and 408s

_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/healthz", "/metrics"}


@api.middleware("http")
async def _count(request: Request, call_next):
    """Requests and latency (to the first byte for streams) per endpoint and status."""
    start = time.monotonic()
    response = await call_next(request)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        path = request.url.path
        endpoint = path if path in _ENDPOINTS else "/admin" if path.startswith("/admin/") else "other"
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
    return response


def _adapter_headers(lease: Lease) -> dict[str, str]:
    """Which adapter answered (`pplug`: the plug's soft tokens); whether it was resident or had to be loaded."""
    if lease.pplug:
        return {"x-peftu-adapter": "pplug", "x-peftu-cache": "pplug"}
    headers = {"x-peftu-adapter": lease.version or "none",
               "x-peftu-cache": "base" if lease.version is None else "load" if lease.loaded_ms else "hit"}
    if lease.loaded_ms is not None:
        headers["x-peftu-load-ms"] = f"{lease.loaded_ms:.1f}"
    if lease.fallback is not None:
        headers["x-peftu-fallback"] = lease.fallback
    return headers


@serve.deployment(name="PeftuServer", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10)
@serve.ingress(api)
class PeftuServer:
    """One base model per replica, users' adapters in a bank, mixed batches."""

    def __init__(self, config: dict | None = None):
        self.cfg = ServeConfig.model_validate(config or {})
        self.engine = Engine(self.cfg)
        self.generation = Completions(self.engine, self.cfg, _adapter_headers)
        self.tokens = UserTokens.from_config(self.cfg, self.engine.model_name)
        if not self.cfg.user_tokens:
            log.warning("user_tokens is false: any client may use any user's adapter")
        self.selection = Selections(self.engine.adapters.store, self.cfg.task, self.engine.adapters.base_fp,
                                    ttl_s=self.cfg.version_ttl_s, device=self.cfg.device,
                                    encoder=self.engine.plug.encoder if self.engine.plug is not None else None)
        self.broadcast = Broadcast(self._forget)
        api.state.metrics = self.engine.metrics
        api.state.body_limits = (self.cfg.max_body_bytes, self.cfg.body_timeout_s)

        async def register(model_id: str) -> str:
            return model_id  # routing bookkeeping only; AdapterManager does the loading

        self._register = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters)(register)
        # What is loaded now (the model, the bank, Ray's and the web stack's objects) lives as long as
        # the replica: out of the collector's sight, a full collection, which stops every stream, takes
        # 5 to 14 ms under `peftu bench serve` (the first took 200 ms before).
        gc.freeze()

    def check_health(self) -> None:
        """Unhealthy only if the batch loop died (a bad adapter never makes a replica unhealthy)."""
        if self.engine.scheduler.error is not None:
            raise RuntimeError(f"the batch loop stopped: {self.engine.scheduler.error!r}")

    # --- who is asking for which adapter ------------------------------------------------

    def _forget(self, user: str) -> None:
        """Evict the user here (running requests keep their weights), forget their PPlug history and
        neighbours, and read the selection record again (a new fit may have chosen for them)."""
        self.engine.adapters.invalidate(user)
        self.selection.forget(user)
        if self.engine.plug is not None:
            self.engine.plug.forget(user)

    async def _user(self, model: str, authorization: str | None) -> str | None:
        self.broadcast.listen()  # a replica holds users only once it has served one
        header = serve.get_multiplexed_model_id() or None
        user = resolve_user(model, header, self.engine.model_name)
        if user is not None and self.cfg.user_tokens:
            await self.tokens.authorize(user, authorization)
        if user is not None:
            await self._register(f"{self.engine.model_name}:{user}")
        return user

    async def _generate(self, body: SamplingFields, prompts: list[str | list[int]], authorization: str | None,
                        chat: bool) -> Response:
        rows = self.generation.rows(body, prompts)
        route = await self.selection.route(await self._user(body.model, authorization))
        return await self.generation.answer(body, rows, route.user, chat,
                                            lambda lease: _adapter_headers(lease) | route.generation_headers(lease),
                                            adapter=route.adapter)

    # --- the API ----------------------------------------------------------------------------

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest,
                          authorization: str | None = Header(None)) -> Response:
        return await self._generate(body, body.prompts(), authorization, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest,
                               authorization: str | None = Header(None)) -> Response:
        return await self._generate(body, [chat_prompt(body.messages, self.engine.tokenizer)], authorization,
                                    chat=True)

    @api.post("/v1/score")
    async def score(self, body: ScoreRequest, authorization: str | None = Header(None)) -> Response:
        labels = body.labels or self.engine.spec.labels
        if len(labels) < 2:
            raise ApiError(400, f"task {self.cfg.task!r} has no labels: give two or more in 'labels'", "labels")
        self.generation.checked(self.engine.encode_prompt(self.engine.score_spec(labels).render(body.input)))
        route = await self.selection.route(await self._user(body.model, authorization))
        scored = await route.score(self.engine, body.input, labels)
        return JSONResponse({"object": "score", "model": body.model, "label": scored.label, "scores": scored.scores},
                            headers=_adapter_headers(scored.lease) | scored.headers)

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict:
        """The base, and the caller's own model when a valid user token comes along.

        Users are never listed: their ids are not public.
        """
        created = int(time.time())
        names = [self.engine.model_name]
        user = await self.tokens.token_user(authorization) if self.tokens is not None else None
        if user is not None:
            names.append(f"{self.engine.model_name}:{user}")
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "peftu"}
                                           for n in names]}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.engine.model_name, "task": self.cfg.task,
                "adapters_resident": len(self.engine.adapters.resident())}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    # --- admin ------------------------------------------------------------------------------

    def _admin(self, api_key: str | None) -> None:
        key = self.cfg.secret("admin")
        if key is None and not self.cfg.admin_without_key:
            raise ApiError(403, f"admin endpoints are off: set ${self.cfg.admin_key_env} "
                           "(or admin_without_key for local use)", kind="permission_error")
        if key is not None and not same_secret(api_key, key):
            raise ApiError(401, "admin endpoints need the admin key in the x-api-key header",
                           kind="authentication_error")

    @staticmethod
    def _admin_user(user_id: str) -> str:
        try:
            return validate_id(user_id, "user id")
        except InvalidIdError as e:
            raise ApiError(400, str(e), "user_id") from None

    @api.get("/admin/adapters")
    async def admin_adapters(self, x_api_key: str | None = Header(None)) -> dict:
        """Users whose adapters this replica holds, least recently used first, and which replica it is."""
        self._admin(x_api_key)
        return {"users": self.engine.adapters.resident(), "replica": self.broadcast.replica}

    @api.post("/admin/users/{user_id}/invalidate")
    async def admin_invalidate(self, user_id: str, x_api_key: str | None = Header(None)) -> dict:
        """Drop the user's loaded adapter on every replica; the next request reads the store's latest version."""
        self._admin(x_api_key)
        user = self._admin_user(user_id)
        was_loaded = user in self.engine.adapters.resident()
        return {"user": user, "was_loaded": was_loaded, "replicas": await self.broadcast.publish(user, "invalidate")}

    @api.delete("/admin/users/{user_id}")
    async def admin_delete(self, user_id: str, x_api_key: str | None = Header(None)) -> dict:
        """Delete every version of the user's adapter from the store; answer once every replica has evicted it."""
        self._admin(x_api_key)
        user = self._admin_user(user_id)
        try:
            removed = await self.engine.adapters.delete(user)
        except NotFoundError as e:
            raise ApiError(404, str(e), "user_id", "not_found_error") from None
        except StoreError as e:
            raise ApiError(503, f"the store could not delete the adapter: {e}", kind="server_error") from None
        return {"user": user, "deleted_versions": removed, "replicas": await self.broadcast.publish(user, "delete")}


def build_app(args: dict | None = None) -> serve.Application:
    """The application for `serve run` / a serve config: args are `ServeConfig` fields."""
    cfg = ServeConfig.model_validate(args or {})
    return PeftuServer.bind(cfg.model_dump())
