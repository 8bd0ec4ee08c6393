"""Training steps: forward, loss, backward and update for one batch, in the three kinds the loop can run.

- ``eager``: PyTorch's kernels launched one by one (any device, any setting);
- ``compiled``: the same step through ``torch.compile(model, mode=train.compile)``;
- ``graph`` (``train.cuda_graph``): after three eager warm-up steps (cuDNN autotuning, optimizer state), forward,
  backward and the fused SGD update are captured as one CUDA graph and replayed every step. Batches are copied into
  the graph's static input tensors; the learning rate lives in device tensors the fused update reads, so the graph
  serves every learning rate of the schedule. The paper's CIFAR nets are narrow: at batch 128 a step is a few hundred
  small kernels that a GPU finishes faster than Python launches them, and a replay launches them all at once.

A step returns the batch's loss and number of misclassified images as device tensors (no host sync) and the batch
size; the loop accumulates them. Precision (``train.amp``) is an autocast dtype; fp16 adds a GradScaler whose state
is checkpointed so a resumed run stays exact.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ConfigError, step_kind

__all__ = ["CapturedStep", "EagerStep", "Precision", "build_step", "compile_model", "cpu_description",
           "native_bf16_cpu", "resolve_amp"]


def _inductor_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older PyTorch: the same rule
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return default_cache_dir()


def inductor_cache_dir(environ=os.environ) -> str | None:
    """The folder torch.compile should cache its code in: None (Inductor's own choice) unless the process overrides
    ATEN_CPU_CAPABILITY and names no cache folder of its own (TORCHINDUCTOR_CACHE_DIR unset, or Inductor's default,
    which importing torchvision already writes there), then a folder beside the default for that capability.

    Inductor's cache does not tell code generated for one vector width from code for another: on an AVX-512 CPU
    (torch 2.14.1), a compiled run under ATEN_CPU_CAPABILITY=avx2 after one without it died of a segmentation fault
    in a fused batch-norm kernel, and one in the other order too; under =default the C++ build failed ("at::vec has
    not been declared"). Each capability in its own folder, all three compile and run."""
    capability = environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return None
    default = os.path.abspath(_inductor_default_cache_dir())
    named = environ.get("TORCHINDUCTOR_CACHE_DIR")
    if named and os.path.abspath(named) != default:
        return None
    return f"{default}-aten-{re.sub(r'[^A-Za-z0-9_.-]', '_', capability)}"


def compile_model(model: nn.Module, mode: str | None = None) -> nn.Module:
    """``torch.compile(model, mode=mode)``, its code cached apart under an ATEN_CPU_CAPABILITY override
    (:func:`inductor_cache_dir`)."""
    folder = inductor_cache_dir()
    if folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read by Inductor when it compiles; inherited by workers
    return torch.compile(model, mode=mode)


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag). Elsewhere (AVX2 and
    older, or flags that cannot be read) PyTorch emulates bf16 and it is slower than fp32. ``DEEPRES_CPU_BF16=1|0``
    overrides the reading (the test suite sets 0, so its numbers do not depend on the CPU it runs on)."""
    forced = os.environ.get("DEEPRES_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """This CPU's model name, the flags that decide the precision ``train.amp=auto`` picks, and the threads."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": sorted(f for f in CPU_FLAGS if f in flags),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "native_bf16": native_bf16_cpu()}


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` on this device: auto is bf16 on a CUDA GPU that has it and on a CPU with native bf16 arithmetic
    (:func:`native_bf16_cpu`), fp32 ("off") elsewhere."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    if device.type == "cpu" and native_bf16_cpu():
        return "bf16"
    return "off"


class Precision:
    """Autocast dtype of a run and, for fp16, its GradScaler (gradients of fp16 activations underflow without one)."""

    def __init__(self, amp: str, device: torch.device):
        self.name = resolve_amp(amp, device)
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None

    def autocast(self, cache_enabled: bool = True):
        """The autocast context (a no-op in fp32). ``cache_enabled=False`` inside a captured graph: the graph must
        recompute the casts of the live fp32 weights on every replay."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache_enabled)


def _wrong(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) != labels).sum().float()


def _split(targets, parts: int) -> list:
    """A batch's targets in ``parts`` pieces along the batch (a tensor, or a tuple of them)."""
    if isinstance(targets, torch.Tensor):
        return list(targets.tensor_split(parts))
    return list(zip(*(t.tensor_split(parts) for t in targets)))


class EagerStep:
    """One training step with eager (or ``torch.compile``d) kernels."""

    kind = "eager"

    def __init__(self, model: nn.Module, step_model: nn.Module, task, optimizer: torch.optim.Optimizer,
                 precision: Precision, grad_clip: float | None = None, ema=None, compile_mode: str = "off",
                 micro_batches: int = 1):
        self.micro_batches = micro_batches  # gradient accumulation over this many parts of each batch
        self.model = model  # the parameters (unwrapped)
        self.step_model = step_model  # what the batch goes through: the model, its DDP wrapper, compiled or not
        self.task = task
        self.optimizer = optimizer
        self.precision = precision
        self.grad_clip = grad_clip
        self.ema = ema
        self.compile_mode = compile_mode
        if compile_mode != "off":
            self.kind = "compiled"

    def set_lr(self, lr: float) -> None:
        """The schedule's learning rate, times each parameter group's ``lr_scale`` (fine-tuning)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def __call__(self, images: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Train on one batch; returns (loss, misclassified count) as fp32 device scalars, and the batch size."""
        scaler = self.precision.scaler
        self.optimizer.zero_grad(set_to_none=True)
        if self.micro_batches > 1:
            loss, wrong = self._accumulate(images, targets)
        else:
            with self.precision.autocast():
                targets = self.task.targets(images, targets)
                outputs = self.step_model(images)
                loss, logits = self.task.loss(outputs, targets)
            (scaler.scale(loss) if scaler else loss).backward()
            wrong = _wrong(logits, self.task.labels(targets))
        self._update()
        return loss.detach().float(), wrong, len(images)

    def _accumulate(self, images: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over ``micro_batches`` parts of the batch, each loss weighted by its share of the
        images, so the summed gradients are the batch's mean; under DDP the gradients are reduced once, after the
        last part."""
        scaler, total = self.precision.scaler, len(images)
        parts = list(zip(images.tensor_split(self.micro_batches), _split(targets, self.micro_batches)))
        unwrapped = getattr(self.step_model, "_orig_mod", self.step_model)  # torch.compile's wrapper
        no_sync = getattr(unwrapped, "no_sync", None)
        loss_sum = wrong = None
        for i, (x, t) in enumerate(parts):
            with (no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext()):
                with self.precision.autocast():
                    t = self.task.targets(x, t)
                    loss, logits = self.task.loss(self.step_model(x), t)
                    weighted = loss * (len(x) / total)
                (scaler.scale(weighted) if scaler else weighted).backward()
            part_wrong = _wrong(logits, self.task.labels(t))
            loss_sum = weighted.detach().float() if loss_sum is None else loss_sum + weighted.detach().float()
            wrong = part_wrong if wrong is None else wrong + part_wrong
        return loss_sum, wrong

    def _update(self) -> None:
        """Clip (when asked), step the optimizer (through the scaler in fp16) and update the weight average."""
        scaler = self.precision.scaler
        if self.grad_clip:
            if scaler:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if scaler:
            scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def optimizer_state(self) -> dict:
        """The optimizer's state dict with plain-number learning rates."""
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
        return state

    def state_dict(self) -> dict:
        return {"scaler": self.precision.scaler.state_dict()} if self.precision.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])

    def describe(self) -> dict:
        return {"step": self.kind, "compile": self.compile_mode, "amp": self.precision.name, "cuda_graph": False,
                "micro_batches": self.micro_batches}


class CapturedStep(EagerStep):
    """The step captured as one CUDA graph after ``WARMUP_STEPS`` eager steps on a side stream.

    Every call is one real training step: the warm-up steps train too, the capture call replays its graph at once.
    Batches must keep one shape and dtype (the loaders drop the last partial batch, so they do).
    """

    kind = "graph"
    WARMUP_STEPS = 3

    def __init__(self, model, step_model, task, optimizer, precision, compile_mode: str = "off"):
        super().__init__(model, step_model, task, optimizer, precision, compile_mode=compile_mode)
        self.kind = "graph"
        device = next(model.parameters()).device
        for group in optimizer.param_groups:  # the fused update reads its lr from device memory: one graph for all
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        self.loss = torch.zeros((), device=device)
        self.wrong = torch.zeros((), device=device)
        self.images = self.targets = None
        self.graph = None
        self.calls = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))

    def _body(self) -> None:
        with self.precision.autocast(cache_enabled=False):
            targets = self.task.targets(self.images, self.targets)
            outputs = self.step_model(self.images)
            loss, logits = self.task.loss(outputs, targets)
        loss.backward()
        self.optimizer.step()
        self.loss.copy_(loss.detach().float())
        self.wrong.copy_(_wrong(logits, self.task.labels(targets)))

    def __call__(self, images: torch.Tensor, targets) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.images is None:
            self.images, self.targets = torch.empty_like(images), torch.empty_like(targets)
        elif images.shape != self.images.shape or targets.shape != self.targets.shape \
                or targets.dtype != self.targets.dtype:
            raise ValueError(f"train.cuda_graph: the captured step needs batches of one shape; got images "
                             f"{tuple(images.shape)} after {tuple(self.images.shape)}")
        self.images.copy_(images)
        self.targets.copy_(targets)
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.WARMUP_STEPS:
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
            current.wait_stream(side)
        else:
            # Gradients are freed so that backward allocates them from the graph's own memory pool; replays then
            # overwrite them (PyTorch's whole-network capture recipe).
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self.graph = graph
            graph.replay()
        self.calls += 1
        return self.loss, self.wrong, len(images)

    def describe(self) -> dict:
        return {**super().describe(), "cuda_graph": True}


def build_step(config, model: nn.Module, train_model: nn.Module, task, optimizer, ema, device: torch.device,
               world_size: int = 1, notice=print) -> EagerStep:
    """The step kind the config asks for on this device. ``train.cuda_graph`` without a CUDA device runs eagerly
    (``notice`` says so); with several processes (DDP) it is refused."""
    tc = config.train
    precision = Precision(tc.amp, device)
    step_model = compile_model(train_model, tc.compile) if tc.compile != "off" else train_model
    if step_kind(config) == "graph":
        if world_size > 1:
            raise ConfigError("train.cuda_graph", f"not supported with {world_size} processes (DDP); "
                                                  "use train.cuda_graph=false")
        if device.type == "cuda":
            return CapturedStep(model, step_model, task, optimizer, precision, compile_mode=tc.compile)
        notice(f"train.cuda_graph: {device} is not a CUDA device; the step runs eagerly")
    per_process = tc.batch_size // max(1, world_size)
    if tc.micro_batches > per_process:
        raise ConfigError("train.micro_batches", f"{tc.micro_batches} micro-batches of a batch of {per_process} images "
                                                 f"per process: at most {per_process}")
    return EagerStep(model, step_model, task, optimizer, precision, config.optim.grad_clip, ema, tc.compile,
                     tc.micro_batches)
