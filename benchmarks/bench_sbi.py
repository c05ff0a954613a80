"""The peer: sbi's NPE trained on the project's training split, scored exactly like the project's models.

    python -m venv --system-site-packages .venv-sbi                     # beside the project's environment
    .venv-sbi/bin/pip install -r benchmarks/requirements-sbi.txt -c benchmarks/constraints-torch.txt
    .venv-sbi/bin/python benchmarks/bench_sbi.py --data DATA --exact EXACT.npz --minutes 14 --threads 2 \
        [--estimator nsf] [--seed 0] [--out runs/sbi]

sbi (Tejero-Cantero et al. 2020, 0.27) is a benchmark-only dependency, installed in its own environment with
the project's torch pinned (the constraints file), so the project itself never imports it. Its NPE density
estimator (`--estimator`: "nsf", a neural spline flow, or "maf", sbi's default) is trained with sbi's default
batch size (200), learning rate (5e-4) and z-scoring on theta and x of DATA/train.npz, for a wall-clock budget
(the quick profile's training time, threads as given), keeping the estimator of the best validation loss
(sbi's own 10 % validation split). Then, on DATA/test.npz, the same scores as the project's models: the test
NLL in physical coordinates (2,000 clusters, the density estimator's own density, and the share of its draws
outside the prior box), the KL estimate against the exact posteriors of an `evaluate.py exact` run (EXACT.npz:
its clusters and log p_exact), and SBC on 10,000 test clusters with draws restricted to the prior box
(sbi's DirectPosterior). Prints figures; writes OUT/sbi.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import preprocess  # noqa: E402
from simulate import load_npz  # noqa: E402


def train_npe(theta, x, estimator, minutes, seed, batch=200, lr=5e-4):
    """sbi's NPE density estimator on (theta, x), Adam, for `minutes` of wall clock; the best on validation."""
    from sbi.neural_nets import posterior_nn
    from sbi.utils import BoxUniform
    torch.manual_seed(seed)
    prior = BoxUniform(torch.as_tensor(preprocess.THETA_BOUNDS[:, 0]).float(),
                       torch.as_tensor(preprocess.THETA_BOUNDS[:, 1]).float())
    t, xx = torch.as_tensor(theta).float(), torch.as_tensor(x).float()
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))
    n_val = len(t) // 10
    val, tr = perm[:n_val], perm[n_val:]
    net = posterior_nn(model=estimator)(t[tr[:10_000]], xx[tr[:10_000]])     # built and z-scored as NPE does
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state, epoch, t0 = np.inf, None, 0, time.time()
    gen = torch.Generator().manual_seed(seed + 1)
    while time.time() - t0 < 60 * minutes:
        net.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = net.loss(t[idx], condition=xx[idx]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            if time.time() - t0 > 60 * minutes:
                break
        net.eval()
        with torch.no_grad():
            v = float(torch.cat([net.loss(t[val[j:j + 10_000]], condition=xx[val[j:j + 10_000]])
                                 for j in range(0, n_val, 10_000)]).mean())
        epoch += 1
        print(f"epoch {epoch}: validation loss {v:.4f} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        if v < best:
            best, best_state = v, {k: w.clone() for k, w in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), prior, epoch


def log_prob(net, theta, x, chunk=20_000):
    """The density estimator's log density at theta (N, 3) given x (N, 11), in theta's own coordinates."""
    with torch.no_grad():
        return np.concatenate([net.log_prob(torch.as_tensor(theta[i:i + chunk]).float()[None],
                                            condition=torch.as_tensor(x[i:i + chunk]).float()).numpy().ravel()
                               for i in range(0, len(theta), chunk)])


def draws(net, x, n, inside_prior):
    """n draws per row of x (N, n, 3), re-drawn until inside the prior box (sbi's DirectPosterior does the
    same); also the share of first draws outside it."""
    out, outside = np.empty((len(x), n, 3), np.float32), []
    with torch.no_grad():
        for i, xi in enumerate(x):
            c = torch.as_tensor(xi[None]).float()
            s = net.sample((n,), condition=c).reshape(n, 3).numpy()
            ok = inside_prior(s)
            outside.append(1 - ok.mean())
            while not ok.all():
                more = net.sample((4 * n,), condition=c).reshape(-1, 3).numpy()
                more = more[inside_prior(more)]
                fill = min(len(more), (~ok).sum())
                s[np.flatnonzero(~ok)[:fill]] = more[:fill]
                ok = inside_prior(s)
            out[i] = s
    return out, float(np.mean(outside))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="preprocess.py output directory")
    ap.add_argument("--exact", required=True, help="exact.npz of an `evaluate.py exact` run on DATA/test.npz")
    ap.add_argument("--minutes", type=float, required=True, help="training wall clock (the quick profile's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="nsf", choices=("nsf", "maf"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sbc", type=int, default=10_000)
    ap.add_argument("--out", default="runs/sbi")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tr, te = load_npz(Path(args.data) / "train.npz"), load_npz(Path(args.data) / "test.npz")
    net, prior, epochs = train_npe(tr["theta"], tr["x"], args.estimator, args.minutes, args.seed)
    inside = preprocess.inside_prior
    lp = log_prob(net, te["theta"][:2000], te["x"][:2000])
    _, leak = draws(net, te["x"][:200], 1000, inside)
    ref = load_npz(args.exact, required=("logp_exact", "theta_true"))
    n_ex = len(ref["theta_true"])
    assert np.allclose(ref["theta_true"], te["theta"][:n_ex]), "EXACT.npz is not of DATA/test.npz"
    logq = log_prob(net, te["theta"][:n_ex], te["x"][:n_ex])
    kl, kl_se = evaluate.kl_estimate(ref["logp_exact"], logq)
    splits = evaluate.kl_near_prior_bounds(ref["logp_exact"], logq, te["theta"][:n_ex])
    floor = evaluate.kl_by_floor_height(ref["logp_exact"], logq, te["theta"][:n_ex], te["x"][:n_ex])
    samples, _ = draws(net, te["x"][:args.sbc], 100, inside)
    sbc = evaluate.sbc_check(samples, te["theta"][:args.sbc], rng=np.random.default_rng(args.seed + 1))["summary"]
    res = dict(estimator=args.estimator, epochs=epochs, minutes=args.minutes, threads=args.threads,
               test_nll=float(-np.mean(lp)), share_draws_outside_prior=leak, kl_mean_nats=kl, kl_se_nats=kl_se,
               kl_by_distance_to_prior_bounds=splits, kl_by_height_above_mass_floor_dex=floor,
               sbc_max_abs_ecdf_diff=[s["max_abs_ecdf_diff"] for s in sbc["statistics"]],
               sbc_all_inside=sbc["all_inside_simultaneous"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sbi.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
