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


if __name__ == "__main__":
    run_dir, *overrides = sys.argv[1:]
    train(load_config(None, overrides), run_dir, quiet=True)
