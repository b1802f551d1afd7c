"""Training metrics: a JSONL log, TensorBoard event files (when tensorboard is installed) and a PNG plot of
the loss curves. On resume, rows logged after the checkpoint being resumed are dropped so curves do not
double back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["MetricsLog", "plot_metrics"]

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            log.info("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def plot(self, png: Path) -> Path | None:
        return plot_metrics(self.path, png) if self.enabled else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_metrics(jsonl: Path, png: Path, keys: tuple[str, ...] = ("loss", "ce", "mse")) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no loss plot")
        return None
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.is_file() else []
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
