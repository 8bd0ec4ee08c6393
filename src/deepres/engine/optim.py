"""Parameter groups, the optimizer and iteration-based learning-rate schedules."""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn as nn

__all__ = ["Schedule", "build_optimizer", "param_groups"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = True,
                 exclude: set[int] | None = None) -> list[dict]:
    """Split parameters into decayed and non-decayed groups by module type (never by name).

    The paper decays every weight (``decay_norm_and_bias=True``). Otherwise normalisation layers' parameters and every
    bias are exempt: they set scales and offsets, which decay only pushes toward zero. Frozen parameters and those
    whose ``id`` is in ``exclude`` are left out.
    """
    exclude = exclude or set()
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in exclude],
                 "weight_decay": weight_decay}]
    decay, no_decay, seen = [], [], set(exclude)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = isinstance(module, _NORM_TYPES) or name == "bias" or p.ndim <= 1
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device, backbone_lr_scale: float = 1.0,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """SGD (or AdamW, ``cfg.name``) over the trainable parameters. ``backbone_lr_scale`` != 1 (fine-tuning): every
    parameter outside the classifier (``model.get_classifier()``) gets ``lr_scale`` = that factor, which the loop
    applies to the schedule's lr. ``capturable``: AdamW's state kept ready for a CUDA graph (the captured step)."""
    if backbone_lr_scale == 1.0:
        groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    else:
        head = model.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        groups = [dict(g, lr_scale=backbone_lr_scale)
                  for g in param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, exclude=head_ids)]
        groups += [dict(g, lr_scale=1.0) for g in param_groups(head, cfg.weight_decay, cfg.decay_norm_and_bias)]
        groups = [g for g in groups if g["params"]]
    # fused: one kernel for the whole update on CUDA; foreach: vectorised on CPU. Same arithmetic.
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.name == "adamw":  # each group's weight_decay applies, decoupled from the gradient
        if device.type == "cuda":
            kind["capturable"] = capturable
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind)
    if cfg.name != "sgd":
        raise ValueError(f"optim.name={cfg.name!r} is not supported; allowed: sgd, adamw")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kind)


class Schedule:
    """Learning rate as a function of the iteration (the paper's schedules are in iterations, not epochs).

    multistep: lr x gamma^(milestones passed); cosine: from lr to min_lr; onecycle: up to lr over the warmup, then
    linearly down to min_lr; constant. ``warmup_iterations`` ramps linearly from warmup_lr. The paper's ResNet-110 rule
    (``warmup_until_train_error``) holds warmup_lr until the training error falls below the threshold; that switch
    (and ``error_warmup_iterations``, how many iterations trained at warmup_lr before it) is state, saved with the
    checkpoint.
    """

    WINDOW = 20  # training batches averaged for the warmup-until-error test

    def __init__(self, cfg, base_lr: float, total_iterations: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.total = max(1, total_iterations)
        self.error_warmup_done = cfg.warmup_until_train_error is None
        self.error_warmup_iterations: int | None = None  # iterations held at warmup_lr, once the hold has ended
        self.recent_errors: deque[float] = deque(maxlen=self.WINDOW)
        # Values below 1 are fractions of the run.
        self.milestones = [self.iteration(m) for m in cfg.milestones]
        self.warmup = self.iteration(cfg.warmup_iterations)

    def iteration(self, value: float) -> int:
        """An iteration count, or a fraction of the run (0 < value < 1) as one."""
        return round(value * self.total) if 0 < value < 1 else int(value)

    def notices(self) -> list[str]:
        """Schedule points past the last iteration (they never take effect), milestones given once as a fraction and
        once as an iteration that fall together (gamma applies twice there), and a warm-up that starts above the rate
        it leads to: what a run warns about."""
        multistep = self.cfg.name == "multistep"
        out = [f"schedule.milestones {m} is at or beyond the run's {self.total} iterations: the learning rate "
               f"never drops there" for m in self.milestones if m >= self.total and multistep]
        given = dict(zip(self.milestones, self.cfg.milestones))
        out += [f"schedule.milestones {given_m} and {given[m]} both fall at iteration {m}: the learning rate drops "
                f"by schedule.gamma twice there" for m, given_m in zip(self.milestones, self.cfg.milestones)
                if multistep and given[m] != given_m]
        if (self.warmup > 0 or self.cfg.warmup_until_train_error is not None) and self.cfg.warmup_lr > self.base_lr:
            out.append(f"schedule.warmup_lr {self.cfg.warmup_lr:g} is above optim.lr {self.base_lr:g}: the warm-up "
                       f"starts higher than the rate it leads to (set schedule.warmup_lr below optim.lr)")
        if self.warmup >= self.total:
            out.append(f"schedule.warmup_iterations {self.warmup} is at or beyond the run's {self.total} iterations: "
                       f"the warm-up never ends")
        return out

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if not self.error_warmup_done:
            return cfg.warmup_lr
        if cfg.name == "onecycle":
            up = max(1, self.warmup)
            if step < up:
                return cfg.warmup_lr + (self.base_lr - cfg.warmup_lr) * step / up
            frac = (step - up) / max(1, self.total - up)
            return self.base_lr + (cfg.min_lr - self.base_lr) * min(1.0, frac)
        if self.warmup and step < self.warmup:
            return cfg.warmup_lr + (self.base_lr - cfg.warmup_lr) * step / self.warmup
        if cfg.name == "multistep":
            return self.base_lr * cfg.gamma ** sum(step >= m for m in self.milestones)
        if cfg.name == "cosine":
            start = self.warmup
            frac = min(1.0, (step - start) / max(1, self.total - start))
            return cfg.min_lr + 0.5 * (self.base_lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
        if cfg.name == "constant":
            return self.base_lr
        raise ValueError(f"schedule.name={cfg.name!r} is unknown")

    def observe_train_error(self, error_percent: float, step: int) -> bool:
        """Feed the training error of the batch of iteration ``step`` (0-based); returns True when this call ends
        the error-driven warmup (the next iteration trains at the base rate)."""
        if self.error_warmup_done:
            return False
        self.recent_errors.append(error_percent)
        if (len(self.recent_errors) == self.WINDOW
                and sum(self.recent_errors) / self.WINDOW < self.cfg.warmup_until_train_error):
            self.error_warmup_done = True
            self.error_warmup_iterations = step + 1
            return True
        return False

    def state_dict(self) -> dict:
        return {"error_warmup_done": self.error_warmup_done, "recent_errors": list(self.recent_errors),
                "error_warmup_iterations": self.error_warmup_iterations}

    def load_state_dict(self, state: dict) -> None:
        self.error_warmup_done = bool(state["error_warmup_done"])
        self.error_warmup_iterations = state.get("error_warmup_iterations")  # absent in older checkpoints
        self.recent_errors = deque((float(e) for e in state["recent_errors"]), maxlen=self.WINDOW)
