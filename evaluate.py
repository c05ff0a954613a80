"""Diagnostics and figures for cINN posteriors of star clusters (Walter et al. 2026, Sect. 3).

What is here (DESIGN.md Sect. 5):
  * simulation-based calibration, SBC (Talts et al. 2018): six statistics T1..T6, ranks, rank histograms,
    ECDF - uniform CDF with a binomial band (paper Fig. 3)
  * posterior predictive checks, PPC: posterior samples re-simulated through simulate.model_flux and the
    log-normal noise model of DESIGN Sect. 3 (paper Fig. 4)
  * modes by mean-shift (Fukunaga & Hostetler 1975) in NumPy; MAP = densest mode; 16/50/84 % quantiles
  * re-simulation chi^2 (Eq. 11), inlier fractions (Table 1), MAP/closest mode vs MLE (Fig. 6),
    deviation vs posterior width (Fig. B.3), example posteriors beside the exact grid posterior (Fig. 5)
  * accuracy against the exact grid posterior (mean log p_exact - log q_cINN at the true theta)
  * throughput (posterior samples/s, clusters/s)

Conventions: theta = (log10 age/Myr, log10 m0/Msun, E(B-V)) in physical units, arrays (N, S, 3) for samples.
`modes[n, k, p]` is parameter p of the k-th densest mode of cluster n (NaN-padded to 3 modes);
`quantiles[n, q, p]` is the q-th of the 16/50/84 % marginal quantiles of parameter p.

Pure-NumPy functions come first (importable without torch); the CLI at the bottom wires them to
simulate.py, preprocess.py, cinn.py and grid_posterior.py, which are imported lazily.
Run `python evaluate.py --help` for the subcommands.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

STAT_NAMES = ("T1 log t", "T2 log m", "T3 E(B-V)", "T4 log t * log m", "T5 log m * E(B-V)",
              "T6 log t * E(B-V)")
PARAM_NAMES = ("log10_age_myr", "log10_mass", "ebv")
PARAM_LABELS = (r"$\log_{10}(t/\mathrm{Myr})$", r"$\log_{10}(m_0/M_\odot)$", r"$E(B-V)$ [mag]")
BAND_NAMES = ("F275W", "F336W", "F438W", "F555W", "F814W")
QUANTILE_LEVELS = (0.16, 0.50, 0.84)


def log(msg):
    """Progress line on stderr (keeps stdout for the summaries)."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# SBC (Talts et al. 2018), paper Sect. 3 / Fig. 3
# ----------------------------------------------------------------------------------------------------------

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
    from scipy.stats import binom
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


def sbc_summary(ranks, L, alpha=0.02):
    """Per-statistic numbers: max |ECDF - uniform|, inside the simultaneous band, inside the pointwise band."""
    ranks = np.asarray(ranks)
    n = ranks.shape[0]
    z, diff = ecdf_difference(ranks, L)
    _, slo, shi = ecdf_band(n, L, alpha, simultaneous=True)
    _, plo, phi = ecdf_band(n, L, alpha, simultaneous=False)
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


def plot_sbc(ranks, L, path, alpha=0.02, n_bins=None, title=""):
    """Paper Fig. 3: rank histograms (+-1 sigma band of a uniform histogram, grey) on top, ECDF - uniform CDF
    with the simultaneous (shaded) and pointwise (dotted) binomial bands below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = np.asarray(ranks)
    n, K = ranks.shape
    n_bins = n_bins or _default_bins(L, n)
    z, diff = ecdf_difference(ranks, L)
    _, slo, shi = ecdf_band(n, L, alpha, simultaneous=True)
    _, plo, phi = ecdf_band(n, L, alpha, simultaneous=False)
    edges, mean, sig = rank_histogram_band(n, L, n_bins)
    fig, axes = plt.subplots(2, K, figsize=(2.6 * K, 5.2), sharex="row")
    w = np.diff(edges)                        # rank values per bin: plot clusters per rank value
    for k in range(K):
        ax = axes[0, k]
        ax.stairs(np.histogram(ranks[:, k], bins=edges)[0] / w, edges, fill=True, color="C0", alpha=0.8)
        ax.stairs((mean + sig) / w, edges, baseline=(mean - sig) / w, fill=True, color="0.6", alpha=0.5, lw=0)
        ax.stairs(mean / w, edges, color="k", lw=0.8)
        ax.set_title(STAT_NAMES[k] if K == 6 else f"stat {k}", fontsize=9)
        ax.set_xlabel(f"rank (0..{L})")
        ax = axes[1, k]
        ax.fill_between(z, slo, shi, color="C1", alpha=0.25, lw=0, label=f"simultaneous {1-alpha:.0%}")
        ax.plot(z, plo, "k:", lw=0.8, label=f"pointwise {alpha/2:.2f}-{1-alpha/2:.2f}")
        ax.plot(z, phi, "k:", lw=0.8)
        ax.plot(z, diff[k], color="C0", lw=1.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("fractional rank")
    axes[0, 0].set_ylabel("test clusters per rank value")
    axes[1, 0].set_ylabel("ECDF - uniform CDF")
    axes[1, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title or f"SBC, {n} test clusters, L = {L}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _default_bins(L, n):
    """Number of rank-histogram bins: one per rank value when that gives >= 20 clusters per bin, else fewer."""
    return int(max(5, min(L + 1, n // 20)))


# ----------------------------------------------------------------------------------------------------------
# Modes: mean-shift (Fukunaga & Hostetler 1975) and quantiles
# ----------------------------------------------------------------------------------------------------------

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

    # binned seeding: centroids of the most populated cells of size h
    cells = np.floor(zs / h).astype(np.int64)
    cells -= cells.min(axis=0)
    key = np.ravel_multi_index(cells.T, cells.max(axis=0) + 1)      # one integer per cell (fast unique)
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), d))
    np.add.at(sums, inverse, zs)
    order = np.argsort(-counts, kind="stable")[:max_seeds]
    seeds = sums[order] / counts[order, None]

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


def summarize(samples, bandwidth=None, max_modes=3, kernel="gaussian", progress=True):
    """Per-cluster posterior summary of samples (N, S, 3).

    Returns dict(modes (N, max_modes, 3) NaN-padded, densest first (modes[:, 0] = MAP),
    mode_density (N, max_modes) relative kernel density (NaN-padded), n_modes (N,),
    quantiles (N, 3, 3): quantiles[n, q, p] = (16, 50, 84) % quantile q of parameter p).
    """
    samples = np.asarray(samples)
    if samples.ndim != 3:
        raise ValueError(f"summarize needs samples (N, S, 3); got {samples.shape}")
    N, _, d = samples.shape
    modes = np.full((N, max_modes, d), np.nan)
    dens = np.full((N, max_modes), np.nan)
    t0 = time.time()
    for i in range(N):
        m, w = mean_shift(samples[i], bandwidth, max_modes, kernel, return_density=True)
        modes[i, :len(m)] = m
        dens[i, :len(m)] = w / w[0]
        if progress and (i + 1) % 500 == 0:
            log(f"  modes: {i + 1}/{N} clusters, {time.time() - t0:.1f} s")
    quantiles = np.quantile(samples, QUANTILE_LEVELS, axis=1).transpose(1, 0, 2)
    return {"modes": modes, "mode_density": dens, "n_modes": np.isfinite(modes[:, :, 0]).sum(1),
            "quantiles": quantiles}


def densest_sample(samples, flux_mjy, rel_err, distance_mpc):
    """Per cluster, the posterior sample where the exact unnormalised posterior density is highest: (N, 3) as
    (log10 k, log10 m0, E(B-V)), k = round(t') its age bin, the coordinates of the grid MAP.

    The likelihood of this model is tractable (grid_posterior.log_map_density, the function the grid MAP
    maximises: five table look-ups per sample, ~2 ms per cluster for 1e4 samples), so the network proposes and
    the exact density ranks. Not DESIGN's MAP (the densest mean-shift mode, a property of the samples alone):
    a point estimate that needs the forward model and the noise model, reported beside it. samples (N, S, 3);
    flux_mjy, rel_err (N, 5); distance_mpc (N,). NaN for a cluster none of whose samples the noise model allows."""
    import grid_posterior
    out = np.empty((len(samples), 3))
    for i in range(len(samples)):
        v, k = grid_posterior.log_map_density(samples[i], flux_mjy[i], rel_err[i], distance_mpc[i])
        j = int(np.argmax(v))
        out[i] = (np.log10(k[j]), samples[i, j, 1], samples[i, j, 2]) if np.isfinite(v[j]) else np.nan
    return out


def map_density_gap(points, map_exact, flux_mjy, rel_err, distance_mpc):
    """Per cluster, how much less dense the exact posterior is at a point estimate than at the exact MAP:
    log p(map_exact | x) - log p(point | x) in nats (grid_posterior.log_map_density, both at the centre of
    their 1 Myr age bin; ~0 or slightly negative on the exact posterior's flat top, large in another mode or
    off the support). It tells the two ways of missing the exact MAP's age apart: a posterior whose top is
    flat over more than 0.1 dex in age has no well-defined MAP age (a small gap), a wrong mode has a large
    one. points, map_exact (N, 3); flux_mjy, rel_err (N, 5); distance_mpc (N,). NaN where either is."""
    import grid_posterior
    out = np.full(len(points), np.nan)
    for i in range(len(points)):
        if np.all(np.isfinite(points[i])) and np.all(np.isfinite(map_exact[i])):
            v, _ = grid_posterior.log_map_density(np.stack([map_exact[i], points[i]]), flux_mjy[i], rel_err[i],
                                                  distance_mpc[i])
            out[i] = v[0] - v[1]
    return out


def closest_mode(modes, reference, scale=None):
    """The mode (N, 3) of modes (N, K, 3) closest to reference (N, 3); distances per parameter are divided
    by `scale` (3,) (default: the widths of preprocess.THETA_BOUNDS-like prior ranges: 4.14 dex, 6 dex, 1.5 mag)."""
    modes = np.asarray(modes, dtype=float)
    ref = np.asarray(reference, dtype=float)
    scale = np.array([np.log10(13750.5 / 0.5), 6.0, 1.5]) if scale is None else np.asarray(scale)
    d2 = np.sum(((modes - ref[:, None, :]) / scale) ** 2, axis=2)
    d2 = np.where(np.isfinite(d2), d2, np.inf)
    idx = np.argmin(d2, axis=1)
    return modes[np.arange(len(modes)), idx]


# ----------------------------------------------------------------------------------------------------------
# Re-simulation, PPC, chi^2 (Eq. 11), inliers (Table 1)
# ----------------------------------------------------------------------------------------------------------

def theta_to_age_myr(log_age):
    """Integer model-grid age in Myr (1..13750) of a (jittered) log10 age label: round(10**log_age)."""
    return np.clip(np.rint(10.0 ** np.asarray(log_age, dtype=float)), 1, 13750).astype(np.int64)


def resimulate(theta, distance_mpc):
    """Noise-free model photometry (..., 5) in mJy of theta (..., 3) at distance_mpc (broadcast to theta[..., 0]).

    Uses simulate.model_flux with the integer grid age round(10**log t) (DESIGN Sect. 2).
    """
    import simulate
    theta = np.asarray(theta, dtype=float)
    dist = np.broadcast_to(np.asarray(distance_mpc, dtype=float), theta.shape[:-1])
    ebv = np.clip(theta[..., 2], 0.0, 1.5)
    return simulate.model_flux(theta_to_age_myr(theta[..., 0]), ebv, theta[..., 1], dist)


def lognormal_noise(flux_true, sigma, rng):
    """DESIGN Sect. 3 noise model with a given absolute sigma: f* ~ LogNormal with mean f and sd sigma,
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
    the mean predictive photometry (nu = 5).
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


def mean_and_se(values):
    """Mean and standard error of the finite entries of a 1-d array."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def kl_estimate(logp_exact, logq):
    """Mean of log p_exact(theta_true|x) - log q_cINN(theta_true|x) over clusters (nats) and its standard
    error: a Monte-Carlo estimate of the expected KL divergence E_x KL(p || q) (>= 0, 0 is perfect)."""
    return mean_and_se(np.asarray(logp_exact, float) - np.asarray(logq, float))


NEAR_BOUND = (0.2, 0.05)     # kl_near_prior_bounds: dex of log mass from 2 or 8, mag of E(B-V) from 0 or 1.5


def kl_near_prior_bounds(logp_exact, logq, theta_true):
    """The KL estimate split by where the truth lies: within NEAR_BOUND of a hard prior bound in mass
    ([2, 8] dex) or E(B-V) ([0, 1.5] mag), where the exact posterior keeps a finite density at the bound that
    the flow must approach through the Phi^-1 map's Gaussian tail, or away from them. Returns
    {"near": (n, mean, se), "away": (n, mean, se), "near_share_of_total": the near clusters' part of the mean}."""
    import preprocess
    d = np.asarray(logp_exact, float) - np.asarray(logq, float)
    (m0, m1), (e0, e1) = preprocess.THETA_BOUNDS[1], preprocess.THETA_BOUNDS[2]
    m, e = theta_true[:, 1], theta_true[:, 2]
    near = (m < m0 + NEAR_BOUND[0]) | (m > m1 - NEAR_BOUND[0]) | (e < e0 + NEAR_BOUND[1]) | (e > e1 - NEAR_BOUND[1])
    (n_near, *near_stats, share), (n_away, *away_stats, _) = _kl_part(d, near), _kl_part(d, ~near)
    return {"near": (n_near, *near_stats), "away": (n_away, *away_stats), "near_share_of_total": share}


def _kl_part(d, sel):
    """(count, mean, se, share of the overall sum) of the finite per-cluster differences d inside the mask sel."""
    ok = np.isfinite(d)
    share = float(np.sum(d[sel & ok]) / np.sum(d[ok])) if ok.any() else float("nan")
    return (int(np.sum(sel & ok)),) + mean_and_se(d[sel & ok]) + (share,)


FLOOR_HEIGHT_EDGES = (0.01, 0.03, 0.1)    # kl_by_floor_height: dex of the true log mass above its mass floor


def kl_by_floor_height(logp_exact, logq, theta_true, x):
    """The KL estimate split by the truth's height h above the noise model's mass floor at its (t', E(B-V))
    (preprocess.log_mass_floor's edge, unclipped: the exact posterior keeps a finite, often its largest,
    density there): bins h < 0.01, 0.01-0.03, 0.03-0.1 and >= 0.1 dex (FLOOR_HEIGHT_EDGES). Returns a list of
    (label, n, mean, se, share of the overall mean) per bin."""
    import preprocess
    d = np.asarray(logp_exact, float) - np.asarray(logq, float)
    h = theta_true[:, 1] - preprocess._raw_mass_floor(theta_true[:, 0], theta_true[:, 2], x)
    edges = (-np.inf,) + tuple(FLOOR_HEIGHT_EDGES) + (np.inf,)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        label = f"< {hi:g}" if lo == -np.inf else (f">= {lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}")
        out.append((label,) + _kl_part(d, (h >= lo) & (h < hi)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ppc(flux_obs, out, path, n_examples=3):
    """Paper Fig. 4: mean predictive vs observed flux per band, example SEDs with predictive 16-84 %, and the
    histogram of the observation's rank among the predictive draws."""
    plt = _plt()
    nb = flux_obs.shape[1]
    fig, axes = plt.subplots(2, nb, figsize=(3.0 * nb, 6.0))
    for b in range(nb):
        ax = axes[0, b]
        lo, mp = np.log10(flux_obs[:, b]), np.log10(out["pred_mean"][:, b])
        ax.plot(lo, mp, ".", ms=2, alpha=0.5)
        lim = [np.nanmin([lo.min(), mp.min()]), np.nanmax([lo.max(), mp.max()])]
        ax.plot(lim, lim, "k-", lw=0.7)
        ax.set_title(BAND_NAMES[b], fontsize=10)
        ax.set_xlabel(r"observed $\log_{10}(f/\mathrm{mJy})$")
    axes[0, 0].set_ylabel(r"mean predictive $\log_{10}(f/\mathrm{mJy})$")
    wav = np.array([275, 336, 438, 555, 814])[:nb]
    for j in range(min(n_examples, nb - 1, len(flux_obs))):
        ax = axes[1, j]
        q = out["pred_q"][j]
        ax.fill_between(wav, q[0], q[2], color="C0", alpha=0.3, label="predictive 16-84 %")
        ax.plot(wav, out["pred_mean"][j], "C0-", label="mean predictive")
        ax.errorbar(wav, flux_obs[j], yerr=out["sigma"][j], fmt="ko", ms=3, label="observed")
        ax.set_yscale("log")
        ax.set_xlabel("band pivot ~ wavelength [nm]")
        ax.set_title(f"cluster {j}", fontsize=9)
    axes[1, 0].set_ylabel("flux [mJy]")
    axes[1, 0].legend(fontsize=7)
    for ax in axes[1, min(n_examples, nb - 1, len(flux_obs)):-1]:
        ax.axis("off")
    ax = axes[1, -1]
    S = out["n_samples"]
    for b in range(nb):
        ax.hist(out["rank"][:, b] / S, bins=10, range=(0, 1), histtype="step", label=BAND_NAMES[b])
    ax.set_xlabel("rank of observation / S")
    ax.set_ylabel("number of clusters")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_modes(samples, summary, path, n_examples=3):
    """Example posteriors: 2-d sample histograms (age-mass, age-E(B-V)) with the mean-shift modes (MAP = star)
    and marginal histograms with the 16/50/84 % quantiles."""
    plt = _plt()
    n = min(n_examples, len(samples))
    fig, axes = plt.subplots(n, 5, figsize=(16, 3.0 * n), squeeze=False)
    for i in range(n):
        s, m, q = samples[i], summary["modes"][i], summary["quantiles"][i]
        for j, (a, b) in enumerate([(0, 1), (0, 2)]):
            ax = axes[i, j]
            ax.hist2d(s[:, a], s[:, b], bins=60, cmap="Greys")
            ax.plot(m[1:, a], m[1:, b], "o", mfc="none", mec="C1", ms=8, label="other modes")
            ax.plot(m[0, a], m[0, b], "*", color="C3", ms=12, label="MAP")
            ax.set_xlabel(PARAM_LABELS[a])
            ax.set_ylabel(PARAM_LABELS[b])
        axes[i, 0].set_title(f"cluster {i}", fontsize=9)
        for p in range(3):
            ax = axes[i, 2 + p]
            ax.hist(s[:, p], bins=60, color="0.5", density=True)
            for v in q[:, p]:
                ax.axvline(v, color="C0", ls="--", lw=0.8, label="16/50/84 %" if v == q[0, p] else None)
            ax.axvline(m[0, p], color="C3", lw=1.2, label="MAP")
            ax.set_xlabel(PARAM_LABELS[p])
            ax.set_ylabel("posterior density")
    axes[0, 0].legend(fontsize=7)
    axes[0, 2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(res, path_prefix):
    """Paper Fig. 6 (MAP vs MLE, closest mode vs MLE), Fig. 8 (chi^2 of MAP and MLE) and Fig. B.3
    (|MAP - MLE| against the cINN 16-84 % width). Writes <prefix>_map_vs_mle.png, _chi2.png, _width.png."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for row, (key, name) in enumerate([("map", "cINN MAP"), ("closest", "closest cINN mode")]):
        for p in range(3):
            ax = axes[row, p]
            x, y = res["mle"][:, p], res[key][:, p]
            ax.plot(x, y, ".", ms=3, alpha=0.5)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                lim = [min(x[ok].min(), y[ok].min()), max(x[ok].max(), y[ok].max())]
                ax.plot(lim, lim, "k-", lw=0.7)
            ax.set_xlabel("MLE " + PARAM_LABELS[p])
            ax.set_ylabel(name + " " + PARAM_LABELS[p])
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_map_vs_mle.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    both = np.concatenate([res["chi2_map"], res["chi2_mle"]])
    both = both[np.isfinite(both) & (both > 0)]
    bins = np.logspace(np.log10(max(both.min(), 1e-4)), np.log10(both.max()), 40) if both.size else 10
    ax.hist(res["chi2_map"], bins=bins, histtype="step", lw=1.5, label="cINN MAP")
    ax.hist(res["chi2_mle"], bins=bins, histtype="step", lw=1.5, label="MLE")
    ax.set_xscale("log")
    ax.set_xlabel(r"re-simulation $\chi^2$ (Eq. 11, $\nu$ = %d bands)" % res["nu"])
    ax.set_ylabel("number of clusters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_chi2.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    width = res["quantiles"][:, 2] - res["quantiles"][:, 0]
    for p in range(3):
        ax = axes[p]
        ax.plot(width[:, p], np.abs(res["map"][:, p] - res["mle"][:, p]), ".", ms=3, alpha=0.5)
        w = np.linspace(0, np.nanmax(width[:, p]) if np.isfinite(width[:, p]).any() else 1, 10)
        ax.plot(w, w / 2, "k--", lw=0.8, label="half 16-84 % width")
        ax.set_xlabel("cINN 16-84 % width of " + PARAM_LABELS[p])
        ax.set_ylabel("|MAP - MLE| of " + PARAM_LABELS[p])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{path_prefix}_width.png", dpi=110)
    plt.close(fig)


def plot_exact_examples(samples, grids, path, truth=None):
    """Paper Fig. 5: marginal posteriors of the cINN (histograms of its samples) beside the exact grid
    posterior (curves). grids: list of dicts with, per parameter p, 'x{p}' (grid centres) and 'p{p}' (density)."""
    plt = _plt()
    n = len(grids)
    fig, axes = plt.subplots(n, 3, figsize=(11, 2.8 * n), squeeze=False)
    for i in range(n):
        for p in range(3):
            ax = axes[i, p]
            ax.hist(samples[i][:, p], bins=60, density=True, color="C0", alpha=0.5, label="cINN")
            ax.plot(grids[i][f"x{p}"], grids[i][f"p{p}"], "k-", lw=1.2, label="exact grid")
            if truth is not None:
                ax.axvline(truth[i][p], color="C3", ls="--", lw=1, label="true")
            ax.set_xlabel(PARAM_LABELS[p])
        axes[i, 0].set_ylabel(f"cluster {i}\nposterior density")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# CLI: data loading and sampling helpers
# ----------------------------------------------------------------------------------------------------------

OBS_KEYS = ("x", "flux_mjy", "rel_err", "distance_mpc")


def load_obs(path, n=None, need_theta=False):
    """Observation file (DESIGN Sect. 4) -> dict, first n rows; clear error on missing keys / unknown theta."""
    import simulate
    obs = simulate.load_npz(path, required=OBS_KEYS + (("theta",) if need_theta else ()))
    N = len(obs["x"])
    n = N if n is None else min(int(n), N)
    out = {k: (v[:n] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == N else v)
           for k, v in obs.items()}
    if need_theta and not np.all(np.isfinite(out["theta"])):
        bad = np.flatnonzero(~np.all(np.isfinite(out["theta"]), axis=1))
        raise ValueError(f"{path}: true theta is NaN in rows {bad[:10].tolist()}; this diagnostic needs "
                         "simulated test clusters with known parameters")
    return out


def load_model(path, device=None):
    """The trained cINN (cinn.load); torch limited to one thread unless OMP_NUM_THREADS says otherwise."""
    import os
    import torch
    import cinn
    if path is None:
        raise ValueError("this subcommand needs --model (a cINN checkpoint or run directory)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return cinn.load(path, device=device)


def draw_samples(model, x, n_samples, seed, chunk=256, label="samples"):
    """Posterior samples (N, n_samples, 3) from model.sample in chunks of clusters (progress lines);
    chunk seeds come from np.random.default_rng(seed), so the same seed and chunk give identical samples."""
    x = np.asarray(x)
    seeds = np.random.default_rng(seed).integers(0, 2 ** 62, size=max(1, -(-len(x) // chunk)))
    out = np.empty((len(x), n_samples, 3), dtype=np.float32)
    t0 = time.time()
    for k, i in enumerate(range(0, len(x), chunk)):
        out[i:i + chunk] = model.sample(x[i:i + chunk], n_samples, seed=int(seeds[k]))
        if (k + 1) % 10 == 0 or i + chunk >= len(x):
            log(f"  {label}: {min(i + chunk, len(x))}/{len(x)} clusters, {time.time() - t0:.1f} s")
    return out


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    raise TypeError(type(o))


def _outdir(path):
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ----------------------------------------------------------------------------------------------------------
# CLI subcommands
# ----------------------------------------------------------------------------------------------------------

def cmd_sbc(args):
    """SBC on held-out simulations: ranks of the truth among L posterior samples for T1..T6 (Fig. 3)."""
    import simulate
    obs = load_obs(args.obs, args.n, need_theta=True)
    model = load_model(args.model, args.device)
    samples = draw_samples(model, obs["x"], args.L, args.seed, label="SBC samples")
    ranks = sbc_ranks(samples, obs["theta"], rng=np.random.default_rng(args.seed + 1))
    summ = sbc_summary(ranks, args.L, args.alpha)
    z, diff = ecdf_difference(ranks, args.L)
    _, slo, shi = ecdf_band(len(ranks), args.L, args.alpha, simultaneous=True)
    _, plo, phi = ecdf_band(len(ranks), args.L, args.alpha, simultaneous=False)
    out = _outdir(args.out)
    simulate.save_npz(out / "sbc.npz", ranks=ranks, L=args.L, z=z, ecdf_diff=diff, band_simultaneous_lo=slo,
                      band_simultaneous_hi=shi, band_pointwise_lo=plo, band_pointwise_hi=phi,
                      stat_names=np.array(STAT_NAMES), seed=args.seed)
    _write_json(out / "sbc.json", summ)
    plot_sbc(ranks, args.L, out / "sbc.png", args.alpha)
    print(f"SBC: {summ['n_pairs']} test clusters, L = {args.L}, band: simultaneous {1 - args.alpha:.0%} "
          f"(pointwise {args.alpha / 2:.2f}-{1 - args.alpha / 2:.2f} binomial band also given)")
    print(f"{'statistic':22s} {'max|ECDF-U|':>11s} {'inside sim.':>11s} {'inside pw.':>10s}")
    for s in summ["statistics"]:
        print(f"{s['name']:22s} {s['max_abs_ecdf_diff']:11.4f} {str(s['inside_simultaneous_band']):>11s} "
              f"{str(s['inside_pointwise_band']):>10s}")
    print(f"simultaneous band half-width ~ {summ['statistics'][0]['simultaneous_band_halfwidth_max']:.4f}; "
          f"all inside: {summ['all_inside_simultaneous']}; wrote {out}/sbc.npz, sbc.json, sbc.png")
    return summ


def cmd_ppc(args):
    """Posterior predictive check (Fig. 4)."""
    import simulate
    obs = load_obs(args.obs, args.n)
    model = load_model(args.model, args.device)
    samples = draw_samples(model, obs["x"], args.samples, args.seed, label="PPC samples")
    rng = np.random.default_rng(args.seed + 1)
    res = {k: [] for k in ("pred_mean", "pred_q", "rank", "chi2_mean", "sigma")}
    for i in range(0, len(samples), 100):            # (100, S, 5) re-simulated fluxes at a time
        r = ppc(samples[i:i + 100], obs["flux_mjy"][i:i + 100], obs["rel_err"][i:i + 100],
                obs["distance_mpc"][i:i + 100], rng)
        for k in res:
            res[k].append(r[k])
    res = {k: np.concatenate(v) for k, v in res.items()}
    res["n_samples"] = args.samples
    S = args.samples
    frac = res["rank"] / S
    dlog = np.log10(res["pred_mean"] / obs["flux_mjy"])
    summ = {"n_clusters": len(samples), "n_samples": S, "bands": list(BAND_NAMES),
            "median_log10_pred_over_obs": np.median(dlog, axis=0),
            "mad_log10_pred_over_obs": np.median(np.abs(dlog - np.median(dlog, 0)), axis=0),
            "share_obs_in_central_68": np.mean((frac >= 0.16) & (frac <= 0.84), axis=0),
            "share_obs_in_central_95": np.mean((frac >= 0.025) & (frac <= 0.975), axis=0),
            "median_chi2_mean_prediction": float(np.median(res["chi2_mean"]))}
    out = _outdir(args.out)
    simulate.save_npz(out / "ppc.npz", flux_obs_mjy=obs["flux_mjy"], rel_err=obs["rel_err"],
                      pred_mean_mjy=res["pred_mean"], pred_q_mjy=res["pred_q"], rank=res["rank"],
                      chi2_mean=res["chi2_mean"], n_samples=S, bands=np.array(BAND_NAMES), seed=args.seed)
    _write_json(out / "ppc.json", summ)
    plot_ppc(obs["flux_mjy"], res, out / "ppc.png")
    print(f"PPC: {len(samples)} clusters, {S} posterior samples each, re-simulated with the log-normal noise "
          "model at the observed sigma")
    print(f"{'band':6s} {'med log10(pred/obs)':>20s} {'MAD':>7s} {'obs in 68%':>10s} {'obs in 95%':>10s}")
    for b in range(len(BAND_NAMES)):
        print(f"{BAND_NAMES[b]:6s} {summ['median_log10_pred_over_obs'][b]:20.4f} "
              f"{summ['mad_log10_pred_over_obs'][b]:7.4f} {summ['share_obs_in_central_68'][b]:10.3f} "
              f"{summ['share_obs_in_central_95'][b]:10.3f}")
    print(f"median chi^2 (Eq. 11, nu = 5) of the mean prediction: {summ['median_chi2_mean_prediction']:.3f}; "
          f"wrote {out}/ppc.npz, ppc.json, ppc.png")
    return summ


def _summary_or_run(args, obs, model):
    """Posterior samples and summary (modes + quantiles) for obs, with timing."""
    samples = draw_samples(model, obs["x"], args.samples, args.seed, label="posterior samples")
    t0 = time.time()
    summ = summarize(samples, args.bandwidth, 3, args.kernel)
    log(f"  modes + quantiles: {time.time() - t0:.1f} s for {len(samples)} clusters")
    return samples, summ


def cmd_modes(args):
    """Posterior samples -> modes (mean-shift), MAP, 16/50/84 % quantiles, the densest sample (densest_sample);
    the posterior-samples .npz."""
    import simulate
    obs = load_obs(args.obs, args.n)
    if args.samples_file:
        samples = simulate.load_npz(args.samples_file, required=("samples",))["samples"][:len(obs["x"])]
        t0 = time.time()
        summ = summarize(samples, args.bandwidth, 3, args.kernel)
        log(f"  modes + quantiles: {time.time() - t0:.1f} s")
    else:
        samples, summ = _summary_or_run(args, obs, load_model(args.model, args.device))
    arrays = dict(modes=summ["modes"], mode_density=summ["mode_density"], n_modes=summ["n_modes"],
                  quantiles=summ["quantiles"], quantile_levels=np.array(QUANTILE_LEVELS),
                  param_names=np.array(PARAM_NAMES), kernel=args.kernel, seed=args.seed,
                  densest=densest_sample(samples, obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"]))
    if "id" in obs:
        arrays["id"] = obs["id"]
    if args.save_samples:
        arrays["samples"] = samples
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    simulate.save_npz(out, **arrays)
    png = out.with_suffix(".png")
    plot_modes(samples, summ, png)
    nm = np.bincount(summ["n_modes"], minlength=4)[1:]
    print(f"modes: {len(samples)} clusters, {samples.shape[1]} samples each, kernel {args.kernel}, bandwidth "
          f"{'Silverman rule' if args.bandwidth is None else args.bandwidth} (standardised units)")
    print(f"clusters with 1 / 2 / 3 modes: {nm[0]} / {nm[1]} / {nm[2]}")
    if "theta" in obs and np.all(np.isfinite(obs["theta"])):
        err = summ["modes"][:, 0] - obs["theta"]
        cover = np.mean((obs["theta"] >= summ["quantiles"][:, 0]) & (obs["theta"] <= summ["quantiles"][:, 2]), 0)
        for p in range(3):
            print(f"  {PARAM_NAMES[p]:14s} median |MAP - true| {np.median(np.abs(err[:, p])):.4f}, "
                  f"truth in 16-84 %: {cover[p]:.3f} (0.68 expected)")
    print(f"wrote {out}, {png}")
    return summ


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


def cmd_compare(args):
    """cINN vs maximum-likelihood fits: chi^2 (Eq. 11, Fig. 8), Table 1 inliers, Fig. 6, Fig. B.3."""
    import simulate
    obs = load_obs(args.obs, args.n)
    if args.mle:
        mle = simulate.load_npz(args.mle)
        mle = {k: v[:len(obs["x"])] if isinstance(v, np.ndarray) and v.ndim else v for k, v in mle.items()}
        src = args.mle
    else:
        import grid_posterior
        log("  MLE fits with grid_posterior.mle ...")
        mle = grid_posterior.mle(obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"])
        src = "grid_posterior.mle"
    th, lo, hi = mle_theta(mle)
    if len(th) != len(obs["x"]):
        raise ValueError(f"{src}: {len(th)} MLE rows but {len(obs['x'])} clusters in {args.obs}")
    if args.summary:
        s = simulate.load_npz(args.summary, required=("modes", "quantiles"))
        summ = {"modes": s["modes"][:len(th)], "quantiles": s["quantiles"][:len(th)]}
    else:
        _, summ = _summary_or_run(args, obs, load_model(args.model, args.device))
    res = compare_with_mle(summ, th, lo, hi, obs, args.nu)
    out = _outdir(args.out)
    simulate.save_npz(out / "compare.npz", **{k: np.asarray(v) for k, v in res.items()}, seed=args.seed)
    summary = {"n_clusters": len(th), "mle_source": src, "nu": res["nu"],
               "median_chi2_map": float(np.nanmedian(res["chi2_map"])),
               "median_chi2_mle": float(np.nanmedian(res["chi2_mle"])),
               "share_chi2_map_below_mle": float(np.nanmean(res["chi2_map"] <= res["chi2_mle"])),
               "mle_in_cinn_16_84": dict(zip(PARAM_NAMES, res["mle_in_cinn"])),
               "map_in_mle_1sigma": dict(zip(PARAM_NAMES, res["map_in_mle"])),
               "median_abs_map_minus_mle": dict(zip(PARAM_NAMES, np.nanmedian(np.abs(res["map"] - th), 0))),
               "median_abs_closest_minus_mle": dict(zip(PARAM_NAMES,
                                                        np.nanmedian(np.abs(res["closest"] - th), 0)))}
    _write_json(out / "compare.json", summary)
    plot_compare(res, str(out / "compare"))
    print(f"compare: {len(th)} clusters, MLE from {src}; chi^2 of Eq. 11 with nu = {res['nu']}")
    print(f"median chi^2: MAP {summary['median_chi2_map']:.3f}, MLE {summary['median_chi2_mle']:.3f}; "
          f"MAP chi^2 <= MLE chi^2 for {summary['share_chi2_map_below_mle']:.1%}")
    print(f"{'parameter':14s} {'MLE in cINN 16-84%':>19s} {'MAP in MLE 1sig':>16s} {'med|MAP-MLE|':>13s} "
          f"{'med|closest-MLE|':>17s}")
    for p, name in enumerate(PARAM_NAMES):
        print(f"{name:14s} {res['mle_in_cinn'][p]:19.1%} {res['map_in_mle'][p]:16.1%} "
              f"{summary['median_abs_map_minus_mle'][name]:13.4f} "
              f"{summary['median_abs_closest_minus_mle'][name]:17.4f}")
    print(f"wrote {out}/compare.npz, compare.json, compare_map_vs_mle.png, compare_chi2.png, compare_width.png")
    return summary


def cmd_throughput(args):
    """Posterior samples per second and clusters per second (samples + modes + quantiles)."""
    import simulate
    obs = load_obs(args.obs, args.n)
    model = load_model(args.model, args.device)
    x = obs["x"]
    model.sample(x[:2], 100, seed=0)                                      # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    samples = model.sample(x, args.samples, seed=args.seed)
    t_sample, c_sample = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    summarize(samples, None, 3, args.kernel, progress=False)
    t_summ, c_summ = time.perf_counter() - t0, time.process_time() - c0
    n = len(x)
    res = {"device": str(getattr(model, "device", "cpu")), "n_clusters": n, "samples_per_cluster": args.samples,
           "threads": int(__import__("torch").get_num_threads()),
           "sampling_s": t_sample, "modes_quantiles_s": t_summ,
           "sampling_cpu_s": c_sample, "modes_quantiles_cpu_s": c_summ,
           "projected_cpu_s_for_2439_clusters": 2439 * (c_sample + c_summ) / n,
           "posterior_samples_per_s": n * args.samples / t_sample,
           "clusters_per_s": n / (t_sample + t_summ),
           "modes_s_per_cluster": t_summ / n,
           "projected_s_for_2439_clusters": 2439 * (t_sample + t_summ) / n}
    out = _outdir(args.out)
    simulate.save_npz(out / "throughput.npz", **{k: np.asarray(v) for k, v in res.items()})
    _write_json(out / "throughput.json", res)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.barh(["sampling", "modes + quantiles"], [t_sample / n * 1e3, t_summ / n * 1e3], color=["C0", "C1"])
    ax.set_xlabel(f"time per cluster [ms] ({args.samples} samples, {res['device']}, {res['threads']} thread(s))")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    print(f"throughput on {res['device']} ({res['threads']} thread(s)), {n} clusters x {args.samples} samples:")
    print(f"  posterior samples/s: {res['posterior_samples_per_s']:.3g}")
    print(f"  modes + quantiles:   {res['modes_s_per_cluster'] * 1e3:.1f} ms per cluster")
    print(f"  clusters/s (samples + modes + quantiles): {res['clusters_per_s']:.2f}; "
          f"2,439 clusters would take {res['projected_s_for_2439_clusters']:.0f} s wall "
          f"({res['projected_cpu_s_for_2439_clusters']:.0f} CPU-s; wall > CPU means a busy machine)")
    return res


def exact_reference(obs, cinn_samples, args):
    """Per cluster of obs: the exact grid posterior's log density at the true theta, MAP, 16/50/84 %
    quantiles, and the mean-shift MAP of as many exact samples as the cINN has; plus the marginals of the
    first args.examples clusters for the Fig. 5 figure. Clusters whose exact posterior exceeds the memory cap
    get NaN (reported as a count, never silently). One cluster at a time: a grid posterior holds ~1e5-1e7
    cells, so only summaries are kept."""
    import grid_posterior
    n, theta = len(obs["x"]), obs["theta"]
    rng = np.random.default_rng(args.seed + 1)
    ref = dict(logp_exact=np.full(n, np.nan), map_exact=np.full((n, 3), np.nan),
               quantiles_exact=np.full((n, 3, 3), np.nan), map_exact_meanshift=np.full((n, 3), np.nan),
               map_exact_meanshift_2=np.full((n, 3), np.nan))
    grids, k_ex, t0 = [], min(args.examples, n), time.time()
    for i in range(n):
        f, r, d = obs["flux_mjy"][i:i + 1], obs["rel_err"][i:i + 1], obs["distance_mpc"][i:i + 1]
        try:
            post = grid_posterior.exact_posterior(f[0], r[0], d[0])
        except MemoryError as exc:
            log(f"  cluster {i}: exact posterior failed ({exc}); left out")
            k_ex = min(k_ex, i)
            continue
        ref["logp_exact"][i] = grid_posterior.log_density(theta[i:i + 1], f, r, d, posts=[post])[0]
        ref["map_exact"][i] = post["map"]
        ref["quantiles_exact"][i] = np.asarray(post["quantiles"]).T                     # (q, param)
        ex = grid_posterior.sample_posterior(post, cinn_samples.shape[1], rng)
        ref["map_exact_meanshift"][i] = mean_shift(ex, args.bandwidth, 3, args.kernel)[0]
        ex2 = grid_posterior.sample_posterior(post, cinn_samples.shape[1], rng)   # the estimator's own scatter
        ref["map_exact_meanshift_2"][i] = mean_shift(ex2, args.bandwidth, 3, args.kernel)[0]
        if i < k_ex:
            grids.append(_exact_marginals(post, ex, cinn_samples[i]))
        del post
        if (i + 1) % 10 == 0 or i + 1 == n:
            log(f"  exact posteriors: {i + 1}/{n} clusters, {time.time() - t0:.1f} s")
    return ref, grids


def _share_within(a, b, tol):
    """Share of |a - b| <= tol over the pairs where a is known (NaN if none is)."""
    known = np.isfinite(a)
    return float(np.mean(np.abs(a[known] - b[known]) <= tol)) if known.any() else float("nan")


def _load_exact_reference(path, theta):
    """The exact-posterior part of an earlier `exact` run (its exact.npz) on the same clusters: the grid
    posteriors do not depend on the cINN, so comparing another model need not recompute them."""
    import simulate
    keys = ("logp_exact", "map_exact", "quantiles_exact", "map_exact_meanshift", "theta_true")
    ref = simulate.load_npz(path, required=keys)
    if ref["theta_true"].shape != theta.shape or not np.allclose(ref["theta_true"], theta, rtol=0, atol=1e-12):
        raise ValueError(f"{path}: its theta_true ({ref['theta_true'].shape[0]} clusters) is not that of the "
                         f"first {len(theta)} clusters of --obs; use the same --obs and --n as the run that wrote it")
    ref.setdefault("map_exact_meanshift_2", np.full_like(ref["map_exact_meanshift"], np.nan))   # older files
    log(f"  exact posteriors: reused from {path} (no example figure)")
    return ref


def cmd_exact(args):
    """Accuracy against the exact grid posterior (grid_posterior.py) on simulated test clusters:
    KL estimate mean(log p_exact(theta_true|x) - log q_cINN(theta_true|x)) +- SE, 16-84 % width ratios,
    share of cINN MAPs within 0.1 dex in age of the exact MAP, share of cINN samples below the mass floor
    (where the exact density is zero); Fig. 5 style example marginals.

    The exact MAP is the grid posterior's density maximum (post['map']); the cINN MAP is the densest
    mean-shift mode of its samples; beside it, the cINN sample of highest exact density (densest_sample). As a
    same-estimator check, the mean-shift MAP of 1e4 exact samples (grid_posterior.sample_posterior) is compared
    too, and the exact density at each MAP below the exact MAP's (map_density_gap: a miss in age with a small
    gap is a flat-topped posterior, a large gap another mode). Widths: 16-84 % of the cINN samples over the grid
    posterior's 16-84 % marginal quantiles."""
    import simulate
    obs = load_obs(args.obs, args.n, need_theta=True)
    model = load_model(args.model, args.device)
    n = len(obs["x"])
    theta = obs["theta"]
    logq = np.asarray(model.log_prob(theta, obs["x"]), dtype=float)                  # age bins (cinn.py)
    logq_flow = np.asarray(model.log_prob(theta, obs["x"], age_bins=False), dtype=float)   # the flow alone
    samples, summ = _summary_or_run(args, obs, model)
    if args.reuse_exact:
        ref, grids = _load_exact_reference(args.reuse_exact, theta), []
    else:
        ref, grids = exact_reference(obs, samples, args)
    logp, map_exact, q_exact, ms_exact = (ref[k] for k in ("logp_exact", "map_exact", "quantiles_exact",
                                                            "map_exact_meanshift"))
    ok = np.isfinite(logp)                 # clusters whose exact posterior could be computed
    kl, kl_se = kl_estimate(logp, logq)
    kl_flow, kl_flow_se = kl_estimate(logp, logq_flow)
    ratio = (summ["quantiles"][:, 2] - summ["quantiles"][:, 0]) / (q_exact[:, 2] - q_exact[:, 0])
    dage = np.abs(summ["modes"][:, 0, 0] - map_exact[:, 0])
    dage_ms = np.abs(summ["modes"][:, 0, 0] - ms_exact[:, 0])
    dage_exact_ms = np.abs(ms_exact[:, 0] - map_exact[:, 0])
    map_dense = densest_sample(samples, obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"])
    dage_dense = np.abs(map_dense[:, 0] - map_exact[:, 0])
    f_, r_, d_ = obs["flux_mjy"], obs["rel_err"], obs["distance_mpc"]
    gap = map_density_gap(summ["modes"][:, 0], map_exact, f_, r_, d_)        # nats below the exact MAP
    gap_exact_ms = map_density_gap(ms_exact, map_exact, f_, r_, d_)
    import preprocess
    below = preprocess.below_floor(samples, obs["x"][:, None, :])     # outside the noise model's support
    res = {"n_clusters": n, "n_exact_failed": int(np.sum(~ok)), "n_samples": samples.shape[1],
           "share_cinn_samples_below_mass_floor": float(below.mean()),
           "kl_mean_nats": kl, "kl_se_nats": kl_se,
           "kl_median_nats": float(np.nanmedian(logp - logq)),
           "kl_mean_nats_flow_without_age_bins": kl_flow, "kl_se_nats_flow_without_age_bins": kl_flow_se,
           "kl_by_distance_to_prior_bounds": kl_near_prior_bounds(logp, logq, theta),
           "kl_by_height_above_mass_floor_dex": kl_by_floor_height(logp, logq, theta, obs["x"]),
           "n_logq_not_finite": int(np.sum(~np.isfinite(logq))),
           "n_logp_not_finite": int(np.sum(~np.isfinite(logp))),
           "median_width_ratio_cinn_over_exact": dict(zip(PARAM_NAMES, np.nanmedian(ratio, 0))),
           "share_width_ratio_within_20pc": dict(zip(PARAM_NAMES, np.mean(np.abs(ratio[ok] - 1) <= 0.2, 0))),
           "share_map_within_0p1_dex_age": float(np.mean(dage[ok] <= 0.1)),
           "share_densest_cinn_sample_within_0p1_dex_age": float(np.mean(dage_dense[ok] <= 0.1)),
           "median_map_density_gap_nats": float(np.nanmedian(gap[ok])),
           "share_map_density_within_0p5_nat_of_exact_map": float(np.mean(gap[ok] <= 0.5)),
           "share_map_within_0p1_dex_age_or_0p5_nat": float(np.mean((dage[ok] <= 0.1) | (gap[ok] <= 0.5))),
           "share_meanshift_of_exact_samples_within_0p1_dex_age_or_0p5_nat": float(np.mean(
               (dage_exact_ms[ok] <= 0.1) | (gap_exact_ms[ok] <= 0.5))),
           "share_any_cinn_mode_within_0p1_dex_age": float(np.mean(
               np.nanmin(np.abs(summ["modes"][ok, :, 0] - map_exact[ok, :1]), axis=1) <= 0.1)),
           "share_map_within_0p1_dex_age_vs_meanshift_of_exact_samples": float(np.mean(dage_ms[ok] <= 0.1)),
           "share_meanshift_of_exact_samples_within_0p1_dex_of_grid_map": float(np.mean(dage_exact_ms[ok] <= 0.1)),
           "share_meanshift_of_two_exact_sample_sets_within_0p1_dex": _share_within(   # NaN: not in a reused file
               ref["map_exact_meanshift_2"][ok, 0], ms_exact[ok, 0], 0.1),
           "median_abs_map_diff": dict(zip(PARAM_NAMES, np.nanmedian(np.abs(summ["modes"][:, 0] - map_exact), 0))),
           "truth_in_cinn_16_84": dict(zip(PARAM_NAMES, np.mean((theta >= summ["quantiles"][:, 0])
                                                               & (theta <= summ["quantiles"][:, 2]), 0))),
           "truth_in_exact_16_84": dict(zip(PARAM_NAMES, np.mean((theta[ok] >= q_exact[ok, 0])
                                                                & (theta[ok] <= q_exact[ok, 2]), 0)))}
    out = _outdir(args.out)
    simulate.save_npz(out / "exact.npz", logp_exact=logp, logq_cinn=logq, logq_flow=logq_flow,
                      theta_true=theta,
                      map_cinn=summ["modes"][:, 0], map_exact=map_exact, map_cinn_densest_sample=map_dense,
                      map_exact_meanshift=ms_exact, map_exact_meanshift_2=ref["map_exact_meanshift_2"],
                      map_density_gap=gap,
                      modes_cinn=summ["modes"], quantiles_cinn=summ["quantiles"], quantiles_exact=q_exact,
                      seed=args.seed)
    _write_json(out / "exact.json", res)
    if grids:
        plot_exact_examples(samples[:len(grids)], grids, out / "exact_examples.png", truth=theta[:len(grids)])
    _plot_exact_summary(res, logp - logq, ratio, dage[ok], out / "exact.png")
    print(f"exact: {n} simulated test clusters ({res['n_exact_failed']} left out: exact posterior failed), "
          f"{samples.shape[1]} cINN samples each")
    print(f"  mean log p_exact - log q_cINN at the true theta: {kl:.4f} +- {kl_se:.4f} nats (KL estimate; "
          f"median {res['kl_median_nats']:.4f}; the flow without the age-bin average: {kl_flow:.4f} +- "
          f"{kl_flow_se:.4f})")
    kb = res["kl_by_distance_to_prior_bounds"]
    print(f"  of which truths within {NEAR_BOUND[0]} dex of the mass bounds or {NEAR_BOUND[1]} mag of the E(B-V) "
          f"bounds: {kb['near'][0]} clusters, {kb['near'][1]:.3f} +- {kb['near'][2]:.3f} nats "
          f"({kb['near_share_of_total']:.0%} of the mean); the other {kb['away'][0]}: "
          f"{kb['away'][1]:.3f} +- {kb['away'][2]:.3f}")
    print("  by the truth's height above its mass floor (dex): " + "; ".join(
        f"{lab}: {n_} clusters, {m_:.3f} +- {se_:.3f} ({sh_:.0%})"
        for lab, n_, m_, se_, sh_ in res["kl_by_height_above_mass_floor_dex"]))
    print(f"  cINN samples below the mass floor (zero exact density: sigma_b > f_b / 2 in some band): "
          f"{res['share_cinn_samples_below_mass_floor']:.2%}")
    print("  16-84 % width ratio cINN/exact, median: " + ", ".join(
        f"{k_}: {v:.3f}" for k_, v in res["median_width_ratio_cinn_over_exact"].items()))
    print(f"  cINN MAP within 0.1 dex in age of the exact (grid) MAP: {res['share_map_within_0p1_dex_age']:.1%} "
          f"(of the mean-shift MAP of exact samples: "
          f"{res['share_map_within_0p1_dex_age_vs_meanshift_of_exact_samples']:.1%}; exact samples' own "
          f"mean-shift MAP vs grid MAP: {res['share_meanshift_of_exact_samples_within_0p1_dex_of_grid_map']:.1%}; "
          f"two independent sets of exact samples, mean-shift MAP vs mean-shift MAP: "
          f"{res['share_meanshift_of_two_exact_sample_sets_within_0p1_dex']:.1%})")
    print(f"  exact density at the cINN MAP below the exact MAP's (map_density_gap): median "
          f"{res['median_map_density_gap_nats']:.2f} nats, within 0.5 nat for "
          f"{res['share_map_density_within_0p5_nat_of_exact_map']:.1%}; within 0.1 dex in age or 0.5 nat: "
          f"{res['share_map_within_0p1_dex_age_or_0p5_nat']:.1%} (exact samples' mean-shift MAP: "
          f"{res['share_meanshift_of_exact_samples_within_0p1_dex_age_or_0p5_nat']:.1%}; a small gap with a "
          f"large age difference is a posterior whose top is flat over > 0.1 dex, where the MAP age is undefined)")
    print(f"  cINN sample of highest exact density (densest_sample: the network proposes, the likelihood "
          f"ranks) within 0.1 dex in age of the exact MAP: {res['share_densest_cinn_sample_within_0p1_dex_age']:.1%}")
    print(f"  any of the <= 3 cINN modes within 0.1 dex in age of the exact MAP: "
          f"{res['share_any_cinn_mode_within_0p1_dex_age']:.1%} (ridge-like posteriors have near-equal modes)")
    print("  truth inside 16-84 %: cINN " + ", ".join(f"{v:.3f}" for v in res["truth_in_cinn_16_84"].values())
          + "; exact " + ", ".join(f"{v:.3f}" for v in res["truth_in_exact_16_84"].values()) + " (0.68 expected)")
    print(f"wrote {out}/exact.npz, exact.json, exact.png" + (", exact_examples.png" if grids else ""))
    return res


def _exact_marginals(post, exact_samples, cinn_samples, bins=80):
    """Marginal densities of the exact posterior for plotting: age from the grid's P(k) (as a density in
    log10 t'), mass and E(B-V) as histograms of many exact samples (the grid cells vary in size)."""
    g = {}
    pmf = np.asarray(post["age_pmf"])
    k = np.arange(1, len(pmf) + 1)
    lo_, hi_ = np.percentile(np.concatenate([exact_samples[:, 0], cinn_samples[:, 0]]), [0.1, 99.9])
    edges = np.linspace(lo_, hi_, bins + 1)
    # P(log10 t' in bin) = sum_k P(k) * overlap of [k-1/2, k+1/2] with the bin in t, per unit of log10 t'
    t_edges = 10.0 ** edges
    cdf_k = np.concatenate([[0.0], np.cumsum(pmf)])
    def cdf_t(t):                                      # CDF of t' (uniform within each 1 Myr cell)
        t = np.clip(t, 0.5, len(pmf) + 0.5)
        j = np.minimum(np.floor(t - 0.5).astype(int), len(pmf) - 1)   # cell j covers [j + 1/2, j + 3/2]
        return cdf_k[j] + pmf[j] * (t - 0.5 - j)
    g["x0"], g["p0"] = 0.5 * (edges[1:] + edges[:-1]), np.diff(cdf_t(t_edges)) / np.diff(edges)
    for p in (1, 2):
        lo_, hi_ = np.percentile(np.concatenate([exact_samples[:, p], cinn_samples[:, p]]), [0.1, 99.9])
        dens, e = np.histogram(exact_samples[:, p], bins=bins, range=(lo_, hi_), density=True)
        g[f"x{p}"], g[f"p{p}"] = 0.5 * (e[1:] + e[:-1]), dens
    return g


def _plot_exact_summary(res, dlog, ratio, dage, path):
    """Histograms of log p - log q, of the width ratios and of the age MAP differences."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    d = dlog[np.isfinite(dlog)]
    axes[0].hist(d, bins=40, color="0.5")
    axes[0].axvline(res["kl_mean_nats"], color="C3", label=f"mean {res['kl_mean_nats']:.3f} nats")
    axes[0].set_xlabel(r"$\log p_\mathrm{exact}(\theta_\mathrm{true}|x) - \log q_\mathrm{cINN}$ [nats]")
    axes[0].set_ylabel("number of clusters")
    axes[0].legend(fontsize=8)
    for p in range(3):
        r = ratio[:, p][np.isfinite(ratio[:, p]) & (ratio[:, p] > 0)]
        axes[1].hist(np.log10(r), bins=40, histtype="step", label=PARAM_LABELS[p])
    axes[1].axvline(0, color="k", lw=0.7)
    axes[1].set_xlabel(r"$\log_{10}$ (cINN / exact 16-84 % width)")
    axes[1].legend(fontsize=8)
    axes[2].hist(np.log10(np.maximum(dage, 1e-4)), bins=40, color="0.5")
    axes[2].axvline(-1, color="C3", label="0.1 dex")
    axes[2].set_xlabel(r"$\log_{10}$ |MAP$_\mathrm{cINN}$ - MAP$_\mathrm{exact}$| in log age [dex]")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    """argparse parser with the subcommands; `catalog` is registered by catalogs.py when it imports."""
    ap = argparse.ArgumentParser(
        description="Diagnostics of cINN star-cluster posteriors (Walter et al. 2026, Sect. 3): SBC, PPC, modes, "
                    "comparison with MLEs, accuracy against the exact grid posterior, throughput. Each "
                    "subcommand prints a summary and writes .npz/.json numbers and a PNG figure.")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, n_default, samples_default=None, needs_model=True):
        p.add_argument("--model", required=needs_model, default=None,
                       help="cINN checkpoint (model.pt) or run directory, e.g. runs/quick")
        p.add_argument("--obs", required=True, help="observation .npz (DESIGN Sect. 4), e.g. runs/quick/test.npz")
        p.add_argument("--n", type=int, default=n_default,
                       help=f"use the first N clusters (default: {n_default or 'all'})")
        if samples_default:
            p.add_argument("--samples", type=int, default=samples_default,
                           help=f"posterior samples per cluster (default {samples_default})")
        p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
        p.add_argument("--device", default=None, help="torch device for the cINN (default: cuda if available)")

    def mode_args(p):
        p.add_argument("--kernel", choices=("gaussian", "flat"), default="gaussian",
                       help="mean-shift kernel (default gaussian; flat = scikit-learn's ball kernel)")
        p.add_argument("--bandwidth", type=float, default=None,
                       help="mean-shift bandwidth in standardised units (default: Silverman's rule, 0.26 for "
                            "1e4 samples; flat kernel x sqrt(5))")

    p = sub.add_parser("sbc", help="simulation-based calibration: ranks, ECDF bands (Fig. 3)")
    common(p, None)
    p.add_argument("--L", type=int, default=100, help="posterior samples per test pair (paper: 100)")
    p.add_argument("--alpha", type=float, default=0.02, help="band level: 0.02 = 0.01-0.99 band")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_sbc)

    p = sub.add_parser("ppc", help="posterior predictive check (Fig. 4)")
    common(p, 1000, 500)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_ppc)

    p = sub.add_parser("modes", help="mean-shift modes, MAP, 16/50/84 %% quantiles -> posterior .npz")
    common(p, None, 10000, needs_model=False)
    mode_args(p)
    p.add_argument("--samples-file", default=None, help="summarise existing samples (.npz with 'samples') "
                                                       "instead of sampling the model")
    p.add_argument("--save-samples", action="store_true", help="also store the samples (N x S x 3 float32)")
    p.add_argument("--out", required=True, help="output .npz (a PNG of example posteriors is written beside)")
    p.set_defaults(func=cmd_modes)

    p = sub.add_parser("compare", help="cINN vs MLE: chi^2 (Eq. 11), Table 1 inliers, Figs. 6, 8, B.3")
    common(p, 1000, 10000, needs_model=False)
    mode_args(p)
    p.add_argument("--mle", default=None, help=".npz with MLE columns age_myr (or log10_age_myr), log10_mass, ebv "
                                               "and *_lo/*_hi 1-sigma ranges; default: grid_posterior.mle")
    p.add_argument("--summary", default=None, help="modes .npz from `evaluate.py modes` (skips sampling)")
    p.add_argument("--nu", type=int, default=None, help="chi^2 normalisation of Eq. 11 (default: 5 bands)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("exact", help="accuracy against the exact grid posterior; Fig. 5 examples")
    common(p, 200, 10000)
    mode_args(p)
    p.add_argument("--examples", type=int, default=4, help="clusters shown in the Fig. 5 style figure")
    p.add_argument("--reuse-exact", metavar="EXACT_NPZ",
                   help="take the exact posteriors' summaries from an earlier run's exact.npz (same --obs, --n) "
                        "instead of recomputing them: compares another model in minutes")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_exact)

    p = sub.add_parser("throughput", help="posterior samples/s and clusters/s (samples + modes + quantiles)")
    common(p, 100, 10000)
    p.add_argument("--kernel", choices=("gaussian", "flat"), default="gaussian")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_throughput)

    try:                          # `catalog` lives in catalogs.py (helper E); optional here
        import catalogs
        catalogs.add_catalog_parser(sub)
    except ImportError as exc:
        log(f"(catalog subcommand unavailable: {exc})")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:     # bad input: the message names the file and what is wrong
        raise SystemExit(f"evaluate.py: error: {exc}") from None
