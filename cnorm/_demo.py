"""``python -m cnorm demo``: BatchNorm trains at a learning rate that breaks the same network without it.

The same small MLP (64 → 128 → 128 → 10, ReLU, softmax cross-entropy),
written here in a few lines of NumPy, is trained twice on scikit-learn's
bundled 8×8 digits (no download) from the same initial weights, with the same
batches and the same large learning rate (plain SGD): once with a
:class:`cnorm.nn.BatchNorm1d` after each hidden linear layer, once without.
The demo prints both test accuracies and saves both training-loss curves as a
PNG. Needs the ``demo`` extra: ``pip install 'cnorm-kernels[demo]'``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .backends import resolve
from .nn import BatchNorm1d

DTYPE = np.float32


# -- a tiny network in NumPy ---------------------------------------------------------

class Linear:
    """``y = x @ weight + bias``, He-initialized; the same weight/bias/*_grad names as cnorm.nn."""

    def __init__(self, n_in, n_out, rng, bias=True):
        self.weight = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE)
        self.bias = np.zeros(n_out, DTYPE) if bias else None
        self.weight_grad = self.bias_grad = None
        self._x = None

    def __call__(self, x):
        self._x = x
        y = x @ self.weight
        return y if self.bias is None else y + self.bias

    def backward(self, dy):
        self.weight_grad = self._x.T @ dy
        self.bias_grad = None if self.bias is None else dy.sum(axis=0)
        return dy @ self.weight.T


class ReLU:
    def __call__(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Sequential:
    """Layers applied in order; backward in reverse; plain SGD on every weight/bias with a gradient."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)

    def sgd_step(self, lr):
        for layer in self.layers:
            for name in ("weight", "bias"):
                param, grad = getattr(layer, name, None), getattr(layer, name + "_grad", None)
                if param is not None and grad is not None:
                    param -= lr * grad


def make_mlp(seed, batch_norm, hidden=128, depth=2, n_in=64, n_out=10):
    """The MLP; the same ``seed`` gives the same linear weights with or without BatchNorm."""
    rng = np.random.default_rng(seed)
    layers, width = [], n_in
    for _ in range(depth):
        # A bias before BatchNorm is cancelled by its mean subtraction: BatchNorm's own bias replaces it.
        layers.append(Linear(width, hidden, rng, bias=not batch_norm))
        if batch_norm:
            layers.append(BatchNorm1d(hidden))
        layers.append(ReLU())
        width = hidden
    layers.append(Linear(width, n_out, rng))
    return Sequential(layers)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -float(log_p[rows, labels].mean())
    grad = np.exp(log_p)
    grad[rows, labels] -= 1
    return loss, grad / len(labels)


# -- the experiment -------------------------------------------------------------------

@dataclass
class RunResult:
    """One training run: per-epoch mean training loss and final test accuracy."""

    label: str
    losses: list
    test_accuracy: float
    diverged: bool


def load_digits_split(seed, test_fraction=0.25):
    """scikit-learn's bundled digits scaled to [0, 1], split stratified into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(DTYPE)
    return train_test_split(x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)


def train_and_test(model, label, data, epochs, lr, batch_size, seed, progress=True):
    """Train ``model`` with SGD on full mini-batches (same order for the same seed); return a RunResult."""
    from tqdm import tqdm

    x_train, x_test, y_train, y_test = data
    rng = np.random.default_rng(seed + 1)
    steps = len(x_train) // batch_size
    losses, diverged = [], False
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), \
            tqdm(total=epochs * steps, desc=f"{label:<17}", unit="step", disable=not progress, leave=True) as bar:
        for _ in range(epochs):
            order = rng.permutation(len(x_train))
            total = 0.0
            for i in range(steps):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss, dlogits = cross_entropy(model(x_train[idx]), y_train[idx])
                model.backward(dlogits)
                model.sgd_step(lr)
                total += loss
                bar.update(1)
            losses.append(total / steps)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if not np.isfinite(losses[-1]):
                diverged = True
                bar.update(bar.total - bar.n)
                break
        model.train(False)
        predicted = model(x_test).argmax(axis=1)
        model.train(True)
    return RunResult(label, losses, float((predicted == y_test).mean()), diverged)


def run(epochs=20, seed=0, lr=1.0, batch_size=32, progress=True):
    """Train with and without BatchNorm; returns ``(with_bn, without_bn)`` RunResults."""
    data = load_digits_split(seed)
    results = []
    # The matrices are tiny: BLAS threads would only add synchronization (and fight other processes).
    with threadpool_limits(1, user_api="blas"):
        for batch_norm, label in ((True, "with BatchNorm"), (False, "without BatchNorm")):
            model = make_mlp(seed, batch_norm)
            results.append(train_and_test(model, label, data, epochs, lr, batch_size, seed, progress))
    return tuple(results)


def blas_kernels() -> str:
    """The BLAS library and kernel set NumPy's matrix products run on (OpenBLAS picks its
    kernels for the CPU at start-up): the run without BatchNorm depends on their rounding."""
    from threadpoolctl import threadpool_info

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not libs:
        return "unknown BLAS"
    lib = libs[0]
    arch = lib.get("architecture")
    name = f"{lib.get('internal_api', 'BLAS')} {lib.get('version') or ''}".strip()
    return name + (f", {arch} kernels" if arch else "")


def plot(results, path, lr):
    """Save both loss curves to ``path`` (matplotlib's Agg canvas; pyplot's state is untouched)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r, style in zip(results, ("-o", "-s")):
        epochs = np.arange(1, len(r.losses) + 1)
        tag = "diverged" if r.diverged else f"test accuracy {r.test_accuracy:.1%}"
        ax.plot(epochs, r.losses, style, markersize=3, label=f"{r.label} ({tag})")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (cross-entropy)")
    ax.set_title(f"MLP on scikit-learn digits, SGD at learning rate {lr:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def main(argv=None) -> int:
    """``python -m cnorm demo [--epochs N] [--seed S] [--lr LR] [--batch-size B] [--out PNG] [--no-progress]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cnorm demo",
        description="Train one MLP on scikit-learn's digits with and without cnorm.nn.BatchNorm1d "
                    "at the same large learning rate; compare.")
    parser.add_argument("--epochs", type=_positive(int), default=20, help="training epochs per run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches (default 0)")
    parser.add_argument("--lr", type=_positive(float), default=1.0, help="SGD learning rate of both runs (default 1.0)")
    parser.add_argument("--batch-size", type=_positive(int), default=32, help="mini-batch size (default 32)")
    parser.add_argument("--out", default="demo_loss.png", help="PNG file for the loss curves (default demo_loss.png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"cnorm demo needs scikit-learn, tqdm and matplotlib ({exc}); pip install 'cnorm-kernels[demo]'")
        return 2
    start = time.perf_counter()
    backend = resolve(None, (np.empty(0, DTYPE),)).name
    print(f"cnorm demo: MLP 64-128-128-10 on scikit-learn digits, SGD lr={args.lr:g}, batch {args.batch_size}, "
          f"{args.epochs} epochs, BatchNorm1d on the {backend!r} backend")
    print(f"matrix products: {blas_kernels()} (the run without BatchNorm is chaotic at this learning rate: "
          "its accuracy depends on their rounding)")
    results = run(args.epochs, args.seed, args.lr, args.batch_size, progress=not args.no_progress)
    plot(results, args.out, args.lr)
    for r in results:
        note = "  (diverged)" if r.diverged else ""
        print(f"test accuracy {r.label + ':':<19} {r.test_accuracy:6.1%}   "
              f"final training loss {r.losses[-1]:.4f}{note}")
    print(f"loss curves saved to {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0
