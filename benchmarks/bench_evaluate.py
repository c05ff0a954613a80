"""Benchmark of evaluate.py: mean-shift per cluster, and the paper-sized job of 2,439 clusters (the PHANGS
sample) x 1e4 posterior samples + modes + quantiles on the CPU. Prints figures; asserts nothing.

    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py                      # mean-shift only
    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py --model runs/quick --obs runs/quick/data/test.npz
    OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py --model runs/quick --obs ... --n 2439   # full job

With --n smaller than 2,439 the full-job time is extrapolated linearly (clusters are independent).
Without --model, the sampling part is timed on an untrained cINN of the default architecture (sampling
cost depends on the architecture, not the weights); its posteriors are prior-like, the slowest case for
mean-shift, so that figure is an upper bound for the modes part.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cinn  # noqa: E402
import evaluate as ev  # noqa: E402
import preprocess  # noqa: E402
import simulate  # noqa: E402
import train  # noqa: E402


def time_call(f, repeat=5):
    f()
    t0 = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t0) / repeat


def bench_mean_shift(seed):
    rng = np.random.default_rng(seed)
    uni = rng.standard_normal((10_000, 3)) * [0.3, 0.5, 0.1] + [1.0, 4.0, 0.3]
    centres = np.array([[0.5, 3.0, 0.2], [2.0, 4.0, 0.6], [3.5, 5.5, 0.1]])
    k = rng.choice(3, 10_000, p=[0.5, 0.3, 0.2])
    tri = centres[k] + rng.standard_normal((10_000, 3)) * [0.15, 0.2, 0.05]
    flat = rng.uniform([0, 2, 0], [4.1, 8, 1.5], (10_000, 3))
    print("mean-shift on 1e4 samples (target <= 0.1 s per cluster):")
    for name, x in [("unimodal Gaussian", uni), ("three-mode mixture", tri), ("uniform (prior-like)", flat)]:
        for kernel in ("gaussian", "flat"):
            t = time_call(lambda: ev.mean_shift(x, kernel=kernel))
            print(f"  {name:22s} {kernel:8s} {t * 1e3:7.1f} ms, {len(ev.mean_shift(x, kernel=kernel))} mode(s)")
    try:
        from sklearn.cluster import MeanShift
        z = (tri - tri.mean(0)) / tri.std(0)
        h = ev.silverman_bandwidth(len(z)) * np.sqrt(5)
        t = time_call(lambda: MeanShift(bandwidth=h, bin_seeding=True).fit(z), repeat=1)
        print(f"  scikit-learn MeanShift (flat, bin seeding), three-mode mixture: {t * 1e3:.0f} ms")
    except ImportError:
        pass


def bench_job(model_path, obs_path, n, samples, seed, device=None):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if obs_path:
        x = simulate.load_npz(obs_path, required=("x",))["x"][:n]
    else:
        sim = simulate.simulate(n, seed=seed)
        x = preprocess.observe(sim, np.random.default_rng(seed))["x"]
    if model_path:
        model, what = cinn.load(model_path, device=device), f"model {model_path}"
    else:
        model = cinn.build("refined", train.PROFILES["quick"][0], None, x.mean(0), x.std(0)).to(device or cinn.default_device())
        what = "UNTRAINED refined cINN of the quick profile (timing of sampling only; prior-like posteriors)"
    n = len(x)
    print(f"\nfull job on {n} clusters x {samples} samples, {what}, device {model.device}, "
          f"torch threads {torch.get_num_threads()}:")
    t_s = t_m = c_s = c_m = 0.0
    chunk = 100
    for i in range(0, n, chunk):
        t0, c0 = time.perf_counter(), time.process_time()
        s = model.sample(x[i:i + chunk], samples, seed=seed + i)
        t1, c1 = time.perf_counter(), time.process_time()
        ev.summarize(s)
        t2, c2 = time.perf_counter(), time.process_time()
        t_s += t1 - t0
        t_m += t2 - t1
        c_s += c1 - c0
        c_m += c2 - c1
        print(f"  {min(i + chunk, n)}/{n}: sampling {t_s:.1f} s, modes+quantiles {t_m:.1f} s", file=sys.stderr)
    total = t_s + t_m
    print(f"  sampling: {n * samples / t_s:.3g} posterior samples/s ({t_s / n * 1e3:.1f} ms per cluster)")
    print(f"  modes + quantiles: {t_m / n * 1e3:.1f} ms per cluster")
    print(f"  total {total:.1f} s = {n / total:.2f} clusters/s; 2,439 clusters: "
          f"{2439 * total / n:.0f} s = {2439 * total / n / 60:.1f} min "
          f"({'measured' if n >= 2439 else 'extrapolated from ' + str(n)}; target <= 10 min)")
    print(f"  CPU time: sampling {c_s:.1f} s, modes+quantiles {c_m:.1f} s -> 2,439 clusters: "
          f"{2439 * (c_s + c_m) / n / 60:.1f} CPU-min (= wall time on an otherwise idle core; wall > CPU "
          f"means other processes shared the cores)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="trained cINN (model.pt or run directory)")
    ap.add_argument("--obs", default=None, help="observation .npz; default: simulate --n fresh clusters")
    ap.add_argument("--n", type=int, default=200, help="clusters to time (2439 = the full PHANGS-size job)")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="torch device for sampling (default: cuda if available)")
    ap.add_argument("--skip-job", action="store_true", help="only the mean-shift timings")
    args = ap.parse_args()
    bench_mean_shift(args.seed)
    if not args.skip_job:
        bench_job(args.model, args.obs, args.n, args.samples, args.seed, args.device)


if __name__ == "__main__":
    main()
