"""AdamW over stacked adapters, behaving exactly like K separate AdamW fits.

Every tensor of the bank is `[n_slots, ...]`. AdamW is element-wise, so one
update over the stack equals K updates, with three things kept per slot:

- only *active* slots (users with rows in this batch) are stepped: an idle
  slot gets no momentum decay, no weight decay, and its step count stays;
- gradient clipping uses each slot's own norm over all its tensors, as
  `clip_grad_norm_` over one user's parameters would;
- the learning rate follows each slot's own schedule and step count.

The arithmetic follows `torch.optim.AdamW` (single-tensor path) term by term,
so the weights agree with the reference fit to float rounding. `SlotSchedule`
and `adamw_update` are shared with the ZeRO variant (`peftu.fitting.zero`), which
steps a flat partition of the bank instead of whole `[n_slots, ...]` tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SlotSchedule:
    """Each slot's step count and learning-rate schedule."""

    def __init__(self, n_slots: int, lr: float, betas: tuple[float, float]):
        self.lr, self.betas = lr, betas
        self.steps = torch.zeros(n_slots, dtype=torch.long)
        self.lr_factor: list[Callable[[int], float]] = [lambda step: 1.0] * n_slots

    def reset(self, slot: int, lr_factor: Callable[[int], float]) -> None:
        self.steps[slot] = 0
        self.lr_factor[slot] = lr_factor

    def advance(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count a step for the `active` slots; their (lr, bias1, sqrt(bias2)), float64 `[len(active)]`."""
        self.steps[active] += 1
        steps = self.steps[active].tolist()
        lr = torch.tensor([self.lr * self.lr_factor[s](n - 1) for s, n in zip(active.tolist(), steps)],
                          dtype=torch.float64)
        step = torch.tensor(steps, dtype=torch.float64)
        beta1, beta2 = self.betas
        return lr, 1 - beta1 ** step, (1 - beta2 ** step).sqrt()


def clip_coefficients(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """`clip_grad_norm_`'s factor for each slot, from its squared gradient norm."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def adamw_update(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *,
                 lr: torch.Tensor, bias1: torch.Tensor, bias2_sqrt: torch.Tensor, weight_decay: float,
                 betas: tuple[float, float], eps: float, spread: Callable[[torch.Tensor], torch.Tensor]
                 ) -> None:
    """One AdamW step in place; `spread` turns a per-slot float64 term into one that broadcasts over w."""
    beta1, beta2 = betas
    w.mul_(spread(1 - lr * weight_decay))
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / spread(bias2_sqrt)).add_(eps)
    w.sub_(spread(lr / bias1) * m / denom)


class SlotAdamW:
    def __init__(self, params: list[torch.nn.Parameter], n_slots: int, *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, max_grad_norm: float = 0.0):
        self.params = params
        self.eps, self.betas = eps, betas
        self.weight_decay, self.max_grad_norm = weight_decay, max_grad_norm
        self.schedule = SlotSchedule(n_slots, lr, betas)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @property
    def steps(self) -> torch.Tensor:
        return self.schedule.steps

    def reset_slot(self, slot: int, lr_factor: Callable[[int], float] = lambda step: 1.0) -> None:
        """Forget a slot's state: a new user starts there with a fresh optimizer."""
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m[slot].zero_()
            v[slot].zero_()
        self.schedule.reset(slot, lr_factor)

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One AdamW step for the slots in `active` (a 1-D tensor of slot ids)."""
        if active.numel() == 0:
            return
        active = active.cpu()
        lr, bias1, bias2_sqrt = self.schedule.advance(active)
        idx = active.to(self.params[0].device)
        grads = [p.grad[idx] if p.grad is not None else torch.zeros_like(p[idx]) for p in self.params]
        if self.max_grad_norm > 0:
            coef = clip_coefficients(torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0),
                                     self.max_grad_norm)
            grads = [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads]

        for p, g, m_all, v_all in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            def spread(x: torch.Tensor) -> torch.Tensor:
                return x.to(p.dtype).to(p.device).view(-1, *([1] * (p.dim() - 1)))

            w, m, v = p[idx], m_all[idx], v_all[idx]
            adamw_update(w, g, m, v, lr=lr, bias1=bias1, bias2_sqrt=bias2_sqrt,
                         weight_decay=self.weight_decay, betas=self.betas, eps=self.eps, spread=spread)
            p[idx], m_all[idx], v_all[idx] = w, m, v

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
