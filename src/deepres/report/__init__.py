"""Plots and Markdown reports."""

from .plots import plot_run

__all__ = ["plot_run"]
