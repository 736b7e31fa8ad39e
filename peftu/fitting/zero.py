"""Pack-parallel fitting with DeepSpeed ZeRO-2/3: the workers of a group train one bank together.

User-parallel fitting (each worker its own bank) is right while a worker holds
the base and its bank comfortably. With thousands of users on a large base the
bank's AdamW state is the biggest state there is, so here the G workers of a
group train the *same* bank (the same users in its slots): each takes a share of every step's rows (data
parallel), and DeepSpeed ZeRO-2 shards the bank's gradients and optimizer
state over them; ZeRO-3 shards the frozen base too, and then every rank must
run the same forwards (`lockstep`) and evaluation runs on the whole group.

What stays exactly as in `train.fit_stream`:

- each user's loss is divided by their answer-token count over the whole step,
  counted on every rank from the full step, so the shares add up to the sum of
  per-user means; DeepSpeed averages gradients over the group, so the loss is
  multiplied by G to get that sum back;
- the per-slot AdamW semantics: ZeRO hands the optimizer one flat fp32
  partition of the bank, so `PartitionedSlotAdamW` maps every element of its
  partition to the slot it belongs to (from where DeepSpeed laid each
  parameter out in its flat buffer), steps only active slots' elements, and
  clips each slot by its norm summed over the partitions of the group.

The bank lives for the whole run: each user who takes a slot over loads the
initial weights into it and DeepSpeed's fp32 master copy is refreshed from them.
Every rank of a group follows the same plan, so all of them see a user finish
at the same step.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from peftu.bank.model import AdapterBank, peft_initial_state
from peftu.bank.optim import SlotSchedule, adamw_update, clip_coefficients
from peftu.config import LoraHParams
from peftu.data.schema import TaskSpec, UserRecord
from peftu.fitting.banked import PackTrainer, plan_users, run_stream, slot_count
from peftu.fitting.reference import FitSummary
from peftu.model.lora import lora_config
from peftu.store import AdapterStore

STAGES = {"zero2": 2, "zero3": 3}


def ds_config(stage: str, offload: bool = False) -> dict:
    """The DeepSpeed config of a pack-parallel fit (written out with the run)."""
    if stage not in STAGES:
        raise ValueError(f"unknown DeepSpeed mode {stage!r}: choose {' or '.join(STAGES)}")
    # One optimizer sub-group: the per-slot norms and step counts are taken once per step.
    zero: dict = {"stage": STAGES[stage], "sub_group_size": 10**15}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        # Batches are ours (a step is each packed user's own mini-batch), so DeepSpeed's are 1.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # Our optimizer is the per-slot AdamW; clipping is per slot, inside it.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }


def use_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; without a GPU it must be told it is the CPU."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class GroupMpu:
    """DeepSpeed's view of a group: data parallel over the group's ranks, no model parallelism."""

    def __init__(self, group: dist.ProcessGroup, solo: dist.ProcessGroup):
        self.group, self.solo = group, solo

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)

    def get_model_parallel_group(self):
        return self.solo

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


def form_groups(group_size: int) -> tuple[int, int, GroupMpu | None]:
    """Split the world into groups of `group_size` consecutive ranks (every rank must call this).

    Returns (this rank's group index, how many groups, the mpu to hand
    DeepSpeed: None when one group is the whole world).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if group_size <= 0 or world % group_size:
        raise ValueError(f"{world} workers cannot form groups of {group_size}")
    n_groups = world // group_size
    if n_groups == 1:
        return 0, 1, None
    groups = [dist.new_group(list(range(g * group_size, (g + 1) * group_size))) for g in range(n_groups)]
    solos = [dist.new_group([r]) for r in range(world)]
    mine = rank // group_size
    return mine, n_groups, GroupMpu(groups[mine], solos[rank])


def _slots_of(p: torch.Tensor, n_slots: int, first: int, count: int) -> torch.Tensor:
    """Slots of elements `first .. first+count` of a flattened `[n_slots, ...]` tensor (-1 past its end)."""
    idx = torch.arange(first, first + count)
    numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return torch.where(idx < numel, idx // (numel // n_slots), -1)


def partition_slots(zero_optimizer, params: list[torch.nn.Parameter], n_slots: int) -> dict[int, torch.Tensor]:
    """The slot of every element of this rank's fp32 partitions (-1: padding), keyed by `id(partition)`.

    Stage 1/2 makes every parameter a view into one flat buffer per group and
    gives each rank a contiguous piece of that buffer. Stage 3 gives each
    parameter its own partition (`ds_tensor`, a view into the rank's flat
    buffer) holding elements `rank * size ...` of that parameter. Either way,
    where DeepSpeed put each view says which slots its elements belong to.
    """
    maps = {}
    if hasattr(zero_optimizer, "bit16_groups_flat"):  # stage 1/2
        for gid, flat in enumerate(zero_optimizer.bit16_groups_flat):
            where = torch.full((flat.numel(),), -1, dtype=torch.long)
            for p in params:
                start = (p.data.data_ptr() - flat.data_ptr()) // flat.element_size()
                if 0 <= start < flat.numel():
                    where[start:start + p.numel()] = _slots_of(p, n_slots, 0, p.numel())
            rank = dist.get_rank(group=zero_optimizer.real_dp_process_group[gid])
            mine = zero_optimizer.parallel_partitioned_bit16_groups[gid][rank]
            offset = (mine.data_ptr() - flat.data_ptr()) // flat.element_size()
            maps[id(zero_optimizer.single_partition_of_fp32_groups[gid])] = where[offset:offset + mine.numel()]
        return maps
    rank = dist.get_rank(group=zero_optimizer.dp_process_group)
    for sub, flat in enumerate(zero_optimizer.fp16_partitioned_groups_flat):  # stage 3
        where = torch.full((flat.numel(),), -1, dtype=torch.long)
        for p in zero_optimizer.fp16_groups[sub]:
            part = p.ds_tensor
            start = (part.data_ptr() - flat.data_ptr()) // flat.element_size()
            where[start:start + part.numel()] = _slots_of(p, n_slots, rank * part.numel(), part.numel())
        maps[id(zero_optimizer.fp32_partitioned_groups_flat[sub])] = where
    return maps


class PartitionedSlotAdamW(torch.optim.Optimizer):
    """`SlotAdamW` for the flat partition of the bank that ZeRO gives this rank.

    `active` (the slots with rows in the step) is set before each
    `engine.step()`; `locate` is called once DeepSpeed has laid the bank out.
    """

    def __init__(self, params: list[torch.nn.Parameter], n_slots: int, *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 max_grad_norm: float = 0.0, group: dist.ProcessGroup | None = None):
        super().__init__(params, {"lr": lr})
        self.n_slots, self.betas, self.eps = n_slots, betas, eps
        self.weight_decay, self.max_grad_norm, self.group = weight_decay, max_grad_norm, group
        self.schedule = SlotSchedule(n_slots, lr, betas)
        self.slot_maps: dict[int, torch.Tensor] = {}
        self.owned: list[torch.Tensor] = []
        self.active = torch.zeros(0, dtype=torch.long)

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        return state["exp_avg"], state["exp_avg_sq"]

    def _partitions(self):
        """The fp32 partitions DeepSpeed has put in the param groups now, with their elements' slots."""
        for group in self.param_groups:
            for p in group["params"]:
                yield p, self.slot_maps[id(p)].to(p.device)

    def locate(self, zero_optimizer, params: list[torch.nn.Parameter]) -> None:
        """Learn, once DeepSpeed has laid the bank out, which slot each owned element belongs to."""
        self.slot_maps = partition_slots(zero_optimizer, params, self.n_slots)
        self.owned = [p for p in getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
                      or zero_optimizer.fp32_partitioned_groups_flat]

    def reset_slot(self, slot: int, lr_factor: Callable[[int], float]) -> None:
        for p in self.owned:  # stage 3 puts partitions in the param groups only while stepping
            slots = self.slot_maps[id(p)].to(p.device)
            for moment in self._moments(p):
                moment[slots == slot] = 0
        self.schedule.reset(slot, lr_factor)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        active = self.active.cpu()
        parts = [(p, slots, p.grad if p.grad is not None else torch.zeros_like(p))
                 for p, slots in self._partitions()]
        # Every rank joins the norm's all-reduce, even one whose step is empty.
        coef = None
        if self.max_grad_norm > 0:
            sq = torch.zeros(self.n_slots + 1, dtype=parts[0][0].dtype, device=parts[0][0].device)
            for p, slots, g in parts:
                sq.index_add_(0, slots + 1, g.pow(2))
            dist.all_reduce(sq, group=self.group)
            coef = clip_coefficients(sq[1:], self.max_grad_norm)
        if active.numel() == 0:
            return
        lr, bias1, bias2_sqrt = self.schedule.advance(active)
        position = torch.full((self.n_slots,), -1, dtype=torch.long)
        position[active] = torch.arange(active.numel())
        for p, slots, g in parts:
            where = (position.to(p.device)[slots.clamp(min=0)] >= 0) & (slots >= 0)
            elem_slot = slots[where]
            elem_pos = position.to(p.device)[elem_slot]
            grad = g[where] if coef is None else g[where] * coef[elem_slot]
            m_all, v_all = self._moments(p)
            w, m, v = p[where], m_all[where], v_all[where]
            adamw_update(w, grad, m, v, lr=lr, bias1=bias1, bias2_sqrt=bias2_sqrt,
                         weight_decay=self.weight_decay, betas=self.betas, eps=self.eps,
                         spread=lambda x, p=p, elem_pos=elem_pos: x.to(p.device)[elem_pos].to(p.dtype))
            p[where], m_all[where], v_all[where] = w, m, v


class ZeroPackTrainer(PackTrainer):
    """A `PackTrainer` whose steps are shared by the ranks of a DeepSpeed ZeRO group."""

    def __init__(self, model: torch.nn.Module, n_slots: int, hp: LoraHParams, *, config: dict,
                 mpu: GroupMpu | None = None):
        import deepspeed

        if config["zero_optimization"]["stage"] not in STAGES.values():
            raise ValueError(f"pack-parallel fitting runs ZeRO stage {sorted(STAGES.values())}, "
                             f"not {config['zero_optimization']['stage']}")
        self.bank = AdapterBank(model, n_slots, lora_config(hp))
        group = self.group = mpu.group if mpu else None
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        params = self.bank.parameters()
        self.opt = PartitionedSlotAdamW(params, n_slots, lr=hp.lr, weight_decay=hp.weight_decay,
                                        max_grad_norm=hp.max_grad_norm, group=group)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.opt, config=config,
                                               model_parameters=params, mpu=mpu,
                                               dist_init_required=False)
        self.opt.locate(self.engine.optimizer, params)
        self.lockstep = config["zero_optimization"]["stage"] == 3
        self.pending: list[torch.Tensor] = []
        self.refresh = False

    def full_bank(self, modify: bool = False):
        if not self.lockstep:  # stage 1/2: the bank is whole on every rank
            return super().full_bank(modify)
        import deepspeed
        return deepspeed.zero.GatheredParameters(self.bank.parameters(), modifier_rank=0 if modify else None)

    def reset_slot(self, slot: int, state: dict[str, torch.Tensor], lr_factor) -> None:
        self.bank.load_slot(slot, state)  # into DeepSpeed's bit16 copy; the fp32 master follows at the step
        self.opt.reset_slot(slot, lr_factor)
        self.refresh = True

    def backward(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)  # one backward per step: every rank must make the same collective calls

    def step(self, active: torch.Tensor, per_user: torch.Tensor) -> torch.Tensor:
        if self.refresh:  # the slots were reloaded: the fp32 master copy follows
            self.engine.optimizer.refresh_fp32_params()
            self.refresh = False
        # A rank with no rows in this step still takes part, with a zero that touches every slot.
        loss = sum(self.pending) if self.pending else sum(p.sum() for p in self.bank.parameters()) * 0.0
        self.pending = []
        self.engine.backward(loss * self.world)  # DeepSpeed averages over the group; ours is a sum
        self.opt.active = active
        self.engine.step()
        dist.all_reduce(per_user, group=self.group)
        return per_user


def fit_users_zero(model: torch.nn.Module, tokenizer, spec: TaskSpec, users: list[UserRecord],
                   hp: LoraHParams, store: AdapterStore, *, base_fp: str, config: dict, group_size: int = 0,
                   pack_size: int = 16, token_budget: int = 0, on_progress=None) -> FitSummary:
    """`fit_users_banked` for a DeepSpeed world: every rank calls it with the same users.

    Groups of `group_size` ranks (0: one group of all) take every n-th user of
    the largest-first order; the ranks of a group train its stream together
    and the group's first rank evaluates and publishes each user. Rank 0 alone
    decides what to skip, so a user published while another rank is still
    starting cannot split the world's plans. A group's first rank returns what
    it published (rank 0 also the skipped and failed users); the other ranks
    return an empty summary.
    """
    group, n_groups, mpu = form_groups(group_size or dist.get_world_size())
    plan = [plan_users(store, spec, users, hp, base_fp) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(plan, src=0)
    summary, todo = plan[0]
    if dist.get_rank() != 0:
        summary = FitSummary()
    mine = todo[group::n_groups]
    if not mine:
        return summary
    init_state = peft_initial_state(model, lora_config(hp), hp.seed)
    trainer = ZeroPackTrainer(model, min(len(mine), slot_count(pack_size, hp, token_budget)), hp, config=config,
                              mpu=mpu)
    return run_stream(model, tokenizer, spec, mine, hp, store, base_fp, trainer, init_state, summary, on_progress)
