"""Throughput of the cINN: training samples/s, posterior samples/s and log_prob evaluations/s.

    python benchmarks/bench_train.py [--profile quick] [--threads 1 2] [--steps 60] [--device cpu]

Training uses random inputs with the shapes of real training data (the cost does not depend on the values);
sampling and log_prob use 100 freshly simulated clusters (the refinements need physical inputs). Prints
figures; asserts nothing. Also prints the projected wall time of the profile's training run (epochs x
training-set size / throughput) for a given number of training clusters.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cinn        # noqa: E402
import preprocess  # noqa: E402
import simulate    # noqa: E402
import train       # noqa: E402


def train_throughput(cfg, steps, device):
    """Training samples/s of full optimisation steps (forward, Eq. 4 loss, backward, clip, Adam with L2)."""
    rng = np.random.default_rng(0)
    bs = cfg.train.batch_size
    n = bs * steps
    u = torch.as_tensor(rng.normal(size=(n, 3)), dtype=torch.float32, device=device)
    x = torch.as_tensor(rng.normal(size=(n, 11)), dtype=torch.float32, device=device)
    model = train.new_model(cfg, None, None, 0).to(device)
    opt = train.make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(0)
    train.train_one_epoch(model, opt, u[:bs * 5], x[:bs * 5], cfg.train, gen)     # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train.train_one_epoch(model, opt, u, x, cfg.train, gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="quick", choices=sorted(train.PROFILES))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60, help="optimisation steps timed per setting")
    p.add_argument("--n-train", type=int, default=360_000, help="training-set size for the projection")
    p.add_argument("--method", default="refined", choices=cinn.METHODS)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = train.pick_device(args.device)
    cfg = train.resolve_config(args.profile, args.method)
    print(f"profile {args.profile}, method {args.method}: {cfg.flow}, batch {cfg.train.batch_size}, device {device}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for threads in args.threads:
        torch.set_num_threads(threads)
        sps, model = train_throughput(cfg, args.steps, device)
        minutes = cfg.train.epochs * args.n_train / sps / 60
        print(f"threads {threads}: training {sps:9.0f} samples/s -> {cfg.train.epochs} epochs of "
              f"{args.n_train} clusters in {minutes:.1f} min (plus validation)")
        obs = preprocess.observe(simulate.simulate(100, seed=1), np.random.default_rng(1))   # physical x: the
        x = obs["x"]                                                                        # mass floor needs it
        t0 = time.perf_counter()
        model.sample(x, 1000, seed=0)
        t1 = time.perf_counter()
        theta_rep, x_rep = np.repeat(obs["theta"], 1000, axis=0), np.repeat(x, 1000, axis=0)
        cinn.CINN.log_prob(model, theta_rep, x_rep)                     # the flow and its transform alone
        t2 = time.perf_counter()
        model.log_prob(theta_rep[:10_000], x_rep[:10_000])              # the model's own: refined, 16 age nodes
        t3 = time.perf_counter()
        print(f"threads {threads}: sample {1e5 / (t1 - t0):9.0f} samples/s;  log_prob {1e5 / (t2 - t1):9.0f} "
              f"points/s (flow), {1e4 / (t3 - t2):9.0f} points/s (the model's log_prob)")


if __name__ == "__main__":
    main()
