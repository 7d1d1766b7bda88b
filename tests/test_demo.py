"""``python -m cnorm demo`` in reduced form: BatchNorm must reach the markedly higher accuracy."""

import re

import numpy as np
import pytest

for _module in ("sklearn", "tqdm", "matplotlib"):
    pytest.importorskip(_module, reason="the demo needs the 'demo' extra: pip install 'cnorm-kernels[demo]'")

from cnorm import _demo  # noqa: E402


def test_demo_batch_norm_wins(tmp_path, capsys):
    out = tmp_path / "loss.png"
    assert _demo.main(["--epochs", "3", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    acc = {k: float(v) for k, v in re.findall(r"test accuracy (with|without) BatchNorm:\s+([\d.]+)%", text)}
    assert acc.keys() == {"with", "without"}, text
    assert acc["with"] >= 90, text
    assert acc["with"] >= acc["without"] + 20, text
    assert "matrix products: " in text  # the BLAS kernels the run without BatchNorm depends on
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_run_results():
    with_bn, without_bn = _demo.run(epochs=2, seed=1, progress=False)
    assert len(with_bn.losses) == 2 and not with_bn.diverged
    assert with_bn.losses[-1] < with_bn.losses[0]
    assert with_bn.test_accuracy > without_bn.test_accuracy + 0.2
    # The learning rate is the point: at a small one both networks learn.
    small = _demo.run(epochs=2, seed=1, lr=0.05, progress=False)
    assert min(r.test_accuracy for r in small) > 0.8


def test_cross_entropy_gradient():
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((5, 4)) * 3, rng.integers(0, 4, 5)
    loss, grad = _demo.cross_entropy(logits, labels)
    eps, numeric = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        bumped = logits.copy()
        bumped[idx] += eps
        numeric[idx] = (_demo.cross_entropy(bumped, labels)[0] - loss) / eps
    np.testing.assert_allclose(grad, numeric, atol=1e-5)


def test_demo_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        _demo.main(["--epochs", "0"])
    assert "positive" in capsys.readouterr().err
