"""Pack-parallel fitting under DeepSpeed ZeRO-2: two gloo ranks train one pack exactly as one process does.

The ranks are real processes (torch.multiprocessing, gloo on loopback, DeepSpeed's CPU
accelerator). In float64 the differences from the single-process bank are the order of float
sums and DeepSpeed's fp32 master copy of the weights, so weights and losses
agree to 1e-4 relative; the fit job's own test
(tests/test_fit_job.py) runs the same through Ray Train in fp32.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from peftu.bank import peft_initial_state
from peftu.config import LoraHParams
from peftu.data.schema import UserRecord
from peftu.data.synthetic import TASKS, generate
from peftu.fitting.banked import fit_pack
from peftu.model.base import load_base
from peftu.model.lora import lora_config

RATING = TASKS["synth-rating"]
HP = LoraHParams(r=4, alpha=8, epochs=2, batch_size=4, lr=2e-2, weight_decay=0.05, max_grad_norm=0.3,
                 target_modules=["q_proj", "v_proj", "down_proj"])


def _users() -> list[UserRecord]:
    """Four users of 3 to 11 examples: slots go idle at different steps, and ranks get uneven rows."""
    _, users, _ = generate("synth-rating", 60, seed=21)
    pool = sorted(users, key=lambda u: -len(u.train))
    return [UserRecord(f"user{i}", train=pool[i].train[:n], test=pool[i].test)
            for i, n in enumerate([3, 7, 11, 5])]


def _rank(rank: int, world: int, port: int, base: str, out: str, offload: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from peftu.fitting.zero import ZeroPackTrainer, ds_config, form_groups

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok = load_base(base)
        model.double()
        init = peft_initial_state(model, lora_config(HP), HP.seed)
        _, _, mpu = form_groups(world)
        # one spare slot: an idle slot must come out untouched
        trainer = ZeroPackTrainer(model, 5, HP, config=ds_config("zero2", offload), mpu=mpu)
        spare = {k: v.clone() for k, v in trainer.bank.slot_state(4).items()}
        packed = fit_pack(model, tok, RATING, _users(), HP, init, trainer)
        torch.save({"slots": [packed.bank.slot_state(s) for s in range(4)], "spare": spare,
                    "spare_after": packed.bank.slot_state(4),
                    "losses": {u: r.losses for u, r in packed.results.items()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("offload", [
    pytest.param(False, marks=pytest.mark.slow),  # `make test-slow`: the same ranks without offload
    True], ids=["on-device", "optimizer-offload"])
def test_zero2_on_two_ranks_equals_one_process_in_float64(tiny_base, tmp_path, free_tcp_port, offload):
    mp.spawn(_rank, args=(2, free_tcp_port, tiny_base, str(tmp_path), offload), nprocs=2)
    model, tok = load_base(tiny_base)
    model.double()
    alone = fit_pack(model, tok, RATING, _users(), HP)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for slot, user in enumerate(alone.users):
            for key, want in alone.bank.slot_state(slot).items():
                rel = ((got["slots"][slot][key] - want).norm() / want.norm()).item()
                assert rel < 1e-4, (rank, user.user_id, key, rel)
            assert got["losses"][user.user_id] == pytest.approx(alone.results[user.user_id].losses, rel=1e-4)
        for key, before in got["spare"].items():  # DeepSpeed's master copy is fp32, hence the rounding
            assert torch.equal(got["spare_after"][key], before.float().double())
