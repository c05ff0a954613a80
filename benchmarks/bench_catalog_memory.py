"""Peak memory of `evaluate.py catalog` against the catalogue's length: it must not grow with the clusters.

    python benchmarks/bench_catalog_memory.py --model RUN --n 1000 10000 [--samples 10000] [--seed 0]

For each n, a synthetic PHANGS-format catalogue of n clusters (catalogs.make_synthetic_phangs) goes through
`evaluate.py catalog` in a fresh process; its peak resident memory (getrusage of the child) and wall time are
printed. Prints figures; asserts nothing.
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import catalogs  # noqa: E402


def run(model, n, samples, seed, work):
    """Peak RSS (MB) and wall time (s) of one catalogue run of n clusters, in a child process."""
    cat = work / f"syn_{n}.fits"
    catalogs.make_synthetic_phangs(cat, n, seed=seed, distance_mpc=10.0)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "catalog", "--input", str(cat), "--format", "phangs",
                    "--distance", "10", "--model", str(model), "--out", str(work / f"res_{n}.ecsv"),
                    "--samples", str(samples), "--seed", str(seed), "--no-figures"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(peak, before) / 1024, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.n):          # ru_maxrss of the children is a running maximum: smallest first
            peak, wall = run(args.model, n, args.samples, args.seed, Path(tmp))
            print(f"{n:7d} clusters x {args.samples} samples: peak RSS {peak:7.0f} MB, wall {wall / 60:.1f} min",
                  flush=True)


if __name__ == "__main__":
    main()
