"""How well can any point estimate from posterior samples find the exact posterior's MAP age?

    python benchmarks/bench_map_estimators.py --obs runs/quick/data/test.npz --n 150 [--model runs/quick] [--seed 5]

For the first n simulated clusters of --obs: the exact grid posterior (grid_posterior.exact_posterior), its MAP
(the density maximum on the grid) and 1e4 exact samples; then, on the exact samples (and on the cINN's, with
--model), the share of clusters whose estimate lies within 0.1 dex in age of the grid MAP for
  * mean-shift (evaluate.mean_shift: the MAP of SPEC.md Sect. 5) at Silverman's bandwidth and at half of it,
  * the sample of highest k-nearest-neighbour density (k = 20, 50, 200; standardised coordinates),
  * the sample of highest exact density (evaluate.densest_sample, which needs the likelihood),
and the median density gap log p(grid MAP) - log p(estimate) of the misses (map_density_gap): a
small gap means a posterior flat on top over more than 0.1 dex, where the MAP age is undefined (a wrong mode
has a large one).
Prints figures only (~2 s per cluster for the exact posteriors on one core).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import grid_posterior  # noqa: E402


def knn_densest(samples, k):
    """The sample whose k-th nearest neighbour is closest (highest kNN density), per-axis standardised."""
    z = samples / samples.std(axis=0)
    dist, _ = cKDTree(z).query(z, k + 1)
    return samples[np.argmin(dist[:, -1])]


def map_density_gap(points, map_exact, flux_mjy, rel_err, distance_mpc):
    """Per cluster, log p(map_exact | x) - log p(point | x) in nats from grid_posterior.log_map_density (both at
    the centre of their 1 Myr age bin); NaN where either is NaN."""
    out = np.full(len(points), np.nan)
    for i in range(len(points)):
        if np.all(np.isfinite(points[i])) and np.all(np.isfinite(map_exact[i])):
            v, _ = grid_posterior.log_map_density(np.stack([map_exact[i], points[i]]), flux_mjy[i], rel_err[i],
                                                  distance_mpc[i])
            out[i] = v[0] - v[1]
    return out


def estimators(samples, obs):
    """name -> (N, 3) point estimates from samples (N, S, 3)."""
    h = evaluate.silverman_bandwidth(samples.shape[1], 3)
    out = {"mean-shift (Silverman h)": np.array([evaluate.mean_shift(s, h)[0] for s in samples]),
           "mean-shift (h / 2)": np.array([evaluate.mean_shift(s, h / 2)[0] for s in samples])}
    for k in (20, 50, 200):
        out[f"highest kNN density, k = {k}"] = np.array([knn_densest(s, k) for s in samples])
    out["densest sample (exact density)"] = evaluate.densest_sample(samples, obs["flux_mjy"], obs["rel_err"],
                                                                    obs["distance_mpc"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--obs", required=True, help="simulated observations .npz (with theta)")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--model", default=None, help="a cINN run directory: its samples too")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    obs = evaluate.load_obs(args.obs, args.n, need_theta=True)
    n, rng, t0 = len(obs["x"]), np.random.default_rng(args.seed), time.time()
    grid_map = np.full((n, 3), np.nan)
    exact = np.full((n, args.samples, 3), np.nan)
    for i in range(n):
        try:
            post = grid_posterior.exact_posterior(obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i])
        except (MemoryError, RuntimeError):
            continue
        grid_map[i], exact[i] = post["map"], grid_posterior.sample_posterior(post, args.samples, rng)
        if (i + 1) % 25 == 0 or i + 1 == n:
            print(f"  exact posteriors: {i + 1}/{n}, {time.time() - t0:.0f} s", flush=True)
    ok = np.all(np.isfinite(grid_map), axis=1)
    sets = [("exact samples", exact[ok])]
    if args.model:
        model = evaluate.load_model(args.model, "cpu")
        sets.append((f"cINN samples ({args.model})", evaluate.draw_samples(model, obs["x"][ok], args.samples,
                                                                           args.seed).astype(float)))
    sub = {k: obs[k][ok] for k in ("flux_mjy", "rel_err", "distance_mpc")}
    print(f"{ok.sum()} clusters; share within 0.1 dex in age of the grid MAP | median density gap of the misses")
    for name, s in sets:
        print(name)
        for est, theta in estimators(s, sub).items():
            miss = np.abs(theta[:, 0] - grid_map[ok, 0]) > 0.1
            gap = map_density_gap(theta, grid_map[ok], sub["flux_mjy"], sub["rel_err"], sub["distance_mpc"])
            print(f"  {est:34s} {1 - miss.mean():6.1%} | {np.nanmedian(gap[miss]) if miss.any() else 0:.2f} nats")


if __name__ == "__main__":
    main()
