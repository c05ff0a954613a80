"""Benchmark of the forward model: table build time, model_flux and simulate() throughput, peak memory.

Prints figures, asserts nothing. One core:  OMP_NUM_THREADS=1 python benchmarks/bench_simulate.py
"""
import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simulate  # noqa: E402


def peak_rss_mb():
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5_000_000, help="clusters for simulate() (default: paper's 5e6)")
    p.add_argument("--n-flux", type=int, default=1_000_000, help="clusters per model_flux call")
    p.add_argument("--chunk", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    simulate.load_table()
    print(f"load_table (first call, builds ln-flux table {simulate.load_table()['ln_flux'].shape}): "
          f"{time.perf_counter() - t0:.2f} s, peak RSS {peak_rss_mb():.0f} MB")

    rng = np.random.default_rng(args.seed)
    prior = simulate.sample_prior(args.n_flux, rng)
    dist = rng.uniform(*simulate.DISTANCE_RANGE_MPC, args.n_flux)
    best = np.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        simulate.model_flux(prior["age_myr"], prior["ebv"], prior["log10_mass"], dist)
        best = min(best, time.perf_counter() - t0)
    print(f"model_flux: {args.n_flux / best:.3g} clusters/s (best of {args.repeat}, {args.n_flux} per call, "
          f"with distance)")

    tracemalloc.start()
    t0 = time.perf_counter()
    sim = simulate.simulate(args.n, args.seed, chunk=args.chunk)
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out_mb = sum(v.nbytes for v in sim.values()) / 1e6
    print(f"simulate(n={args.n}, chunk={args.chunk}): {dt:.2f} s = {args.n / dt:.3g} clusters/s incl. prior; "
          f"peak traced allocation {peak / 1e6:.0f} MB (output arrays {out_mb:.0f} MB); "
          f"process peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
