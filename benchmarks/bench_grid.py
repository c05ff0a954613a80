"""Benchmark and validation of grid_posterior on the real BC03 table (one CPU core: OMP_NUM_THREADS=1).

    python benchmarks/bench_grid.py --n 20                 # exact-posterior and MLE timings, convergence check
    python benchmarks/bench_grid.py --n 20 --baseline OLD.py   # the same, before/after on the same clusters
    python benchmarks/bench_grid.py --n 500 --clusters 150,159 --baseline OLD.py   # chosen clusters of the --n
    python benchmarks/bench_grid.py --sbc 500 --seed 1 --save F.npz    # SBC of the exact posterior (~25 min)
    python benchmarks/bench_grid.py --summarize F.npz[,G.npz]          # its tests again, parts merged

Simulated clusters come from simulate.sample_prior / model_flux and preprocess.add_noise (the training pipeline's
own noise code), so the SBC also cross-checks that the posterior's likelihood matches the simulator.
Prints figures only; nothing is asserted.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grid_posterior as gp  # noqa: E402
import preprocess  # noqa: E402
import simulate  # noqa: E402


def simulated_clusters(n, seed):
    """theta (n, 3) with the jittered age label, observed fluxes, r*, distances (SPEC.md Sect. 3)."""
    rng = np.random.default_rng(seed)
    pr = simulate.sample_prior(n, rng)
    d = rng.uniform(*simulate.DISTANCE_RANGE_MPC, n)
    f = simulate.model_flux(pr["age_myr"], pr["ebv"], pr["log10_mass"], d)
    fs, rs = preprocess.add_noise(f, rng)
    label = np.log10(pr["age_myr"] + rng.uniform(-0.5, 0.5, n))
    return np.stack([label, pr["log10_mass"], pr["ebv"]], axis=1), fs, rs, d, pr, f


def load_module(path):
    """A grid_posterior.py from another revision (e.g. `git show REV:grid_posterior.py > /tmp/old.py`), for
    before/after timings on the same clusters in one process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("grid_posterior_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_speed(n, seed, baseline=None, max_evaluated=3e8, clusters=None, mle=True):
    """CPU time of exact_posterior per cluster (and of a baseline module's, alternating on the same clusters;
    a posterior over max_evaluated cells or the memory cap counts with the time spent until it stopped), then
    of the MLE in batches, and the MLE's exact recovery on noiseless photometry. clusters: indices into the n
    simulated clusters to time (default all n)."""
    theta, fs, rs, d, pr, f = simulated_clusters(n, seed)
    if clusters is not None:
        fs, rs, d = fs[clusters], rs[clusters], d[clusters]
        n = len(clusters)
    mods = [("this", gp)] + ([("baseline", load_module(baseline))] if baseline else [])
    for _, mod in mods:
        mod._linear_fit(mod._table())                 # one-off table preparation, not per cluster
    times, walls, ncell, failed = np.zeros((len(mods), n)), 0.0, [], np.zeros((len(mods), n), bool)
    for i in range(n):
        for j, (_, mod) in enumerate(mods):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                post = mod.exact_posterior(fs[i], rs[i], d[i], max_evaluated=max_evaluated)
                if j == 0:
                    ncell.append(len(post["prob"]))
            except MemoryError:
                failed[j, i] = True
            times[j, i] = time.process_time() - c0
            walls += time.perf_counter() - t0
            post = None
        if clusters is not None:
            print(f"  cluster {clusters[i]}: " + ", ".join(f"{name} {times[j, i]:.2f} s" for j, (name, _) in
                                                         enumerate(mods)) + f"; {ncell[-1]} cells kept", flush=True)
    print(f"(CPU time per cluster; wall time was {walls / times.sum():.2f}x that on this machine)")
    which = f"{n} prior clusters" if clusters is None else f"clusters {','.join(map(str, clusters))} of the prior set"
    for j, (name, _) in enumerate(mods):
        t = times[j]
        print(f"exact posterior ({name}), full 1 Myr age grid, {which} (seed {seed}), one core: median "
              f"{np.median(t):.2f} s, mean {t.mean():.2f} s, 90th pct {np.percentile(t, 90):.2f} s, max {t.max():.2f} s; "
              f"<= 1 s for {np.mean(t <= 1):.0%}; {failed[j].sum()} over max_evaluated = {max_evaluated:.0e} or the cap"
              + (f"; median cells kept {int(np.median(ncell))}" if j == 0 and ncell else ""))
    if len(mods) == 2:
        r = times[0] / times[1]
        print(f"time ratio this / baseline per cluster: median {np.median(r):.2f}, min {r.min():.2f}, max {r.max():.2f}; "
              f"median / median {np.median(times[0]) / np.median(times[1]):.2f}, "
              f"max / max {times[0].max() / times[1].max():.2f}")
    if not mle:
        return
    nm = max(n, 512)
    theta, fs, rs, d, pr, f = simulated_clusters(nm, seed + 1)
    for name, mod in mods:
        mod.mle(fs[:8], rs[:8], d[:8])                # warm-up (table preparation)
        for ranges in (False, True):
            c0 = time.process_time()
            mod.mle(fs, rs, d, ranges=ranges)
            dt = (time.process_time() - c0) / nm
            print(f"MLE ({name}; min chi^2 over 13750 ages x 151 E(B-V), mass analytic), {nm} clusters in batches, "
                  f"{'with' if ranges else 'without'} the 1-sigma ranges: {dt * 1e3:.2f} ms CPU per cluster")
    # noiseless photometry on grid nodes: exact recovery
    e_nodes = simulate.load_table()["ebv_nodes"]
    ebv = e_nodes[np.random.default_rng(seed).integers(0, len(e_nodes), nm)]
    f0 = simulate.model_flux(pr["age_myr"], ebv, pr["log10_mass"], d)
    m = gp.mle(f0, np.full_like(f0, 0.1), d)
    print(f"MLE on noiseless photometry: age exact {np.mean(m['age_myr'] == pr['age_myr']):.1%}, "
          f"E(B-V) exact {np.mean(np.abs(m['ebv'] - ebv) < 1e-9):.1%}, "
          f"max |log m error| {np.abs(m['log10_mass'] - pr['log10_mass']).max():.1e} dex")


def bench_convergence(n, seed):
    theta, fs, rs, d, pr, f = simulated_clusters(n, seed + 2)
    dq, dz = [], []
    for i in range(n):
        a = gp.exact_posterior(fs[i], rs[i], d[i])
        b = gp.exact_posterior(fs[i], rs[i], d[i], resolution=3.0, tail=40.0)
        dq.append(np.abs(a["quantiles"] - b["quantiles"]).max(axis=1))
        dz.append(abs(a["log_z"] - b["log_z"]))
    dq = np.array(dq)
    print(f"convergence (resolution 2 -> 3, pruning depth 30 -> 40 nats), {n} clusters: max |quantile change| "
          f"log age {dq[:, 0].max():.1e} dex, log mass {dq[:, 1].max():.1e} dex, E(B-V) {dq[:, 2].max():.1e} mag; "
          f"max |log Z change| {max(dz):.1e}")


def one_cluster(n, seed, i, resolution=2.0):
    """Exact posterior of cluster i of simulated_clusters(n, seed): CPU time, kept cells, this process's peak
    memory (run in a fresh process per cluster: `--cluster`, so the peak is the cluster's own)."""
    import resource
    theta, fs, rs, d, pr, f = simulated_clusters(n, seed)
    gp._linear_fit(gp._table())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    c0 = time.process_time()
    try:
        cells = len(gp.exact_posterior(fs[i], rs[i], d[i], resolution=resolution)["prob"])
    except MemoryError:
        cells = -1
    dt = time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"cluster {i} (seed {seed}, n {n}, resolution {resolution}): {dt:.2f} s CPU, "
          f"{'over the memory cap' if cells < 0 else f'{cells} cells kept'}, peak RSS {peak:.2f} GB "
          f"({peak - base:.2f} GB above the loaded table)", flush=True)


def broad_clusters(path, top, resolution=2.0):
    """Re-run the `top` clusters with the most kept cells (or failed) of a saved SBC file, each in a fresh
    process, printing time and peak memory (grid_posterior's worst cases)."""
    import subprocess
    z = simulate.load_npz(path, required=("n_cells", "failed", "seed", "start"))
    score = np.where(z["failed"], np.iinfo(np.int64).max, z["n_cells"])
    idx = np.argsort(-score, kind="stable")[:top] + int(z["start"])
    n = int(z.get("n_total", 500))
    for i in idx:
        subprocess.run([sys.executable, __file__, "--cluster", str(i), "--n", str(n), "--seed", str(int(z["seed"])),
                        "--resolution", str(resolution)], check=True)


def sbc(n, seed, likelihood="exact", n_samples=99, progress=True, save=None, start=0, resolutions=(2.0, 1.0),
        max_evaluated=5e8):
    """Ranks of the truth among posterior draws per parameter, PIT of the marginals, and the HPD rank;
    with `save`, the arrays so far are written there every 25 clusters and at the end (summarise with
    --summarize FILE), with each cluster's CPU time (incl. failed tries), kept cells and resolution used.
    A posterior over grid_posterior's memory cap or over max_evaluated cells (~1 min; MemoryError) is retried
    at the next of `resolutions`
    (leaving the broadest posteriors out would bias the test); if all fail it is recorded as failed (rank -1)
    and left out of the tests, not a crash of the run."""
    theta, fs, rs, d, pr, f = simulated_clusters(n, seed)
    theta, fs, rs, d = theta[start:], fs[start:], rs[start:], d[start:]     # `start`: a second worker's share
    n = len(theta)
    rng = np.random.default_rng([seed + 100, start])
    ranks, pit, hpd = np.full((n, 3), -1), np.full((n, 3), np.nan), np.full(n, -1)
    cpu, cells, failed = np.full(n, np.nan), np.zeros(n, np.int64), np.zeros(n, bool)
    used = np.full(n, np.nan)
    t0 = time.time()
    for i in range(n):
        c0 = time.process_time()
        post = None
        for res in resolutions:                      # the default resolution, then coarser if over the memory cap
            try:
                post = gp.exact_posterior(fs[i], rs[i], d[i], likelihood=likelihood, resolution=res,
                                          max_evaluated=max_evaluated)
                break
            except MemoryError as err:
                print(f"  sbc cluster {start + i} at resolution {res}: {err}", file=sys.stderr, flush=True)
        if post is None:
            failed[i] = True
        else:
            cpu[i], cells[i], used[i] = time.process_time() - c0, len(post["prob"]), res
            s = gp.sample_posterior(post, n_samples, rng)
            ranks[i] = (s < theta[i]).sum(0)
            pit[i] = [gp.marginal_cdf(post, j, theta[i, j]) for j in range(3)]
            ld = gp.log_density(np.concatenate([theta[i:i + 1], s])[None], fs[i:i + 1], rs[i:i + 1], d[i:i + 1],
                                posts=[post], likelihood=likelihood)[0]
            hpd[i] = np.sum(ld[1:] > ld[0])
            del post
        if progress and ((i + 1) % 25 == 0 or i + 1 == n):
            print(f"  sbc {i + 1}/{n}, {time.time() - t0:.0f} s, {failed[:i + 1].sum()} failed",
                  file=sys.stderr, flush=True)
            if save:
                simulate.save_npz(save, ranks=ranks[:i + 1], pit=pit[:i + 1], hpd=hpd[:i + 1],
                                  failed=failed[:i + 1], cpu_s=cpu[:i + 1], n_cells=cells[:i + 1],
                                  resolution=used[:i + 1],
                                  start=np.int64(start), n_total=np.int64(n + start), n_samples=np.int64(n_samples),
                                  seed=np.int64(seed))
    return sbc_summary(ranks, pit, hpd, n_samples, likelihood, seed, failed=failed, cpu=cpu, resolution=used)


def sbc_summary(ranks, pit, hpd, n_samples, likelihood="exact", seed=None, failed=None, cpu=None, resolution=None):
    """chi^2 test of the rank histograms (10 bins), KS test of the PIT, chi^2 test of the HPD rank, over the
    clusters that did not fail; the CPU time per cluster if known."""
    ok = ~failed if failed is not None else np.ones(len(ranks), bool)
    ranks, pit, hpd = ranks[ok], pit[ok], hpd[ok]
    n = len(ranks)
    hist = [np.bincount(ranks[:, j] * 10 // (n_samples + 1), minlength=10) for j in range(3)]
    p_chi2 = [stats.chisquare(h).pvalue for h in hist]
    p_ks = [stats.kstest(pit[:, j], "uniform").pvalue for j in range(3)]
    p_hpd = stats.chisquare(np.bincount(hpd * 10 // (n_samples + 1), minlength=10)).pvalue
    print(f"SBC of the exact posterior ({likelihood} likelihood), {n} prior clusters, seed {seed}, L = {n_samples}"
          f", {len(ok) - n} failed (memory cap):")
    for j, name in enumerate(("log10 age", "log10 mass", "E(B-V)")):
        print(f"  {name:10s}: rank-histogram chi^2 p = {p_chi2[j]:.3f}, KS on PIT p = {p_ks[j]:.3f}")
    print(f"  HPD rank (joint): chi^2 p = {p_hpd:.3g}")
    if resolution is not None and np.isfinite(resolution).any():
        vals, counts = np.unique(resolution[np.isfinite(resolution)], return_counts=True)
        print("  resolution used: " + ", ".join(f"{v:g}: {c} clusters" for v, c in zip(vals, counts)))
    if cpu is not None and np.isfinite(cpu).any():
        c = cpu[np.isfinite(cpu)]
        print(f"  exact posterior CPU time per cluster: median {np.median(c):.2f} s, mean {c.mean():.2f} s, "
              f"90th pct {np.percentile(c, 90):.2f} s, max {c.max():.2f} s; <= 1 s for {np.mean(c <= 1):.0%}")
    return p_chi2, p_ks, p_hpd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="clusters for the timing and convergence runs")
    ap.add_argument("--sbc", type=int, default=0, help="run the SBC on this many clusters instead")
    ap.add_argument("--likelihood", default="exact", choices=gp.LIKELIHOODS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save", default=None, help="with --sbc: write the ranks so far to this .npz")
    ap.add_argument("--start", type=int, default=0, help="with --sbc: skip the first START clusters (split runs)")
    ap.add_argument("--summarize", default=None, help="print the SBC tests of --save file(s), comma-separated")
    ap.add_argument("--cluster", type=int, default=None,
                    help="time one cluster of the --n clusters of --seed (CPU time, peak memory) and exit")
    ap.add_argument("--broad", default=None, help="saved SBC .npz: time its --top broadest clusters, one process each")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--baseline", default=None,
                    help="another grid_posterior.py (e.g. from `git show REV:grid_posterior.py`): time it too, "
                         "alternating on the same clusters")
    ap.add_argument("--clusters", default=None,
                    help="comma-separated indices into the --n clusters of --seed: time only these (exact posterior "
                         "only, no MLE or convergence run), e.g. the broad ones")
    ap.add_argument("--resolution", type=float, default=2.0,
                    help="with --cluster/--broad/--sbc (the SBC retries a cluster over the cap at 1)")
    args = ap.parse_args(argv)
    if args.cluster is not None:
        one_cluster(args.n, args.seed, args.cluster, args.resolution)
        return
    if args.broad:
        broad_clusters(args.broad, args.top, args.resolution)
        return
    if args.summarize:
        zs = [simulate.load_npz(p, required=("ranks", "pit", "hpd", "n_samples", "seed"))
              for p in args.summarize.split(",")]
        for z in zs:                                      # files from before the failed/cpu_s keys
            z.setdefault("failed", np.zeros(len(z["ranks"]), bool))
            z.setdefault("cpu_s", np.full(len(z["ranks"]), np.nan))
            z.setdefault("resolution", np.full(len(z["ranks"]), np.nan))
        sbc_summary(*(np.concatenate([z[k] for z in zs]) for k in ("ranks", "pit", "hpd")),
                    int(zs[0]["n_samples"]), seed=int(zs[0]["seed"]),
                    failed=np.concatenate([z["failed"] for z in zs]), cpu=np.concatenate([z["cpu_s"] for z in zs]),
                    resolution=np.concatenate([z["resolution"] for z in zs]))
        return
    if args.sbc:
        sbc(args.sbc, args.seed, args.likelihood, save=args.save, start=args.start,
            resolutions=(args.resolution, 1.0) if args.resolution != 1.0 else (1.0,))
        return
    if args.clusters:
        bench_speed(args.n, args.seed, args.baseline, clusters=[int(c) for c in args.clusters.split(",")], mle=False)
        return
    bench_speed(args.n, args.seed, args.baseline)
    bench_convergence(max(args.n // 4, 3), args.seed)


if __name__ == "__main__":
    main()
