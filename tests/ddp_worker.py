"""Run by tests/test_distributed.py, once alone and once under torchrun: trains a BatchNorm-free net.

BatchNorm statistics are per process under DDP (as in the paper's 2-GPU runs), so only a net without BN can match a
single process with the same global batch exactly; this isolates what DDP must get right: sharding, gradient
averaging, the same initial weights, rank-0 logging and checkpoints, exact evaluation over the whole split.
"""

import sys

import torch.nn as nn

from deepres.config import load_config
from deepres.engine import train
from deepres.models import register_model


class NoNormNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits=False):
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model(family="test", input_size=(16, 16))
def ddp_test_net(**options):
    return NoNormNet(**options)


def _straddle(run_dir: str) -> None:
    """DDP_STRADDLE: each rank holds its own training labels: rank 0 one class for every image (learned within a few
    steps: its local error falls to 0), rank 1 noise (its local error stays near 90%). Each rank records its local
    error per step and its final weights."""
    import json
    import os
    from pathlib import Path

    import torch

    from deepres.data import sources
    from deepres.engine import loop

    rank = int(os.environ.get("RANK", "0"))
    original = sources.SOURCES["fashion_mnist"]

    def noisy(cfg):
        dataset = original(cfg)
        if rank == 0:
            dataset.train.labels = torch.zeros_like(dataset.train.labels)
        else:
            g = torch.Generator().manual_seed(123)
            dataset.train.labels = torch.randint(0, 10, dataset.train.labels.shape, generator=g)
        return dataset

    sources.SOURCES["fashion_mnist"] = noisy
    log = Path(run_dir) / f"rank{rank}.jsonl"
    observe, save = loop._observe_warmup, loop._save

    def observe_and_record(run, wrong, count):
        with log.open("a") as f:
            f.write(json.dumps({"step": run.step + 1, "local_error": 100.0 * float(wrong) / count}) + "\n")
        observe(run, wrong, count)

    def save_and_keep(run, path, *args):
        save(run, path, *args)
        torch.save(run.model.state_dict(), Path(run_dir) / f"rank{rank}.pt")

    loop._observe_warmup, loop._save = observe_and_record, save_and_keep


def _stall(step: int) -> None:
    """DDP_STALL=N: rank 1 stops answering at its N-th training step (sleeps far past any timeout), as a hung rank
    does; rank 0 then waits in the gradient all-reduce."""
    import os
    import time

    from deepres.engine import steps

    if os.environ.get("RANK") != "1":
        return
    call, calls = steps.EagerStep.__call__, [0]

    def hang(self, images, targets):
        calls[0] += 1
        if calls[0] == step:
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, but ends when torchrun tears the job down
            time.sleep(3600)
        return call(self, images, targets)

    steps.EagerStep.__call__ = hang


if __name__ == "__main__":
    import os

    run_dir, *overrides = sys.argv[1:]
    if os.environ.get("DDP_STALL"):
        _stall(int(os.environ["DDP_STALL"]))
    if os.environ.get("DDP_STRADDLE"):
        from pathlib import Path

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        _straddle(run_dir)
    train(load_config(None, overrides), run_dir, quiet=True)
