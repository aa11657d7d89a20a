"""FP convergence curves of the embedded vision networks: how many epochs the FP checkpoint needs.

Issue 24: QAT rows must measure recovery from quantization, not extra training, so the FP model
every cell starts from must be converged. This trains each architecture on Fashion-MNIST with
the grid's FP recipe (Adam 1e-3, batch 128, reproducible kernels) at a CONSTANT learning rate
for up to ``--max-epochs`` epochs, evaluating test top-1 after every epoch, and picks the
convergence epoch by the rule

    E = the first epoch whose 3-epoch centred moving average of test top-1 is within 0.2
        points of the best moving average of any later epoch of the run

(None when that is one of the last two epochs: the run was too short to show a plateau).
A per-epoch gain threshold ("stop when an epoch gains < 0.2 points") does not work on these
curves: at a constant LR, test top-1 moves by up to +-1 point from one epoch to the next
(cnn-small 0.9044 -> 0.8932 -> 0.9012 at epochs 4-6), so a raw gain falls below 0.2 points by
chance long before the curve flattens (epoch 5 for mbv2-small, which still gained 2 points
after it).

(a constant LR shows where the recipe stops learning; the published FP checkpoint then trains
E epochs with the recipe's cosine decay, which ends at least as converged). It writes
``results/vision/fp-curve-<arch>.csv`` (epoch, test top-1, train loss, seconds) and
``results/vision/fp-curves.png``.

Run: ``python benchmarks/fp_convergence.py [--arch cnn-small mbv2-small] [--max-epochs 20]``.
The test split picks the epoch count only (one number per architecture, published with its
curve); no method is ever selected on it.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from suite.qat_train import moving_mean
from suite.vision.datasets import load_vision
from suite.vision.models import build_model
from suite.vision.train import TrainSpec, train

MIN_GAIN = 0.002  # 0.2 points of top-1 per epoch
OUT = Path("results/vision")


def convergence_epoch(top1: list[float], min_gain: float = MIN_GAIN) -> int | None:
    """The rule above on per-epoch test top-1 (``top1[i]`` after epoch i + 1); None when the
    curve never flattens within the epochs run."""
    ma = moving_mean(top1, 3)
    for i in range(len(ma) - 2):
        if max(ma[i:]) - ma[i] < min_gain:
            return i + 1
    return None


def curve(arch: str, max_epochs: int, seed: int = 0) -> list[dict[str, float]]:
    """Per-epoch test top-1 of ``arch`` trained at a constant LR (one epoch per call to
    ``train``, so the evaluation sees the model after each whole epoch)."""
    data = load_vision("fashion-mnist")
    model = build_model(arch, data.num_classes, data.in_channels, seed=seed)
    spec = TrainSpec(epochs=1, schedule="constant")
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    rows, t0 = [], time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        hist = train(model, data, spec, seed + epoch, optimizer=opt)  # evaluates after it
        rec = hist.records[-1]
        top1 = float(rec.test_top1)
        rows.append({"epoch": epoch, "test_top1": top1, "train_loss": rec.train_loss,
                     "train_acc": rec.train_acc, "seconds": time.perf_counter() - t0})
        print(f"{arch} epoch {epoch}: top-1 {top1:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def write(arch: str, rows: list[dict[str, float]]) -> Path:
    """``results/vision/fp-curve-<arch>.csv``."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"fp-curve-{arch}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def plot(curves: dict[str, list[dict[str, float]]], chosen: dict[str, int | None]) -> Path:
    """Test top-1 per epoch, one line per architecture, the chosen epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (arch, rows) in enumerate(curves.items()):
        x, y = [r["epoch"] for r in rows], [100 * r["test_top1"] for r in rows]
        ax.plot(x, y, marker="o", ms=3, color=f"C{i}", label=arch)
        if chosen[arch]:
            ax.axvline(chosen[arch], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("epoch (Adam 1e-3, constant LR)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("FP convergence (dashed: first epoch whose 3-epoch mean is within\n"
                 "0.2 points of every later one)")
    fig.tight_layout()
    path = OUT / "fp-curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["cnn-small", "mbv2-small"])
    p.add_argument("--max-epochs", type=int, default=20)
    args = p.parse_args()
    curves = {arch: curve(arch, args.max_epochs) for arch in args.arch}
    chosen = {}
    for arch, rows in curves.items():
        chosen[arch] = convergence_epoch([r["test_top1"] for r in rows])
        print(f"{arch}: wrote {write(arch, rows)}; converged at epoch {chosen[arch]}")
    print(f"wrote {plot(curves, chosen)}")


if __name__ == "__main__":
    main()
