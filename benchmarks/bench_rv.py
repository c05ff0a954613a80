"""R_V as a nuisance parameter: what it costs the grid and the network, and what ignoring it does.

    python benchmarks/bench_rv.py --obs RV/data/test.npz --cost 10 --nuisance RV/paper --fixed REF/paper
    python benchmarks/bench_rv.py --obs RV/data/test.npz --bias 2000 --nuisance RV/paper --fixed REF/paper

--cost N: per cluster of the first N of --obs (simulated with a variable R_V), the exact posterior at R_V = 3.1
(grid_posterior.exact_posterior) and with R_V marginalised over the file's prior (exact_posterior_rv), each
with --samples draws, and the cINN's --samples draws of the fixed and of the nuisance model: medians and the
median paired ratio, all in one run. --bias N: both cINNs on the first N clusters: the mean of (posterior
median - truth) per parameter with its standard error, overall and by the clusters' R_V (below and above 3.1),
and the share of truths inside the central 68 %. --tables FIXED NUISANCE: two catalogue result tables of the
same clusters: how the posteriors widen and move. Prints figures only; nothing is asserted.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cinn  # noqa: E402
import grid_posterior as gp  # noqa: E402
from preprocess import THETA_NAMES  # noqa: E402
from simulate import R_V, load_npz  # noqa: E402


def timed(fn):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cost(obs, n, samples, models, seed):
    """Seconds per cluster: exact posterior plus draws, without and with the R_V dimension; cINN draws."""
    rng = np.random.default_rng(seed)
    prior = tuple(float(v) for v in obs["rv_prior"])
    t = {k: [] for k in ("exact, R_V = 3.1", f"exact, R_V ~ U{list(prior)}")}
    for name in models:
        t[f"cINN {name}"] = []
    rv_sd = []
    for i in range(n):
        f, r, d = obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i]
        keys = list(t)
        t[keys[0]].append(timed(lambda: gp.sample_posterior(gp.exact_posterior(f, r, d), samples, rng))[0])
        sec, post = timed(lambda: gp.exact_posterior_rv(f, r, d, prior))
        t[keys[1]].append(sec + timed(lambda: gp.sample_posterior(post, samples, rng))[0])
        rv_sd.append(post["rv_sd"])
        for name, model in models.items():
            t[f"cINN {name}"].append(timed(lambda: model.sample(obs["x"][i:i + 1], samples, seed=seed + i))[0])
        print(f"  cluster {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in t.items()), flush=True)
    print(f"\nseconds per cluster ({n} clusters, {samples} draws each), medians:")
    for k, v in t.items():
        print(f"  {k:28s} {np.median(v):8.3f}")
    print(f"  sd of R_V | x (exact, node mixture) / prior sd: median {np.median(rv_sd) / (np.diff(prior)[0] / 12 ** 0.5):.2f}")
    keys = list(t)
    print(f"  exact: marginal / fixed, median paired ratio {np.median(np.divide(t[keys[1]], t[keys[0]])):.1f}")
    if len(models) == 2:
        a, b = (t[f"cINN {k}"] for k in models)
        print(f"  cINN: {list(models)[1]} / {list(models)[0]}, median paired ratio {np.median(np.divide(b, a)):.2f}")


def bias(obs, n, samples, models, seed):
    """Mean (posterior median - truth) +- SE per parameter, overall and by R_V; 68 % coverage."""
    theta, rv = obs["theta"][:n], obs["rv"][:n]
    groups = {"all": np.ones(n, bool), f"R_V < {R_V}": rv < R_V, f"R_V >= {R_V}": rv >= R_V}
    for name, model in models.items():
        s = model.sample(obs["x"][:n], samples, seed=seed)
        q = np.quantile(s, [0.16, 0.5, 0.84], axis=1)
        err = q[1] - theta
        inside = (q[0] <= theta) & (theta <= q[2])
        print(f"\n{name}: {n} clusters, {samples} draws; posterior median - truth (mean +- SE), 68 % coverage")
        for g, sel in groups.items():
            m, se = err[sel].mean(0), err[sel].std(0, ddof=1) / np.sqrt(sel.sum())
            cov = inside[sel].mean(0)
            print(f"  {g:10s} ({sel.sum():5d}) " + "  ".join(
                f"{p} {m[j]:+.4f} +- {se[j]:.4f} ({cov[j]:.1%})" for j, p in enumerate(THETA_NAMES)))


def tables(fixed_path, nuisance_path):
    """Two catalogue result tables of the same clusters (fixed and nuisance model): per parameter the median
    ratio of the 16-84 % widths, and the median and mean shift of the posterior median (nuisance - fixed)."""
    from astropy.table import Table

    from catalogs import RESULT_PARAMS
    a, b = Table.read(fixed_path), Table.read(nuisance_path)
    if len(a) != len(b) or any(np.any(np.asarray(a[c]) != np.asarray(b[c])) for c in ("field", "id")):
        raise SystemExit(f"{fixed_path}, {nuisance_path}: not the same clusters (columns field, id)")
    print(f"\n{len(a)} clusters; nuisance against fixed model:")
    for p in RESULT_PARAMS:
        w_a, w_b = (np.asarray(t[f"{p}_q84"] - t[f"{p}_q16"]) for t in (a, b))
        shift = np.asarray(b[f"{p}_q50"] - a[f"{p}_q50"])
        print(f"  {p:22s} width ratio median {np.nanmedian(w_b / w_a):.3f} (16-84 %: "
              f"{np.nanpercentile(w_b / w_a, 16):.3f}-{np.nanpercentile(w_b / w_a, 84):.3f}); median shift "
              f"{np.nanmedian(shift):+.4f}, mean {np.nanmean(shift):+.4f}, median |shift| / fixed width "
              f"{np.nanmedian(np.abs(shift) / w_a):.3f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--obs", help="test.npz of a variable-R_V simulation (keys rv, rv_prior)")
    ap.add_argument("--nuisance", help="model trained on variable-R_V data")
    ap.add_argument("--fixed", help="model trained on R_V = 3.1 data")
    ap.add_argument("--cost", type=int, default=0, help="clusters for the cost comparison")
    ap.add_argument("--bias", type=int, default=0, help="clusters for the bias of both models")
    ap.add_argument("--tables", nargs=2, metavar=("FIXED", "NUISANCE"),
                    help="two result tables of `evaluate.py catalog` on the same clusters")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.tables:
        tables(*args.tables)
    if not args.obs:
        return
    obs = load_npz(args.obs, required=("x", "theta", "flux_mjy", "rel_err", "distance_mpc", "rv", "rv_prior"))
    models = {k: cinn.load(p, device="cpu") for k, p in (("fixed", args.fixed), ("nuisance", args.nuisance)) if p}
    if args.cost:
        cost(obs, args.cost, args.samples, models, args.seed)
    if args.bias:
        bias(obs, args.bias, args.samples, models, args.seed)


if __name__ == "__main__":
    main()
