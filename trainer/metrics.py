"""What the trainer reports: `CKPT/metrics.jsonl`, TensorBoard event files, learning-curve PNGs.

Rank 0 only (the others pass `enabled=False`). Every record is one JSON line
with a `step` and a `time`; the same scalars go to TensorBoard under
`CKPT/tensorboard/`, and `plot` draws loss, train and held-out accuracy and
the published versions into a PNG, written atomically.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from agent.files import write_atomically


class Metrics:
    def __init__(self, directory: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory)
        self.records: list[dict[str, Any]] = []
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = (self.directory / "metrics.jsonl").open("a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tensorboard"))
        except ImportError:  # tensorboard is optional for the trainer itself
            self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.records.append(record)
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if key not in ("time", "step") and number and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def plot(
        self, path: Path, key: str = "loss", label: str = "training loss", log: bool = True
    ) -> None:
        """`key` (the loss; GRPO: the reward) and accuracies against steps, published versions
        marked."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if key in r]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot([r["step"] for r in train], [r[key] for r in train], color="tab:red")
        left.set(xlabel="step", ylabel=label, yscale="log" if log else "linear", title=label)
        plot_accuracy(right, self.records)
        right.set(title="accuracy")
        save_figure(fig, path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_accuracy(ax: Any, records: list[dict[str, Any]]) -> None:
    """Train and held-out decision accuracy of metrics records against steps; grey: published."""
    train = [r for r in records if "train_accuracy" in r]
    val = [r for r in records if r.get("validation_accuracy") is not None]
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["train_accuracy"] for r in train],
            alpha=0.6,
            label="train",
        )
    ax.plot(
        [r["step"] for r in val], [r["validation_accuracy"] for r in val], "o-", label="held-out"
    )
    for r in val:
        if r.get("published"):
            ax.axvline(r["step"], color="grey", alpha=0.2)
    ax.set(xlabel="step (grey: a published version)", ylabel="decision accuracy", ylim=(0, 1.02))
    ax.legend(loc="lower right")


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (`agent.files`), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
