"""Host-side helpers: metrics files, progress bars, plots, phase timers."""
from rlhf_jax.utils.metrics import MetricsWriter, is_main_process, read_metrics
from rlhf_jax.utils.plotting import plot_bars, plot_metrics
from rlhf_jax.utils.progress import Progress
from rlhf_jax.utils.timing import Timers

__all__ = [
    "MetricsWriter",
    "Progress",
    "Timers",
    "is_main_process",
    "plot_bars",
    "plot_metrics",
    "read_metrics",
]
