"""torch.hub entry points: every model of ``deepres models`` by its name, built by ``deepres.create_model``.

    model = torch.hub.load("path/to/deepres", "resnet56", source="local", num_classes=10)
    model = torch.hub.load("path/to/deepres", "resnet50", source="local", pretrained=True)  # torchvision's weights

``torch.hub.load`` also takes a GitHub ``owner/repo[:ref]`` of this repository instead of a checkout (its default
``source="github"``), and so do ``torch.hub.list`` and ``torch.hub.help``. Keyword arguments are ``create_model``'s
(timm's names accepted: ``num_classes``, ``in_chans``).
"""

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "numpy", "yaml", "tqdm", "PIL"]

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)  # this checkout's deepres, also where another one is installed

from deepres.models import create_model as _create_model  # noqa: E402
from deepres.models import list_models as _list_models  # noqa: E402


def _entry(name: str):
    def build(pretrained: bool = False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"deepres's {name}: deepres.create_model({name!r}, pretrained=False, **kwargs); "
                     f"`deepres models {name}` lists its parameters, multiply-adds and weights.")
    return build


for _name in _list_models():
    globals()[_name] = _entry(_name)
