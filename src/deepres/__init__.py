"""deepres: deep residual learning, faithful to the paper and fast.

The Python API (imported on first use, so ``import deepres`` stays light)::

    import deepres

    model = deepres.create_model("resnet56", num_classes=10)
    summary = deepres.train("demo", {"train.iterations": 200}, run_dir="runs/api")
    print(deepres.evaluate("runs/api/checkpoints/best.pt"))

``create_model`` / ``list_models`` (the model registry), ``load_config`` (a recipe with ``key=value`` overrides),
``train``, ``evaluate``, ``load_model``, ``predict`` and ``export`` (:mod:`deepres.api`).
"""

from .version import __version__

__all__ = ["__version__", "create_model", "evaluate", "export", "list_models", "load_config", "load_model", "predict",
           "train"]

_LAZY = {
    "create_model": ("deepres.models", "create_model"),
    "list_models": ("deepres.models", "list_models"),
    "load_config": ("deepres.config", "load_config"),
    "train": ("deepres.api", "train"),
    "evaluate": ("deepres.api", "evaluate"),
    "export": ("deepres.api", "export"),
    "load_model": ("deepres.api", "load_model"),
    "predict": ("deepres.api", "predict"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepres' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
