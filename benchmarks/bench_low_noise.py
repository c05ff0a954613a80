"""How trained cINNs do on simulated clusters with less noise than the training mix (r ~ U[0, r_max] per band).

Real catalogues have relative errors of 5-20 % in most bands, while training draws r ~ U[0, 0.5]: clusters with
all five errors below 0.12 are ~1e-3 of the training set. This prints, per model and r_max, the test NLL, the
coverage of central 68 % intervals and the median |posterior median - truth|. Asserts nothing.

    python benchmarks/bench_low_noise.py --models RUN_A RUN_B [--n 2000] [--r-max 0.5 0.12] [--seed 11]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cinn         # noqa: E402
import preprocess   # noqa: E402
import simulate     # noqa: E402


def observe_with(sim, rng, r_max):
    """preprocess.observe with the relative errors drawn from U[0, r_max]."""
    t_label = preprocess.jitter_age(sim["age_myr"], rng)
    d = rng.uniform(*simulate.DISTANCE_RANGE_MPC, len(t_label))
    flux, rel = preprocess.add_noise(sim["flux_10pc_mjy"] * (simulate.PC10_IN_MPC / d[:, None]) ** 2, rng,
                                     r_max=r_max)
    theta = np.column_stack([np.log10(t_label), sim["log10_mass"], sim["ebv"]])
    return theta, preprocess.make_x(flux, rel, d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="run directories or model.pt files")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--r-max", type=float, nargs="+", default=[0.5, 0.12])
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sim = simulate.simulate(args.n, seed=args.seed)
    models = {m: cinn.load(m, device="cpu") for m in args.models}
    print(f"{args.n} simulated clusters, {args.samples} samples each; columns log t / log m / E(B-V)")
    for k, r_max in enumerate(args.r_max):
        theta, x = observe_with(sim, np.random.default_rng([args.seed, k]), r_max)
        for name, model in models.items():
            s = model.sample(x, args.samples, seed=args.seed)
            lo, med, hi = np.quantile(s, [0.16, 0.5, 0.84], axis=1)
            cov = ((theta >= lo) & (theta <= hi)).mean(0)
            err = np.median(np.abs(med - theta), axis=0)
            nll = -np.mean(model.log_prob(theta, x))
            print(f"r_max {r_max:4.2f}  {name:20s} NLL {nll:7.3f}  68 % coverage "
                  + " / ".join(f"{c:.3f}" for c in cov) + "  median |median - truth| "
                  + " / ".join(f"{e:.3f}" for e in err))


if __name__ == "__main__":
    main()
