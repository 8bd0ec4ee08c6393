"""deepres: deep residual learning, faithful to the paper and fast."""

__version__ = "0.1.0"
