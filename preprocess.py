"""Training data for the cINN, as in Walter et al. (2026, Sect. 2.2): noise, network inputs, bounded targets.

From a noise-free simulation (simulate.py) to the observation files the network trains on (SPEC.md Sect. 3-4):

    theta = (log10 t'/Myr, log10 m0/Msun, E(B-V))        the target
    x     = (log10 f*_b [mJy] x 5, r*_b x 5, d [Mpc])     the condition, band order simulate.BANDS

drawn per simulated cluster in this order (observe):

    1. age label    t' = t + U[-1/2, 1/2] Myr, on the label only; the photometry keeps t     (jitter_age)
    2. distance     d ~ U[1, 30] Mpc; f' = f (10 pc / d)^2
    3. noise        per band r ~ U[0, 0.5], sigma = r f', f* log-normal with mean f' and sd sigma:
                    ln f* ~ N(ln f' - s^2/2, s^2), s^2 = ln(1 + r^2)                        (Eq. 9, add_noise)
    4. inputs       x as above, with the observed relative error r* = sigma / f*                 (make_x)

Real photometry gets the 5 % systematic error in quadrature, r' = sqrt((sigma/f)^2 + 0.05^2) (Eq. 10,
prepare_real). The targets are mapped to the real line, u = Phi^-1((theta - a) / (b - a)) with [a, b] the prior
range (the age's widened to hold every jittered label) and Phi the standard normal CDF (theta_to_u): under the
uniform prior u is close to standard normal, so the network needs no further scaling of its targets.

    python preprocess.py --sim sim.npz --out DIR [--n-val N] [--n-test N] [--seed S]

writes DIR/train.npz, DIR/val.npz and DIR/test.npz, random disjoint splits, each observed once.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import ndtr, ndtri

import checks
from simulate import (AGE_MAX_MYR, BANDS, DISTANCE_RANGE_MPC, EBV_RANGE, LOG_MASS_RANGE, PC10_IN_MPC, R_MAX, RV_LIMITS,
                      SYS_ERR, load_npz, save_npz)

THETA_NAMES = ("log10_age_myr", "log10_mass", "ebv")
DIM_X = 2 * len(BANDS) + 1          # the 11 network inputs
# [a, b] per target; the age's holds every jittered label t' in [0.5, 13750.5] Myr
THETA_BOUNDS = np.array([[np.log10(0.5), np.log10(AGE_MAX_MYR + 0.5)], LOG_MASS_RANGE, EBV_RANGE])
EPS = 1e-7        # (theta - a)/(b - a) is clipped to [EPS, 1 - EPS]: |u| <= 5.2, finite on the bounds
SIM_KEYS = ("age_myr", "log10_mass", "ebv", "flux_10pc_mjy")


# ----------------------------------------------------------------------------------------------------------
# The paper's data steps.

def jitter_age(age_myr, rng):
    """The age label t' = t + U[-1/2, 1/2] Myr of integer model ages t (the photometry keeps t).

    Args:
        age_myr: integer ages in Myr, any shape.
        rng: np.random.Generator.
    Returns:
        float array of the same shape, in Myr.
    """
    age = np.asarray(age_myr, dtype=np.float64)
    return age + rng.uniform(-0.5, 0.5, size=age.shape)


def add_noise(flux_true_mjy, rng, r_max=R_MAX):
    """The log-normal photometric noise of Eq. 9.

    Args:
        flux_true_mjy: noise-free fluxes f' at the cluster's distance (..., 5), finite and > 0.
        rng: np.random.Generator.
        r_max: the relative noise level is drawn from U[0, r_max].
    Returns:
        (flux_obs_mjy f*, rel_err_obs r* = sigma / f*), both of the input's shape.
    """
    f = np.asarray(flux_true_mjy, dtype=np.float64)
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError("add_noise: noise-free fluxes must be finite and > 0")
    r = rng.uniform(0.0, r_max, size=f.shape)
    s2 = np.log1p(r ** 2)
    flux_obs = np.exp(np.log(f) - 0.5 * s2 + np.sqrt(s2) * rng.standard_normal(f.shape))
    return flux_obs, r * f / flux_obs          # r* = sigma / f*, sigma = r f'


def make_x(flux_mjy, rel_err, distance_mpc):
    """The network condition (N, 11): log10 flux [mJy] x 5, relative error x 5, distance [Mpc].

    Args:
        flux_mjy, rel_err: (N, 5); fluxes finite and > 0.
        distance_mpc: (N,) or a scalar.
    Returns:
        x (N, 11) float64.
    """
    flux = np.atleast_2d(np.asarray(flux_mjy, dtype=np.float64))
    rel = np.atleast_2d(np.asarray(rel_err, dtype=np.float64))
    if flux.shape != rel.shape or flux.shape[-1] != len(BANDS):
        raise ValueError(f"make_x: flux {flux.shape} and rel_err {rel.shape} must both be (N, {len(BANDS)})")
    bad = np.flatnonzero(~np.all(np.isfinite(flux) & (flux > 0), axis=1))
    if bad.size:
        raise ValueError(f"make_x: non-positive or non-finite flux in rows {bad[:10].tolist()} "
                         f"({bad.size} rows); drop them before building network inputs")
    d = np.broadcast_to(np.asarray(distance_mpc, dtype=np.float64), flux.shape[:1])
    return np.column_stack([np.log10(flux), rel, d])


def observe(sim, rng):
    """One noisy observation of each simulated cluster: steps 1-4 of the module docstring.

    Args:
        sim: dict with age_myr (N,), log10_mass (N,), ebv (N,), flux_10pc_mjy (N, 5) (noise-free, at 10 pc,
            mass included), as simulate.simulate returns.
        rng: np.random.Generator; the draw order is fixed (jitter, distance, noise), so the result is a
            function of its state.
    Returns:
        the observation dict of SPEC.md Sect. 4: theta, x, flux_mjy, rel_err, distance_mpc, age_myr, bands.
    """
    missing = [k for k in SIM_KEYS if k not in sim]
    if missing:
        raise ValueError(f"observe: the simulation lacks {missing}")
    age = np.asarray(sim["age_myr"])
    t_label = jitter_age(age, rng)
    distance = rng.uniform(*DISTANCE_RANGE_MPC, size=len(age))
    flux_true = np.asarray(sim["flux_10pc_mjy"], dtype=np.float64) * (PC10_IN_MPC / distance[:, None]) ** 2
    flux, rel_err = add_noise(flux_true, rng)
    theta = np.column_stack([np.log10(t_label), sim["log10_mass"], sim["ebv"]])
    return dict(theta=theta, x=make_x(flux, rel_err, distance), flux_mjy=flux, rel_err=rel_err,
                distance_mpc=distance, age_myr=age.astype(np.int64), bands=np.array(BANDS))


def prepare_real(flux_mjy, flux_err_mjy, distance_mpc, sys_err=SYS_ERR, ids=None):
    """The observation dict of measured photometry: r' = sqrt((err/flux)^2 + sys_err^2) (Eq. 10), theta NaN.

    Args:
        flux_mjy, flux_err_mjy: (N, 5) in mJy; every row needs finite positive fluxes and finite
            non-negative errors (catalogs.py selects and counts such rows before calling this).
        distance_mpc: (N,) or a scalar.
        sys_err: the systematic relative error.
        ids: optional (N,) cluster ids, stored as `id`.
    Returns:
        dict theta (N, 3) NaN, x, flux_mjy, rel_err, distance_mpc, bands [, id].
    """
    flux = np.atleast_2d(np.asarray(flux_mjy, dtype=np.float64))
    err = np.atleast_2d(np.asarray(flux_err_mjy, dtype=np.float64))
    if flux.shape != err.shape or flux.shape[-1] != len(BANDS):
        raise ValueError(f"prepare_real: flux {flux.shape} and errors {err.shape} must both be (N, {len(BANDS)})")
    bad = np.flatnonzero(~np.all(np.isfinite(err) & (err >= 0), axis=1))
    if bad.size:
        raise ValueError(f"prepare_real: invalid (negative or non-finite) flux errors in rows "
                         f"{bad[:10].tolist()} ({bad.size} rows)")
    n = len(flux)
    distance = np.broadcast_to(np.asarray(distance_mpc, dtype=np.float64), (n,)).copy()
    rel_err = np.sqrt((err / flux) ** 2 + sys_err ** 2)
    obs = dict(theta=np.full((n, 3), np.nan), x=make_x(flux, rel_err, distance), flux_mjy=flux,
               rel_err=rel_err, distance_mpc=distance, bands=np.array(BANDS))
    if ids is not None:
        obs["id"] = np.asarray(ids)
    return obs


# ----------------------------------------------------------------------------------------------------------
# The bounded transform of the targets.

def _check_theta(theta):
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape[-1] != 3:
        raise ValueError(f"theta must have last dimension 3 {THETA_NAMES}, got shape {theta.shape}")
    return theta


def coordinate_u(v, j):
    """The bounded transform of target j alone: u = Phi^-1((v - a_j) / (b_j - a_j)), [a_j, b_j] = THETA_BOUNDS[j],
    finite on the bounds (clipped to [EPS, 1 - EPS]).

    Args:
        v: values of target j (0 log age, 1 log mass, 2 E(B-V)), any shape.
    Returns:
        (u, log du/dv), log du/dv = -log((b_j - a_j) phi(u)) with phi the standard normal density.
    """
    a, b = THETA_BOUNDS[j]
    u = ndtri(np.clip((np.asarray(v, dtype=np.float64) - a) / (b - a), EPS, 1.0 - EPS))
    return u, -np.log(b - a) + 0.5 * u * u + 0.5 * np.log(2.0 * np.pi)


def coordinate_theta(u, j):
    """The inverse of coordinate_u: a_j + (b_j - a_j) Phi(u)."""
    a, b = THETA_BOUNDS[j]
    return a + (b - a) * ndtr(u)


def theta_to_u(theta):
    """u (..., 3) of theta (..., 3): coordinate_u of each target."""
    theta = _check_theta(theta)
    return np.stack([coordinate_u(theta[..., j], j)[0] for j in range(3)], axis=-1)


def u_to_theta(u):
    """The inverse of theta_to_u: theta = a + (b - a) Phi(u) (..., 3)."""
    u = _check_theta(u)
    return np.stack([coordinate_theta(u[..., j], j) for j in range(3)], axis=-1)


def log_du_dtheta(theta):
    """The diagonal of the transform's Jacobian, log du_i/dtheta_i (..., 3) (the Jacobian is diagonal)."""
    theta = _check_theta(theta)
    return np.stack([coordinate_u(theta[..., j], j)[1] for j in range(3)], axis=-1)


def inside_prior(theta):
    """True where theta (..., 3) lies inside THETA_BOUNDS."""
    return np.all((theta >= THETA_BOUNDS[:, 0]) & (theta <= THETA_BOUNDS[:, 1]), axis=-1)


class BoundedTransform:
    """The paper's target transform behind the interface every target transform has (cinn.py): forward(theta,
    x) -> (u, log du/dtheta per coordinate), inverse(u, x) -> theta, age_u(log_age, x) (the age coordinate
    alone), and how the model draws and evaluates its posterior through it, sample_batch and log_prob. It
    ignores x; the refined transform of refinements.py uses it."""

    method = "paper"

    def forward(self, theta, x=None):
        theta = _check_theta(theta)
        parts = [coordinate_u(theta[..., j], j) for j in range(3)]
        return np.stack([p[0] for p in parts], axis=-1), np.stack([p[1] for p in parts], axis=-1)

    def inverse(self, u, x=None):
        return u_to_theta(u)

    def age_u(self, log_age, x=None):
        return coordinate_u(log_age, 0)

    def sample_batch(self, flow, x, c, n, gen, rng):
        """n posterior draws per cluster of a batch (x its rows, c their condition features): the flow's draws
        mapped back, and the number of draws left outside the support (none here)."""
        return self.inverse(flow.draw_u(c, n, gen)), 0

    def log_prob(self, flow, theta, x, batch_rows):
        """log q(theta | x) of rows theta (M, 3), x (M, 11): the flow's density with the Jacobian."""
        return flow.flow_log_prob(theta, x, batch_rows)


# ----------------------------------------------------------------------------------------------------------
# Splits and the command line.

def fit_standardization(x):
    """Mean and standard deviation (a zero sd set to 1) of the network inputs, from the training split only."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def split_indices(n, n_val, n_test, rng):
    """Random disjoint (train, val, test) index arrays of n clusters; val and test need >= 1 each."""
    if n_val < 1 or n_test < 1:
        raise ValueError(f"n_val and n_test must be >= 1, got {n_val} and {n_test}")
    if n_val + n_test >= n:
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training data out of {n} clusters")
    perm = rng.permutation(n)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def preprocess(sim, n_val, n_test, seed):
    """Split a simulation and observe each split once.

    Args:
        sim: the simulation dict (simulate.simulate or its file).
        n_val, n_test: clusters held out for validation and test.
        seed: the split and each split's noise come from their own generators, spawned from it.
    Returns:
        dict "train" / "val" / "test" -> observation dict (observe) with `seed`.
    """
    seeds = np.random.SeedSequence(seed).spawn(4)
    idx = split_indices(len(sim["age_myr"]), n_val, n_test, np.random.default_rng(seeds[0]))
    out = {}
    for name, ii, ss in zip(("train", "val", "test"), idx, seeds[1:]):
        obs = observe({k: np.asarray(sim[k])[ii] for k in SIM_KEYS}, np.random.default_rng(ss))
        if "rv" in sim:                                    # a variable R_V: each cluster's, and its prior
            obs.update(rv=np.asarray(sim["rv"])[ii], rv_prior=np.asarray(sim["rv_prior"], dtype=float))
        out[name] = dict(obs, seed=np.int64(seed))
    return out


def check_simulation(sim, path):
    """A simulation file's keys are arrays that agree on the number of clusters; every cluster has fluxes > 0,
    an age on the grid (1 ... AGE_MAX_MYR Myr, whole Myr), a mass and E(B-V) inside the prior box."""
    shapes = {k: np.shape(sim[k]) for k in SIM_KEYS}
    if any(len(v) == 0 for v in shapes.values()) or len({v[0] for v in shapes.values()}) > 1 \
            or shapes["flux_10pc_mjy"][1:] != (len(BANDS),):
        raise checks.InputError(f"{path}: keys disagree on the number of clusters or bands: {shapes}")
    age, mass, ebv = (np.asarray(sim[k], float) for k in ("age_myr", "log10_mass", "ebv"))
    _check_rv(sim, path, shapes["age_myr"])
    with np.errstate(invalid="ignore"):
        bad = ~np.all(np.isfinite(sim["flux_10pc_mjy"]) & (sim["flux_10pc_mjy"] > 0), axis=1)
        bad |= ~((age >= 1) & (age <= AGE_MAX_MYR) & (age == np.round(age)))
        bad |= ~((mass >= LOG_MASS_RANGE[0]) & (mass <= LOG_MASS_RANGE[1]))
        bad |= ~((ebv >= EBV_RANGE[0]) & (ebv <= EBV_RANGE[1]))
    if bad.any():
        raise checks.InputError(f"{path}: invalid clusters (fluxes <= 0 or not finite, ages not whole Myr in 1-"
                                f"{AGE_MAX_MYR}, mass or E(B-V) outside the prior) in rows "
                                f"{np.flatnonzero(bad)[:5].tolist()} ({bad.sum()} in all)")


def _check_rv(sim, path, shape):
    """A variable-R_V simulation has both rv (one per cluster, inside its prior) and rv_prior (inside RV_LIMITS)."""
    if ("rv" in sim) != ("rv_prior" in sim):
        raise checks.InputError(f"{path}: has one of rv and rv_prior without the other")
    if "rv" not in sim:
        return
    prior = np.asarray(sim["rv_prior"], dtype=float)
    if prior.shape != (2,) or not RV_LIMITS[0] <= prior[0] < prior[1] <= RV_LIMITS[1] or np.shape(sim["rv"]) != shape:
        raise checks.InputError(f"{path}: rv {np.shape(sim['rv'])} or rv_prior {prior} is not one R_V per cluster "
                                f"from a prior inside {RV_LIMITS}")
    with np.errstate(invalid="ignore"):
        bad = ~((sim["rv"] >= prior[0]) & (sim["rv"] <= prior[1]))
    if bad.any():
        raise checks.InputError(f"{path}: R_V outside its prior {prior} in rows {np.flatnonzero(bad)[:5].tolist()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sim", required=True, help="simulation .npz from simulate.py")
    p.add_argument("--out", required=True, help="output directory for train/val/test .npz")
    p.add_argument("--n-val", type=int, default=20_000, help="validation clusters")
    p.add_argument("--n-test", type=int, default=20_000, help="test clusters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error("--seed must be >= 0")
    t0 = time.time()
    try:
        sim = load_npz(args.sim, required=SIM_KEYS)
        check_simulation(sim, args.sim)
        checks.output_dir(args.out)
        splits = preprocess(sim, args.n_val, args.n_test, args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"preprocess.py: error: {err}") from None
    for name, obs in splits.items():
        path = Path(args.out) / f"{name}.npz"
        save_npz(path, **obs)
        print(f"wrote {path}: {len(obs['x'])} clusters", file=sys.stderr)
    print(f"preprocess done in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
