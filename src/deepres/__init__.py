"""deepres: deep residual learning, faithful to the paper and fast."""

from .version import __version__

__all__ = ["__version__"]
