"""Figures of training runs: ``torchpeer plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``.

``read_metrics`` needs nothing beyond the core install; drawing needs matplotlib (the ``[viz]``
extra), imported only when a figure is made.
"""

from torchpeer.viz.metrics import RunMetrics, Series, read_metrics
from torchpeer.viz.plot import plot_runs, save_plot

__all__ = ["RunMetrics", "Series", "plot_runs", "read_metrics", "save_plot"]
