"""Classification metrics, result tables and plots shared by fine-tuning and evaluation."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassificationResult:
    """Accuracy, per-class accuracy and confusion matrix of one split."""

    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # confusion[true][pred]
    count: int

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "count": self.count,
            "per_class_accuracy": dict(zip(class_names, self.per_class_accuracy)),
            "confusion_matrix": self.confusion,
        }


def classification_result(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                          loss: float = float("nan")) -> ClassificationResult:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    totals = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), totals, out=np.zeros(num_classes), where=totals > 0)
    count = int(len(labels))
    acc = float((labels == preds).mean()) if count else float("nan")
    return ClassificationResult(loss=float(loss), accuracy=acc, per_class_accuracy=[float(v) for v in per_class],
                                confusion=confusion.tolist(), count=count)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_result(result: ClassificationResult, class_names: Sequence[str], split: str) -> str:
    lines = [f"{split}: accuracy {result.accuracy * 100:.2f}% ({result.count} images), loss {result.loss:.4f}"]
    lines.append(format_table(["class", "accuracy"],
                              [[n, f"{a * 100:.1f}%"] for n, a in zip(class_names, result.per_class_accuracy)]))
    short = [n[:6] for n in class_names]
    rows = [[short[i], *result.confusion[i]] for i in range(len(class_names))]
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(format_table(["", *short], rows))
    return "\n".join(lines)


def png_bytes(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def curves_png(history: Sequence[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch, train and val, one line per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = np.arange(1, len(history) + 1)
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        for split, style in (("train", "-"), ("val", "--")):
            ys = [h.get(f"{split}_{key}", np.nan) for h in history]
            ax.plot(x, ys, style, marker="o", label=split)
        ax.set_xlabel("epoch (all phases)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for i, h in enumerate(history[1:], start=1):
        if h.get("phase") != history[i - 1].get("phase"):
            for ax in (ax_loss, ax_acc):
                ax.axvline(i + 0.5, color="grey", lw=0.8)
    ax_acc.legend()
    return png_bytes(fig)


def confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(0.55 * len(class_names) + 2, 0.5 * len(class_names) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    return png_bytes(fig)
