"""Activation (gradient) checkpointing: keep only each block's input during the forward pass and recompute the block's
activations in the backward pass, trading one more forward pass of each block for the memory of its activations
(ResNet-50 at batch 32 at 224, bf16, on a CPU: 0.55x to 0.65x the step's peak memory at 1.25x its time).

Every model family marks its blocks (residual blocks, dense blocks and transitions, EfficientNet stages, inception
modules, the conv groups between poolings) and runs them through :meth:`GradCheckpointing.run_block`;
``model.set_grad_checkpointing()`` turns it on, as timm's models. It applies only where gradients are recorded
(``torch.is_grad_enabled()``); evaluation and inference are unchanged. With it on, a block's hooks may run once
more in the backward pass, and containers whose children are checkpointed one by one (a ResNet stage) are not called.

Unlike a plain ``torch.utils.checkpoint`` of a block, the recomputation does not update BatchNorm running statistics a
second time: an eager checkpointed run trains exactly as the same run without it (the same batch statistics, the same
running averages, the same random masks), only its memory and time differ. Under ``torch.compile`` the compiler does
the recomputation (it replays no module code, so the statistics update once); numbers then match the compiled run
without checkpointing up to the compiler's rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GradCheckpointing", "checkpointed_call"]


@contextmanager
def _running_stats_held(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` run as in training (the same batch statistics and the same saved tensors, which
    the recomputation must reproduce) but leave their running averages and batch counts as they are: momentum 0
    keeps the averages exactly (1 x average + 0 x batch), and the count is put back."""
    held = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m, _, _ in held:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in held:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)


def checkpointed_call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` keeping only ``args`` for the backward pass, which runs ``module`` again to recompute its
    activations (random number state restored, BatchNorm running statistics left as the first call set them)."""
    if torch.compiler.is_compiling():
        # Traced once: the compiler's recomputation replays no module code, so the running statistics update once.
        return checkpoint(module, *args, use_reentrant=False)
    calls = 0

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(*inputs)
        with _running_stats_held(module):
            return module(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


class GradCheckpointing:
    """timm's ``set_grad_checkpointing(enable=True)`` for a model that runs its blocks through :meth:`run_blocks`."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (less memory, more time:
        ``deepres benchmark train-memory`` measures both)."""
        self.grad_checkpointing = bool(enable)

    def _checkpointing_now(self) -> bool:
        return self.grad_checkpointing and torch.is_grad_enabled()

    def run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """``block(*args)``, checkpointed when checkpointing is on and gradients are recorded."""
        return checkpointed_call(block, *args) if self._checkpointing_now() else block(*args)

    def run_blocks(self, blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """The blocks one after the other, each checkpointed on its own when checkpointing is on."""
        for block in blocks:
            x = self.run_block(block, x)
        return x

    def run_sequence(self, sequence: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """``sequence(x)``; when checkpointing, its children checkpointed one by one instead (the container itself is
        not called then, so hooks on it do not run)."""
        return self.run_blocks(sequence, x) if self._checkpointing_now() else sequence(x)
