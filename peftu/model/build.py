"""The default base model: a tiny Llama that peftu builds and pre-trains itself.

No model hub is reachable here, so `peftu base build` makes one: a byte-level
BPE tokenizer trained with `tokenizers` on the task corpora, a Llama-architecture
causal LM of a few million parameters, pre-trained for a few minutes on the CPU
on those corpora (text of a separate population of generated users, so the
base knows the tasks' language and the crowd's answers but no user in the
data sets). It is saved with `save_pretrained`, and everything else loads a base
only through `from_pretrained(path_or_id)`, so a real model id works unchanged.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftu.config import BaseBuildConfig
from peftu.data.schema import TaskSpec, UserRecord
from peftu.data.synthetic import TASKS, generate
from peftu.model.base import BUILD_INFO, default_base_dir

EOS, PAD = "<|eos|>", "<|pad|>"


def task_text(spec: TaskSpec, text: str, output: str) -> str:
    """One example as the base sees it in pre-training: prompt, space, answer."""
    return f"{spec.render(text)} {output}"


def build_corpus(users_per_task: int, seed: int,
                 extra: list[tuple[TaskSpec, list[UserRecord]]] = ()) -> list[str]:
    """Documents for the tokenizer and pre-training.

    Generated users come from their own seed, disjoint from the data sets'
    users; `extra` adds the training examples of imported tasks.
    """
    docs = []
    for name in sorted(TASKS):
        spec, users, _ = generate(name, users_per_task, seed=seed)
        docs += [task_text(spec, e.input, e.output) for u in users for e in u.train]
    for spec, users in extra:
        docs += [task_text(spec, e.input, e.output) for u in users for e in u.train]
    random.Random(seed).shuffle(docs)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: any text encodes, common words are one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def _blocks(tokenizer: PreTrainedTokenizerFast, docs: list[str], block: int) -> torch.Tensor:
    """Documents joined by EOS and cut into equal blocks for language modelling."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    return math.exp(total / count)


def build_base(out: Path, cfg: BaseBuildConfig = BaseBuildConfig(),
               extra: list[tuple[TaskSpec, list[UserRecord]]] = (),
               log=print) -> dict:
    """Build, pre-train and save the tiny base; returns the build info."""
    torch.manual_seed(cfg.seed)
    docs = build_corpus(cfg.users_per_task, cfg.seed, extra)
    tokenizer = train_tokenizer(docs, cfg.vocab_size)
    n_val = max(1, len(docs) // 50)
    train_blocks = _blocks(tokenizer, docs[n_val:], cfg.block_size)
    val_blocks = _blocks(tokenizer, docs[:n_val], cfg.block_size)[:64]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny base: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
        f"{train_blocks.numel() / 1e6:.2f}M training tokens")
    ppl_before = perplexity(model, val_blocks)
    log(f"validation perplexity before pre-training: {ppl_before:.1f}")

    steps = _pretrain(model, train_blocks, cfg, log)
    ppl_after = perplexity(model, val_blocks)
    log(f"validation perplexity after {steps} steps: {ppl_after:.2f}")

    out = Path(out)
    staging = out.with_name(f".{out.name}.building")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {"parameters": n_params, "steps": steps, "ppl_before": ppl_before,
            "ppl_after": ppl_after, "config": cfg.model_dump()}
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return info


def _pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, cfg: BaseBuildConfig, log) -> int:
    """Plain next-token training until the step budget, or the time budget after `min_steps`, is spent."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.max_steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    deadline = time.monotonic() + cfg.max_minutes * 60
    model.train()
    bar = tqdm(range(cfg.max_steps), desc="pre-training", unit="step", mininterval=2,
               disable=None)
    step = 0
    for step in bar:
        batch = blocks[torch.randint(len(blocks), (cfg.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 >= cfg.min_steps and time.monotonic() > deadline:
            log(f"time budget of {cfg.max_minutes} min reached")
            break
    bar.close()
    return step + 1


def ensure_base(path: Path | None = None, log=print) -> Path:
    """The default base folder, built first if it is missing."""
    path = Path(path) if path else default_base_dir()
    if not (path / "config.json").is_file():
        log(f"no base model at {path}; building the tiny base (a few minutes)")
        build_base(path, log=log)
    return path

