"""The one-command end-to-end run: simulate -> preprocess -> train -> evaluate -> a catalogue run.

    python pipeline.py [--profile quick] [--method refined|paper] [--out runs/quick] [--seed S]

Stages (each one of the project's command-line scripts, run as a subprocess; a progress line per stage):
  1 simulate    python simulate.py        -> OUT/sim.npz                       (SPEC.md Sect. 2-3)
  2 preprocess  python preprocess.py      -> OUT/data/{train,val,test}.npz     (noise model, x, theta)
  3 train       python train.py           -> OUT/model.pt, OUT/metrics.json    (Eq. 4; --resume if cut off)
  4 sbc         python evaluate.py sbc    -> OUT/eval/sbc/                     (Fig. 3)
  5 ppc         python evaluate.py ppc    -> OUT/eval/ppc/                     (Fig. 4)
  6 exact       python evaluate.py exact  -> OUT/eval/exact/                   (KL vs the exact grid posterior)
  7 synthetic   python catalogs.py synthetic -> OUT/catalog/synthetic_phangs.fits
  8 catalog     python evaluate.py catalog
                                          -> OUT/catalog/                      (Table 1, Figs. 6, 8, B.3)
A stage whose outputs exist is skipped (resume after an interruption). OUT/pipeline_stages.json records the
command of each finished stage; a stage recorded with a different command (other seed or profile) stops the
run with a message instead of mixing runs. At the end: a summary of the key numbers and where the figures
and tables are (also written to OUT/summary.json).

The quick profile is sized for a 2-core CPU machine (about 16 minutes when it is otherwise idle); `smoke` checks
the wiring in about a minute; `full` is the paper's scale (a GPU for training). Training runs a fixed number of
epochs: the same seed gives the same files on any machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from astropy.table import Table

ROOT = Path(__file__).resolve().parent

RUN_SIZES = {
    # 2-core CPU: about 16 minutes in all on an idle machine, 14 of them training (22 epochs)
    "quick": dict(n_sim=1_040_000, n_val=20_000, n_test=20_000, sbc_n=10_000, sbc_L=100,
                  ppc_n=1000, ppc_samples=500, exact_n=50, exact_samples=10_000, catalog_n=300,
                  catalog_samples=2000, catalog_distance_mpc=10.0),
    # seconds: every stage on toy sizes, to check the wiring (tests/test_pipeline.py); numbers meaningless
    "smoke": dict(n_sim=4000, n_val=500, n_test=500, train_epochs=2, sbc_n=100, sbc_L=20,
                  ppc_n=20, ppc_samples=100, exact_n=2, exact_samples=300, catalog_n=60, catalog_samples=300,
                  catalog_distance_mpc=10.0),
    # the paper's scale: 5e6 simulations, 1e5 validation / test clusters (a GPU for training)
    "full": dict(n_sim=5_000_000, n_val=100_000, n_test=100_000, sbc_n=10_000, sbc_L=100,
                  ppc_n=1000, ppc_samples=500, exact_n=200, exact_samples=10_000, catalog_n=3000,
                  catalog_samples=10_000, catalog_distance_mpc=10.0),
}


def log(msg):
    """Progress line on stderr."""
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stages(out, profile, seed, threads=None, method="refined"):
    """The ordered stages: (name, outputs that mark it done, command argv)."""
    p = RUN_SIZES[profile]
    py = sys.executable
    data, ev, cat = out / "data", out / "eval", out / "catalog"
    test = data / "test.npz"
    train_cmd = [py, "train.py", "--data", str(data), "--out", str(out), "--method", method, "--profile",
                 "quick" if profile == "smoke" else profile, "--seed", str(seed)]
    if p.get("train_epochs"):
        train_cmd += ["--epochs", str(p["train_epochs"])]
    if threads:
        train_cmd += ["--threads", str(threads)]
    train_cmd += ["--workers", str(threads or min(os.cpu_count() or 1, 8))]   # the one-off target transform
    syn = cat / "synthetic_phangs.fits"
    return [
        ("simulate", [out / "sim.npz"],
         [py, "simulate.py", "--n", str(p["n_sim"]), "--seed", str(seed), "--out", str(out / "sim.npz")]),
        ("preprocess", [data / "train.npz", data / "val.npz", test],
         [py, "preprocess.py", "--sim", str(out / "sim.npz"), "--out", str(data), "--n-val", str(p["n_val"]),
          "--n-test", str(p["n_test"]), "--seed", str(seed)]),
        ("train", [out / "model.pt", out / "metrics.json"], train_cmd),
        ("sbc", [ev / "sbc" / "sbc.json"],
         [py, "evaluate.py", "sbc", "--model", str(out), "--obs", str(test), "--n", str(p["sbc_n"]),
          "--L", str(p["sbc_L"]), "--seed", str(seed), "--out", str(ev / "sbc")]),
        ("ppc", [ev / "ppc" / "ppc.json"],
         [py, "evaluate.py", "ppc", "--model", str(out), "--obs", str(test), "--n", str(p["ppc_n"]),
          "--samples", str(p["ppc_samples"]), "--seed", str(seed), "--out", str(ev / "ppc")]),
        ("exact", [ev / "exact" / "exact.json"],
         [py, "evaluate.py", "exact", "--model", str(out), "--obs", str(test), "--n", str(p["exact_n"]),
          "--samples", str(p["exact_samples"]), "--seed", str(seed), "--out", str(ev / "exact")]),
        ("synthetic", [syn],
         [py, "catalogs.py", "synthetic", "--out", str(syn), "--n", str(p["catalog_n"]), "--seed", str(seed),
          "--distance", str(p["catalog_distance_mpc"])]),
        ("catalog", [cat / "synthetic_phangs_result.ecsv", cat / "synthetic_phangs_result_inliers.ecsv"],
         [py, "evaluate.py", "catalog", "--input", str(syn), "--format", "phangs",
          "--distance", str(p["catalog_distance_mpc"]), "--model", str(out),
          "--out", str(cat / "synthetic_phangs_result.ecsv"), "--samples", str(p["catalog_samples"]),
          "--seed", str(seed)]),
    ]


def _rel(cmd):
    """Command as recorded (interpreter path dropped, so a stamp survives a change of virtualenv)."""
    return [str(c) for c in cmd[1:]]


def run_stage(k, n, name, outputs, cmd, record, env):
    """Run one stage unless its outputs exist; returns seconds spent (0 when skipped)."""
    done = all(Path(o).exists() for o in outputs)
    stamp = record.get(name)
    if done and stamp is not None and stamp != _rel(cmd):
        raise SystemExit(f"pipeline: stage '{name}' in this directory was made by a different command:\n"
                         f"  recorded: {' '.join(stamp)}\n  now:      {' '.join(_rel(cmd))}\n"
                         "use another --out (or delete its outputs) to rerun it")
    if done:
        log(f"[{k}/{n}] {name}: outputs exist, skipped ({', '.join(str(o) for o in outputs)})"
            + ("" if stamp else " (not made by pipeline.py)"))
        return 0.0
    if name == "train" and (Path(outputs[0]).parent / "last.pt").exists():
        cmd = cmd + ["--resume"]
    log(f"[{k}/{n}] {name}: {' '.join(_rel(cmd))}")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"pipeline: stage '{name}' failed (exit code {r.returncode}); fix the cause and rerun "
                         "the same command: finished stages are skipped")
    missing = [str(o) for o in outputs if not Path(o).exists()]
    if missing:
        raise SystemExit(f"pipeline: stage '{name}' finished but did not write {missing}")
    record[name] = _rel([c for c in cmd if c != "--resume"])
    dt = time.time() - t0
    log(f"[{k}/{n}] {name}: done in {dt / 60:.1f} min")
    return dt


def _load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def summarize_run(out):
    """Key numbers from the stages' JSON/ECSV outputs -> (text lines, dict)."""
    lines, summ = [], {}
    m = _load_json(out / "metrics.json")
    if m:
        summ["train"] = {k: m.get(k) for k in ("test_nll", "coverage_68", "coverage_95", "best_epoch",
                                               "epochs_run", "train_seconds")}
        lines.append(f"training: test NLL {m.get('test_nll', float('nan')):.3f} nats, coverage of 68 % intervals "
                     + ", ".join(f"{v:.3f}" for v in m.get("coverage_68", [])) + " (log t, log m, E(B-V))")
    s = _load_json(out / "eval" / "sbc" / "sbc.json")
    if s:
        stats = s.get("statistics", [])
        summ["sbc"] = {st["name"]: st["max_abs_ecdf_diff"] for st in stats}
        summ["sbc_all_inside"] = s.get("all_inside_simultaneous")
        lines.append(f"SBC ({s.get('n_pairs')} pairs): max |ECDF - U| " + ", ".join(
            f"{st['name'].split()[0]} {st['max_abs_ecdf_diff']:.3f}" for st in stats)
            + f"; all inside the band: {s.get('all_inside_simultaneous')}")
    p = _load_json(out / "eval" / "ppc" / "ppc.json")
    if p:
        summ["ppc_share_obs_in_central_68"] = p.get("share_obs_in_central_68")
        lines.append("PPC: observation inside the central 68 % of the predictive per band: "
                     + ", ".join(f"{v:.3f}" for v in p.get("share_obs_in_central_68", [])))
    e = _load_json(out / "eval" / "exact" / "exact.json")
    if e:
        summ["exact"] = {k: e.get(k) for k in ("kl_mean_nats", "kl_se_nats", "median_width_ratio_cinn_over_exact",
                                               "share_map_within_0p1_dex_age",
                                               "share_exact_sample_map_within_0p1_dex_age")}
        lines.append(f"exact posterior ({e.get('n_clusters')} clusters): KL estimate {e['kl_mean_nats']:.3f} +- "
                     f"{e['kl_se_nats']:.3f} nats; cINN MAP within 0.1 dex in age of the exact MAP for "
                     f"{e['share_map_within_0p1_dex_age']:.0%} (the same estimator on exact samples: "
                     f"{e['share_exact_sample_map_within_0p1_dex_age']:.0%})")
    inl = out / "catalog" / "synthetic_phangs_result_inliers.ecsv"
    if inl.exists():
        t = Table.read(inl)
        summ["catalog_inliers"] = [dict(zip(t.colnames, [r[c].item() if hasattr(r[c], "item") else r[c]
                                                         for c in t.colnames])) for r in t]
        for ref in dict.fromkeys(t["reference"]):
            sub = t[t["reference"] == ref]
            lines.append(f"synthetic PHANGS catalogue vs {ref}: reference in cINN 16-84 %: " + ", ".join(
                f"{r['parameter']} {r['ref_in_cinn_16_84_pct']:.1f} %" for r in sub)
                + ("; cINN MAP in reference 1 sigma: " + ", ".join(
                    f"{r['parameter']} {r['cinn_map_in_ref_1sigma_pct']:.1f} %" for r in sub)
                   if ref == "grid MLE" else " (truth stored as the catalogue estimate: a coverage check)"))
    figs = sorted(str(f.relative_to(out)) for f in out.rglob("*.png"))
    tables = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.suffix in (".ecsv", ".fits", ".json"))
    summ["figures"], summ["tables"] = figs, tables
    lines.append(f"figures ({out}/): " + ", ".join(figs))
    lines.append(f"tables ({out}/): " + ", ".join(tables))
    return lines, summ


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--profile", choices=sorted(RUN_SIZES), default="quick")
    ap.add_argument("--method", choices=("refined", "paper"), default="refined",
                    help="refined: the refinements of refinements.py; paper: the paper's plain transform")
    ap.add_argument("--out", default=None, help="run directory (default runs/<profile>)")
    ap.add_argument("--seed", type=int, default=0, help="seed passed to every stage (same seed -> same files)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these stages (names as printed)")
    args = ap.parse_args(argv)
    out = Path(args.out or f"runs/{args.profile}")
    if not out.is_absolute():
        out = (Path.cwd() / out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    record_path = out / "pipeline_stages.json"
    record = _load_json(record_path) or {}
    plan = stages(out, args.profile, args.seed, args.threads, args.method)
    t0 = time.time()
    for k, (name, outputs, cmd) in enumerate(plan, 1):
        if args.only and name not in args.only:
            continue
        run_stage(k, len(plan), name, outputs, cmd, record, env)
        tmp = record_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, record_path)
    lines, summ = summarize_run(out)
    summ["wall_minutes"] = (time.time() - t0) / 60
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summ, indent=1, default=str) + "\n")
    os.replace(tmp, out / "summary.json")
    print(f"\npipeline ({args.profile}, {args.method}, seed {args.seed}) finished in {summ['wall_minutes']:.1f} min; {out}")
    for line in lines:
        print("  " + line)
    return summ


if __name__ == "__main__":
    main()
