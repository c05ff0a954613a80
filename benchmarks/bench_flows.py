"""Trained models side by side, paired on the same clusters: test NLL and the KL estimate to the exact posterior.

    python benchmarks/bench_flows.py --runs RUN_A RUN_B ... --obs DATA/test.npz --exact EXACT.npz [--n-nll 20000]

For each run: -mean log q(theta_true | x) over the first --n-nll test clusters (nats, physical coordinates;
the posterior as the model samples it), and the KL estimate mean(log p_exact - log q) over the clusters of
EXACT.npz (an `evaluate.py exact` run on the same file), with its split by the prior bounds and by the height
above the mass floor; then every run against the first, as the mean paired difference +- its standard error
(negative: better than the first). Prints figures; asserts nothing.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cinn  # noqa: E402
import evaluate  # noqa: E402
from simulate import load_npz  # noqa: E402


def scores(run, test, ref, n_nll):
    """Per-cluster -log q on the first n_nll test clusters and log p_exact - log q on the exact ones."""
    model = cinn.load(run, device="cpu")
    t0 = time.time()
    nll = -model.log_prob(test["theta"][:n_nll], test["x"][:n_nll])
    n = len(ref["theta_true"])
    d = ref["logp_exact"] - model.log_prob(test["theta"][:n], test["x"][:n])
    return nll, d, time.time() - t0, model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--obs", required=True)
    ap.add_argument("--exact", required=True)
    ap.add_argument("--n-nll", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    test = load_npz(args.obs, required=("theta", "x"))
    ref = load_npz(args.exact, required=("logp_exact", "theta_true"))
    assert np.allclose(ref["theta_true"], test["theta"][:len(ref["theta_true"])]), "EXACT.npz is not of --obs"
    rows = []
    for run in args.runs:
        nll, d, sec, model = scores(run, test, ref, args.n_nll)
        rows.append((run, nll, d))
        kb = evaluate.kl_near_prior_bounds(ref["logp_exact"], ref["logp_exact"] - d, ref["theta_true"])
        fl = evaluate.kl_by_floor_height(ref["logp_exact"], ref["logp_exact"] - d, ref["theta_true"],
                                         test["x"][:len(d)])
        near_floor = evaluate._kl_part(d, np.isin(np.arange(len(d)), np.flatnonzero(
            ref["theta_true"][:, 1] - evaluate.refinements.raw_mass_floor(ref["theta_true"][:, 0],
                                                                          ref["theta_true"][:, 2],
                                                                          test["x"][:len(d)]) < 0.03)))
        print(f"{run}: {model.method}, {model.config.coupling}, {model.config.domain} domain ({sec:.0f} s)")
        print(f"  test NLL {np.mean(nll):.4f} +- {np.std(nll) / np.sqrt(len(nll)):.4f} ({len(nll)} clusters); "
              f"KL {np.nanmean(d):.4f} +- {np.nanstd(d) / np.sqrt(np.isfinite(d).sum()):.4f} ({np.isfinite(d).sum()})")
        print(f"  KL near a prior bound {kb['near'][1]:.3f} +- {kb['near'][2]:.3f} ({kb['near'][0]}); within 0.03 "
              f"dex of the floor {near_floor[1]:.3f} +- {near_floor[2]:.3f} ({near_floor[0]}); by height "
              + "; ".join(f"{lab} {m:.3f}" for lab, _, m, _, _ in fl))
    base_run, base_nll, base_d = rows[0]
    for run, nll, d in rows[1:]:
        for name, a, b in (("test NLL", nll, base_nll), ("KL", d, base_d)):
            diff = a - b
            diff = diff[np.isfinite(diff)]
            print(f"{run} - {base_run}: {name} {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}")


if __name__ == "__main__":
    main()
