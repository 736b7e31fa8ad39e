"""What a serving replica is told: which base, which store, which limits.

One pydantic model for the Serve application's `args` (the serve config YAML,
`serve run serve.app:app key=value`, a RayService's serveConfigV2), checked
strictly so a misspelt key fails the deploy instead of being ignored. Secrets
never live here: the admin key and the token secret come from environment
variables named here (a Kubernetes Secret, say).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """Settings of the PeftuServer deployment (every replica gets the same)."""

    model_config = ConfigDict(extra="forbid")

    base: str = ""
    """Base model folder or Hugging Face id; empty: the tiny base (built if missing)."""
    model_name: str = ""
    """The name clients use for the base (`<model_name>:<user_id>` for a user); default: base's folder name."""
    store: str = ""
    """Adapter store: a folder or s3://bucket/prefix; empty: $PEFTU_HOME/store."""
    endpoint_url: str | None = None
    task: str = "synth-cls"
    """Adapters are looked up under this task in the store; its prompt and labels serve /v1/score."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    max_rank: int = Field(16, ge=1)
    """Adapters up to this rank share the bank; smaller ones are zero-padded."""
    max_adapters: int = Field(256, ge=1)
    """Adapters held in memory per replica (bank slots)."""
    max_adapter_bytes: int = Field(1 << 30, ge=1)
    """Bytes of adapter weights held in memory per replica."""
    version_ttl_s: float = Field(5.0, ge=0)
    """How long a loaded version is trusted before the store's pointer is read again."""
    oppu: bool = False
    """The users' adapters are OPPU's (`peftu fit --oppu`): load `task`'s task adapter from the store
    and merge it into the base, which then also answers users who have no adapter."""
    pplug: bool = False
    """Answer users who have no adapter but cached history embeddings with PPlug's soft tokens
    (the plug of `task` from the store, fitted on this base by `peftu pplug fit`)."""
    batching: Literal["mixed", "split"] = "mixed"
    """mixed: users share a batch; split: one user per batch (what @serve.batch does; for benchmarks)."""
    max_batch: int = Field(32, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    max_prompt_tokens: int = Field(448, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    torch_threads: int = Field(0, ge=0)
    """0: leave torch's default (Ray sets it from the replica's CPUs)."""
    user_tokens: bool = False
    """Require a per-user HMAC token (Authorization: Bearer) for a user's adapter."""
    token_secret_env: str = "PEFTU_TOKEN_SECRET"
    admin_key_env: str = "PEFTU_ADMIN_KEY"
    admin_without_key: bool = False
    """Allow the admin endpoints with no key set (local use only)."""

    def secret(self, which: Literal["token", "admin"]) -> str | None:
        """The token secret or admin key from the environment (None when unset or empty)."""
        name = self.token_secret_env if which == "token" else self.admin_key_env
        return os.environ.get(name) or None
