"""Fitting speed: users per hour of the published per-user loop, the banked fit, and the floor.

All three fit the same generated users with the same hyper-parameters, one
after another in one process, so their ratio is measured on one machine in one run:

- reference: what OPPU's and PEFT-U's code does for each user in turn: load the
  base from disk, `get_peft_model`, a fresh AdamW over padded batches with the
  model's own loss (logits at every position), `save_pretrained`. That loop is
  `peftu.fitting.reference.fit_adapter`.
- banked: users streamed largest first through a bank of K slots
  (`fit_stream`), every slot exported as a PEFT adapter when its user is done.
- floor: ONE PEFT adapter trained on all those users' examples pooled, in
  batches as large as the banked run's average union batch and with the same
  answer-token loss: the banked run's work without any per-user cost.

The bank visits each user's examples in the reference's seeded order, so each
user's last loss should be the reference's; `max_loss_diff` is the worst gap.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from rich.table import Table
from tqdm import tqdm

from peftu.bank import peft_initial_state
from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.data.synthetic import generate
from peftu.fitting.banked import PackTrainer, answer_token_loss, fit_stream, largest_first
from peftu.fitting.reference import fit_adapter
from peftu.model.base import load_base
from peftu.model.lora import lora_config


@dataclass
class FitBench:
    """Seconds of each fit over the same users, and how close the banked losses came."""

    task: str
    users: int
    examples: int
    """Training examples over all users (each is visited once per epoch)."""
    hp: LoraHParams
    pack_size: int
    threads: int
    repeat: int
    """Each fit ran this many times; the seconds are the fastest run's."""
    reference_seconds: float
    banked_seconds: float
    floor_seconds: float
    floor_batch_size: int
    loss_diffs: list[float]
    """|reference - banked| of each user's last loss."""
    sweep_seconds: dict[int, float] = field(default_factory=dict)
    """Banked seconds per pack size, the headline `pack_size` included."""

    def users_per_hour(self, seconds: float) -> float:
        return 3600 * self.users / seconds

    def summary(self) -> dict[str, float | int]:
        """The result line: exactly these keys, in this order."""
        reference, banked, floor = (self.users_per_hour(s) for s in
                                    (self.reference_seconds, self.banked_seconds, self.floor_seconds))
        return {"users": self.users,
                "reference_users_per_hour": round(reference, 1),
                "banked_users_per_hour": round(banked, 1),
                "floor_users_per_hour": round(floor, 1),
                "speedup_vs_reference": round(banked / reference, 3),
                "ratio_to_floor": round(banked / floor, 3),
                "max_loss_diff": max(self.loss_diffs)}


def time_reference(base_path: str, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
                   progress: bool = True) -> tuple[float, dict[str, float]]:
    """(a) Seconds of the published loop, per-user reload and save included; each user's last loss."""
    last_loss = {}
    start = time.perf_counter()
    for user in tqdm(users, desc="reference: per-user PEFT", unit="user", disable=not progress):
        base, tokenizer = load_base(base_path)
        model, result = fit_adapter(base, tokenizer, spec, user.train, hp)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
        last_loss[user.user_id] = result.losses[-1]
    return time.perf_counter() - start, last_loss


def time_banked(base_path: str, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
                pack_size: int, progress: bool = True) -> tuple[float, dict[str, float], float]:
    """(b) Seconds of the banked fit, every slot's export included; each user's last
    loss; and the average union batch (rows per banked step), which sizes the floor's batches."""
    start = time.perf_counter()
    base, tokenizer = load_base(base_path)
    init_state = peft_initial_state(base, lora_config(hp), hp.seed)
    trainer = PackTrainer(base, min(pack_size, len(users)), hp)
    bar = tqdm(total=len(users), desc=f"banked: {pack_size} slots", unit="user", disable=not progress)

    def export(slot: int, _user: UserRecord, _result) -> None:
        with tempfile.TemporaryDirectory() as folder:
            trainer.bank.export_slot(slot, folder)
        bar.update(1)

    results, steps = fit_stream(base, tokenizer, spec, largest_first(users), hp, trainer, init_state, on_user_done=export)
    trainer.bank.remove()
    bar.close()
    seconds = time.perf_counter() - start
    rows = hp.epochs * sum(len(user.train) for user in users)
    return seconds, {u: r.losses[-1] for u, r in results.items()}, rows / steps


def _answer_token_mean(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss value, with logits made only on answer tokens."""
    one_user = torch.zeros(len(batch["input_ids"]), dtype=torch.long)
    return answer_token_loss(model.get_base_model(), batch, one_user, 1)[0]


def time_floor(base_path: str, spec: TaskSpec, users: list[UserRecord], hp: LoraHParams,
               batch_size: int) -> float:
    """(c) Seconds to train one PEFT adapter on every user's examples pooled.

    A standard loop (PEFT, AdamW, shuffled batches padded to their longest
    row), but with the bank's loss: logits only on answer tokens, because
    logits on the prompt are work the bank never does.
    """
    start = time.perf_counter()
    base, tokenizer = load_base(base_path)
    pooled = [e for user in users for e in user.train]
    model, _ = fit_adapter(base, tokenizer, spec, pooled, hp.model_copy(update={"batch_size": batch_size}),
                           loss_fn=_answer_token_mean, progress=f"floor: one adapter, batch {batch_size}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
    return time.perf_counter() - start


def bench_fit(base_path: str, task: str = "synth-cls", n_users: int = 64, epochs: int = 2,
              pack_size: int = 16, seed: int = 0, sweep: Sequence[int] = (), threads: int | None = None,
              repeat: int = 1, progress: bool = True) -> FitBench:
    """Time (a) the reference, (b) the banked fit and (c) the floor on the same generated users.

    `sweep` adds banked runs at other slot counts (for the plot); the headline
    numbers are those of `pack_size`. With `repeat` > 1 every fit runs that many
    times, in rounds, and keeps its fastest time: on a shared machine the other
    processes only ever add time. `threads` (default: all cores) and the
    silenced loading bars of transformers (the reference reloads the base per
    user) are process-wide: the benchmark expects its own process.
    """
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads or os.cpu_count())
    hf_logging.disable_progress_bar()
    spec, users, _ = generate(task, n_users, seed=seed)
    hp = LoraHParams(epochs=epochs, seed=seed)
    sizes = [pack_size, *sorted(set(sweep) - {pack_size})]
    reference_runs, floor_runs, banked_runs = [], [], {size: [] for size in sizes}
    for _ in range(repeat):
        seconds, reference_loss = time_reference(base_path, spec, users, hp, progress)
        reference_runs.append(seconds)
        for size in sizes:
            seconds, last_loss, union_batch = time_banked(base_path, spec, users, hp, size, progress)
            banked_runs[size].append(seconds)
            if size == pack_size:
                banked_loss, floor_batch_size = last_loss, max(1, round(union_batch))
        floor_runs.append(time_floor(base_path, spec, users, hp, floor_batch_size))
    return FitBench(task=task, users=len(users), examples=sum(len(u.train) for u in users), hp=hp,
                    pack_size=pack_size, threads=torch.get_num_threads(), repeat=repeat,
                    reference_seconds=min(reference_runs), banked_seconds=min(banked_runs[pack_size]),
                    floor_seconds=min(floor_runs), floor_batch_size=floor_batch_size,
                    loss_diffs=[abs(reference_loss[u] - banked_loss[u]) for u in reference_loss],
                    sweep_seconds={size: min(runs) for size, runs in sorted(banked_runs.items())})


def render_fit_table(result: FitBench) -> Table:
    """Seconds and users per hour of each fit, and the ratios the targets are about."""
    hp = result.hp
    table = Table(title=f"fitting {result.users} users of {result.task} ({result.examples} training "
                  f"examples), {hp.epochs} epochs, r={hp.r}, batch {hp.batch_size}, "
                  f"{result.threads} threads, best of {result.repeat}")
    for col in ["fit", "seconds", "users/hour", "speed vs (a)"]:
        table.add_column(col, justify="left" if col == "fit" else "right")
    rows = [("(a) reference: per-user PEFT", result.reference_seconds),
            (f"(b) banked: {result.pack_size} slots", result.banked_seconds),
            (f"(c) floor: one adapter, batch {result.floor_batch_size}", result.floor_seconds)]
    rows += [(f"    banked: {size} slots", seconds)
             for size, seconds in result.sweep_seconds.items() if size != result.pack_size]
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.1f}", f"{result.users_per_hour(seconds):.0f}",
                      f"{result.reference_seconds / seconds:.2f}")
    summary = result.summary()
    table.caption = (f"speedup_vs_reference {summary['speedup_vs_reference']:.2f}, "
                     f"ratio_to_floor {summary['ratio_to_floor']:.2f}, "
                     f"max_loss_diff {summary['max_loss_diff']:.2e} "
                     f"(median {statistics.median(result.loss_diffs):.1e})")
    return table


def plot_fit(result: FitBench, path: str) -> None:
    """Users per hour of the three fits; with a sweep, the speedup per pack size beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = len(result.sweep_seconds) > 1
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 4), squeeze=False)
    bars = axes[0][0]
    names = ["(a) reference", f"(b) banked K={result.pack_size}", "(c) floor"]
    rates = [result.users_per_hour(s) for s in
             (result.reference_seconds, result.banked_seconds, result.floor_seconds)]
    bars.bar(names, rates, color=["tab:gray", "tab:blue", "tab:green"])
    for i, rate in enumerate(rates):
        bars.annotate(f"{rate:.0f}", (i, rate), ha="center", va="bottom")
    bars.set_ylim(0, 1.12 * max(rates))
    bars.set_ylabel("users / hour")
    bars.set_title(f"{result.users} users of {result.task}, {result.hp.epochs} epochs, "
                   f"threads={result.threads}")
    if sweep:
        line = axes[0][1]
        sizes = list(result.sweep_seconds)
        line.plot(sizes, [result.reference_seconds / s for s in result.sweep_seconds.values()], "o-",
                  label="banked / reference")
        line.plot(sizes, [result.floor_seconds / s for s in result.sweep_seconds.values()], "s-",
                  label="banked / floor")
        line.axhline(1.5, color="tab:blue", linestyle="--", linewidth=0.8, label="target vs reference")
        line.axhline(1.0, color="tab:orange", linestyle="--", linewidth=0.8, label="target vs floor")
        line.set_xscale("log", base=2)
        line.set_xticks(sizes, [str(s) for s in sizes])
        line.set_xlabel("slots K (users training at once)")
        line.set_ylabel("speed ratio")
        line.set_title("banked speed vs slots")
        line.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
