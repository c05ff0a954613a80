"""Diagnostics of cINN posteriors of star clusters (Walter et al. 2026, Sect. 3), and the catalogue run.

The library (numbers in, numbers out; SPEC.md Sect. 5):
  * simulation-based calibration (Talts et al. 2018): six statistics T1..T6, ranks, the ECDF - uniform CDF and
    its simultaneous and pointwise bands (Fig. 3)                             sbc_ranks, sbc_check
  * posterior predictive checks: samples re-simulated through the forward model and the log-normal noise
    model at the observed sigma (Fig. 4)                                       ppc
  * modes by mean-shift (Fukunaga & Hostetler 1975); MAP = the densest mode; 16/50/84 % quantiles
                                                                               mean_shift, summarize
  * re-simulation chi^2 (Eq. 11), Table 1 inliers, MAP / closest mode vs the MLE (Figs. 6, 8, B.3)
                                                                               resim_chi2, compare_with_mle
  * against the exact grid posterior: mean log p_exact - log q_cINN at the true theta, an estimate of the
    expected KL divergence, split by where the truth lies; width ratios; MAPs  exact_reference, exact_summary
  * a catalogue through a trained model: summaries with the current stellar mass, chi^2, the grid MLE and
    Table 1 against it and against the catalogue's own estimates             catalog_results
The command line below it prints, plots (plots.py) and writes; `python evaluate.py --help` lists the
subcommands sbc, ppc, modes, compare, exact and catalog (speed: benchmarks/bench_evaluate.py).

Conventions: theta = (log10 age/Myr, log10 m0/Msun, E(B-V)), samples (N, S, 3); modes[n, k, p] is parameter p
of the k-th densest mode of cluster n (NaN-padded to 3 modes); quantiles[n, q, p] the q-th of the 16/50/84 %
marginal quantiles of parameter p.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table, TableMergeError, vstack
from concurrent.futures import ProcessPoolExecutor
from scipy.stats import binom

import catalogs
import checks
import cinn
import grid_posterior
import plots
import preprocess
import refinements
from simulate import BANDS, EBV_RANGE, Progress, age_bin, load_npz, model_flux, save_npz

STAT_NAMES = ("T1 log t", "T2 log m", "T3 E(B-V)", "T4 log t * log m", "T5 log m * E(B-V)",
              "T6 log t * E(B-V)")
QUANTILE_LEVELS = (0.16, 0.50, 0.84)


# ----------------------------------------------------------------------------------------------------------
# SBC (Talts et al. 2018), Fig. 3

def sbc_statistics(theta):
    """Six SBC test statistics of theta (..., 3) -> (..., 6).

    T1 = log t, T2 = log m, T3 = E(B-V), T4 = log t * log m, T5 = log m * E(B-V), T6 = log t * E(B-V)
    (t in Myr, m in Msun, logs base 10). The products probe the joint (correlation) structure.
    """
    theta = np.asarray(theta, dtype=float)
    if theta.shape[-1] != 3:
        raise ValueError(f"theta must have last axis 3 (log age, log mass, E(B-V)); got shape {theta.shape}")
    lt, lm, e = theta[..., 0], theta[..., 1], theta[..., 2]
    return np.stack([lt, lm, e, lt * lm, lm * e, lt * e], axis=-1)


def sbc_ranks(samples, truth, rng=None):
    """SBC ranks (N, 6) in 0..L: number of the L posterior samples whose statistic is below the truth's.

    samples (N, L, 3), truth (N, 3). Exact ties (probability zero for continuous samplers) are broken
    uniformly at random with `rng` (np.random.Generator; default seed 0) so that ranks stay uniform.
    """
    samples = np.asarray(samples, dtype=float)
    truth = np.asarray(truth, dtype=float)
    if samples.ndim != 3 or truth.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(f"need samples (N, L, 3) and truth (N, 3); got {samples.shape} and {truth.shape}")
    ts = sbc_statistics(samples)                     # (N, L, 6)
    tt = sbc_statistics(truth)[:, None, :]           # (N, 1, 6)
    below = (ts < tt).sum(axis=1)
    ties = (ts == tt).sum(axis=1)
    if ties.any():
        rng = np.random.default_rng(0) if rng is None else rng
        below = below + np.floor(rng.random(ties.shape) * (ties + 1)).astype(below.dtype)
    return below.astype(np.int64)


def ecdf_difference(ranks, L):
    """ECDF of the fractional ranks minus the uniform CDF.

    ranks (N,) or (N, K) in 0..L. Evaluated at z_i = i / (L + 1), i = 1..L, where the ECDF is the share of
    ranks < i and the uniform CDF is z_i. Returns z (L,), diff (L,) or (K, L).
    """
    ranks = np.asarray(ranks)
    if ranks.size and (ranks.min() < 0 or ranks.max() > L):
        raise ValueError(f"ranks must lie in 0..{L}; got {ranks.min()}..{ranks.max()}")
    r = ranks.reshape(ranks.shape[0], -1)                                  # (N, K)
    counts = np.stack([np.bincount(r[:, k], minlength=L + 1) for k in range(r.shape[1])])  # (K, L+1)
    ecdf = np.cumsum(counts, axis=1)[:, :L] / r.shape[0]
    z = np.arange(1, L + 1) / (L + 1)
    diff = ecdf - z
    return z, (diff[0] if ranks.ndim == 1 else diff)


def ecdf_band(n_pairs, L, alpha=0.02, simultaneous=True, n_sim=5000, seed=0):
    """Band for ECDF - uniform CDF of n_pairs uniform ranks in 0..L; returns z (L,), lo (L,), hi (L,).

    Pointwise (simultaneous=False): the alpha/2 and 1 - alpha/2 quantiles of Binomial(n_pairs, z_i) / n_pairs
    minus z_i; with alpha = 0.02 this is the paper's 0.01-0.99 binomial band.
    Simultaneous (default): the pointwise binomial band widened to level gamma such that the whole uniform
    ECDF stays inside with probability 1 - alpha (Sailynoja, Buerkner & Vehtari 2022), gamma found by
    simulating n_sim uniform rank sets (fixed seed, so the band depends only on n_pairs, L, alpha).
    An ECDF outside this band rejects uniformity at level alpha for that statistic; with 6 statistics,
    expect about 6 * alpha = 12 % of calibrated runs to show one statistic outside by chance.
    """
    z = np.arange(1, L + 1) / (L + 1)
    gamma = alpha
    if simultaneous:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n_pairs, np.full(L + 1, 1.0 / (L + 1)), size=n_sim)
        k = np.cumsum(counts, axis=1)[:, :L]                                # (n_sim, L) ranks < i
        p_lo = binom.cdf(k, n_pairs, z)                                     # P(K <= k)
        p_hi = binom.sf(k - 1, n_pairs, z)                                  # P(K >= k)
        pmin = 2.0 * np.minimum(p_lo, p_hi).min(axis=1)                     # most extreme point per ECDF
        gamma = float(np.quantile(pmin, alpha))
    lo = binom.ppf(gamma / 2, n_pairs, z) / n_pairs - z
    hi = binom.ppf(1 - gamma / 2, n_pairs, z) / n_pairs - z
    return z, lo, hi


def rank_histogram_band(n_pairs, L, n_bins):
    """Bin edges of a rank histogram and the mean and +-1 sigma count per bin for uniform ranks.

    Bins hold whole rank values (edges at integers in 0..L+1, as equal as possible); a bin holding w of the
    L + 1 rank values has count ~ Binomial(n_pairs, w / (L + 1)). Returns edges (n_bins+1,), mean, sigma.
    """
    edges = np.unique(np.round(np.linspace(0, L + 1, n_bins + 1)).astype(int))
    p = np.diff(edges) / (L + 1)
    return edges - 0.5, n_pairs * p, np.sqrt(n_pairs * p * (1 - p))


def sbc_summary(ranks, L, alpha=0.02, bands=None):
    """Per statistic: max |ECDF - uniform|, inside the simultaneous band, inside the pointwise band.

    Args:
        ranks: (N, 6) SBC ranks in 0..L.
        bands: (simultaneous (lo, hi), pointwise (lo, hi)) if already computed (ecdf_band).
    Returns:
        dict n_pairs, L, alpha, statistics (a dict per statistic), all_inside_simultaneous.
    """
    ranks = np.asarray(ranks)
    n = ranks.shape[0]
    _, diff = ecdf_difference(ranks, L)
    (slo, shi), (plo, phi) = bands or (ecdf_band(n, L, alpha)[1:], ecdf_band(n, L, alpha, simultaneous=False)[1:])
    out = {"n_pairs": int(n), "L": int(L), "alpha": alpha, "statistics": []}
    for k in range(diff.shape[0]):
        out["statistics"].append({
            "name": STAT_NAMES[k] if diff.shape[0] == 6 else f"stat{k}",
            "max_abs_ecdf_diff": float(np.abs(diff[k]).max()),
            "inside_simultaneous_band": bool(np.all((diff[k] >= slo - 1e-12) & (diff[k] <= shi + 1e-12))),
            "inside_pointwise_band": bool(np.all((diff[k] >= plo - 1e-12) & (diff[k] <= phi + 1e-12))),
            "simultaneous_band_halfwidth_max": float(np.maximum(-slo, shi).max()),
        })
    out["all_inside_simultaneous"] = all(s["inside_simultaneous_band"] for s in out["statistics"])
    return out


def sbc_check(samples, truth, alpha=0.02, rng=None):
    """SBC of posterior samples (N, L, 3) against the true theta (N, 3): everything Fig. 3 shows, as numbers.

    Returns:
        dict ranks (N, 6), L, alpha, names, z (L,), ecdf_diff (6, L), band_simultaneous and band_pointwise
        (2, L) each, hist_edges / hist_mean / hist_sigma (the rank histogram's uniform band), summary
        (sbc_summary).
    """
    L = np.asarray(samples).shape[1]
    ranks = sbc_ranks(samples, truth, rng)
    z, diff = ecdf_difference(ranks, L)
    band_s = np.array(ecdf_band(len(ranks), L, alpha)[1:])
    band_p = np.array(ecdf_band(len(ranks), L, alpha, simultaneous=False)[1:])
    edges, mean, sigma = rank_histogram_band(len(ranks), L, int(max(5, min(L + 1, len(ranks) // 20))))
    return dict(ranks=ranks, L=L, alpha=alpha, names=STAT_NAMES, z=z, ecdf_diff=diff, band_simultaneous=band_s,
                band_pointwise=band_p, hist_edges=edges, hist_mean=mean, hist_sigma=sigma,
                summary=sbc_summary(ranks, L, alpha, (band_s, band_p)))


# ----------------------------------------------------------------------------------------------------------
# Modes: mean-shift (Fukunaga & Hostetler 1975) and quantiles

def silverman_bandwidth(n, d=3):
    """Silverman's rule for a Gaussian kernel in standardised coordinates: (4/(d+2))^(1/(d+4)) n^(-1/(d+4)).

    For n = 1e4, d = 3 this is 0.26 standard deviations.
    """
    return (4.0 / (d + 2)) ** (1.0 / (d + 4)) * n ** (-1.0 / (d + 4))


def mean_shift(samples, bandwidth=None, max_modes=3, kernel="gaussian", max_seeds=40, tol=1e-3,
               max_iter=500, standardize=True, return_density=False, subsample=2000):
    """Modes of a sample cloud (S, d) by mean-shift, ranked by kernel density; first row = MAP.

    Coordinates: each parameter is standardised by its sample mean and standard deviation (standardize=True),
    so one bandwidth fits parameters with different units. Bandwidth rule (bandwidth=None):
    Gaussian kernel exp(-|z|^2 / 2h^2) with h = Silverman's rule (silverman_bandwidth, 0.26 for 1e4 samples
    in 3-d); flat kernel (a ball of radius h, as scikit-learn's MeanShift) with h = sqrt(d + 2) times
    Silverman's rule, which gives the ball the same per-axis variance as the Gaussian.
    Seeds: the samples are binned on a grid of cell size h and the centroids of the max_seeds most populated
    cells start the iteration (all seeds move together, vectorised). Seeds move to the kernel-weighted
    mean of the samples (Aitken-accelerated for the Gaussian kernel, see _shift_seeds) until the step is
    < 10 tol * h on a strided subsample of `subsample` points; seeds that met are merged, and the
    3 * max_modes densest candidates are polished on all samples until the step is < tol * h.
    Converged points closer than h are merged, keeping the denser one (as scikit-learn does).
    Density = kernel density estimate at the mode (flat: share of samples inside the ball), for ranking.
    Accuracy: the mode of a KDE from 1e4 samples scatters by ~0.1-0.15 posterior sd per axis (measured on
    a 3-d Gaussian), the statistical limit of the MAP from samples, not of the iteration.
    Returns modes (k <= max_modes, d) in the input units [, density (k,)].
    """
    x = np.asarray(samples, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"mean_shift needs samples of shape (S, d); got {x.shape}")
    x = x[np.all(np.isfinite(x), axis=1)]
    if len(x) == 0:
        raise ValueError("mean_shift: no finite samples")
    n, d = x.shape
    if standardize:
        centre, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
    else:
        centre, scale = np.zeros(d), np.ones(d)
    zs = (x - centre) / scale
    if bandwidth is None:
        bandwidth = silverman_bandwidth(n, d) * (np.sqrt(d + 2) if kernel == "flat" else 1.0)
    h = float(bandwidth)
    if kernel not in ("gaussian", "flat"):
        raise ValueError(f"kernel must be 'gaussian' or 'flat'; got {kernel!r}")

    seeds = _binned_seeds(zs, h, max_seeds)
    # two phases: converge on a strided subsample (iid samples, so any stride is a fair subsample), merge
    # seeds that met, then polish on all samples; the slow linear convergence of Gaussian mean-shift is
    # thus paid mostly on the small set.
    sub = zs[:: max(1, n // subsample)]
    c = _shift_seeds(seeds, sub, h, kernel, 10 * tol, max_iter)
    c = c[_merge(c, _kernel_weights(c, sub, h, kernel).mean(axis=1), h, 3 * max_modes)]
    c = _shift_seeds(c, zs, h, kernel, tol, max_iter)
    dens = _kernel_weights(c, zs, h, kernel).mean(axis=1)
    keep = _merge(c, dens, h, max_modes)
    modes = c[keep] * scale + centre
    if return_density:
        return modes, dens[keep]
    return modes


def _binned_seeds(zs, h, max_seeds):
    """Centroids of the max_seeds most populated cells of size h of the points zs (S, d): the seeds."""
    cells = np.floor(zs / h).astype(np.int64)
    cells -= cells.min(axis=0)
    key = np.ravel_multi_index(cells.T, cells.max(axis=0) + 1)      # one integer per cell (fast unique)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), zs.shape[1]))
    np.add.at(sums, inverse, zs)
    order = np.argsort(-counts, kind="stable")[:max_seeds]
    return sums[order] / counts[order, None]


def _kernel_weights(c, pts, h, kernel, pts2=None):
    """Kernel weights (len(c), len(pts)) between centres c and points pts (same standardised units);
    pts2 = squared norms of pts, if precomputed."""
    pts2 = np.einsum("ij,ij->i", pts, pts) if pts2 is None else pts2
    d2 = np.einsum("ij,ij->i", c, c)[:, None] + pts2[None, :] - 2.0 * c @ pts.T
    if kernel == "flat":
        return (d2 <= h * h).astype(float)
    return np.exp(-0.5 * np.maximum(d2, 0.0) / (h * h))


def _shift_seeds(c, pts, h, kernel, tol, max_iter):
    """Vectorised mean-shift iteration of all centres c until each step is < tol * h (or max_iter).

    Gaussian mean-shift converges linearly, slowly where a peak is broad compared with h. When two
    successive steps of a centre point the same way (cos > 0.995) and shrink by a ratio rho in (0.5, 0.995),
    the remaining geometric tail step * rho / (1 - rho) (Aitken extrapolation, capped at h) is added at
    once; plain mean-shift steps follow, so the end point is still a fixed point of the mean-shift map.
    """
    c = c.copy()
    pts2 = np.einsum("ij,ij->i", pts, pts)
    active = np.arange(len(c))
    prev = np.zeros_like(c)
    for _ in range(max_iter):
        w = _kernel_weights(c[active], pts, h, kernel, pts2)
        wsum = w.sum(axis=1)
        ok = wsum > 0
        new = c[active].copy()
        new[ok] = (w[ok] @ pts) / wsum[ok, None]
        step_vec = new - c[active]
        step = np.sqrt((step_vec ** 2).sum(axis=1))
        if kernel == "gaussian":
            p = prev[active]
            pn = np.sqrt((p ** 2).sum(axis=1))
            with np.errstate(invalid="ignore", divide="ignore"):
                rho = step / pn
                cos = (step_vec * p).sum(axis=1) / (step * pn)
            jump = (pn > 0) & (cos > 0.995) & (rho > 0.5) & (rho < 0.995)
            if jump.any():
                tail = step_vec[jump] * (rho[jump] / (1 - rho[jump]))[:, None]
                tail_len = np.sqrt((tail ** 2).sum(axis=1))
                new[jump] += tail * np.minimum(1.0, h / np.maximum(tail_len, 1e-300))[:, None]
            step_vec[jump] = 0.0                         # no two extrapolations in a row
        c[active] = new
        prev[active] = step_vec
        still = step >= tol * h
        active = active[still]
        if len(active) == 0:
            break
    return c


def _merge(c, dens, h, max_keep):
    """Indices of centres kept densest first, dropping any centre within h of a denser kept one."""
    keep = []
    for i in np.argsort(-dens, kind="stable"):
        if all(np.sum((c[i] - c[j]) ** 2) > h * h for j in keep):
            keep.append(i)
        if len(keep) == max_keep:
            break
    return np.array(keep, dtype=int)


def summarize(samples, bandwidth=None, max_modes=3, kernel="gaussian", progress=None):
    """Per-cluster summary of posterior samples (N, S, 3).

    Args:
        bandwidth, max_modes, kernel: as mean_shift.
        progress: called with the number of clusters done (e.g. simulate.Progress(N, ...).update).
    Returns:
        dict modes (N, max_modes, 3) NaN-padded, densest first (modes[:, 0] = MAP), mode_density
        (N, max_modes) relative kernel density, n_modes (N,), quantiles (N, 3, 3) as [q, param].
    """
    samples = np.asarray(samples)
    if samples.ndim != 3:
        raise ValueError(f"summarize needs samples (N, S, 3); got {samples.shape}")
    N, _, d = samples.shape
    modes = np.full((N, max_modes, d), np.nan)
    dens = np.full((N, max_modes), np.nan)
    for i in range(N):
        m, w = mean_shift(samples[i], bandwidth, max_modes, kernel, return_density=True)
        modes[i, :len(m)], dens[i, :len(m)] = m, w / w[0]
        if progress and ((i + 1) % 100 == 0 or i + 1 == N):
            progress(i + 1)
    quantiles = np.quantile(samples, QUANTILE_LEVELS, axis=1).transpose(1, 0, 2)
    return {"modes": modes, "mode_density": dens, "n_modes": np.isfinite(modes[:, :, 0]).sum(1),
            "quantiles": quantiles}


def closest_mode(modes, reference, scale=None):
    """The mode (N, 3) of modes (N, K, 3) closest to reference (N, 3); distances per parameter are divided
    by `scale` (3,) (default: the widths of the prior ranges preprocess.THETA_BOUNDS: 4.44 dex, 6 dex, 1.5 mag)."""
    modes = np.asarray(modes, dtype=float)
    ref = np.asarray(reference, dtype=float)
    scale = np.diff(preprocess.THETA_BOUNDS, axis=1)[:, 0] if scale is None else np.asarray(scale)
    d2 = np.sum(((modes - ref[:, None, :]) / scale) ** 2, axis=2)
    d2 = np.where(np.isfinite(d2), d2, np.inf)
    idx = np.argmin(d2, axis=1)
    return modes[np.arange(len(modes)), idx]


def densest_sample(samples, flux_mjy, rel_err, distance_mpc):
    """Per cluster, the posterior sample where the exact unnormalised posterior density is highest: (N, 3) as
    (log10 k, log10 m0, E(B-V)), k = round(t') its age bin, the coordinates of the grid MAP.

    The likelihood of this model is tractable (grid_posterior.log_map_density, the function the grid MAP
    maximises: five table look-ups per sample, ~2 ms per cluster for 1e4 samples), so the network proposes and
    the exact density ranks. Not the MAP of SPEC.md Sect. 5 (the densest mean-shift mode, a property of the samples alone):
    a point estimate that needs the forward model and the noise model, reported beside it. samples (N, S, 3);
    flux_mjy, rel_err (N, 5); distance_mpc (N,). NaN for a cluster none of whose samples the noise model allows."""
    out = np.empty((len(samples), 3))
    for i in range(len(samples)):
        v, k = grid_posterior.log_map_density(samples[i], flux_mjy[i], rel_err[i], distance_mpc[i])
        j = int(np.argmax(v))
        out[i] = (np.log10(k[j]), samples[i, j, 1], samples[i, j, 2]) if np.isfinite(v[j]) else np.nan
    return out


# ----------------------------------------------------------------------------------------------------------
# Re-simulation, PPC (Fig. 4), chi^2 (Eq. 11), inliers (Table 1)

def resimulate(theta, distance_mpc):
    """Noise-free model photometry (..., 5) in mJy of theta (..., 3) at distance_mpc (broadcast to theta[..., 0]),
    at the integer model age of each label (simulate.age_bin)."""
    theta = np.asarray(theta, dtype=float)
    dist = np.broadcast_to(np.asarray(distance_mpc, dtype=float), theta.shape[:-1])
    return model_flux(age_bin(theta[..., 0]), np.clip(theta[..., 2], *EBV_RANGE), theta[..., 1], dist)


def lognormal_noise(flux_true, sigma, rng):
    """SPEC.md Sect. 3 noise model with a given absolute sigma: f* ~ LogNormal with mean f and sd sigma,
    i.e. ln f* ~ N(ln f - s^2/2, s^2), s^2 = ln(1 + (sigma/f)^2)."""
    f = np.asarray(flux_true, dtype=float)
    s2 = np.log1p((np.asarray(sigma, dtype=float) / f) ** 2)
    return np.exp(np.log(f) - 0.5 * s2 + np.sqrt(s2) * rng.standard_normal(f.shape))


def ppc(samples, flux_obs, rel_err, distance_mpc, rng):
    """Posterior predictive check. samples (N, S, 3); observed flux_obs (N, 5) mJy with rel_err (N, 5).

    Each sample is re-simulated (resimulate) and perturbed with the log-normal noise model using the
    observation's absolute uncertainty sigma_b = rel_err_b * flux_obs_b (so r = sigma_b / f_resim).
    Returns dict: pred_mean (N, 5) mean predictive flux, pred_q (N, 3, 5) 16/50/84 % predictive quantiles,
    rank (N, 5) = number of predictive draws below the observation (0..S), chi2_mean (N,) Eq. 11 chi^2 of
    the mean predictive photometry (nu = 5), sigma (N, 5), n_samples.
    """
    samples = np.asarray(samples, dtype=float)
    flux_obs = np.asarray(flux_obs, dtype=float)
    sigma = np.asarray(rel_err, dtype=float) * flux_obs
    f_model = resimulate(samples, np.asarray(distance_mpc, dtype=float)[:, None])   # (N, S, 5)
    f_pred = lognormal_noise(f_model, np.broadcast_to(sigma[:, None, :], f_model.shape), rng)
    pred_mean = f_pred.mean(axis=1)
    return {"pred_mean": pred_mean, "sigma": sigma, "n_samples": samples.shape[1],
            "pred_q": np.quantile(f_pred, QUANTILE_LEVELS, axis=1).transpose(1, 0, 2),
            "rank": (f_pred < flux_obs[:, None, :]).sum(axis=1),
            "chi2_mean": resim_chi2(pred_mean, flux_obs, sigma)}


def resim_chi2(flux_model, flux_obs, sigma, nu=None):
    """Re-simulation chi^2 of Walter et al. Eq. 11: chi^2 = (1/nu) sum_b ((f_b^resim - f_b) / sigma_b)^2.

    nu defaults to the number of finite bands per cluster (5 for complete photometry): the reduced
    chi^2 of photometry at the true parameters then averages 1. Pass nu = n_bands - 3 for the reduced
    chi^2 of a 3-parameter fit. Bands with NaN are skipped. Shapes broadcast; sum over the last axis.
    """
    r = (np.asarray(flux_model, float) - np.asarray(flux_obs, float)) / np.asarray(sigma, float)
    ok = np.isfinite(r)
    if nu is None:
        nu = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, r * r, 0.0).sum(axis=-1) / nu


def inlier_fractions(mle, mle_lo, mle_hi, quantiles, map_theta):
    """Table 1 inlier shares per parameter (3,), in [0, 1]:

    mle_in_cinn: share of MLEs inside the cINN 16-84 % interval [quantiles[:, 0], quantiles[:, 2]];
    map_in_mle: share of cINN MAPs inside the MLE 1-sigma range [mle_lo, mle_hi].
    Clusters with NaN in the compared quantities are left out per parameter (counts in n).
    """
    mle, lo, hi = (np.asarray(a, dtype=float) for a in (mle, mle_lo, mle_hi))
    q = np.asarray(quantiles, dtype=float)
    mp = np.asarray(map_theta, dtype=float)
    ok1 = np.isfinite(mle) & np.isfinite(q[:, 0]) & np.isfinite(q[:, 2])
    in1 = (mle >= q[:, 0]) & (mle <= q[:, 2])
    ok2 = np.isfinite(mp) & np.isfinite(lo) & np.isfinite(hi)
    in2 = (mp >= lo) & (mp <= hi)
    with np.errstate(invalid="ignore", divide="ignore"):      # a share of no clusters is NaN, not 0 %
        share1 = np.where(ok1.sum(0) > 0, (in1 & ok1).sum(0) / ok1.sum(0), np.nan)
        share2 = np.where(ok2.sum(0) > 0, (in2 & ok2).sum(0) / ok2.sum(0), np.nan)
    return {"mle_in_cinn": share1, "map_in_mle": share2,
            "n_mle_in_cinn": ok1.sum(0), "n_map_in_mle": ok2.sum(0)}


def mle_theta(mle, age_cell_myr=1.0):
    """MLE columns -> theta (N, 3), lo (N, 3), hi (N, 3) in (log10 age/Myr, log10 mass, E(B-V)).

    mle: dict (grid_posterior.mle output or a file with its keys) with age_myr (or log10_age_myr),
    log10_mass, ebv and optional 1-sigma ranges <key>_lo / <key>_hi (NaN where absent). Ages on CIGALE's
    1 Myr grid stand for the cell (k - 1/2, k + 1/2] that the cINN's jittered age label fills, so the age
    range is widened by age_cell_myr / 2 on both sides before taking log10 (0 switches this off).
    """
    def col(key):
        v = np.asarray(mle[key], dtype=float)
        nan = np.full_like(v, np.nan)
        return v, np.asarray(mle.get(f"{key}_lo", nan), float), np.asarray(mle.get(f"{key}_hi", nan), float)
    for key in ("log10_mass", "ebv"):
        if key not in mle:
            raise ValueError(f"MLE data lacks '{key}' (keys: {sorted(mle)})")
    if "age_myr" in mle:
        a, alo, ahi = col("age_myr")
        with np.errstate(divide="ignore", invalid="ignore"):
            age = (np.log10(a), np.log10(alo - age_cell_myr / 2), np.log10(ahi + age_cell_myr / 2))
    elif "log10_age_myr" in mle:
        age = col("log10_age_myr")
    else:
        raise ValueError(f"MLE data lacks 'age_myr' or 'log10_age_myr' (keys: {sorted(mle)})")
    parts = [age, col("log10_mass"), col("ebv")]
    return tuple(np.stack([p[i] for p in parts], axis=1) for i in range(3))


def compare_with_mle(summ, mle, mle_lo, mle_hi, obs, nu=None, chi2_mle=None):
    """Numbers of the MLE comparison: MAP, closest mode, re-simulation chi^2 (Eq. 11) of MAP and MLE,
    Table 1 inliers. chi2_mle from the fit itself may be given; otherwise it is recomputed by re-simulation."""
    sigma = obs["rel_err"] * obs["flux_mjy"]
    mp = summ["modes"][:, 0]
    res = {"map": mp, "closest": closest_mode(summ["modes"], mle), "mle": mle, "mle_lo": mle_lo,
           "mle_hi": mle_hi, "quantiles": summ["quantiles"], "nu": 5 if nu is None else nu}
    res["chi2_map"] = resim_chi2(resimulate(mp, obs["distance_mpc"]), obs["flux_mjy"], sigma, nu)
    ok = np.all(np.isfinite(mle), axis=1)
    chi2 = np.full(len(mle), np.nan)
    chi2[ok] = resim_chi2(resimulate(mle[ok], obs["distance_mpc"][ok]), obs["flux_mjy"][ok], sigma[ok], nu)
    res["chi2_mle"] = chi2 if chi2_mle is None else np.asarray(chi2_mle, float)
    res.update(inlier_fractions(mle, mle_lo, mle_hi, summ["quantiles"], mp))
    return res


def ppc_summary(res, flux_obs):
    """The numbers of a PPC (ppc's dict): per band the median and MAD of log10(predicted / observed), the share
    of observations inside the central 68 and 95 % of the predictive draws; the median chi^2 of the mean."""
    frac = res["rank"] / res["n_samples"]
    dlog = np.log10(res["pred_mean"] / flux_obs)
    return {"n_clusters": len(flux_obs), "n_samples": res["n_samples"], "bands": list(BANDS),
            "median_log10_pred_over_obs": np.median(dlog, axis=0),
            "mad_log10_pred_over_obs": np.median(np.abs(dlog - np.median(dlog, 0)), axis=0),
            "share_obs_in_central_68": np.mean((frac >= 0.16) & (frac <= 0.84), axis=0),
            "share_obs_in_central_95": np.mean((frac >= 0.025) & (frac <= 0.975), axis=0),
            "median_chi2_mean_prediction": float(np.median(res["chi2_mean"]))}


def compare_summary(res, mle):
    """The numbers of compare_with_mle's dict: median chi^2 of MAP and MLE, Table 1 shares, median |MAP - MLE|."""
    names = preprocess.THETA_NAMES
    return {"n_clusters": len(mle), "nu": res["nu"],
            "median_chi2_map": float(np.nanmedian(res["chi2_map"])),
            "median_chi2_mle": float(np.nanmedian(res["chi2_mle"])),
            "share_chi2_map_below_mle": float(np.nanmean(res["chi2_map"] <= res["chi2_mle"])),
            "mle_in_cinn_16_84": dict(zip(names, res["mle_in_cinn"])),
            "map_in_mle_1sigma": dict(zip(names, res["map_in_mle"])),
            "median_abs_map_minus_mle": dict(zip(names, np.nanmedian(np.abs(res["map"] - mle), 0))),
            "median_abs_closest_minus_mle": dict(zip(names, np.nanmedian(np.abs(res["closest"] - mle), 0)))}


# ----------------------------------------------------------------------------------------------------------
# Against the exact grid posterior

def mean_and_se(values):
    """Mean and standard error of the finite entries of a 1-d array (NaN where there are too few)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def kl_estimate(logp_exact, logq):
    """Mean of log p_exact(theta_true|x) - log q_cINN(theta_true|x) over clusters (nats) and its standard
    error: a Monte-Carlo estimate of the expected KL divergence E_x KL(p || q) (>= 0, 0 is perfect)."""
    return mean_and_se(np.asarray(logp_exact, float) - np.asarray(logq, float))


def _kl_part(d, sel):
    """(count, mean, se, share of the overall sum) of the finite per-cluster differences d inside the mask sel."""
    ok = np.isfinite(d)
    share = float(np.sum(d[sel & ok]) / np.sum(d[ok])) if ok.any() else float("nan")
    return (int(np.sum(sel & ok)),) + mean_and_se(d[sel & ok]) + (share,)


NEAR_BOUND = (0.2, 0.05)     # kl_near_prior_bounds: dex of log mass from 2 or 8, mag of E(B-V) from 0 or 1.5


def kl_near_prior_bounds(logp_exact, logq, theta_true):
    """The KL estimate split by where the truth lies: within NEAR_BOUND of a hard prior bound in mass or E(B-V),
    where the exact posterior keeps a finite density at the bound, or away from them.

    Returns:
        {"near": (n, mean, se), "away": (n, mean, se), "near_share_of_total": the near clusters' share}.
    """
    d = np.asarray(logp_exact, float) - np.asarray(logq, float)
    (m0, m1), (e0, e1) = preprocess.THETA_BOUNDS[1], preprocess.THETA_BOUNDS[2]
    m, e = theta_true[:, 1], theta_true[:, 2]
    near = (m < m0 + NEAR_BOUND[0]) | (m > m1 - NEAR_BOUND[0]) | (e < e0 + NEAR_BOUND[1]) | (e > e1 - NEAR_BOUND[1])
    (n_near, *near_stats, share), (n_away, *away_stats, _) = _kl_part(d, near), _kl_part(d, ~near)
    return {"near": (n_near, *near_stats), "away": (n_away, *away_stats), "near_share_of_total": share}


FLOOR_HEIGHT_EDGES = (0.01, 0.03, 0.1)    # kl_by_floor_height: dex of the true log mass above its mass floor


def kl_by_floor_height(logp_exact, logq, theta_true, x):
    """The KL estimate split by the truth's height h above the noise model's mass floor at its (t', E(B-V))
    (refinements.raw_mass_floor; the exact posterior keeps a finite, often its largest, density there):
    h < 0.01, 0.01-0.03, 0.03-0.1 and >= 0.1 dex. Returns [(label, n, mean, se, share of the mean), ...]."""
    d = np.asarray(logp_exact, float) - np.asarray(logq, float)
    h = theta_true[:, 1] - refinements.raw_mass_floor(theta_true[:, 0], theta_true[:, 2], x)
    edges = (-np.inf,) + tuple(FLOOR_HEIGHT_EDGES) + (np.inf,)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = f"< {hi:g}" if lo == -np.inf else (f">= {lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}")
        out.append((label,) + _kl_part(d, (h >= lo) & (h < hi)))
    return out


EXACT_KEYS = ("logp_exact", "map_exact", "quantiles_exact", "map_exact_meanshift")


def exact_posterior_of(obs, i, rv_prior="auto"):
    """The exact posterior of cluster i of obs: with R_V marginalised over the observations' own R_V prior
    (obs["rv_prior"], simulated with a variable R_V; grid_posterior.exact_posterior_rv), else at R_V = 3.1.
    rv_prior "auto" takes the observations'; None forces R_V = 3.1 (the fixed model's posterior)."""
    if isinstance(rv_prior, str):
        rv_prior = obs.get("rv_prior")
    f, r, d = obs["flux_mjy"][i], obs["rel_err"][i], obs["distance_mpc"][i]
    if rv_prior is None:
        return grid_posterior.exact_posterior(f, r, d)
    return grid_posterior.exact_posterior_rv(f, r, d, tuple(np.asarray(rv_prior, dtype=float)), seed=i)


def exact_reference(obs, n_samples, rng, bandwidth=None, kernel="gaussian", n_examples=0, progress=None,
                    rv_prior="auto"):
    """Per cluster of obs (with the true theta): the exact grid posterior's log density at the true theta, its
    MAP, 16/50/84 % quantiles, and the mean-shift MAP of n_samples exact samples (the same estimator as the
    cINN's). A cluster whose posterior cannot be computed gets NaN (counted by exact_summary). rv_prior: as in
    exact_posterior_of (observations simulated with a variable R_V get the R_V-marginal posterior).

    Returns:
        (dict of EXACT_KEYS arrays, the marginals of the first n_examples clusters for plots.plot_exact_examples,
        and those clusters' exact samples).
    """
    n = len(obs["x"])
    ref = dict(logp_exact=np.full(n, np.nan), map_exact=np.full((n, 3), np.nan),
               quantiles_exact=np.full((n, 3, 3), np.nan), map_exact_meanshift=np.full((n, 3), np.nan))
    grids, examples = [], []
    for i in range(n):
        f, r, d = obs["flux_mjy"][i:i + 1], obs["rel_err"][i:i + 1], obs["distance_mpc"][i:i + 1]
        try:
            post = exact_posterior_of(obs, i, rv_prior)
        except (MemoryError, RuntimeError):              # this cluster is left out, the others go on
            n_examples = min(n_examples, i)
            continue
        ref["logp_exact"][i] = grid_posterior.log_density(obs["theta"][i:i + 1], f, r, d, posts=[post])[0]
        ref["map_exact"][i] = post["map"]
        ref["quantiles_exact"][i] = np.asarray(post["quantiles"]).T                     # (q, param)
        ex = grid_posterior.sample_posterior(post, n_samples, rng)
        ref["map_exact_meanshift"][i] = mean_shift(ex, bandwidth, 3, kernel)[0]
        if i < n_examples:
            grids.append(exact_marginals(post, ex))
            examples.append(ex)
        if progress:
            progress(i + 1)
    return ref, grids, examples


def exact_marginals(post, exact_samples, bins=80):
    """Marginal densities of an exact posterior for plotting: the age from the grid's P(k) (as a density in
    log10 t', uniform in t' inside each bin), mass and E(B-V) as histograms of exact samples."""
    pmf = np.asarray(post["age_pmf"])
    edges = np.linspace(*np.percentile(exact_samples[:, 0], [0.05, 99.95]), bins + 1)
    cdf_k = np.concatenate([[0.0], np.cumsum(pmf)])
    t = np.clip(10.0 ** edges, 0.5, len(pmf) + 0.5)
    j = np.minimum(np.floor(t - 0.5).astype(int), len(pmf) - 1)         # bin j covers [j + 1/2, j + 3/2]
    g = {"x0": 0.5 * (edges[1:] + edges[:-1]), "p0": np.diff(cdf_k[j] + pmf[j] * (t - 0.5 - j)) / np.diff(edges)}
    for p in (1, 2):
        dens, e = np.histogram(exact_samples[:, p], bins=bins, density=True)
        g[f"x{p}"], g[f"p{p}"] = 0.5 * (e[1:] + e[:-1]), dens
    return g


def exact_summary(ref, logq, logq_flow, samples, summ, obs):
    """The comparison with the exact posterior, as numbers.

    Args:
        ref: exact_reference's dict. logq, logq_flow: the model's log density at the true theta, as it samples
        and of the flow alone (the same for a paper-method model). samples (N, S, 3), summ (summarize) and obs
        of the same clusters.
    Returns:
        dict (JSON-ready): KL estimate and its splits, share of samples outside the noise model's support,
        16-84 % width ratios, MAP agreement, truth inside the 16-84 % intervals.
    """
    theta, logp = obs["theta"], ref["logp_exact"]
    ok = np.isfinite(logp)
    kl, kl_se = kl_estimate(logp, logq)
    kl_flow, kl_flow_se = kl_estimate(logp, logq_flow)
    q, q_exact = summ["quantiles"], ref["quantiles_exact"]
    ratio = (q[:, 2] - q[:, 0]) / (q_exact[:, 2] - q_exact[:, 0])
    dage = np.abs(summ["modes"][:, 0, 0] - ref["map_exact"][:, 0])
    dage_exact = np.abs(ref["map_exact_meanshift"][:, 0] - ref["map_exact"][:, 0])
    names = preprocess.THETA_NAMES
    return {"n_clusters": len(theta), "n_exact_failed": int(np.sum(~ok)), "n_samples": samples.shape[1],
            "kl_mean_nats": kl, "kl_se_nats": kl_se, "kl_median_nats": float(np.nanmedian(logp - logq)),
            "kl_flow_mean_nats": kl_flow, "kl_flow_se_nats": kl_flow_se,
            "kl_by_distance_to_prior_bounds": kl_near_prior_bounds(logp, logq, theta),
            "kl_by_height_above_mass_floor_dex": kl_by_floor_height(logp, logq, theta, obs["x"]),
            "share_cinn_samples_below_mass_floor": float(refinements.below_floor(samples, obs["x"][:, None]).mean()),
            "median_width_ratio_cinn_over_exact": dict(zip(names, np.nanmedian(ratio, 0))),
            "share_width_ratio_within_20pc": dict(zip(names, np.mean(np.abs(ratio[ok] - 1) <= 0.2, 0))),
            "share_map_within_0p1_dex_age": float(np.mean(dage[ok] <= 0.1)),
            "share_exact_sample_map_within_0p1_dex_age": float(np.mean(dage_exact[ok] <= 0.1)),
            "truth_in_cinn_16_84": dict(zip(names, np.mean((theta >= q[:, 0]) & (theta <= q[:, 2]), 0))),
            "truth_in_exact_16_84": dict(zip(names, np.mean((theta[ok] >= q_exact[ok, 0])
                                                           & (theta[ok] <= q_exact[ok, 2]), 0)))}


# ----------------------------------------------------------------------------------------------------------
# A catalogue through a trained model

def posterior_summary(samples, summ, chunk=256):
    """summarize's modes and quantiles (N, K, 3) with the log current stellar mass inserted: (N, K, 4) modes and
    (N, 3, 4) quantiles over catalogs.RESULT_PARAMS. The M* of the samples is computed chunk by chunk (bounded memory)."""
    modes3, q3 = summ["modes"], summ["quantiles"]
    modes = np.concatenate([modes3[..., :2], catalogs.log10_mstar(modes3)[..., None], modes3[..., 2:]], axis=-1)
    q_ms = np.concatenate([np.quantile(catalogs.log10_mstar(samples[i:i + chunk]), QUANTILE_LEVELS, axis=1).T
                           for i in range(0, len(samples), chunk)])
    quant = np.concatenate([q3[..., :2], q_ms[..., None], q3[..., 2:]], axis=-1)
    return {"modes": modes, "quantiles": quant, "n_modes": summ["n_modes"]}


def inlier_table(name, ref, lo, hi, quantiles, map_theta, param_names):
    """Table 1 rows (inlier_fractions) for one reference (the grid MLE or the catalogue's estimates)."""
    f = inlier_fractions(ref, lo, hi, quantiles, map_theta)
    return Table({"reference": [name] * len(param_names), "parameter": list(param_names),
                  "ref_in_cinn_16_84_pct": 100 * np.asarray(f["mle_in_cinn"]),
                  "n_ref_in_cinn": np.asarray(f["n_mle_in_cinn"]),
                  "cinn_map_in_ref_1sigma_pct": 100 * np.asarray(f["map_in_mle"]),
                  "n_map_in_ref": np.asarray(f["n_map_in_mle"])})


CURRENT_MASS = [0, 2, 3]       # catalogs.RESULT_PARAMS a catalogue reports: its masses are current stellar masses


def catalog_inliers(summ, mle, cat, fmt, rows=slice(None)):
    """Table 1 against the grid MLE (mle: dict theta, lo, hi over catalogs.RESULT_PARAMS, or None) and against the
    catalogue's own estimates (cat: (theta, lo, hi) over log age, log M*, E(B-V), or None), for `rows`."""
    q, mp = summ["quantiles"][rows], summ["modes"][rows, 0]
    parts = []
    if mle is not None:
        parts.append(inlier_table("grid MLE", mle["theta"][rows], mle["lo"][rows], mle["hi"][rows], q, mp,
                                  catalogs.RESULT_PARAMS))
    if cat is not None:
        parts.append(inlier_table(f"catalogue ({fmt})", cat[0][rows], cat[1][rows], cat[2][rows],
                                  q[:, :, CURRENT_MASS], mp[:, CURRENT_MASS],
                                  [catalogs.RESULT_PARAMS[i] for i in CURRENT_MASS]))
    return vstack(parts) if parts else None


def inliers_by_field(fields, summ, mle, cat, fmt):
    """Table 1 per field (several catalogues in one run): one row per field, reference and parameter."""
    tables = []
    for f in dict.fromkeys(fields):
        t = catalog_inliers(summ, mle, cat, fmt, np.asarray(fields == f))
        t.add_column([f] * len(t), index=0, name="field")
        tables.append(t)
    return vstack(tables)


CATALOG_CHUNK = 256        # clusters per chunk of a catalogue run: memory holds one chunk of samples


def part_rows(n, part, chunk=CATALOG_CHUNK):
    """The rows of part "K/N" (1-based) of n clusters: the K-th of N contiguous slices, cut at multiples of the
    chunk so that every part draws exactly the samples the whole run would (the chunks' seeds are global)."""
    try:
        k, n_parts = (int(v) for v in part.split("/"))
    except (ValueError, AttributeError):
        raise checks.InputError(f"--part must be K/N with 1 <= K <= N, got {part!r}") from None
    if not 1 <= k <= n_parts:
        raise checks.InputError(f"--part must be K/N with 1 <= K <= N, got {part!r}")
    n_chunks = -(-n // chunk)
    if n_parts > n_chunks:
        raise checks.InputError(f"--part {part}: {n} clusters make {n_chunks} chunks of {chunk}, fewer than "
                                f"{n_parts} parts (some would be empty); use at most {n_chunks} parts or a smaller --chunk")
    return slice(min((k - 1) * n_chunks // n_parts * chunk, n), min(k * n_chunks // n_parts * chunk, n))


def _chunk_posteriors(model, x, n_samples, seed, flux, rel, dist, n_examples):
    """Samples of one chunk of clusters and their summaries; the samples of its n_examples most multimodal."""
    s = model.sample(x, n_samples, seed=int(seed)).astype(np.float32)
    summ3 = summarize(s)
    summ = posterior_summary(s, summ3)
    top = np.lexsort((np.arange(len(s)), -summ3["n_modes"]))[:n_examples]
    return dict(**{f"s3_{k}": v for k, v in summ3.items() if k != "mode_density"},
                **{f"s4_{k}": v for k, v in summ.items()}, densest=densest_sample(s, flux, rel, dist),
                ex_index=top, ex_samples=s[top])


_WORKER = {}


def _worker_init(model_path, device):
    torch.set_num_threads(1)
    _WORKER["model"] = cinn.load(model_path, device=device)


def _worker_chunk(args):
    return _chunk_posteriors(_WORKER["model"], *args)


def catalog_posteriors(model, x, n_samples, seed, obs, rows=slice(None), chunk=CATALOG_CHUNK, n_examples=3,
                       progress=None, stash=None, workers=1, device=None):
    """Posterior summaries of the clusters x[rows], a chunk of clusters at a time: memory holds one chunk of
    samples (chunk x n_samples x 3) per worker, whatever the catalogue's length.

    Args:
        model: the path of a trained cINN (each worker process loads it), or a loaded one (workers = 1).
        x (N, 11), obs (flux_mjy, rel_err, distance_mpc) of the whole catalogue; rows: the clusters to do
            (part_rows), starting at a multiple of chunk.
        seed: the chunks' seeds come from it and their global index, so any part draws the samples of the
            whole run (on the same kind of device: CPU and CUDA generators draw different streams). stash: a
            directory where every finished chunk is kept (a rerun takes them from there instead of redoing them;
            refused if they were made by another run or on another kind of device). workers: processes, each on
            the CPU; device: the torch device of a single process (default: cuda if available).
        progress: called with the number of clusters done.
    Returns:
        dict summ3 (modes, quantiles, n_modes), summ (with log M*), densest (n, 3), examples (global indices,
        samples and summ3 of the n_examples most multimodal clusters), key (stash_key: the parts of one run
        share it) and device (the kind it sampled on).
    """
    start, stop, _ = rows.indices(len(x))
    assert start % chunk == 0, "a part starts at a multiple of the chunk (part_rows)"
    device = sampling_device(model, workers, device)
    seeds = np.random.default_rng(seed).integers(0, 2 ** 62, size=max(1, -(-len(x) // chunk)))
    todo = list(range(start // chunk, -(-stop // chunk)))
    args = {c: (x[c * chunk:(c + 1) * chunk], n_samples, seeds[c], obs["flux_mjy"][c * chunk:(c + 1) * chunk],
                obs["rel_err"][c * chunk:(c + 1) * chunk], obs["distance_mpc"][c * chunk:(c + 1) * chunk],
                n_examples) for c in todo}
    key = stash_key(model, x, n_samples, seed, chunk, device)
    done = {c: r for c in todo if (r := _from_stash(stash, c, key)) is not None}
    for c, part in _run_chunks(model, args, [c for c in todo if c not in done], workers, device):
        done[c] = part
        if stash:
            save_npz(Path(stash) / f"chunk_{c:06d}.npz", key=key, **part)
        if progress:
            progress(min(sum(len(args[k][0]) for k in done), stop - start))
    return dict(_join_chunks([done[c] for c in todo], [c * chunk for c in todo], n_examples), key=key, device=device)


def sampling_device(model, workers, device=None):
    """The kind of torch device a catalogue run samples on ("cpu" or "cuda"): worker processes use the CPU."""
    if workers > 1:
        if device not in (None, "cpu"):
            raise checks.InputError(f"--workers {workers} sample on the CPU; --device {device} needs --workers 1")
        return "cpu"
    if not isinstance(model, (str, Path)):
        return next(model.parameters()).device.type
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type


def stash_key(model, x, n_samples, seed, chunk, device):
    """What the samples of a catalogue run depend on, as a digest: the model's weights, the inputs, the samples
    per cluster, seed, chunk and the kind of device. Stashed chunks and merged parts must share it."""
    model = load_model(model, "cpu") if isinstance(model, (str, Path)) else model
    weights = b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values())
    settings = model.transform.settings if model.method == "refined" else None
    h = hashlib.sha256()
    for part in (weights, f"{model.method} {model.config} {settings}".encode(), np.ascontiguousarray(x).tobytes(),
                 f"{n_samples} {seed} {chunk} {device}".encode()):
        h.update(part)
    return h.hexdigest()


def _from_stash(stash, c, key):
    """A stashed chunk's results, or None; a chunk stashed by another run is refused."""
    f = Path(stash) / f"chunk_{c:06d}.npz" if stash else None
    if f is None or not f.exists():
        return None
    part = load_npz(f)
    if str(part.pop("key")) != key:
        raise checks.InputError(f"{f}: made by another run (model, inputs, samples or seed differ); delete "
                                f"{Path(stash)} or choose another --out")
    return part


def _run_chunks(model, args, todo, workers, device):
    """Yield (chunk index, results) for the chunks todo, in order, in this process or in `workers` processes."""
    if workers <= 1 or len(todo) <= 1:
        model = load_model(model, device) if isinstance(model, (str, Path)) else model
        for c in todo:
            yield c, _chunk_posteriors(model, *args[c])
        return
    if not isinstance(model, (str, Path)):
        raise ValueError("workers > 1 need the model's path")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(str(model), "cpu")) as pool:
        yield from zip(todo, pool.map(_worker_chunk, [args[c] for c in todo]))


def _join_chunks(parts, offsets, n_examples):
    """The chunks' results as one: summaries concatenated, the examples merged across chunks."""
    join = lambda key: np.concatenate([p[key] for p in parts])
    summ3 = {k: join(f"s3_{k}") for k in ("modes", "quantiles", "n_modes")}
    cand = [(-int(p["s3_n_modes"][i]), off + int(i), p["ex_samples"][j])
            for p, off in zip(parts, offsets) for j, i in enumerate(p["ex_index"])]
    cand = sorted(cand, key=lambda e: e[:2])[:n_examples]
    base = offsets[0]
    idx = np.array([e[1] for e in cand], dtype=int)
    return dict(summ3=summ3, summ={k: join(f"s4_{k}") for k in ("modes", "quantiles", "n_modes")},
                densest=join("densest"), examples=(idx, np.array([e[2] for e in cand]),
                                                    {k: summ3[k][idx - base] for k in summ3}))


def catalog_results(obs, est, post, fmt, with_mle=True):
    """Everything a catalogue run reports, from its observations and posterior summaries.

    Args:
        obs, est: catalogs.read_many's observations and the catalogue's own estimates.
        post: catalog_posteriors of the clusters.
        with_mle: also fit the grid MLE (grid_posterior.mle) and compare with it.
    Returns:
        dict table (catalogs.result_table), inliers (Table 1 or None), by_field (or None), res_grid and
        res_cat (compare_with_mle-style dicts for the figures, or None), chi2_map.
    """
    summ3, summ = post["summ3"], post["summ"]
    sigma = obs["rel_err"] * obs["flux_mjy"]
    chi2_map = resim_chi2(resimulate(summ3["modes"][:, 0], obs["distance_mpc"]), obs["flux_mjy"], sigma)
    mle = res_grid = None
    if with_mle:
        th, lo, hi = mle_theta(grid_posterior.mle(obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"]))
        res_grid = compare_with_mle(summ3, th, lo, hi, obs)
        theta4, lo4, hi4 = catalogs.with_mstar(th, lo, hi)
        mle = {"theta": theta4, "lo": lo4, "hi": hi4, "chi2": res_grid["chi2_mle"]}
    table = catalogs.result_table(obs, est, summ, chi2_map, mle, post["densest"])
    cat = catalogs.catalogue_estimates(est)
    if np.isfinite(cat[0]).any():
        res_cat = _catalogue_comparison(obs, cat, summ, sigma, chi2_map)
        table["chi2_resim_cat"] = res_cat["chi2_mle"]      # NaN where the catalogue has no estimate
    else:                                                  # no estimates at all: nothing to compare with
        cat = res_cat = None
        table["chi2_resim_cat"] = np.full(len(table), np.nan)
    table["chi2_resim_cat"].description = "Eq. 11 chi^2 of the catalogue's own estimate through this model"
    fields = obs["field"]
    several = len(set(fields)) > 1 and (mle is not None or cat is not None)
    return dict(table=table, inliers=catalog_inliers(summ, mle, cat, fmt), res_grid=res_grid, res_cat=res_cat,
                by_field=inliers_by_field(fields, summ, mle, cat, fmt) if several else None, chi2_map=chi2_map)


def _catalogue_comparison(obs, cat, summ, sigma, chi2_map):
    """compare_with_mle-style dict of the cINN against the catalogue's own estimates, in current mass."""
    theta, lo, hi = cat
    ok = np.all(np.isfinite(theta), axis=1)
    chi2_cat = np.full(len(theta), np.nan)
    chi2_cat[ok] = resim_chi2(resimulate(catalogs.to_initial_mass(theta[ok]), obs["distance_mpc"][ok]),
                              obs["flux_mjy"][ok], sigma[ok])
    modes_c, q_c = summ["modes"][:, :, CURRENT_MASS], summ["quantiles"][:, :, CURRENT_MASS]
    res = {"map": modes_c[:, 0], "closest": closest_mode(modes_c, theta), "mle": theta, "mle_lo": lo,
           "mle_hi": hi, "quantiles": q_c, "nu": 5, "chi2_map": chi2_map, "chi2_mle": chi2_cat}
    res.update(inlier_fractions(theta, lo, hi, q_c, modes_c[:, 0]))
    return res


# ----------------------------------------------------------------------------------------------------------
# Command line: loading, sampling, writing

OBS_KEYS = ("x", "flux_mjy", "rel_err", "distance_mpc")


def load_obs(path, n=None, need_theta=False):
    """An observation file (SPEC.md Sect. 4), checked (checks.observations), its first n rows; with need_theta
    its true theta must be known. Rows with fluxes no cluster of the prior can have are counted on stderr."""
    obs = load_npz(path)
    N = checks.observations(obs, path)
    if need_theta:
        if "theta" not in obs or np.shape(obs["theta"]) != (N, 3):
            raise checks.InputError(f"{path}: needs key 'theta' of shape ({N}, 3), the true parameters")
        bad = ~np.all(np.isfinite(obs["theta"][:n]), axis=1)
        if bad.any():
            raise checks.InputError(f"{path}: true theta is NaN in rows {np.flatnonzero(bad)[:10].tolist()}; this "
                                    "diagnostic needs simulated test clusters with known parameters")
    n = N if n is None else min(int(n), N)
    out = {k: (v[:n] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == N else v) for k, v in obs.items()}
    far = checks.flux_outside_model(out["flux_mjy"])
    if far.any():
        print(f"{path}: {far.sum()} of {n} clusters have fluxes no cluster of the prior can have at 1-30 Mpc "
              f"(rows {np.flatnonzero(far)[:5].tolist()}); their posteriors sit on the prior's edges", file=sys.stderr)
    return out


def load_model(path, device=None, threads=None):
    """The trained cINN (cinn.load), with torch on `threads` CPU threads (default: 1 unless OMP_NUM_THREADS)."""
    if path is None:
        raise ValueError("this subcommand needs --model (a cINN checkpoint or run directory)")
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    return cinn.load(path, device=device)


def draw_samples(model, x, n_samples, seed, chunk=256, label="posterior samples"):
    """Posterior samples (N, n_samples, 3) float32 from model.sample in chunks of clusters, with a progress
    line; chunk seeds come from np.random.default_rng(seed): the same seed and chunk give identical samples."""
    x = np.asarray(x)
    seeds = np.random.default_rng(seed).integers(0, 2 ** 62, size=max(1, -(-len(x) // chunk)))
    out = np.empty((len(x), n_samples, 3), dtype=np.float32)
    progress = Progress(len(x), label)
    for k, i in enumerate(range(0, len(x), chunk)):
        out[i:i + chunk] = model.sample(x[i:i + chunk], n_samples, seed=int(seeds[k]))
        progress.update(min(i + chunk, len(x)))
    return out


def samples_and_summary(args, obs, model):
    """Posterior samples and their summary (modes + quantiles) for the CLI, with progress lines."""
    samples = draw_samples(model, obs["x"], args.samples, args.seed)
    summ = summarize(samples, args.bandwidth, 3, args.kernel, progress=Progress(len(samples), "modes").update)
    return samples, summ


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    raise TypeError(type(o))


def write_json(path, obj):
    """obj as indented JSON at path (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _outdir(path):
    return checks.output_dir(path)


# ----------------------------------------------------------------------------------------------------------
# Command line: the subcommands (each computes with the library, writes, plots and prints)

def cmd_sbc(args):
    """SBC on held-out simulations: ranks of the truth among L posterior samples for T1..T6 (Fig. 3)."""
    obs = load_obs(args.obs, args.n, need_theta=True)
    samples = draw_samples(load_model(args.model, args.device), obs["x"], args.L, args.seed, label="SBC samples")
    res = sbc_check(samples, obs["theta"], args.alpha, rng=np.random.default_rng(args.seed + 1))
    out = _outdir(args.out)
    save_npz(out / "sbc.npz", ranks=res["ranks"], L=args.L, z=res["z"], ecdf_diff=res["ecdf_diff"],
             band_simultaneous_lo=res["band_simultaneous"][0], band_simultaneous_hi=res["band_simultaneous"][1],
             band_pointwise_lo=res["band_pointwise"][0], band_pointwise_hi=res["band_pointwise"][1],
             stat_names=np.array(STAT_NAMES), seed=args.seed)
    write_json(out / "sbc.json", res["summary"])
    plots.plot_sbc(out / "sbc.png", res)
    print(format_sbc(res["summary"]) + f"\nwrote {out}/sbc.npz, sbc.json, sbc.png")
    return res["summary"]


def format_sbc(summ):
    """sbc_summary as a table in text."""
    lines = [f"SBC: {summ['n_pairs']} test clusters, L = {summ['L']}, band: simultaneous {1 - summ['alpha']:.0%} "
             f"(pointwise {summ['alpha'] / 2:.2f}-{1 - summ['alpha'] / 2:.2f} binomial band also given)",
             f"{'statistic':22s} {'max|ECDF-U|':>11s} {'inside sim.':>11s} {'inside pw.':>10s}"]
    lines += [f"{s['name']:22s} {s['max_abs_ecdf_diff']:11.4f} {str(s['inside_simultaneous_band']):>11s} "
              f"{str(s['inside_pointwise_band']):>10s}" for s in summ["statistics"]]
    lines.append(f"simultaneous band half-width ~ {summ['statistics'][0]['simultaneous_band_halfwidth_max']:.4f}; "
                 f"all inside: {summ['all_inside_simultaneous']}")
    return "\n".join(lines)


def cmd_ppc(args):
    """Posterior predictive check (Fig. 4)."""
    obs = load_obs(args.obs, args.n)
    samples = draw_samples(load_model(args.model, args.device), obs["x"], args.samples, args.seed, label="PPC samples")
    rng = np.random.default_rng(args.seed + 1)
    parts = [ppc(samples[i:i + 100], obs["flux_mjy"][i:i + 100], obs["rel_err"][i:i + 100],
                 obs["distance_mpc"][i:i + 100], rng) for i in range(0, len(samples), 100)]   # (100, S, 5) at a time
    res = {k: np.concatenate([p[k] for p in parts]) for k in ("pred_mean", "pred_q", "rank", "chi2_mean", "sigma")}
    res["n_samples"] = args.samples
    summ = ppc_summary(res, obs["flux_mjy"])
    out = _outdir(args.out)
    save_npz(out / "ppc.npz", flux_obs_mjy=obs["flux_mjy"], rel_err=obs["rel_err"], pred_mean_mjy=res["pred_mean"],
             pred_q_mjy=res["pred_q"], rank=res["rank"], chi2_mean=res["chi2_mean"], n_samples=args.samples,
             bands=np.array(BANDS), seed=args.seed)
    write_json(out / "ppc.json", summ)
    plots.plot_ppc(out / "ppc.png", obs["flux_mjy"], res)
    print(f"PPC: {summ['n_clusters']} clusters, {args.samples} posterior samples each, re-simulated with the "
          f"log-normal noise model at the observed sigma\n"
          f"{'band':6s} {'med log10(pred/obs)':>20s} {'MAD':>7s} {'obs in 68%':>10s} {'obs in 95%':>10s}")
    for b, name in enumerate(BANDS):
        print(f"{name:6s} {summ['median_log10_pred_over_obs'][b]:20.4f} {summ['mad_log10_pred_over_obs'][b]:7.4f} "
              f"{summ['share_obs_in_central_68'][b]:10.3f} {summ['share_obs_in_central_95'][b]:10.3f}")
    print(f"median chi^2 (Eq. 11, nu = 5) of the mean prediction: {summ['median_chi2_mean_prediction']:.3f}; "
          f"wrote {out}/ppc.npz, ppc.json, ppc.png")
    return summ


def cmd_modes(args):
    """Posterior samples -> mean-shift modes, MAP, 16/50/84 % quantiles, the densest sample -> posterior .npz."""
    obs = load_obs(args.obs, args.n)
    if args.samples_file:
        samples = load_npz(args.samples_file, required=("samples",))["samples"][:len(obs["x"])]
        summ = summarize(samples, args.bandwidth, 3, args.kernel, progress=Progress(len(samples), "modes").update)
    else:
        samples, summ = samples_and_summary(args, obs, load_model(args.model, args.device))
    arrays = dict(modes=summ["modes"], mode_density=summ["mode_density"], n_modes=summ["n_modes"],
                  quantiles=summ["quantiles"], quantile_levels=np.array(QUANTILE_LEVELS),
                  param_names=np.array(preprocess.THETA_NAMES), kernel=args.kernel, seed=args.seed,
                  densest=densest_sample(samples, obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"]),
                  **({"id": obs["id"]} if "id" in obs else {}), **({"samples": samples} if args.save_samples else {}))
    out = Path(args.out)
    save_npz(out, **arrays)
    plots.plot_modes(out.with_suffix(".png"), samples, summ)
    nm = np.bincount(summ["n_modes"], minlength=4)[1:]
    print(f"modes: {len(samples)} clusters, {samples.shape[1]} samples each, kernel {args.kernel}; clusters with "
          f"1 / 2 / 3 modes: {nm[0]} / {nm[1]} / {nm[2]}")
    if "theta" in obs and np.all(np.isfinite(obs["theta"])):
        err = np.median(np.abs(summ["modes"][:, 0] - obs["theta"]), 0)
        cover = np.mean((obs["theta"] >= summ["quantiles"][:, 0]) & (obs["theta"] <= summ["quantiles"][:, 2]), 0)
        for p, name in enumerate(preprocess.THETA_NAMES):
            print(f"  {name:14s} median |MAP - true| {err[p]:.4f}, truth in 16-84 %: {cover[p]:.3f} (0.68 expected)")
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return summ


def cmd_compare(args):
    """cINN vs maximum-likelihood fits: chi^2 (Eq. 11, Fig. 8), Table 1 inliers, Fig. 6, Fig. B.3."""
    obs = load_obs(args.obs, args.n)
    if args.mle:
        mle = {k: v[:len(obs["x"])] if isinstance(v, np.ndarray) and v.ndim else v
               for k, v in load_npz(args.mle).items()}
    else:
        mle = grid_posterior.mle(obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"])
    th, lo, hi = mle_theta(mle)
    if len(th) != len(obs["x"]):
        raise ValueError(f"{args.mle}: {len(th)} MLE rows but {len(obs['x'])} clusters in {args.obs}")
    if args.summary:
        s = load_npz(args.summary, required=("modes", "quantiles"))
        summ = {"modes": s["modes"][:len(th)], "quantiles": s["quantiles"][:len(th)]}
    else:
        summ = samples_and_summary(args, obs, load_model(args.model, args.device))[1]
    res = compare_with_mle(summ, th, lo, hi, obs, args.nu)
    summary = dict(compare_summary(res, th), mle_source=args.mle or "grid_posterior.mle")
    out = _outdir(args.out)
    save_npz(out / "compare.npz", **{k: np.asarray(v) for k, v in res.items()}, seed=args.seed)
    write_json(out / "compare.json", summary)
    plots.plot_compare(str(out / "compare"), res)
    print(f"compare: {len(th)} clusters, MLE from {summary['mle_source']}; chi^2 of Eq. 11 with nu = {res['nu']}\n"
          f"median chi^2: MAP {summary['median_chi2_map']:.3f}, MLE {summary['median_chi2_mle']:.3f}; MAP chi^2 <= "
          f"MLE chi^2 for {summary['share_chi2_map_below_mle']:.1%}\n"
          f"{'parameter':14s} {'MLE in cINN 16-84%':>19s} {'MAP in MLE 1sig':>16s} {'med|MAP-MLE|':>13s}")
    for p, name in enumerate(preprocess.THETA_NAMES):
        print(f"{name:14s} {res['mle_in_cinn'][p]:19.1%} {res['map_in_mle'][p]:16.1%} "
              f"{summary['median_abs_map_minus_mle'][name]:13.4f}")
    print(f"wrote {out}/compare.npz, compare.json, compare_map_vs_mle.png, compare_chi2.png, compare_width.png")
    return summary


def _rv_prior_array(rv_prior):
    """An R_V prior as stored in exact.npz: (lo, hi), or (NaN, NaN) for R_V = 3.1 fixed."""
    return np.full(2, np.nan) if rv_prior is None else np.asarray(rv_prior, dtype=float)


def _load_exact_reference(path, theta, rv_prior):
    """The exact-posterior part of an earlier `exact` run (its exact.npz) on the same clusters and R_V prior:
    the grid posteriors do not depend on the cINN, so comparing another model need not recompute them."""
    ref = load_npz(path, required=EXACT_KEYS + ("theta_true",))
    if ref["theta_true"].shape != theta.shape or not np.allclose(ref["theta_true"], theta, rtol=0, atol=1e-12):
        raise ValueError(f"{path}: its theta_true ({ref['theta_true'].shape[0]} clusters) is not that of the "
                         f"first {len(theta)} clusters of --obs; use the same --obs and --n as the run that wrote it")
    had = ref.get("exact_rv_prior", _rv_prior_array(None))
    if not np.array_equal(had, _rv_prior_array(rv_prior), equal_nan=True):
        raise ValueError(f"{path}: its exact posteriors took R_V prior {had} (NaN: R_V = 3.1), this run asks for "
                         f"{_rv_prior_array(rv_prior)}; see --exact-rv")
    return {k: ref[k] for k in EXACT_KEYS}


def cmd_exact(args):
    """Accuracy against the exact grid posterior on simulated test clusters (exact_summary); Fig. 5 examples."""
    obs = load_obs(args.obs, args.n, need_theta=True)
    model = load_model(args.model, args.device)
    logq = np.asarray(model.log_prob(obs["theta"], obs["x"]), dtype=float)
    logq_flow = model.flow_log_prob(obs["theta"], obs["x"]) if model.method == "refined" else logq
    samples, summ = samples_and_summary(args, obs, model)
    rv_prior = obs.get("rv_prior") if args.exact_rv == "auto" else None
    if args.reuse_exact:
        ref, grids, examples = _load_exact_reference(args.reuse_exact, obs["theta"], rv_prior), [], []
    else:
        ref, grids, examples = exact_reference(obs, samples.shape[1], np.random.default_rng(args.seed + 1),
                                               args.bandwidth, args.kernel, args.examples,
                                               Progress(len(obs["x"]), "exact posteriors").update, rv_prior)
    res = exact_summary(ref, logq, logq_flow, samples, summ, obs)
    out = _outdir(args.out)
    save_npz(out / "exact.npz", **ref, logq_cinn=logq, logq_flow=logq_flow, theta_true=obs["theta"],
             map_cinn=summ["modes"][:, 0], modes_cinn=summ["modes"], quantiles_cinn=summ["quantiles"], seed=args.seed,
             exact_rv_prior=_rv_prior_array(rv_prior))
    write_json(out / "exact.json", res)
    if grids:
        plots.plot_exact_examples(out / "exact_examples.png", samples[:len(grids)], grids, obs["theta"][:len(grids)])
    ratio = (summ["quantiles"][:, 2] - summ["quantiles"][:, 0]) / (ref["quantiles_exact"][:, 2] - ref["quantiles_exact"][:, 0])
    plots.plot_exact_summary(out / "exact.png", res["kl_mean_nats"], ref["logp_exact"] - logq, ratio,
                             np.abs(summ["modes"][:, 0, 0] - ref["map_exact"][:, 0]))
    print(format_exact(res) + f"\nwrote {out}/exact.npz, exact.json, exact.png" + (", exact_examples.png" if grids else ""))
    return res


def format_exact(res):
    """exact_summary as text lines."""
    kb = res["kl_by_distance_to_prior_bounds"]
    pct = lambda d: ", ".join(f"{k}: {v:.3f}" for k, v in d.items())
    return "\n".join([
        f"exact: {res['n_clusters']} simulated test clusters ({res['n_exact_failed']} left out: exact posterior "
        f"failed), {res['n_samples']} cINN samples each",
        f"  KL estimate, mean log p_exact - log q at the true theta: {res['kl_mean_nats']:.4f} +- "
        f"{res['kl_se_nats']:.4f} nats (median {res['kl_median_nats']:.4f}; the flow alone: "
        f"{res['kl_flow_mean_nats']:.4f} +- {res['kl_flow_se_nats']:.4f})",
        f"  truth within {NEAR_BOUND[0]} dex of the mass bounds or {NEAR_BOUND[1]} mag of the E(B-V) bounds: "
        f"{kb['near'][0]} clusters, {kb['near'][1]:.3f} +- {kb['near'][2]:.3f} nats ({kb['near_share_of_total']:.0%}"
        f" of the mean); the other {kb['away'][0]}: {kb['away'][1]:.3f} +- {kb['away'][2]:.3f}",
        "  by the truth's height above its mass floor (dex): " + "; ".join(
            f"{lab}: {n_} clusters, {m_:.3f} +- {se_:.3f} ({sh_:.0%})"
            for lab, n_, m_, se_, sh_ in res["kl_by_height_above_mass_floor_dex"]),
        f"  cINN samples outside the noise model's support: {res['share_cinn_samples_below_mass_floor']:.2%}",
        "  16-84 % width ratio cINN/exact, median: " + pct(res["median_width_ratio_cinn_over_exact"]),
        f"  cINN MAP within 0.1 dex in age of the exact MAP: {res['share_map_within_0p1_dex_age']:.1%} (the "
        f"mean-shift MAP of as many exact samples: {res['share_exact_sample_map_within_0p1_dex_age']:.1%})",
        "  truth inside 16-84 %: cINN " + pct(res["truth_in_cinn_16_84"]) + "; exact " + pct(res["truth_in_exact_16_84"])])


def cmd_catalog(args):
    """A catalogue through a trained cINN (catalog_results): OUT.ecsv and OUT.fits (the result table),
    OUT_obs.npz (the observations fed to the cINN), OUT_inliers.ecsv (Table 1) and, unless --no-figures,
    the Fig. 6 / 8 / B.3 figures against the grid MLE and the catalogue and example posteriors. Finished chunks
    are kept in OUT_chunks/ until the end, so an interrupted run resumes; --part K/N does one slice of the
    clusters (merge the parts with `evaluate.py merge`)."""
    stem = catalog_stem(args.out)
    obs, est, reports = catalogs.read_many(args.input, args.format, args.distance, args.columns, args.readme,
                                           args.classes)
    rows = part_rows(len(obs["x"]), args.part, args.chunk) if args.part else slice(0, len(obs["x"]))
    model = args.model if args.workers > 1 else load_model(args.model, args.device)
    stash = Path(f"{stem}_chunks")
    post = catalog_posteriors(model, obs["x"], args.samples, args.seed, obs, rows=rows, chunk=args.chunk,
                              stash=stash, workers=args.workers, device=args.device,
                              progress=Progress(rows.stop - rows.start, "posteriors").update)
    n_total = len(obs["x"])
    obs = {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim and len(v) == len(obs["x"]) else v)
           for k, v in obs.items()}
    est = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in est.items()}
    res = catalog_results(obs, est, post, args.format, with_mle=not args.no_mle)
    res["table"].meta.update({"model": str(args.model), "samples": int(args.samples), "seed": int(args.seed),
                              "inputs": [str(p) for p in args.input], "format": args.format, "run": post["key"],
                              "device": post["device"], "mle": not args.no_mle, "chunk": int(args.chunk),
                              "n_total": n_total, "part": args.part or "1/1", "rows": [rows.start, rows.stop]})
    if args.phangs_names:
        catalogs.add_phangs_names(res["table"])
    written = _write_catalog(stem, res, obs)
    if not args.no_figures:
        written += _catalog_figures(stem, post["examples"], res)
    for f in stash.glob("chunk_*.npz"):          # the outputs are written: the stash is no longer needed
        f.unlink()
    stash.rmdir() if stash.is_dir() else None
    _print_catalog(obs, reports, res, written)
    return res["table"]


def catalog_stem(out):
    """The stem of a catalogue run's files: --out without a .ecsv or .fits suffix (any other dot is kept)."""
    out = str(out)
    return out[:-5] if out.lower().endswith((".ecsv", ".fits")) else out


def _write_catalog(stem, res, obs):
    """The result table (.ecsv, .fits), the observations (_obs.npz) and Table 1 (_inliers*.ecsv); their names."""
    written = [Path(f"{stem}.ecsv"), Path(f"{stem}.fits")]
    for path in written:
        catalogs.write_table_atomic(res["table"], path)
    save_npz(f"{stem}_obs.npz", **{k: v for k, v in obs.items() if k != "field"}, field=obs["field"].astype(str))
    for suffix, table in (("_inliers.ecsv", res["inliers"]), ("_inliers_by_field.ecsv", res["by_field"])):
        if table is not None:
            catalogs.write_table_atomic(table, Path(f"{stem}{suffix}"))
            written.append(f"{stem}{suffix}")
    return written


MERGE_KEYS = ("run", "model", "samples", "seed", "inputs", "format", "device", "mle", "chunk", "n_total")


def merge_parts(tables, names=None):
    """The result tables of the parts K/N of one catalogue run, joined in order.

    Args:
        tables: astropy Tables written by `evaluate.py catalog --part K/N` (.ecsv: their meta says what run and
            rows they hold); names: their file names, for the messages.
    Returns:
        the joined Table; InputError unless they are the N parts of one run (the same stash_key: model,
        inputs, samples, seed, chunk, device; the same format and MLE choice), each once, whose rows follow
        one another from the first cluster to the last, with the same columns.
    """
    names = names or [f"table {i + 1}" for i in range(len(tables))]
    for t, name in zip(tables, names):
        missing = [k for k in MERGE_KEYS + ("part", "rows") if k not in t.meta]
        if missing:
            raise checks.InputError(f"{name}: not a part of a catalogue run (no {missing} in its meta; merge the "
                                    ".ecsv tables that `evaluate.py catalog --part K/N` wrote)")
    first = tables[0].meta
    for t, name in zip(tables, names):
        differ = [k for k in MERGE_KEYS if t.meta[k] != first[k]]
        if differ:
            raise checks.InputError(f"{name} is not a part of the same run as {names[0]} ({', '.join(differ)} differ)")
    order = sorted(range(len(tables)), key=lambda i: int(tables[i].meta["part"].split("/")[0]))
    n = int(first["part"].split("/")[1])
    labels = [tables[i].meta["part"] for i in order]
    if labels != [f"{k}/{n}" for k in range(1, n + 1)]:
        raise checks.InputError(f"parts {labels}: need each of 1/{n} ... {n}/{n} once")
    stops = [0] + [int(tables[i].meta["rows"][1]) for i in order]
    if [int(tables[i].meta["rows"][0]) for i in order] != stops[:-1] or stops[-1] != first["n_total"]:
        raise checks.InputError(f"the parts' rows {[tables[i].meta['rows'] for i in order]} do not cover "
                                f"0 ... {first['n_total']} one after another")
    try:
        merged = vstack([tables[i] for i in order], join_type="exact", metadata_conflicts="silent")
    except TableMergeError as err:                        # the columns differ
        raise checks.InputError(f"the parts have different columns ({str(err).splitlines()[0]})") from None
    merged.meta.update({k: first[k] for k in MERGE_KEYS}, part="1/1", rows=[0, len(merged)])
    return merged


def cmd_merge(args):
    """Join the parts of a catalogue run (--part K/N) into one result table and its Table 1."""
    tables = []
    for path in args.input:
        if not str(path).lower().endswith(".ecsv"):
            raise checks.InputError(f"{path}: merge reads the parts' .ecsv tables (their meta says which rows "
                                    "of which run they hold)")
        try:
            tables.append(Table.read(path, format="ascii.ecsv"))
        except Exception as err:
            raise checks.InputError(f"{path}: cannot read as a result table ({type(err).__name__})") from None
    t = merge_parts(tables, [str(p) for p in args.input])
    stem = catalog_stem(args.out)
    for path in (Path(f"{stem}.ecsv"), Path(f"{stem}.fits")):
        catalogs.write_table_atomic(t, path)
    inl = inliers_from_table(t, t.meta["format"])
    if inl is not None:
        catalogs.write_table_atomic(inl, Path(f"{stem}_inliers.ecsv"))
        print(catalogs.format_inliers(inl))
    print(f"merged {len(tables)} parts, {len(t)} clusters -> {stem}.ecsv, {stem}.fits")
    return t


def inliers_from_table(t, fmt):
    """Table 1 from a result table's own columns (catalog_inliers), or None without references."""
    p = catalogs.RESULT_PARAMS
    summ = {"quantiles": np.stack([_stacked(t, f"{{}}_q{lev}", p) for lev in (16, 50, 84)], 1),
            "modes": np.stack([_stacked(t, f"{{}}_{m}", p) for m in ("map", "mode2", "mode3")], 1)}
    mle = cat = None
    if f"mle_{p[0]}" in t.colnames:
        mle = {"theta": _stacked(t, "mle_{}", p), "lo": _stacked(t, "mle_{}_lo", p), "hi": _stacked(t, "mle_{}_hi", p)}
    cat_params = ("log10_age_myr", "log10_mstar", "ebv")
    if "cat_log10_age_myr" in t.colnames and np.isfinite(_stacked(t, "cat_{}", cat_params)[:, 0]).any():
        cat = tuple(_stacked(t, f"cat_{{}}{s}", cat_params) for s in ("", "_lo", "_hi"))
    return catalog_inliers(summ, mle, cat, fmt) if mle is not None or cat is not None else None


def _stacked(t, pattern, params):
    """The columns pattern.format(q) of t for q in params as one (N, len(params)) array; masked values NaN."""
    return np.stack([np.ma.filled(np.ma.asarray(t[pattern.format(q)], float), np.nan) for q in params], -1)


def _catalog_figures(stem, examples, res):
    """The catalogue run's figures; returns their names."""
    names = []
    if res["res_grid"] is not None:
        plots.plot_compare(f"{stem}_vs_grid_mle", res["res_grid"])
        names.append(f"{stem}_vs_grid_mle_{{map_vs_mle,chi2,width}}.png")
    if res["res_cat"] is not None:
        labels = (plots.PARAM_LABELS[0], plots.MSTAR_LABEL, plots.PARAM_LABELS[2])
        plots.plot_compare(f"{stem}_vs_catalogue", res["res_cat"], labels)
        names.append(f"{stem}_vs_catalogue_{{map_vs_mle,chi2,width}}.png")
    _, samples, summ3 = examples                       # the most multimodal clusters first
    plots.plot_modes(f"{stem}_examples.png", samples, summ3)
    return names + [f"{stem}_examples.png"]


def _print_catalog(obs, reports, res, written):
    if len(reports) > 1:
        print(f"all inputs: {sum(r['rows'] for r in reports)} rows, kept {len(obs['id'])}")
    if res["inliers"] is not None:
        print(catalogs.format_inliers(res["inliers"]))
    t = res["table"]
    print("flagged (kept): " + ", ".join(f"{k} {int(np.count_nonzero(obs['flags'] & b))}"
                                          for k, b in catalogs.FLAG_BITS.items()))
    print(f"median chi2_resim (Eq. 11, nu = 5): cINN MAP {np.nanmedian(res['chi2_map']):.2f}"
          + (f", grid MLE {np.nanmedian(t['chi2_resim_mle']):.2f}" if "chi2_resim_mle" in t.colnames else "")
          + (f", catalogue {np.nanmedian(t['chi2_resim_cat']):.2f}" if "chi2_resim_cat" in t.colnames else ""))
    print(f"wrote {', '.join(str(w) for w in written)} ({len(t)} clusters)")


# ----------------------------------------------------------------------------------------------------------
# Command line: the parser

def _common(p, n_default, samples_default=None, needs_model=True):
    p.add_argument("--model", required=needs_model, default=None, help="cINN checkpoint (model.pt) or run directory")
    p.add_argument("--obs", required=True, help="observation .npz (SPEC.md Sect. 4), e.g. runs/quick/data/test.npz")
    p.add_argument("--n", type=int, default=n_default, help=f"use the first N clusters (default: {n_default or 'all'})")
    if samples_default:
        p.add_argument("--samples", type=int, default=samples_default,
                       help=f"posterior samples per cluster (default {samples_default})")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    p.add_argument("--device", default=None, help="torch device for the cINN (default: cuda if available)")
    p.add_argument("--out", required=True, help="output directory (modes: output .npz)")


def _mode_args(p):
    p.add_argument("--kernel", choices=("gaussian", "flat"), default="gaussian",
                   help="mean-shift kernel (flat = scikit-learn's ball kernel)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="mean-shift bandwidth in standardised units (default: Silverman's rule)")


def _catalog_parser(sub):
    p = sub.add_parser("catalog", help="a trained cINN on a real (or synthetic) cluster catalogue -> result table",
                       description="Read PHANGS, LEGUS or any astropy table, select classes 1-2 with valid photometry "
                                   "in all five bands, and write per cluster the MAP and up to three modes, 16/50/84 "
                                   "%% quantiles (log age, log initial mass, log current stellar mass, E(B-V)), the "
                                   "re-simulation chi^2 (Eq. 11) and training-domain flags (.ecsv and .fits), Table 1 "
                                   "and figures against the grid MLE and the catalogue's own estimates.")
    p.add_argument("--input", nargs="+", required=True, help="catalogue file(s); several are concatenated")
    p.add_argument("--format", choices=("phangs", "legus", "table"), required=True)
    p.add_argument("--distance", default=None, help="Mpc, or a table with columns name, distance_mpc (the galaxy "
                                                    "is taken from each file name)")
    p.add_argument("--columns", default=None, help="for --format table: flux_F275W=COL,err_F275W=COL,... for all "
                                                   "five bands (mJy unless the column has a unit); optional id, ra, "
                                                   "dec, class, distance, age_myr, mass, ebv, *_err")
    p.add_argument("--readme", default=None, help="--format legus: the catalogue's readme, which states its columns "
                                                  "(else --columns FIELD=N, else the layout is detected or refused)")
    p.add_argument("--classes", default="human", choices=sorted(catalogs.PHANGS_CLASSES),
                   help="--format phangs: keep classes 1-2 of the human (default) or the machine classification")
    p.add_argument("--phangs-names", action="store_true", help="also write the results in PHANGS-style columns "
                   "(CINN_AGE, CINN_AGE_LIMLO, ..., CINN_MASS (current), CINN_EBV) beside the project's own")
    p.add_argument("--model", required=True, help="cINN checkpoint or run directory holding model.pt")
    p.add_argument("--out", required=True, help="result table path; .ecsv and .fits are both written")
    p.add_argument("--samples", type=int, default=10000, help="posterior samples per cluster (paper: 1e4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical tables)")
    p.add_argument("--device", default=None, help="torch device for the cINN (default: cuda if available)")
    p.add_argument("--no-mle", action="store_true", help="skip the grid MLE (grid_posterior.mle)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--part", default=None, metavar="K/N", help="only the K-th of N contiguous slices of the selected "
                   "clusters (1-based), e.g. one task of a batch array job; join them with `evaluate.py merge`")
    p.add_argument("--workers", type=int, default=1, help="processes, each sampling a chunk on one CPU thread")
    p.add_argument("--chunk", type=int, default=CATALOG_CHUNK, help="clusters per chunk (memory: about chunk x "
                   "samples x 12 bytes per worker; the same --chunk for every part of a run)")
    p.set_defaults(func=cmd_catalog)
    p = sub.add_parser("merge", help="join the result tables of the parts (--part K/N) of a catalogue run")
    p.add_argument("--input", nargs="+", required=True, help="the parts' .ecsv result tables")
    p.add_argument("--out", required=True, help="the joined result table (.ecsv and .fits)")
    p.set_defaults(func=cmd_merge)


def build_parser():
    """argparse parser with the subcommands."""
    ap = argparse.ArgumentParser(description="Diagnostics of cINN star-cluster posteriors (Walter et al. 2026, "
                                             "Sect. 3) and the catalogue run. Each subcommand prints a summary and "
                                             "writes .npz/.json numbers and PNG figures.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sbc", help="simulation-based calibration: ranks, ECDF bands (Fig. 3)")
    _common(p, None)
    p.add_argument("--L", type=int, default=100, help="posterior samples per test pair (paper: 100)")
    p.add_argument("--alpha", type=float, default=0.02, help="band level: 0.02 = 0.01-0.99 band")
    p.set_defaults(func=cmd_sbc)
    p = sub.add_parser("ppc", help="posterior predictive check (Fig. 4)")
    _common(p, 1000, 500)
    p.set_defaults(func=cmd_ppc)
    p = sub.add_parser("modes", help="mean-shift modes, MAP, 16/50/84 %% quantiles -> posterior .npz")
    _common(p, None, 10000, needs_model=False)
    _mode_args(p)
    p.add_argument("--samples-file", default=None, help="summarise the samples of this .npz instead")
    p.add_argument("--save-samples", action="store_true", help="also store the samples (N x S x 3 float32)")
    p.set_defaults(func=cmd_modes)
    p = sub.add_parser("compare", help="cINN vs MLE: chi^2 (Eq. 11), Table 1 inliers, Figs. 6, 8, B.3")
    _common(p, 1000, 10000, needs_model=False)
    _mode_args(p)
    p.add_argument("--mle", default=None, help=".npz with MLE columns age_myr (or log10_age_myr), log10_mass, ebv "
                                               "and *_lo/*_hi 1-sigma ranges; default: grid_posterior.mle")
    p.add_argument("--summary", default=None, help="modes .npz from `evaluate.py modes` (skips sampling)")
    p.add_argument("--nu", type=int, default=None, help="chi^2 normalisation of Eq. 11 (default: 5 bands)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("exact", help="accuracy against the exact grid posterior; Fig. 5 examples")
    _common(p, 200, 10000)
    _mode_args(p)
    p.add_argument("--examples", type=int, default=4, help="clusters shown in the Fig. 5 style figure")
    p.add_argument("--reuse-exact", metavar="EXACT_NPZ", help="the exact posteriors' summaries from an earlier "
                   "run's exact.npz (same --obs and --n): compares another model in minutes")
    p.add_argument("--exact-rv", choices=("auto", "fixed"), default="auto",
                   help="auto: observations simulated with a variable R_V (their rv_prior) get the exact posterior "
                   "with R_V marginalised; fixed: the R_V = 3.1 posterior whatever the observations")
    p.set_defaults(func=cmd_exact)
    _catalog_parser(sub)
    return ap


def check_args(args):
    """The numbers and the output path of a subcommand, checked before any work (checks.py)."""
    if args.command == "merge":
        checks.output_path(f"{catalog_stem(args.out)}.ecsv")
        return
    checks.seed(args.seed)
    checks.count("--workers", getattr(args, "workers", None))
    checks.count("--chunk", getattr(args, "chunk", None))
    for name in ("n", "samples", "L"):
        checks.count(f"--{name}", getattr(args, name, None))
    checks.count("--examples", getattr(args, "examples", None), minimum=0)
    if args.command == "modes":
        checks.output_path(args.out, (".npz",))
    elif args.command == "catalog":
        checks.output_path(f"{catalog_stem(args.out)}.ecsv")
    else:
        checks.output_dir(args.out)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args.func(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:     # bad input: the message names the file and what is wrong
        raise SystemExit(f"evaluate.py: error: {exc}") from None
