"""Cross-check benchmarks/aggregators.py against ByzFL's implementations on random vectors.

    /tmp/byzfl-venv/bin/python -m benchmarks.byzfl_crosscheck   (needs ``pip install byzfl``)

Not part of the benchmark (which does not depend on ByzFL). Prints the largest absolute
difference per rule, with the parameters that make the two definitions coincide.
"""

from __future__ import annotations

import numpy as np
from byzfl import NNM, ALittleIsEnough, CenteredClipping, GeometricMedian, InnerProductManipulation, Krum, TrMean

from benchmarks import aggregators as agg


def main() -> int:
    rng = np.random.default_rng(0)
    worst: dict[str, float] = {}
    for trial in range(20):
        n, d, f = 15 + trial % 4, 50, 3 + trial % 3
        x = rng.standard_normal((n, d)) + rng.standard_normal(d)
        honest = x[: n - f]
        checks = {
            # ByzFL's TrMean(f) cuts f per side; FedTrimmedAvg's beta = 0.2 cuts int(0.2 n)
            "trimmed-mean": (agg.trimmed_mean(x, beta=int(0.2 * n) / n + 1e-9), TrMean(f=int(0.2 * n))(x)),
            "nnm": (agg.nnm(x, f), NNM(f=f)(x)),
            # ByzFL: 3 iterations from zero, nu = 0.1; ours to convergence: compare at ByzFL's settings
            # run long (T = 500), where both reach the geometric median
            "geomed": (agg.geometric_median(x, nu=1e-12), GeometricMedian(nu=1e-9, T=500)(x)),
            "centered-clip": (
                agg.centered_clipping(x, tau=1.5, iters=3, start=np.zeros(d)),
                CenteredClipping(L=3, tau=1.5)(x),
            ),
            # ByzFL's ALIE: mean + tau * std with ddof = 1; ours: mean - z * std (ddof 0)
            "alie": (
                agg.alie(honest, -1.5 * np.sqrt(len(honest) / (len(honest) - 1))),
                ALittleIsEnough(tau=1.5)(honest),
            ),
            "ipm": (agg.ipm(honest, 2.0), InnerProductManipulation(tau=2.0)(honest)),
        }
        # Krum: ByzFL scores with the n - f - 1 nearest (mean), Flower with the n - f - 2 nearest (sum):
        # the same rule once Flower's f is lowered by one
        checks["krum (f-1 vs ByzFL f)"] = (agg.krum(x, f - 1), Krum(f=f)(x))
        for name, (ours, theirs) in checks.items():
            worst[name] = max(worst.get(name, 0.0), float(np.abs(np.asarray(ours) - np.asarray(theirs)).max()))
    for name, diff in worst.items():
        print(f"{name}: max |difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
