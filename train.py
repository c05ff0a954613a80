"""Train the cINN by maximum likelihood (Walter et al. 2026, Sect. 2.1-2.2, Eq. 4), and tune it with Hyperband.

    loss = mean over the batch of ( ||z||^2 / 2 - log|det dz/du| )  +  eta ||phi||^2           (Eq. 4 + L2)

Adam (the L2 term enters as its weight decay 2 eta: the same gradient), cosine learning-rate decay over the fixed
number of epochs, gradient-norm clipping, validation NLL every epoch, early stopping, an atomic checkpoint every
epoch (RUN/last.pt: weights, optimizer, scheduler, history) and the best model so far (RUN/model.pt, what
cinn.load reads). All randomness of epoch e comes from generators seeded by (seed, e), so a run resumed from
last.pt reproduces the uninterrupted run exactly; a resume with other data or another configuration is refused.

    python train.py --data DIR --out RUN [--method refined|paper] [--profile quick|full] [--epochs N] [--seed S]
    python train.py --data DIR --out RUN --resume                       # continue an interrupted run
    python train.py --data DIR --out RUN --config best_config.json      # e.g. the Hyperband winner
    python train.py --hyperband --data DIR --out HB [--hb-max-epochs R] [--hb-eta 3] [--hb-subset N]
    python train.py --evaluate RUN --data DIR [--n-eval 2000]           # test NLL and interval coverage

DIR holds train.npz, val.npz and test.npz from preprocess.py.
"""
import argparse
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch

import checks
import cinn
import preprocess
from simulate import load_npz, save_npz


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of a run (the network's shape is cinn.FlowConfig)."""
    epochs: int = 22
    batch_size: int = 2048
    lr: float = 2e-3           # Adam, decayed by a cosine to lr_final over the epochs
    lr_final: float = 1e-5
    l2: float = 1e-7           # eta of Eq. 4
    clip_norm: float = 10.0    # gradient-norm clipping
    patience: int = 12         # early stopping after this many epochs without a better validation NLL

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}")
        return cls(**d)


PROFILES = {
    # 2-core CPU: 1,000,000 training clusters, 22 epochs in about 14 minutes on two threads
    "quick": (cinn.FlowConfig(n_blocks=6, width=96, depth=2, clamp=2.0, cond_dim=64, cond_width=256, cond_depth=4),
              TrainConfig(epochs=22, batch_size=2048, lr=2e-3, lr_final=1e-5, l2=1e-7, clip_norm=10.0,
                          patience=12)),
    # a GPU at the paper's scale (4.8e6 training clusters): about 5.5 minutes for 35 epochs on an H200
    "full": (cinn.FlowConfig(n_blocks=10, width=256, depth=3, clamp=2.0, cond_dim=64, cond_width=256,
                             cond_depth=3),
             TrainConfig(epochs=100, batch_size=16384, lr=1.5e-3, lr_final=5e-6, l2=1e-7, clip_norm=10.0,
                         patience=10)),
}
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


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (written to RUN/config.json; a resume must match it)."""
    method: str = "refined"
    flow: cinn.FlowConfig = PROFILES["quick"][0]
    train: TrainConfig = PROFILES["quick"][1]
    refinements: dict = None        # refinements.Settings as a dict (None: its defaults, for "refined")

    def as_dict(self):
        return dict(method=self.method, flow=asdict(self.flow), train=asdict(self.train),
                    refinements=self.refinements)


def log(msg):
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def epoch_seed(seed, epoch, stream):
    """Integer seed for one (run seed, epoch, stream) triple: the only source of randomness during training."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1, np.uint64)[0]
               % (2 ** 63))


# ----------------------------------------------------------------------------------------------------------
# Data

def load_split(data_dir, name):
    """Observation file DIR/name.npz, checked (x and the true theta, at least one cluster) -> dict of arrays."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such data directory (preprocess.py --out writes one)")
    path = os.path.join(data_dir, f"{name}.npz")
    obs = load_npz(path, required=("theta", "x"))
    checks.observations(obs, path, need_theta=True, keys=("x",))
    return obs


RV_OFF = {"floor_scale": 0.0, "support": False}    # the refinements that hold only at R_V = 3.1 (below)


def for_variable_rv(run, data):
    """The run for data simulated with a variable R_V (their rv_prior). The refined method's mass floor and
    support truncation follow from the R_V = 3.1 table and are hard edges: a cluster with another R_V can lie
    below that floor, where the coordinate is undefined. They are switched off (RV_OFF, said on stderr); the
    ridges and the age profile stay at R_V = 3.1, approximations that the flow corrects."""
    if run.method != "refined" or data.get("rv_prior") is None:
        return run
    log(f"variable R_V (prior {np.asarray(data['rv_prior']).tolist()}): refinements {RV_OFF} "
        "(the mass floor and the support hold at R_V = 3.1 only)")
    return replace(run, refinements={**(run.refinements or {}), **RV_OFF})


def fingerprint(*arrays):
    """sha256 of the arrays' bytes: what a resume checks that it trains on the same data."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _forward_u(transform, theta, x):
    return transform.forward(theta, x)[0]


def targets_to_u(theta, x, transform, workers=1, chunk=100_000):
    """transform.forward(theta, x)[0] of every row, in `workers` processes of `chunk` rows each (the transform
    is row by row: the same numbers, up to the order of BLAS sums, 1e-10). The refined transform costs ~0.2 ms
    per cluster (the age profile), 16 CPU-minutes for the paper's 5e6. Spawned processes with one BLAS thread
    each (safe after CUDA has started); a script calling this with workers > 1 needs the
    `if __name__ == "__main__":` guard (train.py has it)."""
    if workers <= 1 or len(theta) <= chunk:
        return _forward_u(transform, theta, x)
    starts = range(0, len(theta), chunk)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})               # inherited by the spawned workers
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = pool.map(partial(_forward_u, transform), [theta[i:i + chunk] for i in starts],
                             [x[i:i + chunk] for i in starts])
            return np.concatenate(list(parts))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def tensors(obs, model, n=None, workers=1):
    """(u, x) float32 tensors on the model's device from an observation dict (first n rows)."""
    theta, x = obs["theta"][:n], obs["x"][:n]
    u = targets_to_u(theta, x, model.transform, workers)
    return (torch.as_tensor(u, dtype=torch.float32, device=model.device),
            torch.as_tensor(x, dtype=torch.float32, device=model.device))


# ----------------------------------------------------------------------------------------------------------
# Training loop

def make_optimizer(model, cfg):
    """Adam with the L2 term of Eq. 4 folded in: d(eta ||phi||^2)/d phi = 2 eta phi is what Adam's
    weight_decay = 2 eta adds to each gradient (the penalty is not clipped with the ML gradient). On a GPU the
    fused kernel updates all weights at once."""
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=2.0 * cfg.l2,
                            fused=model.device.type == "cuda")


@torch.no_grad()
def mean_nll(model, u, x, batch=1 << 15):
    """Mean negative log-likelihood -log p(u | x) (nats per cluster, in u coordinates)."""
    model.eval()
    total = sum(float(-model.log_prob_u(u[i:i + batch], x[i:i + batch]).double().sum())
                for i in range(0, len(u), batch))
    return total / len(u)


def train_one_epoch(model, opt, u, x, cfg, gen):
    """One pass over (u, x) in shuffled mini-batches; returns the mean ML loss (Eq. 4 without L2, which opt
    applies). The loss stays on the device and is read once per epoch (a host sync per step would stall a
    GPU); a non-finite loss raises FloatingPointError then."""
    model.train()
    perm = torch.randperm(len(u), generator=gen).to(u.device)
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    for i in range(0, len(u), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        z, logdet = model.to_latent(u[idx], x[idx])
        ml = (0.5 * (z ** 2).sum(dim=1) - logdet).mean()                      # Eq. 4
        opt.zero_grad(set_to_none=True)
        ml.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        total += ml.detach().double() * len(idx)
    mean = float(total) / len(u)
    if not math.isfinite(mean):
        raise FloatingPointError("non-finite training loss")
    return mean


def write_json(path, obj):
    """obj as indented JSON, atomically (a temporary file, then os.replace)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    """torch.save through a temporary file and os.replace."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _new_state():
    return dict(epoch=0, best_val=math.inf, best_epoch=-1, bad_epochs=0,
                history=dict(epoch=[], train_nll=[], val_nll=[], lr=[], seconds=[], samples_per_s=[]))


def read_last(path, run):
    """The checkpoint RUN/last.pt, checked to belong to `run` (a dict: config, seed, data fingerprint);
    ValueError naming the file and what differs, or what to do with an unreadable file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                       # truncated, empty or not a torch file
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}); the last good model is "
                         f"model.pt beside it; delete {path} to train from the start") from None
    if not isinstance(ckpt, dict) or "run" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint of this version of train.py; delete it to train from the start")
    diff = sorted(k for k in set(run) | set(ckpt["run"]) if run.get(k) != ckpt["run"].get(k))
    if diff:
        raise ValueError(f"{path} was written by another run (different {', '.join(diff)}); resuming would not "
                         f"reproduce it. Use the same --data, configuration and --seed, or another --out")
    return ckpt


def fit(model, train, val, cfg, seed, out_dir=None, stop_after=None, max_minutes=None, quiet=False, run=None):
    """Train `model` in place on train = dict(u, x) tensors, scored on val.

    Args:
        cfg: TrainConfig.
        seed: the run's seed (shuffling).
        out_dir: if given, writes last.pt every epoch, model.pt at every new best validation NLL and
            history.npz, and resumes from out_dir/last.pt when it exists (it must have been written by `run`).
        stop_after: return after this epoch (simulates an interruption).
        max_minutes: stop before this wall-clock budget (only when the user asks: the same seed then gives
            different models on machines of different speed).
        run: dict identifying the run (default: cfg and seed), stored in and checked against last.pt.
    Returns:
        dict(best_val, best_epoch, epochs_run, history, stopped).
    """
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs), eta_min=cfg.lr_final)
    run = run or dict(train=asdict(cfg), seed=int(seed))
    state, last = _new_state(), os.path.join(out_dir, "last.pt") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if last and os.path.exists(last):
        ckpt = read_last(last, run)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        if not quiet:
            log(f"resumed from {last} after epoch {state['epoch']} (best val NLL {state['best_val']:.4f})")
    t_start, stopped = time.time(), "epochs"
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        improved = _epoch(model, opt, sched, train, val, cfg, seed, epoch, state, last)
        if out_dir:
            _save_epoch(out_dir, model, opt, sched, state, run, improved, seed, cfg)
        if not quiet:
            _log_epoch(state, cfg, improved)
        h = state["history"]
        if state["bad_epochs"] >= cfg.patience:
            stopped = "early stopping"
        elif stop_after is not None and epoch >= stop_after:
            stopped = "stop_after"
        elif max_minutes is not None and (time.time() - t_start + np.mean(h["seconds"])) / 60 > max_minutes:
            stopped = "time budget"
        if stopped != "epochs":
            break
    if not quiet:
        log(f"stopped ({stopped}) after epoch {state['epoch']}; best val NLL {state['best_val']:.4f} "
            f"at epoch {state['best_epoch']}")
    return dict(best_val=state["best_val"], best_epoch=state["best_epoch"], epochs_run=state["epoch"],
                history=state["history"], stopped=stopped)


def _epoch(model, opt, sched, train, val, cfg, seed, epoch, state, last):
    """One epoch of fit: train, validate, step the schedule, update state; returns whether val improved."""
    t0 = time.time()
    lr = opt.param_groups[0]["lr"]
    try:
        train_nll = train_one_epoch(model, opt, train["u"], train["x"], cfg,
                                    torch.Generator().manual_seed(epoch_seed(seed, epoch, 0)))
    except FloatingPointError as err:
        raise FloatingPointError(f"{err} in epoch {epoch}; stopping. Last good checkpoint: "
                                 f"{last or '(none written)'} (epoch {state['epoch']}). "
                                 "Try a lower --lr or a smaller clamp.") from None
    train_nll += 0.5 * 3 * math.log(2 * math.pi)                 # the full NLL, comparable to val
    val_nll = mean_nll(model, val["u"], val["x"])
    if not math.isfinite(val_nll):
        raise FloatingPointError(f"non-finite validation NLL in epoch {epoch}; stopping. Last good "
                                 f"checkpoint: {last or '(none written)'} (epoch {state['epoch']}).")
    sched.step()
    seconds = time.time() - t0
    for k, v in zip(state["history"], (epoch, train_nll, val_nll, lr, seconds, len(train["u"]) / seconds)):
        state["history"][k].append(v)
    improved = val_nll < state["best_val"] - 1e-4
    if improved:
        state.update(best_val=val_nll, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    return improved


def _save_epoch(out_dir, model, opt, sched, state, run, improved, seed, cfg):
    """The files of one epoch: model.pt (when improved), last.pt, history.npz, each written atomically."""
    if improved:
        cinn.save(os.path.join(out_dir, "model.pt"), model, extra=dict(
            epoch=state["epoch"], val_nll=state["best_val"], seed=int(seed), train_config=asdict(cfg)))
    atomic_torch_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                           state=state, run=run), os.path.join(out_dir, "last.pt"))
    save_npz(os.path.join(out_dir, "history.npz"), **{k: np.asarray(v) for k, v in state["history"].items()})


def _log_epoch(state, cfg, improved):
    h = state["history"]
    epoch, seconds = state["epoch"], h["seconds"][-1]
    eta_min = np.mean(h["seconds"]) * (cfg.epochs - epoch) / 60
    log(f"epoch {epoch:3d}/{cfg.epochs}  train NLL {h['train_nll'][-1]:8.4f}  val NLL {h['val_nll'][-1]:8.4f}"
        f"{' *' if improved else '  '}  lr {h['lr'][-1]:.2e}  {h['samples_per_s'][-1]:8.0f} samples/s  "
        f"{seconds:6.1f} s  ETA {eta_min:5.1f} min")


# ----------------------------------------------------------------------------------------------------------
# Calibration on held-out clusters

def held_out_metrics(model, obs, n_samples=1000, levels=(0.68, 0.95), n=2000, seed=0):
    """Coverage of central marginal intervals and the test NLL on the first n clusters of obs.

    The central q interval of parameter i is the [(1-q)/2, (1+q)/2] range of n_samples posterior samples;
    coverage = share of true theta_i inside (calibrated: q +- sqrt(q (1-q) / n)). test_nll = -mean
    log q(theta_true | x) in physical coordinates, q the posterior the model samples (for a refined model
    also test_nll_flow, the flow without the age-bin average and the support truncation).

    Returns:
        dict of plain Python numbers (JSON-ready).
    """
    theta, x = np.asarray(obs["theta"])[:n], np.asarray(obs["x"])[:n]
    samples = model.sample(x, n_samples, seed=seed)
    out = dict(n_clusters=len(x), n_samples=n_samples, params=list(preprocess.THETA_NAMES))
    for q in levels:
        lo, hi = np.quantile(samples, [(1 - q) / 2, (1 + q) / 2], axis=1)
        out[f"coverage_{round(100 * q)}"] = ((theta >= lo) & (theta <= hi)).mean(axis=0).tolist()
        out[f"coverage_{round(100 * q)}_stderr"] = math.sqrt(q * (1 - q) / len(x))
    out["test_nll"] = float(-np.mean(model.log_prob(theta, x)))
    if getattr(model, "method", "paper") == "refined":
        out["test_nll_flow"] = float(-np.mean(model.flow_log_prob(theta, x)))
    return out


def format_metrics(m):
    """held_out_metrics as text lines."""
    flow = f";  the flow alone {m['test_nll_flow']:.4f}" if "test_nll_flow" in m else ""
    lines = [f"test NLL (physical theta) {m['test_nll']:.4f} nats{flow}"]
    for key in [k for k in m if k.startswith("coverage_") and not k.endswith("stderr")]:
        vals = "  ".join(f"{name} {v:.3f}" for name, v in zip(m["params"], m[key]))
        lines.append(f"coverage of central {key.split('_')[1]}% intervals: {vals}  (+-{m[key + '_stderr']:.3f} stat.)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Configuration and the training entry point

def resolve_config(profile="quick", method="refined", config=None, **overrides):
    """The run configuration: the profile's, then a JSON config (a file path or the JSON text itself:
    {"flow": {...}, "train": {...}, "refinements": {...}}), then explicit training overrides (None = keep)."""
    flow, tcfg = PROFILES[profile]
    refine = None
    if config:
        text = config if config.lstrip().startswith("{") else open(config).read()
        user = json.loads(text)
        unknown = set(user) - {"flow", "train", "refinements", "config_id", "val_nll"}
        if unknown:
            raise ValueError(f"config: unknown sections {sorted(unknown)}; use flow, train, refinements")
        flow = cinn.FlowConfig.from_dict({**asdict(flow), **user.get("flow", {})})
        tcfg = TrainConfig.from_dict({**asdict(tcfg), **user.get("train", {})})
        refine = user.get("refinements")
    tcfg = replace(tcfg, **{k: v for k, v in overrides.items() if v is not None})
    if refine is not None and method != "refined":
        raise ValueError("config: refinement settings given for --method paper")
    return RunConfig(method, flow, tcfg, refine)


def pick_device(name=None):
    """The torch device named, or cinn.default_device()."""
    return torch.device(name) if name else cinn.default_device()


def new_model(run, x_mean, x_std, seed):
    """The untrained model of a RunConfig."""
    return cinn.build(run.method, run.flow, run.refinements, x_mean, x_std, seed)


def train(data_dir, out_dir, run, seed=0, resume=False, device=None, max_minutes=None, stop_after=None,
          n_eval=2000, workers=1):
    """Train from preprocess.py's files into out_dir; then report test NLL and coverage (metrics.json).

    Args:
        run: RunConfig. seed: weights, shuffling and the evaluation draws. resume: continue from last.pt.
        workers: processes for the one-off target transform (targets_to_u).
    Returns:
        fit's dict, with train_seconds and metrics.
    """
    device = pick_device(device)
    last = os.path.join(out_dir, "last.pt")
    if os.path.exists(last) and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    tr, va = load_split(data_dir, "train"), load_split(data_dir, "val")
    run = for_variable_rv(run, tr)
    checks.output_dir(out_dir)
    ident = dict(run.as_dict(), seed=int(seed), data=fingerprint(tr["theta"], tr["x"], va["theta"], va["x"]))
    if os.path.exists(last):
        read_last(last, ident)                      # refuse a mismatch before touching any file
    x_mean, x_std = preprocess.fit_standardization(tr["x"])
    model = new_model(run, x_mean, x_std, seed).to(device)
    t0 = time.time()
    u, x = tensors(tr, model, workers=workers)
    val_u, val_x = tensors(va, model, workers=workers)
    log(f"target transform ({run.method}) of {len(u) + len(val_u)} clusters: {time.time() - t0:.1f} s "
        f"({workers} processes)")
    write_json(os.path.join(out_dir, "config.json"), dict(ident, data=os.path.abspath(data_dir), data_sha256=ident["data"]))
    log(f"training on {device}: {len(u)} train / {len(val_u)} val clusters, "
        f"{sum(p.numel() for p in model.parameters())} parameters, {torch.get_num_threads()} threads")
    t0 = time.time()
    result = fit(model, dict(u=u, x=x), dict(u=val_u, x=val_x), run.train, seed, out_dir=out_dir,
                 stop_after=stop_after, max_minutes=max_minutes, run=ident)
    result["train_seconds"] = time.time() - t0
    if result["stopped"] != "stop_after" and n_eval and os.path.exists(os.path.join(data_dir, "test.npz")):
        metrics = held_out_metrics(cinn.load(out_dir, device=device), load_split(data_dir, "test"), n=n_eval, seed=seed)
        metrics.update(best_val_nll=result["best_val"], best_epoch=result["best_epoch"],
                       epochs_run=result["epochs_run"], train_seconds=result["train_seconds"],
                       samples_per_s=float(np.median(result["history"]["samples_per_s"])), method=run.method)
        write_json(os.path.join(out_dir, "metrics.json"), metrics)
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


def split_trial(run, trial):
    """A RunConfig with a sampled trial's values (flow keys into flow, the others into train)."""
    flow_keys = set(asdict(run.flow))
    return replace(run, flow=replace(run.flow, **{k: v for k, v in trial.items() if k in flow_keys}),
                   train=replace(run.train, **{k: v for k, v in trial.items() if k not in flow_keys}))


def _trial(run, r_i, train_data, val_data, x_mean, x_std, seed, device):
    """Train one Hyperband configuration from scratch for r_i epochs; its best validation NLL (inf if it
    diverged)."""
    run = replace(run, train=replace(run.train, epochs=r_i, patience=r_i + 1))
    model = new_model(run, x_mean, x_std, seed).to(device)
    try:
        return fit(model, train_data, val_data, run.train, seed, quiet=True)["best_val"]
    except FloatingPointError:
        return math.inf


def hyperband(train_data, val_data, x_mean, x_std, base, R=27, eta=3, seed=0, device=None, out_dir=None):
    """Hyperband over SEARCH_SPACE with resource = epochs; each trial trains from scratch for r_i epochs
    (cosine schedule over r_i, no early stopping) and is scored by its best validation NLL.

    Returns:
        (trials: dict of arrays, the best RunConfig). With out_dir, trials.npz is rewritten after every trial
        and best_config.json written at the end.
    """
    device = pick_device(device)
    rng = np.random.default_rng(seed)
    cols = dict(bracket=[], rung=[], config_id=[], epochs=[], val_nll=[], seconds=[], **{k: [] for k in SEARCH_SPACE})
    configs = []
    for b, rungs in enumerate(hyperband_schedule(R, eta)):
        ids = list(range(len(configs), len(configs) + rungs[0][0]))
        configs += [sample_config(rng) for _ in ids]
        for i, (n_i, r_i) in enumerate(rungs):
            ids, scores = ids[:n_i], []
            for cid in ids:
                t0 = time.time()
                val = _trial(split_trial(base, configs[cid]), r_i, train_data, val_data, x_mean, x_std,
                             seed + cid, device)
                for k, v in dict(bracket=b, rung=i, config_id=cid, epochs=r_i, val_nll=val,
                                 seconds=time.time() - t0, **configs[cid]).items():
                    cols[k].append(v)
                scores.append(val)
                log(f"hyperband bracket {b} rung {i}: config {cid} {configs[cid]} {r_i} epochs -> val NLL {val:.4f}")
                if out_dir:
                    save_npz(os.path.join(out_dir, "trials.npz"), **{k: np.asarray(v) for k, v in cols.items()})
            ids = [ids[j] for j in np.argsort(np.asarray(scores), kind="stable")]   # best first
    trials = {k: np.asarray(v) for k, v in cols.items()}
    best = int(trials["config_id"][np.argmin(trials["val_nll"])])
    best_run = split_trial(base, configs[best])
    if out_dir:
        write_json(os.path.join(out_dir, "best_config.json"), dict(flow=asdict(best_run.flow), train=asdict(best_run.train),
                                                                    config_id=best, val_nll=float(np.min(trials["val_nll"]))))
    return trials, best_run


def run_hyperband(args, run):
    """The --hyperband command: trials on a subset of the training split."""
    device = pick_device(args.device)
    tr, va = load_split(args.data, "train"), load_split(args.data, "val")
    x_mean, x_std = preprocess.fit_standardization(tr["x"])
    probe = new_model(run, x_mean, x_std, args.seed).to(device)        # its transform makes the targets
    u, x = tensors(tr, probe, n=args.hb_subset)
    vu, vx = tensors(va, probe, n=args.hb_val)
    os.makedirs(args.out, exist_ok=True)
    log(f"hyperband: R={args.hb_max_epochs} eta={args.hb_eta} on {len(u)} train / {len(vu)} val clusters; "
        f"schedule {hyperband_schedule(args.hb_max_epochs, args.hb_eta)}")
    trials, best = hyperband(dict(u=u, x=x), dict(u=vu, x=vx), x_mean, x_std, run, R=args.hb_max_epochs,
                             eta=args.hb_eta, seed=args.seed, device=device, out_dir=args.out)
    log(f"hyperband winner (val NLL {np.min(trials['val_nll']):.4f}): {best.as_dict()}; train it with: python "
        f"train.py --data {args.data} --out RUN --config {os.path.join(args.out, 'best_config.json')}")


def parse_args(argv=None):
    """The command line of train.py, with its numbers checked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="directory with train.npz, val.npz, test.npz")
    p.add_argument("--out", help="run directory (training) or Hyperband output directory")
    p.add_argument("--method", choices=cinn.METHODS, default="refined",
                   help="refined: with the refinements of refinements.py; paper: the paper's plain transform")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="quick: a 2-core CPU in ~15 min; full: the paper's scale, for a GPU")
    p.add_argument("--config", help="JSON file or text {'flow': {...}, 'train': {...}, 'refinements': {...}} "
                                    "overriding the profile (e.g. Hyperband's best_config.json)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    p.add_argument("--max-minutes", type=float, help="stop (with checkpoints) before this wall-time budget; "
                                                      "the model then depends on the machine's speed")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=1, help="processes for the one-off target transform")
    p.add_argument("--n-eval", type=int, default=2000, help="test clusters for coverage/NLL after training")
    p.add_argument("--evaluate", metavar="RUN", help="only evaluate a trained run on DIR/test.npz")
    p.add_argument("--hyperband", action="store_true", help="run the Hyperband search instead of training")
    p.add_argument("--hb-max-epochs", type=int, default=27, help="Hyperband R (max epochs per trial)")
    p.add_argument("--hb-eta", type=int, default=3)
    p.add_argument("--hb-subset", type=int, help="training clusters used by each trial (default: all)")
    p.add_argument("--hb-val", type=int, default=20_000, help="validation clusters used to score trials")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "workers", "n_eval", "hb_max_epochs", "hb_eta", "hb_subset", "hb_val"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "n_eval" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'n_eval' else 1}, got {value}")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if not args.evaluate and not args.out:
        p.error("--out is required for training and --hyperband")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        m = held_out_metrics(cinn.load(args.evaluate, device=args.device), load_split(args.data, "test"),
                         n=args.n_eval, seed=args.seed)
        print(format_metrics(m))
        print(json.dumps(m))
        return
    run = resolve_config(args.profile, args.method, args.config, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size)
    if args.hyperband:
        run_hyperband(args, run)
        return
    train(args.data, args.out, run, seed=args.seed, resume=args.resume, device=args.device,
          max_minutes=args.max_minutes, n_eval=args.n_eval, workers=args.workers)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as exc:    # bad input: one line, no traceback
        raise SystemExit(f"train.py: error: {exc}") from None
    except FloatingPointError as exc:                                  # a diverged run: what to do, no traceback
        raise SystemExit(f"train.py: {exc}") from None
