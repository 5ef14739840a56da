"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits; probabilities = softmax(z / T).

The NLL is convex in 1/T, so a golden-section search over 1/T finds the optimum without an
optimizer's tuning; T = 1 is inside the search range, so the fitted T never does worse than none
on the data it is fitted on. The worker divides its logits by the manifest's `temperature`.

T is kept within [0.2, 10]: on a validation split the model classifies perfectly (small sets do),
the NLL keeps falling as T goes to 0, and an unbounded fit would make every later prediction
certain. A fit that ends on a bound is logged as a warning.
"""

from __future__ import annotations

import math

import numpy as np
import structlog

from .metrics import nll

log = structlog.get_logger("visionqueue.calibrate")

T_RANGE = (0.2, 10.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iters: int = 80) -> float:
    """The temperature minimising NLL of `labels` under softmax(logits / T)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]  # search over beta = 1/T

    def loss(beta: float) -> float:
        return nll(logits, labels, 1.0 / beta)

    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    beta = (a + b) / 2
    if loss(beta) > loss(1.0):  # numerically flat: keep the identity
        beta = 1.0
    t = float(1.0 / beta)
    if min(abs(t - T_RANGE[0]) / T_RANGE[0], abs(t - T_RANGE[1]) / T_RANGE[1]) < 0.01:
        log.warning("temperature fit ended on its bound: the validation split is too small or perfectly "
                    "separated for a reliable calibration", temperature=round(t, 4), n=len(labels),
                    bounds=T_RANGE)
    return t


if __name__ == "__main__":
    import sys

    print("error: trainer.calibrate is a module, not a command: temperature scaling runs inside `python -m "
          "trainer.train` and `python -m continual.update` (see `python -m trainer.evaluate --help` to measure it)",
          file=sys.stderr)
    raise SystemExit(2)
