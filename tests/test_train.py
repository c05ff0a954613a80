"""Tests of train.py: Hyperband schedule, training on a toy with a known posterior, resume, NaN guard, CLI."""
import json
import math

import numpy as np
import pytest
import torch

from dataclasses import replace

import cinn
import preprocess as pp
import refinements as rf
import simulate
import train

TINY = dict(n_blocks=2, width=16, depth=1, cond_dim=8, cond_width=16, cond_depth=1)
TINY_FLOW = cinn.FlowConfig(**TINY)
TINY_TRAIN = train.TrainConfig(epochs=4, batch_size=128, lr=1e-3, lr_final=1e-5, l2=1e-6, clip_norm=10.0,
                               patience=100)


def T(a):
    return torch.as_tensor(a, dtype=torch.float32)


def test_hyperband_schedule_matches_li_et_al_table():
    expected = [[(81, 1), (27, 3), (9, 9), (3, 27), (1, 81)],
                [(34, 3), (11, 9), (3, 27), (1, 81)],
                [(15, 9), (5, 27), (1, 81)],
                [(8, 27), (2, 81)],
                [(5, 81)]]
    assert train.hyperband_schedule(81, 3) == expected
    assert train.hyperband_schedule(27, 3)[0] == [(27, 1), (9, 3), (3, 9), (1, 27)]
    assert train.hyperband_schedule(1, 3) == [[(1, 1)]]


def test_sample_config_inside_declared_space_and_deterministic():
    a = [train.sample_config(np.random.default_rng(4)) for _ in range(3)]
    b = [train.sample_config(np.random.default_rng(4)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = train.sample_config(rng)
        for name, (kind, vals) in train.SEARCH_SPACE.items():
            if kind == "choice":
                assert c[name] in vals
            else:
                assert vals[0] <= c[name] <= vals[1]


def gaussian_toy(n, seed, lim=1.0):
    """u | x ~ N(mu(x), sd(x)) independently per dimension; x ~ U[-lim, lim]^11 (5 inputs irrelevant)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-lim, lim, (n, 11))
    mu = np.column_stack([x[:, 0], -0.5 * x[:, 1], 0.3 + 0.8 * x[:, 2]])
    sd = 0.3 + 0.2 * (x[:, 3:6] + 1)
    return x, mu + sd * rng.normal(size=(n, 3)), mu, sd


def test_training_recovers_conditional_gaussian_posterior():
    """Posterior mean and std at 8 test conditions within 5 % of the true posterior std (RMS over
    conditions and parameters; every single one within 10 %); validation NLL within 0.02 nats of the exact."""
    x, u, _, _ = gaussian_toy(100_000, 0)
    vx, vu, vmu, vsd = gaussian_toy(2_000, 1)
    model = cinn.CINN(cinn.FlowConfig(n_blocks=4, width=64, depth=2, cond_dim=16, cond_width=64, cond_depth=1),
                      x_mean=np.zeros(11), x_std=np.full(11, 1 / math.sqrt(3)), seed=0)
    cfg = replace(TINY_TRAIN, epochs=3, batch_size=256, lr=2e-3, l2=0.0)
    res = train.fit(model, dict(u=T(u), x=T(x)), dict(u=T(vu), x=T(vx)), cfg, seed=0, quiet=True)
    exact = np.mean(np.sum(0.5 * ((vu - vmu) / vsd) ** 2 + np.log(vsd) + 0.5 * np.log(2 * np.pi), axis=1))
    assert res["best_val"] - exact < 0.02, (res["best_val"], exact)
    tx, _, mu, sd = gaussian_toy(8, 2, lim=0.8)
    model.eval()
    with torch.no_grad():
        z = torch.randn(8 * 20_000, 3, generator=torch.Generator().manual_seed(0))
        s = model.to_params(z, T(tx).repeat_interleave(20_000, dim=0)).reshape(8, 20_000, 3).numpy()
    mean_err = (s.mean(axis=1) - mu) / sd
    std_err = s.std(axis=1) / sd - 1
    assert np.sqrt(np.mean(mean_err ** 2)) < 0.05 and np.sqrt(np.mean(std_err ** 2)) < 0.05
    assert np.max(np.abs(mean_err)) < 0.1 and np.max(np.abs(std_err)) < 0.1


def small_problem(n=3_000, seed=0):
    x, u, _, _ = gaussian_toy(n, seed)
    return dict(u=T(u), x=T(x))


def new_model():
    return cinn.CINN(TINY_FLOW, x_mean=np.zeros(11), x_std=np.ones(11), seed=3)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data, val = small_problem(), small_problem(500, 1)
    full = new_model()
    res_full = train.fit(full, data, val, TINY_TRAIN, seed=5, out_dir=str(tmp_path / "a"), quiet=True)
    part = new_model()
    train.fit(part, data, val, TINY_TRAIN, seed=5, out_dir=str(tmp_path / "b"), stop_after=2, quiet=True)
    resumed = new_model()                      # a fresh process: new model object, state from last.pt
    res_resumed = train.fit(resumed, data, val, TINY_TRAIN, seed=5, out_dir=str(tmp_path / "b"), quiet=True)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    assert res_full["history"]["val_nll"] == res_resumed["history"]["val_nll"]
    assert res_resumed["epochs_run"] == 4
    with pytest.raises(ValueError, match="would not reproduce"):
        train.fit(new_model(), data, val, replace(TINY_TRAIN, lr=2e-3), seed=5, out_dir=str(tmp_path / "b"))
    a, b = cinn.load(tmp_path / "a"), cinn.load(tmp_path / "b")
    xx = data["x"][:5].numpy()
    np.testing.assert_array_equal(a.sample(xx, 20, seed=1), b.sample(xx, 20, seed=1))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    data, val = small_problem(), small_problem(500, 1)
    model = new_model()
    train.fit(model, data, val, TINY_TRAIN, seed=0, out_dir=str(tmp_path), stop_after=1, quiet=True)
    before = (tmp_path / "last.pt").read_bytes()
    bad = dict(u=data["u"].clone(), x=data["x"])
    bad["u"][7, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 2.*last.pt \\(epoch 1\\)"):
        train.fit(new_model(), bad, val, TINY_TRAIN, seed=0, out_dir=str(tmp_path), quiet=True)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert cinn.load(tmp_path).extra["epoch"] == 1


class ExactToyPosterior:
    """A 'model' whose posterior is the exact Gaussian of gaussian_toy, optionally mis-scaled."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def sample(self, x, n, seed=None):
        _, _, mu, sd = gaussian_toy_from_x(x)
        rng = np.random.default_rng(seed)
        return mu[:, None] + self.scale * sd[:, None] * rng.normal(size=(len(x), n, 3))

    def log_prob(self, theta, x):
        _, _, mu, sd = gaussian_toy_from_x(x)
        s = self.scale * sd
        return np.sum(-0.5 * ((theta - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi), axis=1)


def gaussian_toy_from_x(x):
    mu = np.column_stack([x[:, 0], -0.5 * x[:, 1], 0.3 + 0.8 * x[:, 2]])
    return x, None, mu, 0.3 + 0.2 * (x[:, 3:6] + 1)


def test_coverage_is_nominal_for_exact_posterior_and_low_for_overconfident():
    x, theta, mu, sd = gaussian_toy(2_000, 9)
    obs = dict(theta=theta, x=x)
    good = train.held_out_metrics(ExactToyPosterior(), obs, n_samples=400, seed=1)
    for q in (68, 95):
        assert np.all(np.abs(np.array(good[f"coverage_{q}"]) - q / 100) < 3 * good[f"coverage_{q}_stderr"] + 0.01)
    narrow = train.held_out_metrics(ExactToyPosterior(scale=0.5), obs, n_samples=400, seed=1)
    assert np.all(np.array(narrow["coverage_68"]) < 0.45)     # true: 2 Phi(0.5) - 1 = 0.38
    assert narrow["test_nll"] > good["test_nll"] + 0.3


def write_tiny_data(directory, n=2_500, seed=0):
    sim = simulate.simulate(n, seed=seed)      # physical photometry: the refinements need it
    for name, obs in pp.preprocess(sim, n_val=300, n_test=300, seed=seed).items():
        simulate.save_npz(directory / f"{name}.npz", **obs)


def test_target_transform_in_worker_processes_equals_one_process():
    """--workers splits the one-off target transform (the refined one: age profile, both ridges) over
    processes: the same u, up to the order of BLAS sums (the parent may use several BLAS threads)."""
    obs = pp.preprocess(simulate.simulate(900, seed=3), n_val=100, n_test=100, seed=3)["train"]
    tf = rf.RefinedTransform()
    one = train.targets_to_u(obs["theta"], obs["x"], tf, workers=1)
    two = train.targets_to_u(obs["theta"], obs["x"], tf, workers=2, chunk=300)
    assert one.shape == two.shape == (700, 3) and np.all(np.isfinite(two))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-9)
    # and a chunk that is not a whole number of rows per worker keeps the row order
    np.testing.assert_allclose(train.targets_to_u(obs["theta"], obs["x"], tf, workers=2, chunk=233), one,
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["paper", "refined"])
def test_cli_train_evaluate_and_same_seed_same_model(tmp_path, method):
    """Both methods train from the CLI; the same seed twice gives identical model files (weights and all)."""
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_data(data)
    cfg = json.dumps(dict(flow=TINY, train=dict(batch_size=256)))
    for run in ("a", "b"):
        train.main(["--data", str(data), "--out", str(tmp_path / run), "--config", cfg, "--epochs", "2",
                    "--method", method, "--seed", "1", "--n-eval", "200"])
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["n_clusters"] == 200 and math.isfinite(metrics["test_nll"]) and metrics["method"] == method
    model = cinn.load(tmp_path / "a")
    assert model.method == method and model.config.width == 16 and model.extra["train_config"]["epochs"] == 2
    with pytest.raises(FileExistsError):
        train.main(["--data", str(data), "--out", str(tmp_path / "a"), "--config", cfg])


def test_resume_is_refused_for_other_data_or_configuration_before_any_file_changes(tmp_path):
    """A resume with another data set, seed or configuration is refused, and config.json is not touched."""
    data, other = tmp_path / "data", tmp_path / "other"
    for d, seed in ((data, 0), (other, 1)):
        d.mkdir()
        write_tiny_data(d, n=1500, seed=seed)
    cfg = json.dumps(dict(flow=TINY, train=dict(batch_size=256)))
    run = tmp_path / "run"
    base = ["--out", str(run), "--config", cfg, "--method", "paper", "--n-eval", "0"]
    train.main(["--data", str(data), *base, "--epochs", "2"])
    before = (run / "config.json").read_bytes()
    for change in (["--data", str(other), "--epochs", "2"], ["--data", str(data), "--epochs", "3"],
                   ["--data", str(data), "--epochs", "2", "--seed", "4"]):
        with pytest.raises(ValueError, match="another run"):
            train.main([*change, *base[:2], *base[2:], "--resume"])
        assert (run / "config.json").read_bytes() == before
    (run / "last.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="last.pt: not a readable checkpoint"):
        train.main(["--data", str(data), *base, "--epochs", "2", "--resume"])


def test_hyperband_cli_is_deterministic(tmp_path):
    """Hyperband R = 3, eta = 3: brackets [(3, 1), (1, 3)] and [(2, 3)], 6 trials, the same for a seed."""
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_data(data)
    cfg = json.dumps(dict(flow=TINY, train=dict(batch_size=256)))
    out = {}
    for name in ("hb1", "hb2"):
        train.main(["--data", str(data), "--out", str(tmp_path / name), "--hyperband", "--hb-max-epochs", "3",
                    "--hb-subset", "600", "--hb-val", "200", "--seed", "2", "--config", cfg, "--method", "paper"])
        out[name] = simulate.load_npz(tmp_path / name / "trials.npz", required=("val_nll", "epochs", "lr"))
    assert out["hb1"]["epochs"].tolist() == [1, 1, 1, 3, 3, 3]
    np.testing.assert_array_equal(out["hb1"]["val_nll"], out["hb2"]["val_nll"])
    best = json.loads((tmp_path / "hb1" / "best_config.json").read_text())
    assert best["val_nll"] == pytest.approx(np.min(out["hb1"]["val_nll"]))
    run = train.resolve_config("quick", "paper", str(tmp_path / "hb1" / "best_config.json"))
    assert run.flow.n_blocks == best["flow"]["n_blocks"] and run.train.lr == best["train"]["lr"]


def test_adam_weight_decay_is_the_l2_term_of_eq4():
    """make_optimizer's weight decay 2 eta gives the same Adam steps as adding eta ||phi||^2 to the loss."""
    eta = 1e-2
    u, x = T(np.random.default_rng(0).normal(size=(64, 3))), T(np.random.default_rng(1).normal(size=(64, 11)))
    a = cinn.CINN(TINY_FLOW, seed=3)
    b = cinn.CINN(TINY_FLOW, seed=3)
    opt_a = train.make_optimizer(a, replace(TINY_TRAIN, lr=1e-2, l2=eta))
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(3):
        for model, opt, penalty in ((a, opt_a, 0.0), (b, opt_b, eta)):
            z, logdet = model.to_latent(u, x)
            loss = (0.5 * (z ** 2).sum(dim=1) - logdet).mean()
            loss = loss + penalty * sum((p ** 2).sum() for p in model.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(a.parameters()), next(cinn.CINN(TINY_FLOW, seed=3).parameters()))


def test_killed_at_random_moments_and_resumed_gives_the_uninterrupted_weights(tmp_path):
    """train.py killed (SIGKILL) at random moments, three times, each time resumed with --resume: the final
    model.pt and last.pt hold the same weights as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_data(data, n=3000)
    cfg = json.dumps(dict(flow=TINY, train=dict(batch_size=128)))
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--config", cfg, "--epochs", "6",
           "--method", "paper", "--seed", "3", "--n-eval", "0", "--threads", "1"]
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, capture_output=True)
    rng = np.random.default_rng(0)
    run = str(tmp_path / "cut")
    for k in range(3):
        proc = subprocess.Popen(cmd + ["--out", run] + (["--resume"] if k else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(cmd + ["--out", run, "--resume"], check=True, capture_output=True)
    for name in ("model.pt", "last.pt"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("whole", "cut"))
        sa, sb = (c["state_dict"] if name == "model.pt" else c["model"] for c in (a, b))
        assert all(torch.equal(sa[key], sb[key]) for key in sa), name
