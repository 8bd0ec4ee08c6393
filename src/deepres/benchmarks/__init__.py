"""Speed and memory benchmarks, each against a reference measured in the same run: ``deepres benchmark NAME``.

One module per benchmark with a ``main(argv)``; results go to ``benchmarks/results/<name>-<device>.json`` under the
working directory (``--out`` for another folder). They ship with the package, so an installed deepres runs them too.
"""

import pkgutil

__all__ = ["available"]


def available() -> list[str]:
    """The benchmark names ``deepres benchmark`` takes (module names with dashes)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name != "common")
