"""Train the cINN by maximum likelihood (Walter et al. 2026, Sect. 2.1-2.2, Eq. 4), and tune it with Hyperband.

    loss = mean over the batch of ( ||z||^2 / 2 - log|det dz/du| )  +  eta ||phi||^2           (Eq. 4 + L2)

Adam (the L2 term enters as its weight decay 2 eta: the same gradient), cosine learning-rate decay, gradient-norm
clipping, validation NLL every epoch, early stopping, an atomic checkpoint every epoch (RUN_DIR/last.pt: weights,
optimizer, scheduler, epoch, history) and the best model so far (RUN_DIR/model.pt, the file cinn.load reads).
All randomness of epoch e (shuffling, online noise) comes from generators seeded by (seed, e), so a run resumed
from last.pt reproduces the uninterrupted run exactly.

    python train.py --data DIR --out RUN_DIR [--profile quick|paper] [--epochs N] [--seed S] [--online]
    python train.py --data DIR --out RUN_DIR --resume                 # continue an interrupted run
    python train.py --data DIR --out RUN_DIR --config best_config.json  # e.g. the Hyperband winner
    python train.py --hyperband --data DIR --out HB_DIR [--hb-max-epochs R] [--hb-eta 3] [--hb-subset N]
    python train.py --evaluate RUN_DIR --data DIR [--n-eval 2000]      # test NLL and interval coverage

DIR holds train.npz, val.npz (and test.npz) from preprocess.py. With --online, distance, noise and the age
jitter are re-drawn every epoch from the noiseless fluxes kept in train.npz (the paper used one fixed draw).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

import cinn
import preprocess

PROFILES = {
    # CPU, 1e6 clusters, ~15 min of training on one thread (README, measured throughput). Both profiles
    # use the mass floor and the two ridges (preprocess docstring): on the quick profile the mass ridge
    # improved the test NLL by 0.76 nats, the E(B-V) ridge by 0.18 more (README, measured figures). The quick
    # profile also warps the age by the age profile (beta = 1) and weighs the bands of the ridges by the moments
    # of their exact likelihood (band_moments): KL to the exact posterior 0.38 -> 0.24 nats on 200 test clusters
    # (README, measured figures). The profile's cost (0.17 ms per cluster) rules out re-drawing the noise every
    # epoch, so the quick profile trains on one fixed draw, like the paper (online was worth nothing at 60 epochs).
    # What limits it is the condition network and the data it sees, not the coupling blocks: 10 blocks or wider
    # subnets gained 0.01-0.02 nats; a larger condition network 0.02-0.04 on 360k clusters (and overfit), and
    # 0.070 +- 0.010 on 1M clusters for 22 epochs, the same number of steps (README, eighth session); 256 x 4
    # instead of 192 x 3 another 0.024 +- 0.007 and 0.019 +- 0.007 (two seeds) for 1.3x the time per epoch
    "quick": dict(model=dict(n_blocks=6, width=96, depth=2, clamp=2.0, cond_dim=64, cond_width=256, cond_depth=4,
                             floor_scale=0.1, ridge=True, ebv_ridge=True, age_profile=1.0,
                             band_moments=True),
                  train=dict(epochs=22, batch_size=2048, lr=2e-3, lr_final=1e-5, l2=1e-7, clip_norm=10.0,
                             patience=12, online=False)),
    # GPU, 5e6 clusters (paper scale). Batch 16384 at lr 1.5e-3: on an H200 the step time is set by kernel
    # launches, so twice the batch is ~twice the samples/s; in 4.4 minutes it reached a test NLL 0.11 nats
    # better than batch 8192 at lr 1e-3 in 5.6 (and 8192 was 0.8 better than 2048; README, measured figures).
    # With the age profile and band_moments as in the quick profile (ninth session, H200, 36 epochs in 6 min,
    # sharing the GPU with a second run): 0.061 +- 0.011 nats per cluster better than the quick model of the
    # eighth session, 0.038 +- 0.010 better than the ninth's. The age profile's one-off cost (~0.2 ms per cluster,
    # 16 CPU-min for 5e6) is spread over processes: train.py --workers (3.2 min with 8 per run, two runs; 2.3 min
    # with 16 for one). Alone on an H200 to the end of its schedule (tenth session, 35 epochs in 5.5 min): KL to
    # the exact posterior 0.087 +- 0.016 nats on 799 test clusters (quick: 0.145), SBC all six inside
    "paper": dict(model=dict(n_blocks=10, width=256, depth=3, clamp=2.0, cond_dim=64, cond_width=256,
                             cond_depth=3, floor_scale=0.1, ridge=True, ebv_ridge=True, age_profile=1.0,
                             band_moments=True),
                  train=dict(epochs=100, batch_size=16384, lr=1.5e-3, lr_final=5e-6, l2=1e-7, clip_norm=10.0,
                             patience=10, online=False)),
}
TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_final", "l2", "clip_norm", "patience", "online")
# Hyperband search space (Li et al. 2018): name -> (kind, values or range); resource = training epochs.
SEARCH_SPACE = {
    "n_blocks": ("choice", [4, 6, 8, 10]),
    "width": ("choice", [64, 128, 256]),
    "depth": ("choice", [1, 2, 3]),
    "lr": ("log_uniform", (1e-4, 3e-3)),
    "batch_size": ("choice", [256, 512, 1024, 2048]),
    "l2": ("log_uniform", (1e-9, 1e-5)),
    "clamp": ("uniform", (1.0, 3.0)),
}
MODEL_KEYS_IN_SPACE = ("n_blocks", "width", "depth", "clamp")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def epoch_seed(seed, epoch, stream):
    """Integer seed for one (run seed, epoch, stream) triple: the only source of randomness during training."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, np.uint64)[0]
               % (2 ** 63))


# ----------------------------------------------------------------------------------------------------------
# Data

def load_split(data_dir, name, online=False):
    """Observation file DIR/name.npz -> dict of numpy arrays (train also needs noiseless fluxes for --online)."""
    from simulate import load_npz
    required = ("theta", "x")
    if online:
        required += ("age_myr", "log10_mass", "ebv", "flux_10pc_mjy")
    return load_npz(os.path.join(data_dir, f"{name}.npz"), required=required)


def tensors(obs, device, n=None, transform=None, workers=1):
    """(u, x) float32 tensors from an observation dict (first n rows); transform: the model's target transform
    options (preprocess.target_transform(config); None: the plain transform); workers: processes for it
    (targets_to_u)."""
    theta, x = obs["theta"][:n], obs["x"][:n]
    if not np.all(np.isfinite(theta)):
        raise ValueError("training/validation targets theta contain NaN (real catalogue passed as training data?)")
    u = targets_to_u(theta, x, transform or dict(scale=0.0), workers)
    return (torch.as_tensor(u, dtype=torch.float32, device=device),
            torch.as_tensor(x, dtype=torch.float32, device=device))


def targets_to_u(theta, x, transform, workers=1, chunk=100_000):
    """preprocess.theta_to_u of every row, in `workers` processes of `chunk` rows each (the transform is row by
    row: the same numbers, up to the order of BLAS sums where the caller's BLAS uses several threads, 1e-10).
    With the age profile it costs ~0.2 ms per cluster, 16 CPU-min for the paper's
    5e6, so on a GPU machine the one-off transform would otherwise outlast much of a short training budget.
    Spawned (not forked) processes, each with one BLAS thread: safe after CUDA has started; as with any spawned
    pool, a script that calls this with workers > 1 needs the `if __name__ == "__main__":` guard (train.py has it)."""
    if workers <= 1 or len(theta) <= chunk:
        return preprocess.theta_to_u(theta, x, **transform)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    starts = range(0, len(theta), chunk)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})               # inherited by the spawned workers
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(partial(preprocess.theta_to_u, **transform),
                             [theta[i:i + chunk] for i in starts], [x[i:i + chunk] for i in starts])
            return np.concatenate(list(parts))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def online_tensors(obs, seed, epoch, device, transform=None):
    """Fresh age jitter, distance and noise for every training cluster (online augmentation)."""
    rng = np.random.default_rng(epoch_seed(seed, epoch, 1))
    sim = {k: obs[k] for k in ("age_myr", "log10_mass", "ebv", "flux_10pc_mjy")}
    return tensors(preprocess.observe(sim, rng), device, transform=transform)


# ----------------------------------------------------------------------------------------------------------
# Training loop

def make_optimizer(model, cfg):
    """Adam with the L2 term of Eq. 4 folded in: d(eta ||phi||^2)/d phi = 2 eta phi is exactly what Adam's
    weight_decay=2 eta adds to each gradient, so the update is that of the penalised loss without an extra
    forward/backward pass over every weight (the penalty is not clipped with the ML gradient). On a GPU the
    fused kernel updates all weights at once."""
    fused = model.device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=2.0 * cfg["l2"], fused=fused)


@torch.no_grad()
def mean_nll(model, u, x, batch=1 << 15):
    """Mean negative log-likelihood -log p(u | x) (nats per cluster, in u coordinates)."""
    model.eval()
    total = 0.0
    for i in range(0, len(u), batch):
        total += float(-model.log_prob_u(u[i:i + batch], x[i:i + batch]).double().sum())
    return total / len(u)


def train_one_epoch(model, opt, u, x, cfg, gen):
    """One pass over (u, x) in shuffled mini-batches; returns the mean ML loss (Eq. 4, without L2).

    opt comes from make_optimizer, which applies the L2 term. The loss stays on the device and is read once
    per epoch (a host sync per step would stall a GPU); a non-finite loss raises FloatingPointError then."""
    model.train()
    perm = torch.randperm(len(u), generator=gen).to(u.device)
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    for i in range(0, len(u), cfg["batch_size"]):
        idx = perm[i:i + cfg["batch_size"]]
        z, logdet = model.to_latent(u[idx], x[idx])
        ml = (0.5 * (z ** 2).sum(dim=1) - logdet).mean()                      # Eq. 4
        opt.zero_grad(set_to_none=True)
        ml.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_norm"])
        opt.step()
        total += ml.detach().double() * len(idx)
    mean = float(total) / len(u)
    if not math.isfinite(mean):
        raise FloatingPointError("non-finite training loss")
    return mean


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(model, train, val, cfg, seed, out_dir=None, stop_after=None, max_minutes=None, quiet=False):
    """Train `model` in place. train/val: dicts with tensors u, x (train may carry `obs` for online draws).

    cfg: the training keys of PROFILES. With out_dir, writes last.pt every epoch, model.pt at every new best
    validation NLL and history.npz, and resumes from out_dir/last.pt when it exists. stop_after: return after
    this epoch (simulates an interruption). Returns dict(best_val, best_epoch, epochs_run, history, stopped).
    """
    device = model.device
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg["epochs"]),
                                                       eta_min=cfg["lr_final"])
    state = dict(epoch=0, best_val=math.inf, best_epoch=-1, bad_epochs=0,
                 history=dict(epoch=[], train_nll=[], val_nll=[], lr=[], seconds=[], samples_per_s=[]))
    last = os.path.join(out_dir, "last.pt") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if last and os.path.exists(last):
        ckpt = torch.load(last, map_location=device, weights_only=True)
        if ckpt["train_config"] != cfg or ckpt["seed"] != int(seed):
            raise ValueError(f"{last} was written with train config {ckpt['train_config']} and seed "
                             f"{ckpt['seed']}; resuming with {cfg} and seed {seed} would not reproduce that run")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        if not quiet:
            log(f"resumed from {last} after epoch {state['epoch']} (best val NLL {state['best_val']:.4f})")
    t_start = time.time()
    n_train = len(train["u"]) if "u" in train else len(train["obs"]["x"])
    stopped = "epochs"
    while state["epoch"] < cfg["epochs"]:
        epoch = state["epoch"] + 1
        t0 = time.time()
        if cfg.get("online"):
            u, x = online_tensors(train["obs"], seed, epoch, device, preprocess.target_transform(model.config))
        else:
            u, x = train["u"], train["x"]
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0))
        lr = opt.param_groups[0]["lr"]
        try:
            train_nll = train_one_epoch(model, opt, u, x, cfg, gen)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} in epoch {epoch}; stopping. Last good checkpoint: "
                                     f"{last or '(none written)'} (epoch {state['epoch']}). "
                                     "Try a lower --lr or a smaller clamp.") from None
        train_nll += 0.5 * u.shape[1] * math.log(2 * math.pi)     # report the full NLL, comparable to val
        val_nll = mean_nll(model, val["u"], val["x"])
        if not math.isfinite(val_nll):
            raise FloatingPointError(f"non-finite validation NLL in epoch {epoch}; stopping. Last good "
                                     f"checkpoint: {last or '(none written)'} (epoch {state['epoch']}).")
        sched.step()
        seconds = time.time() - t0
        h = state["history"]
        for k, v in zip(h, (epoch, train_nll, val_nll, lr, seconds, n_train / seconds)):
            h[k].append(v)
        improved = val_nll < state["best_val"] - 1e-4
        if improved:
            state.update(best_val=val_nll, best_epoch=epoch, bad_epochs=0)
            if out_dir:
                cinn.save(os.path.join(out_dir, "model.pt"), model,
                          extra=dict(epoch=epoch, val_nll=val_nll, seed=int(seed), train_config=cfg))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if out_dir:
            atomic_torch_save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                   scheduler=sched.state_dict(), state=state, train_config=cfg, seed=int(seed)),
                              last)
            from simulate import save_npz
            save_npz(os.path.join(out_dir, "history.npz"), **{k: np.asarray(v) for k, v in h.items()})
        if not quiet:
            eta_min = np.mean(h["seconds"]) * (cfg["epochs"] - epoch) / 60
            log(f"epoch {epoch:3d}/{cfg['epochs']}  train NLL {train_nll:8.4f}  val NLL {val_nll:8.4f}"
                f"{' *' if improved else '  '}  lr {lr:.2e}  {n_train / seconds:8.0f} samples/s  "
                f"{seconds:6.1f} s  ETA {eta_min:5.1f} min")
        if state["bad_epochs"] >= cfg["patience"]:
            stopped = "early stopping"
            break
        if stop_after is not None and epoch >= stop_after:
            stopped = "stop_after"
            break
        if max_minutes is not None and (time.time() - t_start + np.mean(h["seconds"])) / 60 > max_minutes:
            stopped = "time budget"
            break
    if not quiet:
        log(f"stopped ({stopped}) after epoch {state['epoch']}; best val NLL {state['best_val']:.4f} "
            f"at epoch {state['best_epoch']}")
    return dict(best_val=state["best_val"], best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                history=state["history"], stopped=stopped)


# ----------------------------------------------------------------------------------------------------------
# Calibration on held-out clusters

def coverage(model, obs, n_samples=1000, levels=(0.68, 0.95), n=2000, seed=0):
    """Empirical coverage of central marginal intervals and the test NLL on the first n clusters of obs.

    For each cluster draw n_samples posterior samples; the central q interval of parameter i is the
    [(1-q)/2, (1+q)/2] sample quantile range; coverage = share of true theta_i inside. A calibrated model gives
    q +- sqrt(q (1-q) / n). NLL = -mean log p(theta_true | x) in physical coordinates (log10 age/Myr,
    log10 mass/Msun, E(B-V)). Returns a dict of plain Python numbers (JSON-ready).
    """
    theta, x = np.asarray(obs["theta"])[:n], np.asarray(obs["x"])[:n]
    samples = model.sample(x, n_samples, seed=seed)
    out = dict(n_clusters=len(x), n_samples=n_samples, params=list(preprocess.THETA_NAMES))
    for q in levels:
        lo, hi = np.quantile(samples, [(1 - q) / 2, (1 + q) / 2], axis=1)
        inside = (theta >= lo) & (theta <= hi)
        out[f"coverage_{round(100 * q)}"] = inside.mean(axis=0).tolist()
        out[f"coverage_{round(100 * q)}_stderr"] = math.sqrt(q * (1 - q) / len(x))
    logp = model.log_prob(theta, x, age_bins=False)          # the flow's own density, as in training
    out["test_nll"] = float(-np.mean(logp))
    transform = preprocess.target_transform(getattr(model, "config", {}))
    out["test_nll_u"] = float(-np.mean(logp - preprocess.log_det_theta_to_u(theta, x, **transform)))
    out["test_nll_age_bins"] = float(-np.mean(model.log_prob(theta, x)))   # q_bin (cinn docstring)
    return out


def format_metrics(m):
    lines = [f"test NLL (physical theta) {m['test_nll']:.4f} nats;  in u coordinates {m['test_nll_u']:.4f};  "
             f"flow averaged over the age bins {m.get('test_nll_age_bins', float('nan')):.4f}"]
    for key in [k for k in m if k.startswith("coverage_") and not k.endswith("stderr")]:
        q = int(key.split("_")[1])
        vals = "  ".join(f"{name} {v:.3f}" for name, v in zip(m["params"], m[key]))
        lines.append(f"coverage of central {q}% intervals: {vals}  (+-{m[key + '_stderr']:.3f} stat.)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Configuration and the training entry point

def resolve_config(profile="quick", config_file=None, **overrides):
    """Profile defaults, then a JSON file {"model": {...}, "train": {...}}, then explicit overrides."""
    cfg = copy.deepcopy(PROFILES[profile])
    if config_file:
        with open(config_file) as f:
            user = json.load(f)
        for part in ("model", "train"):
            cfg[part].update(user.get(part, {}))
    for k, v in overrides.items():
        if v is not None:
            cfg["train" if k in TRAIN_KEYS else "model"][k] = v
    return cfg


def pick_device(name=None):
    return torch.device(name) if name else cinn.default_device()


def train(data_dir, out_dir, cfg, seed=0, resume=False, device=None, max_minutes=None, stop_after=None,
          n_eval=2000, workers=1):
    """Train from preprocess.py's files into out_dir; then report test NLL and coverage if test.npz exists.
    workers: processes for the one-off target transform (targets_to_u)."""
    device = pick_device(device)
    last = os.path.join(out_dir, "last.pt")
    if os.path.exists(last) and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, seed=seed, data=os.path.abspath(data_dir)), f, indent=1)
    tr = load_split(data_dir, "train", online=cfg["train"]["online"])
    va = load_split(data_dir, "val")
    x_mean, x_std = (tr["x_mean"], tr["x_std"]) if "x_mean" in tr else preprocess.fit_standardization(tr["x"])
    model = cinn.CINN(cfg["model"], x_mean=x_mean, x_std=x_std, seed=seed).to(device)
    transform = preprocess.target_transform(model.config)
    t0 = time.time()
    u, x = tensors(tr, device, transform=transform, workers=workers)
    train_data = dict(u=u, x=x, obs=tr)
    val_u, val_x = tensors(va, device, transform=transform, workers=workers)
    log(f"target transform of {len(u) + len(val_u)} clusters: {time.time() - t0:.1f} s ({workers} processes)")
    n_par = sum(p.numel() for p in model.parameters())
    log(f"training on {device}: {len(u)} train / {len(val_u)} val clusters, {n_par} parameters, "
        f"{torch.get_num_threads()} threads, online={cfg['train']['online']}")
    t0 = time.time()
    result = fit(model, train_data, dict(u=val_u, x=val_x), cfg["train"], seed, out_dir=out_dir,
                 stop_after=stop_after, max_minutes=max_minutes)
    result["train_seconds"] = time.time() - t0
    if result["stopped"] != "stop_after" and n_eval and os.path.exists(os.path.join(data_dir, "test.npz")):
        metrics = coverage(cinn.load(out_dir, device=device), load_split(data_dir, "test"), n=n_eval, seed=seed)
        metrics.update(best_val_nll=result["best_val"], best_epoch=result["best_epoch"],
                       epochs_run=result["epochs_run"], train_seconds=result["train_seconds"],
                       samples_per_s=float(np.median(result["history"]["samples_per_s"])))
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        log(format_metrics(metrics))
        result["metrics"] = metrics
    return result


# ----------------------------------------------------------------------------------------------------------
# Hyperband (Li et al. 2018, Algorithm 1)

def hyperband_schedule(R, eta=3):
    """Brackets of successive halving: list (s = s_max..0) of rungs [(n_i configurations, r_i epochs), ...].

    s_max = floor(log_eta R); bracket s starts n = ceil((s_max + 1) / (s + 1) * eta^s) configurations with
    r = R eta^-s epochs each; rung i keeps floor(n eta^-i) configurations and trains them for r eta^i epochs.
    """
    s_max = 0
    while eta ** (s_max + 1) <= R:          # integer floor(log_eta R), free of rounding error
        s_max += 1
    brackets = []
    for s in range(s_max, -1, -1):
        n = -(-(s_max + 1) * eta ** s // (s + 1))          # ceil in integers
        brackets.append([(n // eta ** i, max(1, round(R * eta ** (i - s)))) for i in range(s + 1)])
    return brackets


def sample_config(rng, space=SEARCH_SPACE):
    """One random configuration from the declared search space."""
    out = {}
    for name, (kind, vals) in space.items():
        if kind == "choice":
            out[name] = vals[int(rng.integers(len(vals)))]
        elif kind == "uniform":
            out[name] = float(rng.uniform(*vals))
        elif kind == "log_uniform":
            out[name] = float(np.exp(rng.uniform(np.log(vals[0]), np.log(vals[1]))))
        else:
            raise ValueError(f"unknown search-space kind {kind!r} for {name}")
    return out


def split_trial(base_cfg, trial):
    """Merge a sampled trial configuration into a {"model", "train"} config."""
    cfg = copy.deepcopy(base_cfg)
    for k, v in trial.items():
        cfg["model" if k in MODEL_KEYS_IN_SPACE else "train"][k] = v
    return cfg


def hyperband(train_data, val_data, x_mean, x_std, base_cfg, R=27, eta=3, seed=0, device=None, out_dir=None):
    """Hyperband over SEARCH_SPACE with resource = epochs. Each trial trains from scratch for r_i epochs
    (cosine schedule over r_i, no early stopping) and is scored by its best validation NLL.

    Returns (trials: dict of arrays, best {"model", "train"} config). With out_dir, trials.npz is rewritten
    after every trial and best_config.json at the end.
    """
    device = pick_device(device)
    rng = np.random.default_rng(seed)
    cols = dict(bracket=[], rung=[], config_id=[], epochs=[], val_nll=[], seconds=[],
                **{k: [] for k in SEARCH_SPACE})
    configs = []
    for b, rungs in enumerate(hyperband_schedule(R, eta)):
        ids = []
        for _ in range(rungs[0][0]):
            configs.append(sample_config(rng))
            ids.append(len(configs) - 1)
        for i, (n_i, r_i) in enumerate(rungs):
            ids = ids[:n_i]
            scores = []
            for cid in ids:
                cfg = split_trial(base_cfg, configs[cid])
                cfg["train"].update(epochs=r_i, patience=r_i + 1, online=False)
                model = cinn.CINN(cfg["model"], x_mean=x_mean, x_std=x_std, seed=seed + cid).to(device)
                t0 = time.time()
                try:
                    val = fit(model, train_data, val_data, cfg["train"], seed + cid, quiet=True)["best_val"]
                except FloatingPointError:
                    val = math.inf
                for k, v in dict(bracket=b, rung=i, config_id=cid, epochs=r_i, val_nll=val,
                                 seconds=time.time() - t0, **configs[cid]).items():
                    cols[k].append(v)
                scores.append(val)
                log(f"hyperband bracket {b} rung {i}: config {cid} {configs[cid]} {r_i} epochs "
                    f"-> val NLL {val:.4f}")
                if out_dir:
                    from simulate import save_npz
                    save_npz(os.path.join(out_dir, "trials.npz"), **{k: np.asarray(v) for k, v in cols.items()})
            order = np.argsort(np.asarray(scores), kind="stable")
            ids = [ids[j] for j in order]                  # best first; the next rung keeps the top n_{i+1}
    trials = {k: np.asarray(v) for k, v in cols.items()}
    best = int(trials["config_id"][np.argmin(trials["val_nll"])])
    best_cfg = split_trial(base_cfg, configs[best])
    best_cfg["train"]["epochs"] = base_cfg["train"]["epochs"]
    if out_dir:
        with open(os.path.join(out_dir, "best_config.json"), "w") as f:
            json.dump(dict(model=best_cfg["model"], train=best_cfg["train"], config_id=best,
                           val_nll=float(np.min(trials["val_nll"]))), f, indent=1)
    return trials, best_cfg


def run_hyperband(args):
    device = pick_device(args.device)
    cfg = resolve_config(args.profile, args.config)
    tr, va = load_split(args.data, "train"), load_split(args.data, "val")
    x_mean, x_std = (tr["x_mean"], tr["x_std"]) if "x_mean" in tr else preprocess.fit_standardization(tr["x"])
    transform = preprocess.target_transform(cfg["model"])
    u, x = tensors(tr, device, n=args.hb_subset, transform=transform)
    vu, vx = tensors(va, device, n=args.hb_val, transform=transform)
    os.makedirs(args.out, exist_ok=True)
    log(f"hyperband: R={args.hb_max_epochs} eta={args.hb_eta} on {len(u)} train / {len(vu)} val clusters; "
        f"schedule {hyperband_schedule(args.hb_max_epochs, args.hb_eta)}")
    trials, best = hyperband(dict(u=u, x=x), dict(u=vu, x=vx), x_mean, x_std, cfg, R=args.hb_max_epochs,
                             eta=args.hb_eta, seed=args.seed, device=device, out_dir=args.out)
    log(f"hyperband winner (val NLL {np.min(trials['val_nll']):.4f}): {best}; "
        f"train it with: python train.py --data {args.data} --out RUN_DIR --config "
        f"{os.path.join(args.out, 'best_config.json')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="directory with train.npz, val.npz, test.npz")
    p.add_argument("--out", help="run directory (training) or Hyperband output directory")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--config", help="JSON {'model': {...}, 'train': {...}} overriding the profile "
                                    "(e.g. Hyperband's best_config.json)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--online", action="store_true", default=None,
                   help="re-draw age jitter, distance and noise every epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--max-minutes", type=float, help="stop (with checkpoints) before this wall-time budget")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for the one-off target transform (the age profile: ~0.2 ms per cluster)")
    p.add_argument("--n-eval", type=int, default=2000, help="test clusters for coverage/NLL after training")
    p.add_argument("--evaluate", metavar="RUN_DIR", help="only evaluate a trained run on DIR/test.npz")
    p.add_argument("--hyperband", action="store_true", help="run the Hyperband search instead of training")
    p.add_argument("--hb-max-epochs", type=int, default=27, help="Hyperband R (max epochs per trial)")
    p.add_argument("--hb-eta", type=int, default=3)
    p.add_argument("--hb-subset", type=int, help="training clusters used by each trial (default: all)")
    p.add_argument("--hb-val", type=int, default=20_000, help="validation clusters used to score trials")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        model = cinn.load(args.evaluate, device=args.device)
        m = coverage(model, load_split(args.data, "test"), n=args.n_eval, seed=args.seed)
        print(format_metrics(m))
        print(json.dumps(m))
        return
    if not args.out:
        p.error("--out is required for training and --hyperband")
    if args.hyperband:
        run_hyperband(args)
        return
    cfg = resolve_config(args.profile, args.config, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         online=args.online)
    train(args.data, args.out, cfg, seed=args.seed, resume=args.resume, device=args.device,
          max_minutes=args.max_minutes, n_eval=args.n_eval, workers=args.workers)


if __name__ == "__main__":
    main()
