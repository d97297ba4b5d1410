"""What every experiment's figures share: a headless pyplot, the PSNR axes of the leakage plots, saving."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (experiments run without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def label_psnr_axes(ax, *, xlabel: str, title: str) -> None:
    """Labels, title and legend of a "median PSNR of the reconstructions vs X" plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def save_figure(fig, path: Path, *, dpi: int) -> None:
    """Lay out, write and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # nothing clipped: long tick labels, legends outside
    pyplot().close(fig)
