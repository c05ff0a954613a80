"""Exact posterior of (age, mass, E(B-V)) on a parameter grid, and the CIGALE-style minimum-chi^2 fit.

Walter et al. (2026) Sect. 3.2.2 / Fig. 5: without nuisance parameters the likelihood of the simulation model
(SPEC.md Sect. 3) is tractable, so p(theta | x) can be computed by quadrature. This is the project's ground truth.

Generative model (per cluster): integer age k in 1..n_age with P(k) from rounding t = 10^U, U ~ U[0, log10 n_age];
label t' = k + U[-1/2, 1/2]; log10 m ~ U[2, 8]; E(B-V) ~ U[e_0, e_1] (table range). Per band: noiseless flux f at
the distance, r ~ U[0, 1/2], sigma = r f, ln f* ~ N(ln f - s^2/2, s^2) with s^2 = ln(1 + r^2). The observation is
(f*, sigma = r* f*), so the likelihood of one band, as a function of f, is

    p(f*, sigma | f) = p(sigma | f) * LogNormal(f*; mean f, sd sigma),   p(sigma | f) = 2/f  for sigma <= f/2.

Write y = ln f - ln f*. Up to terms constant in theta, log p = l(y) with s^2 = ln(1 + r*^2 e^{-2y}):

    l(y) = -y - ln s - (y - s^2/2)^2 / (2 s^2)      for y >= ln(2 r*)      (-inf below: sigma > f/2)

Deliberately wrong likelihoods, to show that the calibration test can fail (`likelihood=`): "no_sigma_factor"
drops p(sigma | f) (the 2/f and the support edge), "no_2_over_f" drops only the 2/f, "gaussian" uses a Gaussian
of sd sigma instead of the log-normal, "naive_lognormal" a log-normal with the observed r* and no p(sigma | f).
With 500 clusters only the last is rejected clearly by SBC; the others shift the marginals too little.

Quadrature (vectorised, pruned with a rigorous bound):
  * age: every integer Myr of the table (no interpolation, the table is the model);
  * E(B-V): each table segment [e_j, e_j+1] (ln F linear in between, as simulate.model_flux) is cut into n_sub
    equal cells, midpoint rule;
  * ln m: per (age, E(B-V)) row a midpoint grid between the lower support edge (all bands sigma <= f/2) and the
    upper end of the likelihood window, spacing = narrowest combined feature / `resolution`; the first cell is
    split in EDGE_SPLIT (the likelihood can jump there and fall steeply);
  * the cells are sheared along the likelihood's ridge (_rows): a cell is a parallelogram whose mass moves
    with E(B-V) as the best-fitting mass does (d ln m / dE = weighted mean reddening slope of the bands). With
    one precise band the likelihood is a thin tilted sheet in (ln m, E(B-V)); axis-aligned cells had to be as
    narrow in E(B-V) as the sheet, sheared cells only resolve the width left once the mass has adjusted
    (EBV_OVERSAMPLE x `resolution` cells per sd of it, never coarser than the axis-aligned grid);
  * per band l(y) is read from a table (linear interpolation, step s/32: error ~1e-4 nats).
  Pruning: per band, l(y) is bounded above, per mode (main peak, support-edge mode), by a concave quadratic
  wherever it can matter; every combination of modes gives a closed-form bound on the likelihood of a whole
  E(B-V) segment (max over mass and E(B-V) within it), plus a window test (all bands inside their windows).
  Segments, rows and cells more than `tail` nats below the best likelihood found are skipped; of the rest,
  the lightest cells holding at most `drop` (1e-6) of the posterior are left out of the result (their weight
  stays in log Z; rows whose bound is that light are not evaluated).
  Sampling and marginals represent each cell by a tent (the linear interpolant of the midpoint values) or, at
  row ends and the E(B-V) range ends, by a box, sheared as above; draws are truncated to the likelihood's
  support and the prior (the support edge sigma = f/2 moves in mass with E(B-V), so a cell's jitter can cross
  it). The mass marginal is the projection of the sheared cells (trapezoids of the same variance, _cell_cdf).
Accuracy (tests, bench_grid.py): quantiles converged to < 4e-3 dex / mag (resolution 1 -> 2), log Z to ~1e-2
(least accurate where the support edge binds), marginal CDFs within 0.01 of an independent dense grid.

Public: dense_posterior (the definition), exact_posterior (the fast quadrature), marginal_cdf, posterior_quantiles,
sample_posterior, log_likelihood, log_density, log_map_density, posterior_summaries (a file of clusters), mle;
the command line main().
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

import checks
from simulate import (BANDS, LOG_MASS_RANGE, PC10_IN_MPC, age_bin, load_npz, load_table, log_prior_age, rv_nodes,
                      save_npz)

LN10 = np.log(10.0)
LIKELIHOODS = ("exact", "no_sigma_factor", "no_2_over_f", "gaussian", "naive_lognormal")
QUANTILES = (0.16, 0.50, 0.84)

_PREP = {}


# ----------------------------------------------------------------------------------------------------------
# Model table and prior.

MAX_CELLS = 60_000_000     # exact_posterior: at most this many kept quadrature cells (~100 B each: ~6 GB)

def _table(table=None):
    """The model table: simulate.load_table() unless a dict with ebv_nodes and ln_flux (n_age, n_e, 5) is given."""
    if table is None:
        table = load_table()
    key = id(table)
    if key not in _PREP or _PREP[key]["table"] is not table:
        a = np.ascontiguousarray(table["ln_flux"], dtype=np.float64)
        e = np.asarray(table["ebv_nodes"], dtype=np.float64)
        if a.ndim != 3 or a.shape[1] != len(e) or len(e) < 2:
            raise ValueError(f"table: ln_flux shape {a.shape} does not match ebv_nodes ({len(e)},)")
        _PREP[key] = {"table": table, "A": a, "dA": np.diff(a, axis=1), "e": e, "de": np.diff(e),
                      "log_prior_age": log_prior_age(a.shape[0])}
        # MAP in (log10 t', log10 m, E): density P(k) L t' ln 10 / Z at a cell centre t' = k
        _PREP[key]["map_age"] = _PREP[key]["log_prior_age"] + np.log(np.arange(1.0, a.shape[0] + 1))
    return _PREP[key]


# ----------------------------------------------------------------------------------------------------------
# Likelihood of one band as a function of y = ln f - ln f*.

def band_loglike(y, rstar, likelihood="exact"):
    """Log-likelihood l(y) of one band (terms constant in theta dropped), y = ln f_model - ln f_obs.

    exact: -y - ln s - (y - s^2/2)^2/(2 s^2), s^2 = ln(1 + r*^2 e^{-2y}), -inf where sigma > f/2 (y < ln 2r*).
    no_sigma_factor: without p(sigma | f) = 2/f 1[sigma <= f/2].  gaussian: N(f*; f, sigma) instead of log-normal.
    """
    y = np.asarray(y, dtype=np.float64)
    r = np.asarray(rstar, dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        if likelihood == "gaussian":
            ll = -0.5 * ((1.0 - np.exp(y)) / r) ** 2 - y
        elif likelihood == "naive_lognormal":
            s2 = np.log1p(r * r) * np.ones_like(y)
            ll = -(y - 0.5 * s2) ** 2 / (2.0 * s2)
        elif likelihood in ("exact", "no_sigma_factor", "no_2_over_f"):
            s2 = np.log1p(r * r * np.exp(-2.0 * y))
            ll = -0.5 * np.log(s2) - (y - 0.5 * s2) ** 2 / (2.0 * s2)
            if likelihood == "exact":
                ll = ll - y
        else:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood in ("exact", "gaussian", "no_2_over_f"):
            ll = np.where(y >= np.log(2.0 * r), ll, -np.inf)
    return np.where(np.isnan(ll), -np.inf, ll)


# ----------------------------------------------------------------------------------------------------------
# The definition: the posterior on a dense regular grid (exact_posterior below is the fast way to the same).

def dense_posterior(flux_mjy, rel_err, distance_mpc, table=None, n_ebv=1201, mass_step=2e-3,
                    mass_window=LOG_MASS_RANGE, likelihood="exact"):
    """The posterior of one cluster by brute force: the definition that exact_posterior is tested against.

    Every integer age k of the table with its prior P(k); n_ebv equally spaced E(B-V) over the table's range
    (ln F linear between its nodes, as simulate.model_flux); log10 m in steps of mass_step over mass_window
    (which must hold all of the posterior); the likelihood sum_b l(y_b) of band_loglike (the log-normal density
    of f* with the factor p(sigma | f) = 2/f and the support edge sigma <= f/2); the trapezoid rule in E(B-V)
    and mass. Time grows as n_age x n_ebv x n_mass: for small tables or narrow windows.

    Returns:
        dict log_z (the evidence, as exact_posterior's), age_pmf (n_age,), ebv and ebv_cdf, log10_mass and
        mass_cdf (marginal CDFs at the grid points, trapezoid weights), quantiles (3, 3) of the marginals.
    """
    prep = _table(table)
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    e = np.linspace(prep["e"][0], prep["e"][-1], n_ebv)
    m = np.arange(max(mass_window[0], LOG_MASS_RANGE[0]), min(mass_window[1], LOG_MASS_RANGE[1]) + mass_step / 2,
                  mass_step)
    j = np.clip(np.searchsorted(prep["e"], e, side="right") - 1, 0, len(prep["e"]) - 2)
    w = ((e - prep["e"][j]) / prep["de"][j])[:, None]
    trapezoid = [np.diff(v).mean() * np.r_[0.5, np.ones(len(v) - 2), 0.5] for v in (e, m)]
    weights = trapezoid[0][:, None] * trapezoid[1][None, :]
    top, total, p_e, p_m = [], [], [], []
    for k in range(prep["A"].shape[0]):                  # one age at a time: (n_ebv, n_mass) per step
        ln_f = prep["A"][k, j] * (1.0 - w) + prep["A"][k, j + 1] * w
        y = ln_f[:, None, :] + (m * LN10)[None, :, None] + _row_offsets(prep, f, d)
        log_p = band_loglike(y, r, likelihood).sum(-1) + prep["log_prior_age"][k]
        top.append(log_p.max())
        p = np.exp(log_p - top[-1]) * weights if np.isfinite(top[-1]) else np.zeros_like(weights)
        total.append(p.sum()), p_e.append(p.sum(1)), p_m.append(p.sum(0))
    scale = np.exp(np.array(top) - max(top))[:, None]
    age, p_e, p_m = np.array(total) * scale[:, 0], (np.array(p_e) * scale).sum(0), (np.array(p_m) * scale).sum(0)
    width = (prep["e"][-1] - prep["e"][0]) * (LOG_MASS_RANGE[1] - LOG_MASS_RANGE[0])
    cdf_e, cdf_m = (np.cumsum(v) / v.sum() - v / (2 * v.sum()) for v in (p_e, p_m))
    k_edges = np.arange(len(age) + 1) + 0.5
    qs = np.asarray(QUANTILES)
    quantiles = np.stack([np.log10(np.interp(qs, np.r_[0.0, np.cumsum(age) / age.sum()], k_edges)),
                          np.interp(qs, cdf_m, m), np.interp(qs, cdf_e, e)])
    return {"log_z": max(top) + np.log(age.sum()) - np.log(width), "age_pmf": age / age.sum(), "ebv": e,
            "ebv_cdf": cdf_e, "log10_mass": m, "mass_cdf": cdf_m, "quantiles": quantiles}


def _band_profile(rstar, likelihood):
    """l(y) of one band on a y grid that resolves its main peak and the support edge."""
    s = np.sqrt(np.log1p(rstar ** 2))
    lo = np.log(2.0 * rstar) if likelihood in ("exact", "gaussian", "no_2_over_f") else -25.0
    hi = 40.0                                   # model 10^17 x brighter than observed: far beyond any fit
    y = np.concatenate([np.linspace(lo, 8.0, 6001), np.linspace(8.0, hi, 641), np.linspace(-15 * s, 15 * s, 801),
                        lo + np.linspace(0.0, 0.2, 201)])
    y = np.unique(y[(y >= lo) & (y <= hi)])
    ll = band_loglike(y, rstar, likelihood)
    i = np.argmax(ll)
    # refine around the maximum so `top` is not underestimated
    step = max(y[min(i + 1, len(y) - 1)] - y[i], y[i] - y[max(i - 1, 0)], 1e-12)
    yf = np.clip(y[i] + np.linspace(-step, step, 201), lo, hi)
    y = np.unique(np.concatenate([y, yf]))
    ll = band_loglike(y, rstar, likelihood)
    return y, ll, s


def _band_scale(prof):
    """Width of the narrowest feature of l(y): the log-normal width s, or, when the maximum sits at the support
    edge (r* > ~0.5), the distance over which l falls by 1 nat from the edge, if shorter."""
    y, ll, s = prof
    i = np.argmax(ll)
    if i > 0:
        return s
    below = np.nonzero(ll < ll[0] - 1.0)[0]
    return min(s, y[below[0]] - y[0]) if len(below) else s


def _piece_bound(y, ll, sel, depth_floor):
    """Concave quadratic top - (y - m)^2 / (2 v) >= l(y) on the points of `sel` with l >= depth_floor."""
    yy, lv = y[sel], ll[sel]
    i = np.argmax(lv)
    top, m = lv[i] + 1e-3, yy[i]
    inside = lv >= depth_floor
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (yy[inside] - m) ** 2 / (2.0 * (top - lv[inside]))
    v = 1.05 * np.max(ratio[np.isfinite(ratio)], initial=1e-30) + 1e-30
    idx = np.nonzero(sel)[0][inside]
    ylo = y[max(idx[0] - 1, 0)] if idx[0] > 0 else y[0]
    yhi = y[min(idx[-1] + 1, len(y) - 1)]
    return top, m, v, ylo, yhi


def _band_pieces(prof, floor):
    """Bounding pieces of one band where l(y) >= floor: one concave quadratic per mode of l (main peak and,
    when separate, the mode at the support edge sigma = f/2), each with its y window."""
    y, ll, _ = prof
    i = np.argmax(ll)
    pieces = []
    # split at the lowest point between the support edge and the main peak, if l rises again towards the edge
    split = None
    if i > 0:
        jmin = int(np.argmin(ll[:i + 1]))
        if jmin > 0 and ll[:jmin].max() > ll[jmin]:
            split = jmin
    cuts = [(np.arange(len(y)) >= split)] if split is not None else [np.ones(len(y), bool)]
    if split is not None:
        cuts.append(np.arange(len(y)) <= split)
    for sel in cuts:
        sel = sel & np.isfinite(ll)
        if sel.any() and ll[sel].max() >= floor:
            pieces.append(_piece_bound(y, ll, sel, floor))
    return pieces


def _combos(pieces, thr):
    """All choices of one piece per band whose summed tops can reach thr: arrays top (C,), m, v, ylo, yhi (C, 5)."""
    combos = [((), 0.0)]
    for band in pieces:
        combos = [(c + (p,), t + p[0]) for c, t in combos for p in band]
    out = [c for c, t in combos if t >= thr]
    arr = np.array([[list(p) for p in c] for c in out])            # (C, 5 bands, 5 fields)
    return {"top": arr[:, :, 0].sum(1), "m": arr[:, :, 1], "v": arr[:, :, 2], "ylo": arr[:, :, 3],
            "yhi": arr[:, :, 4]}


# ----------------------------------------------------------------------------------------------------------
# The exact posterior of one cluster.

def _check_obs(flux_mjy, rel_err, distance_mpc):
    f = np.asarray(flux_mjy, dtype=np.float64)
    r = np.asarray(rel_err, dtype=np.float64)
    d = np.asarray(distance_mpc, dtype=np.float64)
    if f.shape[-1:] != (5,) or r.shape != f.shape:
        raise ValueError(f"flux_mjy {f.shape} and rel_err {r.shape} must both be (..., 5)")
    if d.shape != f.shape[:-1]:
        raise ValueError(f"distance_mpc {d.shape} must match flux_mjy {f.shape[:-1]}")
    bad = ~(np.all(np.isfinite(f) & (f > 0) & np.isfinite(r) & (r > 0), axis=-1) & np.isfinite(d) & (d > 0))
    if np.any(bad):
        rows = np.nonzero(np.atleast_1d(bad))[0][:5]
        raise ValueError(f"observation row(s) {rows.tolist()}: fluxes, rel_err and distance must be finite and > 0")
    return f, r, d


def _row_offsets(prep, flux, dist):
    """off_b with y_b = ln F(k, e, b) + ln m + off_b (ln m = mu' is ln of the mass)."""
    return 2.0 * np.log(PC10_IN_MPC / dist) - np.log(flux)


def _seed_lower_bound(prep, off, rstar, likelihood, n_best=40, n_screen=2000):
    """A likelihood value actually attained (a lower bound on the maximum): Gaussian pre-fit on a sparse grid.

    Per (age, every 5th E(B-V) node) the weighted least-squares mass mu, and mu_c: mu moved into the support
    (up to the support edge, where every band has sigma <= f/2, and into the prior's mass range). Candidates:
    the n_best points of smallest chi^2 at mu, and of the n_screen of smallest chi^2 at mu_c the n_best of
    highest exact likelihood at mu_c; the likelihood is then evaluated on a mass grid around each candidate's
    mu_c and edge (mu_c = mu inside the support; outside it, the points a grid around mu could reach inside
    the support lie in these). The constrained candidates matter when a precise band fixes the mass and a
    noisy band's edge (or the mass prior) excludes it: the best unconstrained fits then all lie outside the support, and a
    seed taken from them was up to ~30,000 nats below the maximum (every cell passed the screen: ~2e8
    evaluated to keep 4e4, cluster 241 of bench_grid's SBC set), or -inf.
    chi^2(m) = sum_b w_b (a_b + m)^2 = S2 + 2 m S1 + m^2 W with a = ln F + off, from matrix-vector products
    with the cached seed table and its square (no (ages, nodes, 5) temporaries): ~20 ms per cluster."""
    if "A_seed" not in prep:
        a0 = np.ascontiguousarray(prep["A"][:, ::5])                # every 5th E(B-V) node
        prep["A_seed"] = a0.reshape(-1, 5)
        prep["A_seed_sq"] = a0.reshape(-1, 5) ** 2
        prep["A_seed_bands"] = np.ascontiguousarray(a0.reshape(-1, 5).T)
    A = prep["A_seed"]
    w = 1.0 / np.log1p(rstar ** 2)
    W = w.sum()
    S1 = A @ w + off @ w                                          # sum w a
    S2 = prep["A_seed_sq"] @ w + 2.0 * (A @ (w * off)) + (w * off) @ off
    mu = -S1 / W
    lo, hi = LOG_MASS_RANGE[0] * LN10, LOG_MASS_RANGE[1] * LN10
    if likelihood in ("exact", "gaussian", "no_2_over_f"):        # edge: max_b ln(2 r*_b) - a_b
        c = np.log(2.0 * rstar) - off
        edge = c[0] - prep["A_seed_bands"][0]
        for b in range(1, 5):
            np.maximum(edge, c[b] - prep["A_seed_bands"][b], out=edge)
    else:
        edge = np.full_like(mu, lo)
    mu_c = np.clip(np.maximum(mu, edge), lo, hi)
    chi_c = np.where(edge <= hi, S2 + mu_c * (2.0 * S1 + mu_c * W), np.inf)
    screen = _smallest(chi_c, n_screen)
    at_c = band_loglike(A[screen] + off + mu_c[screen, None], rstar, likelihood).sum(-1)
    cands = np.unique(np.concatenate([_smallest(S2 - S1 * S1 / W, n_best), screen[_smallest(-at_c, n_best)]]))
    s_eff = 1.0 / np.sqrt(W)
    grid = np.concatenate([mu_c[cands, None] + s_eff * np.linspace(-6, 6, 49)[None, :],
                           edge[cands, None] + s_eff * np.linspace(1e-6, 6, 25)[None, :]], axis=1)
    grid = np.clip(grid, lo, hi)
    y = (A[cands] + off)[:, None, :] + grid[..., None]
    L = band_loglike(y, rstar, likelihood).sum(-1)
    return float(np.max(L))


def _smallest(x, n):
    """Indices of the n smallest values of x (the set of np.argsort(x)[:n]): np.argpartition, or the full
    sort where the n-th value is tied (the set would then depend on the sort)."""
    if len(x) <= n:
        return np.argsort(x)
    kth = np.partition(x, n - 1)[n - 1]
    sel = np.flatnonzero(x <= kth)
    return sel if len(sel) == n and np.sum(x == kth) == 1 else np.argsort(x)[:n]


def _linear_fit(prep):
    """Per age and band: ln F(e) ~ alpha + g e over the whole E(B-V) range, and the largest residual eps (first
    call: also the band-major table copies that _screen_segments reads)."""
    if "lin" not in prep:
        A, e = prep["A"], prep["e"]
        X = np.stack([np.ones_like(e), e], axis=1)
        coef, *_ = np.linalg.lstsq(X, A.transpose(1, 0, 2).reshape(len(e), -1), rcond=None)
        coef = coef.reshape(2, A.shape[0], A.shape[2])
        resid = A - (coef[0][:, None, :] + e[None, :, None] * coef[1][:, None, :])
        prep["lin"] = (coef[0], coef[1], np.abs(resid).max(axis=1) * 1.001 + 1e-12)
        # band-major copies of ln F at the segment starts and of its steps, for _screen_segments
        prep["A_bands"] = np.ascontiguousarray(A[:, :-1].transpose(2, 0, 1))
        prep["dA_bands"] = np.ascontiguousarray(prep["dA"].transpose(2, 0, 1))
    return prep["lin"]


def _segment_bounds(p, q, cmb):
    """For every piece combination c: max over t in [0, 1] and mu' of
    top_c - 1/2 sum_b w_cb (p_b - m_cb + t q_b + mu')^2, in closed form (w = 1/v). p, q (..., 5) -> (..., C)."""
    w = 1.0 / cmb["v"]                                            # (C, 5)
    wm = w * cmb["m"]
    W = w.sum(axis=1)
    s1 = p @ w.T - wm.sum(axis=1)                                 # sum w z, z = p - m
    a11 = (p * p) @ w.T - 2.0 * (p @ wm.T) + (wm * cmb["m"]).sum(axis=1) - s1 * s1 / W
    q1 = q @ w.T
    a12 = (p * q) @ w.T - q @ wm.T - s1 * q1 / W
    a22 = (q * q) @ w.T - q1 * q1 / W
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.where(a22 > 0, -a12 / a22, 0.0), 0.0, 1.0)
    return cmb["top"] - 0.5 * np.maximum(a11 + t * (2.0 * a12 + t * a22), 0.0)


def _window_t_interval(p, q, ylo, yhi):
    """Interval [t_lo, t_hi] within [0, 1] where some mu' puts every band inside its window:
    ylo_b <= p_b + t q_b + mu' <= yhi_b for all b  <=>  t (q_c - q_b) <= yhi_c - ylo_b + p_b - p_c for all b, c.

    Per unordered band pair (b, c), with d = q_c - q_b and dp = p_b - p_c, the two conditions read
    dp - (yhi_b - ylo_c) <= t d <= dp + (yhi_c - ylo_b): one interval in t (loop over the 10 pairs on
    contiguous 1-D arrays; t_hi < t_lo where no t qualifies, t_hi = -1 where the pair can never agree)."""
    nb = p.shape[-1]
    P = [np.ascontiguousarray(p[..., b]) for b in range(nb)]
    Q = [np.ascontiguousarray(q[..., b]) for b in range(nb)]
    t_lo, t_hi = np.zeros(p.shape[:-1]), np.ones(p.shape[:-1])
    never = np.full(p.shape[:-1], bool(np.any(yhi < ylo)))          # the b = c conditions
    for b in range(nb):
        for c in range(b + 1, nb):
            d = Q[c] - Q[b]
            dp = P[b] - P[c]
            k1, k2 = yhi[c] - ylo[b], yhi[b] - ylo[c]               # k1 + k2 >= 0: a2 <= a1 where d > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = 1.0 / d
                a1 = (dp + k1) * inv
                a2 = (dp - k2) * inv
            zero = d == 0
            if zero.any():                      # then the pair constrains mu' only: dp - k2 <= 0 <= dp + k1
                never |= zero & ((dp + k1 < 0) | (dp - k2 > 0))
                a1[zero], a2[zero] = np.inf, -np.inf
            np.maximum(t_lo, np.minimum(a1, a2), out=t_lo)
            np.minimum(t_hi, np.maximum(a1, a2), out=t_hi)
    return t_lo, np.where(never, -1.0, t_hi)


def _window_pass(p, q, ylo, yhi):
    """Necessary condition for a non-empty _window_t_interval: some mu' puts every band's y range over the
    segment, [p_b + min(q_b, 0), p_b + max(q_b, 0)], into contact with its window (the bands may use
    different t). O(bands) instead of O(bands^2); nearly as tight on segments, where |q| << window widths.
    p, q: one array per band (contiguous, ~2x faster than strided slices of (..., 5) arrays)."""
    lo = np.full(p[0].shape, -np.inf)
    hi = np.full(p[0].shape, np.inf)
    for b in range(len(p)):
        np.maximum(lo, (ylo[b] - p[b]) - np.maximum(q[b], 0.0), out=lo)
        np.minimum(hi, (yhi[b] - p[b]) - np.minimum(q[b], 0.0), out=hi)
    return lo <= hi


def _quadratic_t_interval(p, q, cmb, thr):
    """Hull over piece combinations of the t in [0, 1] where max over mu' of the quadratic bound >= thr, and
    which combinations reach thr somewhere in [0, 1] (segments, C)."""
    w = 1.0 / cmb["v"]
    wm = w * cmb["m"]
    W = w.sum(axis=1)
    s1 = p @ w.T - wm.sum(axis=1)
    a11 = (p * p) @ w.T - 2.0 * (p @ wm.T) + (wm * cmb["m"]).sum(axis=1) - s1 * s1 / W
    q1 = q @ w.T
    a12 = (p * q) @ w.T - q @ wm.T - s1 * q1 / W
    a22 = np.maximum((q * q) @ w.T - q1 * q1 / W, 0.0)
    c0 = a11 - 2.0 * (cmb["top"] - thr)                           # need a22 t^2 + 2 a12 t + c0 <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        tiny = a22 <= 1e-12 * (np.abs(a11) + 1.0)
        d2 = a12 * a12 - a22 * c0
        disc = np.sqrt(np.maximum(d2, 0.0))
        lo = (-a12 - disc) / a22
        hi = (-a12 + disc) / a22
        empty = d2 < 0
        if tiny.any():                                             # (nearly) linear in t: rare
            b, c = a12[tiny], c0[tiny]
            lo[tiny] = np.where(b > 0, -np.inf, -c / (2 * b))
            hi[tiny] = np.where(b < 0, np.inf, -c / (2 * b))
            empty[tiny] = (c > 0) & (b == 0)
    lo, hi = np.maximum(lo, 0.0), np.minimum(hi, 1.0)
    empty |= lo > hi
    return _cols(np.minimum, np.where(empty, np.inf, lo)), _cols(np.maximum, np.where(empty, -np.inf, hi)), ~empty


def _screen_segments(prep, off, cmb, win, thr, chunk=2000):
    """Segments (age index, E(B-V) segment index, t interval inside it, bitmask of the piece combinations that
    reach thr in it) where the likelihood can reach thr.

    A segment passes if some (t, mu') puts every band inside its y window and the quadratic bound of some
    piece combination reaches thr. First per age over the whole E(B-V) range, through a linear fit of
    ln F(E) with its largest residual eps (windows widened by eps; |N(z + d)| >= N(z) - N(eps) for the
    weighted centred norm N of the quadratic bound), then per segment, where ln F is exactly linear in E
    (the window test per segment in its cheaper relaxed form, _window_pass: segments are short). Each chunk of
    ages tests only the combinations its per-age bounds allow, and _rows only those active in its segments
    (2-3 of up to 14 where bands have support-edge modes): the bounds are the same, the work is not.
    """
    alpha, g, eps = _linear_fit(prep)
    e0, e1 = prep["e"][0], prep["e"][-1]
    A, dA = prep["A_bands"], prep["dA_bands"]
    p0, q0 = alpha + e0 * g + off, (e1 - e0) * g
    tl, th = _window_t_interval(p0, q0, win[0] - eps.max(0), win[1] + eps.max(0))
    flat = dict(cmb, top=np.zeros_like(cmb["top"]))
    nmin = np.sqrt(-2.0 * _segment_bounds(p0, q0, flat))          # (n_age, C)
    neps = np.sqrt((eps * eps) @ (1.0 / cmb["v"]).T)
    age_combos = cmb["top"] - 0.5 * np.maximum(nmin - neps, 0.0) ** 2 >= thr    # (n_age, C): may reach thr
    idx = np.nonzero(np.any(age_combos, axis=1) & (tl <= th))[0]
    out = [], [], [], [], []
    for s0 in range(0, len(idx), chunk):
        kk = idx[s0:s0 + chunk]
        p = [A[b][kk] + off[b] for b in range(len(A))]             # per band (len(kk), segments)
        q = [dA[b][kk] for b in range(len(A))]
        a, j = np.nonzero(_window_pass(p, q, win[0], win[1]))
        use = np.flatnonzero(age_combos[kk].any(axis=0))            # the others cannot reach thr at these ages
        lo, hi, active = _quadratic_t_interval(np.stack([x[a, j] for x in p], axis=1),
                                               np.stack([x[a, j] for x in q], axis=1), _subset(cmb, use), thr)
        ok = lo <= hi
        mask = active[ok] @ (1 << use)              # bit c: combination c active (C <= 2^5 = 32: fits int64)
        for lst, val in zip(out, (kk[a[ok]], j[ok], lo[ok], hi[ok], mask)):
            lst.append(val)
    return tuple(np.concatenate(x) for x in out)


def _subset(cmb, use):
    """The piece combinations number `use` of cmb (the same dict of arrays)."""
    return {key: v[use] for key, v in cmb.items()}


def _cols(op, x):
    """op (np.minimum or np.maximum) reduced over the last axis of x (n, few), one column at a time: the same
    values as x.min/max(axis=1), ~4x faster for a handful of columns."""
    out = x[:, 0].copy()
    for c in range(1, x.shape[1]):
        op(out, x[:, c], out=out)
    return out


EBV_OVERSAMPLE = 1.5   # sheared cells: E(B-V) cells per profile sd = EBV_OVERSAMPLE * resolution (see _rows);
# 3 cells per sd at the default resolution: one row per 0.01 mag table segment on broad posteriors (3 gave two,
# for 1.5x the mean time and the same quantiles to 2e-3; NOTEBOOK.md, "The exact grid posterior")


def _rows(prep, off, scales, cmb, win, thr, seg, resolution, max_sub):
    """Split the surviving part [t_lo, t_hi] of each segment into E(B-V) cells (midpoint rule on the segment's
    n_sub equal cells); per row: k, e, de, a (5), the mu' window [lo, hi] where the bound reaches thr, the
    shear d mu' / d E(B-V) of the row's cells and an upper bound on their log-likelihood (max over mu').

    Sheared cells: a cell of a row is the parallelogram {(e_c + de', mu + shear de') : |de'| <= de/2, mu in its
    mass cell}, along the ridge of the likelihood. In the Gaussian approximation of the main modes (weights
    w_b = 1/scale_b^2) y_b = a_b + t q_b + mu' along a segment; the shear mu' -> mu' - c t with c = sum w q / sum w
    (the w-weighted mean of q) keeps the weighted mean of the y_b fixed, so in (nu = mu' + c t, t) the quadratic
    form is diagonal: precision W = sum w in nu (the mass cells of width h) and a22 = sum w (q - c)^2 in t (the
    profile width, after the mass has adjusted). When one band is much more precise than the others the
    likelihood is a thin tilted sheet; axis-aligned cells needed 1/sqrt(sum w q^2) steps in E(B-V) to follow
    it, sheared ones 1/sqrt(a22): n_sub = resolution x min(EBV_OVERSAMPLE sqrt(a22), sqrt(sum w q^2)) (3 cells
    per sd of the profile at resolution 2: the tent-smoothed draws' E(B-V) variance grows by 1/54 of it, and
    the quantiles agree with resolution-3 references to 2e-3, as with 6 cells; the min never makes the grid
    finer than the axis-aligned one). Each band's support edge moves against the cells by |q_b - c| per segment,
    <= sqrt(a22 / w_b): at most scale_b / resolution per cell, as the axis-aligned grid guaranteed."""
    A, dA, e, de = prep["A"], prep["dA"], prep["e"], prep["de"]
    kk, jj, tl, th = seg
    wg = 1.0 / scales ** 2
    q = dA[kk, jj]
    qw = q @ wg
    c_seg = qw / wg.sum()                                          # shear per unit t of the segment
    a22 = np.maximum((q * q) @ wg - qw * c_seg, 0.0)                # 1 / var(t | nu), t in [0, 1]
    curv = (q * q) @ wg                                            # 1 / var(t | mu'): axis-aligned cells
    n_sub = np.ceil(resolution * np.sqrt(np.minimum(EBV_OVERSAMPLE ** 2 * a22, curv)))
    n_sub = np.clip(n_sub, 1, max_sub).astype(np.int64)
    i0 = np.minimum(np.floor(tl * n_sub).astype(np.int64), n_sub - 1)
    i1 = np.minimum(np.ceil(th * n_sub).astype(np.int64), n_sub)
    cnt = np.maximum(i1 - i0, 1)
    sid = np.repeat(np.arange(len(kk)), cnt)
    i = np.arange(len(sid)) - np.repeat(np.cumsum(cnt) - cnt, cnt) + i0[sid]
    t = (i + 0.5) / n_sub[sid]
    k, j = kk[sid], jj[sid]
    a = A[k, j] + t[:, None] * dA[k, j] + off
    ebv = e[j] + t * de[j]
    dee = de[j] / n_sub[sid]
    w = 1.0 / cmb["v"]                                            # (C, 5)
    W = w.sum(axis=1)
    wm = w * cmb["m"]
    saz = a @ w.T - (wm).sum(axis=1)                              # sum_b w (a - m), (rows, C)
    n2 = (a * a) @ w.T - 2.0 * a @ wm.T + (wm * cmb["m"]).sum(axis=1) - saz * saz / W
    zbar = saz / W
    rb = cmb["top"] - 0.5 * n2
    half = np.sqrt(np.maximum(2.0 * (rb - thr) / W, 0.0))
    good = rb >= thr
    lo = np.maximum(_cols(np.minimum, np.where(good, -zbar - half, np.inf)), _cols(np.maximum, win[0] - a))
    hi = np.minimum(_cols(np.maximum, np.where(good, -zbar + half, -np.inf)), _cols(np.minimum, win[1] - a))
    lo = np.maximum(lo, LOG_MASS_RANGE[0] * LN10)
    hi = np.minimum(hi, LOG_MASS_RANGE[1] * LN10)
    ok = hi > lo
    shear = -c_seg[sid] / de[j]                                    # d mu' / d E(B-V) inside a cell
    lmax = _cols(np.maximum, np.where(good, rb, -np.inf))          # >= L of every cell of the row
    return k[ok] + 1, ebv[ok], dee[ok], a[ok], lo[ok], hi[ok], shear[ok], lmax[ok]


def _lookup_tables(profiles, windows, likelihood, rstar, per_sd=32):
    """Per band: l(y) tabulated on a uniform y grid over its window, step s/per_sd (linear interpolation
    error <= step^2 |l''| / 8 ~ 1e-4 nats), for fast evaluation of many cells."""
    tabs = []
    for (y, ll, s), (ylo, yhi), r in zip(profiles, windows, rstar):
        step = min(s, 0.5) / per_sd
        n = int(np.ceil((yhi - ylo) / step)) + 2
        yy = ylo + step * np.arange(n)
        t = band_loglike(yy, r, likelihood)
        t = np.where(np.isfinite(t), t, -1e4)
        tabs.append((ylo, step, t, np.append(np.diff(t), 0.0)))
    return tabs


EDGE_SPLIT = 4      # the first mass cell of a row (at the support edge sigma = f/2 when it binds) is split in 4


def _row_grid(lo, hi, h, row_logw):
    """Mass cells of each row: m cells in all (n full cells of width hrow = (hi - lo)/n <= h, the first one split
    into EDGE_SPLIT), and log_h = ln hrow + row_logw, the log weight of a full cell per unit likelihood."""
    n = np.maximum(np.ceil((hi - lo) / h), 1).astype(np.int64)
    hrow = (hi - lo) / n
    return n + EDGE_SPLIT - 1, hrow, np.log(hrow) + row_logw


def _cell_geometry(i, lo, hr):
    """Centre mu' and width of the cells number i of rows starting at lo with full cell width hr: cells
    0..EDGE_SPLIT-1 are the split first cell, mu' = lo + (i + 1/2) hr / EDGE_SPLIT, the others
    mu' = lo + (i - EDGE_SPLIT + 3/2) hr (computed for all, then the split cells overwritten)."""
    small = np.flatnonzero(i < EDGE_SPLIT)
    mu = i - (EDGE_SPLIT - 1.5)
    mu *= hr
    mu += lo
    w_small = hr[small] / EDGE_SPLIT
    mu[small] = lo[small] + (i[small] + 0.5) * w_small
    w = hr.copy()
    w[small] = w_small
    return mu, w


def _cell_logw(log_h, i, L):
    """Log weight of cells (prior x volume x likelihood) from their row's log_h (per cell; modified), index in
    the row and L: the split first cells of a row (i < EDGE_SPLIT) are EDGE_SPLIT times narrower."""
    logw = log_h
    logw += L
    logw -= np.log(EDGE_SPLIT) * (i < EDGE_SPLIT)                   # minus 0.0 for the full cells
    return logw


def _evaluate_rows(tabs, a, lo, m, hrow, log_h, thr=-np.inf, chunk=50_000, row0=0):
    """Log-likelihood on a midpoint grid in mu' = ln m for each row (linear interpolation in the per-band
    tables); the rows' cells as _row_grid made them (m cells per row, full width hrow, first cell split in
    EDGE_SPLIT: where the support edge binds the likelihood may jump there and fall steeply). Yields, per chunk
    of ~`chunk` cells with L >= thr: row index + row0 and index of the cell in its row (int32), L, and the log
    weight (row_logw + ln width + L: prior x volume x likelihood, _cell_logw)."""
    ends = np.cumsum(m)
    # per band, the table position of each cell: u = (a_b + mu' - y0_b) / step_b = base_b[row] + mu' / step_b
    base = [(a[:, b] - y0) / step for b, (y0, step, t, dt) in enumerate(tabs)]
    r0 = 0
    while r0 < len(m):
        base0 = ends[r0 - 1] if r0 else 0
        r1 = max(int(np.searchsorted(ends, base0 + chunk, side="right")), r0 + 1)
        cnt = m[r0:r1]                              # per-row values to cells: np.repeat (rows are runs)
        start = ends[r0:r1] - cnt - base0           # each row's first cell in the chunk
        rows = np.repeat(np.arange(row0 + r0, row0 + r1, dtype=np.int32), cnt)
        i = np.arange(len(rows), dtype=np.int32) - np.repeat(start.astype(np.int32), cnt)
        mu = i - (EDGE_SPLIT - 1.5)                 # mu' as _cell_geometry, the split cells set per row
        mu *= np.repeat(hrow[r0:r1], cnt)
        mu += np.repeat(lo[r0:r1], cnt)
        first = start[:, None] + np.arange(EDGE_SPLIT)
        mu[first] = lo[r0:r1, None] + (np.arange(EDGE_SPLIT) + 0.5) * (hrow[r0:r1] / EDGE_SPLIT)[:, None]
        L = np.zeros(len(rows))
        u, g = np.empty(len(rows)), np.empty(len(rows))
        for b, (y0, step, t, dt) in enumerate(tabs):
            np.multiply(mu, 1.0 / step, out=u)
            u += np.repeat(base[b][r0:r1], cnt)
            np.clip(u, 0.0, len(t) - 1.0, out=u)
            j = u.astype(np.intp)                                   # truncation = floor (u >= 0)
            u -= j
            u *= np.take(dt, j, out=g, mode="clip")                # (mode "raise" would buffer `out`)
            u += np.take(t, j, out=g, mode="clip")
            L += u
        keep = L >= thr                                             # below the pruning level: negligible
        lw = np.repeat(log_h[r0:r1], cnt)
        if not keep.all():
            rows, i, L, lw = rows[keep], i[keep], L[keep], lw[keep]
        yield rows, i, L, _cell_logw(lw, i, L)
        r0 = r1


def _logsumexp(x):
    """log sum exp(x) of a 1-D array (-inf for an empty one)."""
    if len(x) == 0:
        return -np.inf
    top = x.max()
    return top + np.log(np.sum(np.exp(x - top)))


def _prune(parts, level, log_drop):
    """Drop the cells with log weight <= level from the kept parts (row, index in row, L, log weight; in place);
    their probability goes into log_drop (log of the summed weights), so the evidence stays exact."""
    w = 0
    for p in parts:
        logw = p[3]
        if logw.min() > level:
            parts[w], w = p, w + 1
            continue
        sel = logw > level
        log_drop = np.logaddexp(log_drop, _logsumexp(logw[~sel]))
        if sel.any():
            parts[w], w = tuple(x[sel] for x in p), w + 1
    del parts[w:]
    return sum(len(p[2]) for p in parts), log_drop


def _rows_to_skip(bound, allowance):
    """The rows (boolean mask) with the smallest log bounds whose summed bound stays within exp(allowance)."""
    if not np.isfinite(allowance):
        return np.zeros(len(bound), bool)
    order = np.argsort(bound)
    cum = np.logaddexp.accumulate(bound[order])
    n = int(np.searchsorted(cum, allowance, side="right"))
    skip = np.zeros(len(bound), bool)
    skip[order[:n]] = True
    return skip


def _drop_level(parts, log_z, log_drop, budget, bin_nats=0.05):
    """The highest log-weight level such that the cells at or below it, with those already dropped (log_drop),
    hold at most `budget` of the evidence exp(log_z): a histogram of the kept cells' weights in bins of bin_nats
    below log Z, summed from the lightest bin up."""
    n_bins = 4000
    hist = np.zeros(n_bins + 1)
    for p in parts:
        dz = log_z - p[3]
        hist += np.bincount(np.minimum((dz / bin_nats).astype(np.int64), n_bins), np.exp(-dz), n_bins + 1)
    allowed = budget - np.exp(log_drop - log_z)
    tail_sum = np.cumsum(hist[::-1])[::-1]                          # weight of the bins >= b
    ok = np.nonzero(tail_sum <= allowed)[0]
    if len(ok) == 0:
        return -np.inf
    return log_z - ok[0] * bin_nats                                 # drop the cells with logw <= this level


def _expand_cells(post, parts, n, rd, log_z, map_age):
    """Write the kept cells (parts of (global row, index in row, L), in row order) into the per-cell arrays of
    post, each filled once, part by part (the temporaries stay in cache): the row's age, E(B-V), widths and
    shear, the cell's mass and width (_cell_geometry), prob = exp(logw - log Z) normalised to the kept cells,
    log_like, the tent flags and the MAP. Returns the probability of each row and its tent_ebv flag."""
    names = ("ebv", "log10_mass", "d_ebv", "d_log10_mass", "mass_shear", "prob", "log_like")
    out = {name: np.empty(n) for name in names}
    out["k"] = np.empty(n, np.int64)
    out["tent_mass"], out["tent_ebv"] = np.empty(n, bool), np.empty(n, bool)
    e0, e1 = post["ebv_range"]
    # cell shapes for sampling and marginals: a tent (triangle of half-width = cell width, the linear
    # interpolant of the midpoint values) inside, a box at the ends of a mass row (support edge, window end)
    # and at the ends of the E(B-V) range
    row_tent_ebv = (rd["ebv"] - rd["dee"] / 2 > e0 + 1e-9) & (rd["ebv"] + rd["dee"] / 2 < e1 - 1e-9)
    row_shear = rd["shear"] / LN10
    row_prob = np.zeros(len(rd["k"]))
    s, best, i_map = 0, -np.inf, 0
    for rows, i, L, logw in parts:
        sl = slice(s, s + len(L))
        rows = rows.astype(np.intp)                                 # (int32 indices cost a conversion per use)
        for name, src in (("k", rd["k"]), ("ebv", rd["ebv"]), ("d_ebv", rd["dee"]), ("mass_shear", row_shear),
                          ("tent_ebv", row_tent_ebv)):
            np.take(src, rows, out=out[name][sl], mode="clip")     # rows are valid; "raise" buffers
        mu, width = _cell_geometry(i, rd["lo"][rows], rd["hrow"][rows])
        np.divide(mu, LN10, out=out["log10_mass"][sl])
        np.divide(width, LN10, out=out["d_log10_mass"][sl])
        out["log_like"][sl] = L
        p = np.subtract(logw, log_z, out=out["prob"][sl])
        np.exp(p, out=p)
        np.logical_and(i > EDGE_SPLIT, i != rd["m"][rows] - 1, out=out["tent_mass"][sl])
        row_prob[rows[0]:rows[-1] + 1] += np.bincount(rows - rows[0], p)
        v = L + map_age[out["k"][sl] - 1]                          # MAP: the density's maximum, see _table
        j = int(np.argmax(v))
        if v[j] > best:
            best, i_map = v[j], s + j
        s = sl.stop
    p_kept = out["prob"].sum()
    out["prob"] /= p_kept
    row_prob /= p_kept
    post.update(out)
    post["map"] = np.array([np.log10(post["k"][i_map]), post["log10_mass"][i_map], post["ebv"][i_map]])
    return row_prob, row_tent_ebv


def exact_posterior(flux_mjy, rel_err, distance_mpc, table=None, likelihood="exact", resolution=2.0,
                    tail=30.0, max_sub=256, keep=30.0, progress=False, seg_chunk=20_000, max_cells=MAX_CELLS,
                    max_evaluated=None, drop=1e-6):
    """Exact posterior p(k, E(B-V), log10 m | x) of one cluster (flux (5,)) or a list for a batch ((N, 5)).

    Returns a dict of grid cells (midpoint quadrature, see module docstring): `k` integer age (Myr), `ebv`,
    `log10_mass` cell centres, `d_ebv`, `d_log10_mass` cell widths, `mass_shear` d log10 m / d E(B-V) inside a
    cell (sheared cells, see _rows), `prob` normalised cell probabilities (sum 1),
    `log_like` per cell; `log_z` the log evidence (prior-weighted, theta-independent constants dropped);
    `age_pmf` (n_age,) marginal P(k | x); `map` (3,) the maximum of the density in the physical coordinates
    (log10 t', log10 m, E(B-V)); `quantiles` (3, 3) 16/50/84 % of the 1-D marginals (rows: parameters);
    `p_dropped`, `p_skipped_bound`: the probability left out of the cells (see `drop`).
    resolution: cells per likelihood sd (default 2: at 1 the tent-smoothed draws are ~17 % too wide along the
    narrow directions, which the SBC HPD-rank test detects; quantiles change < 4e-3 from 1 to 2); tail: pruning
    depth in nats; keep: cells more than `keep` nats below the best are dropped (while evaluating, against
    the running best, so memory is bounded by the kept cells; their weight still counts in log_z).
    max_cells: the most cells kept (~100 bytes each at the peak: 24 while evaluating, 66 in the result dict);
    a broader posterior raises MemoryError instead of exhausting the machine's memory (a 24 GB run was
    OOM-killed before the pruning and the cap).
    max_evaluated: if given, the most cells evaluated (kept or pruned), a bound on the time (~1e7 cells/s);
    past it MemoryError too (a batch can skip the cluster instead of stalling on it for many minutes).
    drop: the share of the posterior probability the kept cells may leave out: half for the lightest evaluated
    cells (their weight is known: post["p_dropped"], included in log_z), half for rows skipped because their
    bound is that small (post["p_skipped_bound"] bounds them; not in log_z). Broad posteriors have long light
    tails in age: at 1e-6 they keep ~6x fewer cells than all within `keep` nats of the best.
    """
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    if f.ndim == 2:
        out, t0 = [], time.time()
        for i in range(len(f)):
            out.append(exact_posterior(f[i], r[i], d[i], table, likelihood, resolution, tail, max_sub, keep,
                                       max_cells=max_cells, max_evaluated=max_evaluated, drop=drop))
            if progress and ((i + 1) % 50 == 0 or i + 1 == len(f)):
                print(f"exact posterior: {i + 1}/{len(f)} clusters, {time.time() - t0:.1f} s", file=sys.stderr)
        return out
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return _exact_posterior(f, r, d, table, likelihood, resolution, tail, max_sub, keep, seg_chunk, max_cells,
                            max_evaluated, drop)


def _exact_posterior(f, r, d, table, likelihood, resolution, tail, max_sub, keep, seg_chunk, max_cells,
                     max_evaluated, drop):
    """exact_posterior of one cluster (checked input f, r, d); see there."""
    prep = _table(table)
    sc = _screen(prep, f, r, d, likelihood, resolution, tail)
    cells = _Cells(keep, drop, max_cells, max_evaluated, resolution)
    rd = _evaluate_segments(prep, sc, cells, resolution, max_sub, seg_chunk)
    if not cells.parts:
        raise RuntimeError("exact_posterior: no grid cell passed the likelihood screen (should not happen)")
    log_z = cells.z_run
    n_kept, log_drop = _prune(cells.parts, _drop_level(cells.parts, log_z, cells.log_drop, drop / 2.0),
                              cells.log_drop)
    post = {"n_age": prep["A"].shape[0], "ebv_range": (prep["e"][0], prep["e"][-1]), "likelihood": likelihood,
            "obs": (f, r, d), "table": table, "log_z": log_z, "p_dropped": float(np.exp(log_drop - log_z)),
            "p_skipped_bound": float(np.exp(cells.log_skip - log_z))}
    row_prob, row_tent_ebv = _expand_cells(post, cells.parts, n_kept, rd, log_z, prep["map_age"])
    post["age_pmf"] = np.bincount(rd["k"] - 1, weights=row_prob, minlength=post["n_age"])
    used = row_prob > 0
    _marginals(post, (rd["ebv"][used], rd["dee"][used], row_prob[used], row_tent_ebv[used]))
    post["quantiles"] = posterior_quantiles(post)
    return post


def _screen(prep, f, r, d, likelihood, resolution, tail):
    """What the evaluation needs of one cluster: the band profiles' mass step h, the screen's threshold thr
    (tail nats below a likelihood value attained), the bounding piece combinations, the bands' y windows, the
    segments that can reach thr and the per-band look-up tables."""
    off = _row_offsets(prep, f, d)
    profiles = [_band_profile(rb, likelihood) for rb in r]
    tops = np.array([np.max(p[1]) + 1e-3 for p in profiles])
    scales = np.array([_band_scale(p) for p in profiles])
    thr = _seed_lower_bound(prep, off, r, likelihood) - tail    # a too low seed costs time, never accuracy
    pieces = [_band_pieces(p, thr - (tops.sum() - t)) for p, t in zip(profiles, tops)]
    cmb = _combos(pieces, thr)
    windows = [(min(p[3] for p in pc), max(p[4] for p in pc)) for pc in pieces]
    win = np.array(windows).T                                      # (2, 5) y windows of the bands
    return dict(off=off, scales=scales, h=1.0 / np.sqrt(np.sum(1.0 / scales ** 2)) / resolution, thr=thr,
                cmb=cmb, win=win, seg=_screen_segments(prep, off, cmb, win, thr),
                tabs=_lookup_tables(profiles, windows, likelihood, r))


class _Cells:
    """The kept cells, pruned while they are evaluated, and the running sums.

    Cells come in chunks and are pruned against the running best log weight `top` and the running evidence
    z_run (the summed weight of the cells so far, a lower bound on Z): a cell with logw <= top - keep, or below
    z_run + log(drop / 2) - log(1e9), can never be kept, so memory is bounded by the kept cells (plus one
    chunk); the pruned cells' weights go into log_drop, so log Z is that of all cells with L >= thr. Rows
    skipped on their bounds go into log_skip. Kept cells are stored compactly as (global row index, index of
    the cell in its row, L, log weight) and expanded once at the end."""

    def __init__(self, keep, drop, max_cells, max_evaluated, resolution):
        self.keep, self.log_half, self.max_cells, self.max_evaluated = keep, np.log(drop / 2.0), max_cells, max_evaluated
        self.resolution = resolution
        self.parts, self.n_kept, self.n_pruned, self.n_eval = [], 0, 0, 0
        self.top, self.z_run, self.log_drop, self.log_skip = -np.inf, -np.inf, -np.inf, -np.inf

    def add(self, rows, i, L, logw):
        self.n_eval += len(L)
        if self.max_evaluated is not None and self.n_eval > self.max_evaluated:
            raise MemoryError(f"exact_posterior: this posterior needs more than max_evaluated = "
                              f"{self.max_evaluated:.3g} evaluated quadrature cells (a very broad posterior)")
        if len(L) == 0:
            return
        self.top = max(self.top, logw.max())
        self.z_run = np.logaddexp(self.z_run, _logsumexp(logw))
        level = max(self.top - self.keep, self.z_run + self.log_half - np.log(1e9))
        sel = logw > level
        if not sel.all():
            self.log_drop = np.logaddexp(self.log_drop, _logsumexp(logw[~sel]))
        if not sel.any():
            return
        self.parts.append((rows, i, L, logw) if sel.all() else (rows[sel], i[sel], L[sel], logw[sel]))
        self.n_kept += len(self.parts[-1][2])
        if self.n_kept > max(2 * self.n_pruned, 1_000_000) or self.n_kept > self.max_cells:   # re-prune
            self.n_kept, self.log_drop = _prune(self.parts, level, self.log_drop)
            self.n_pruned = self.n_kept
            if self.n_kept > self.max_cells:
                raise MemoryError(f"exact_posterior: this posterior keeps more than max_cells = "
                                  f"{self.max_cells:.3g} quadrature cells (a very broad posterior); pass a lower "
                                  f"`resolution` (now {self.resolution}) or a larger max_cells if the memory is "
                                  f"there")


def _evaluate_segments(prep, sc, cells, resolution, max_sub, seg_chunk):
    """Evaluate the screened segments chunk by chunk into `cells`; returns the rows' data (k, ebv, dee, shear,
    lo, hrow, m), concatenated.

    Rows with the smallest upper bounds (width x prior x bound on L), summing to at most drop/2 x z_run x (the
    chunk's share of the rows, estimated generously as 1 / (2 x chunks)), are not evaluated at all; their
    bounds go into cells.log_skip, reported as post["p_skipped_bound"] (an upper bound on the probability they
    hold; z_run only grows, so this stays within drop/2 of Z)."""
    seg, cmb = sc["seg"], sc["cmb"]
    const = -np.log((prep["e"][-1] - prep["e"][0]) * LN10 * (LOG_MASS_RANGE[1] - LOG_MASS_RANGE[0]))
    row_data, n_rows, n_seg = [], 0, len(seg[0])
    for s0 in range(0, n_seg, seg_chunk):
        use = np.flatnonzero(np.bitwise_or.reduce(seg[4][s0:s0 + seg_chunk]) >> np.arange(len(cmb["top"])) & 1)
        k, ebv, dee, a, lo, hi, shear, lmax = _rows(prep, sc["off"], sc["scales"], _subset(cmb, use), sc["win"],
                                                    sc["thr"], tuple(x[s0:s0 + seg_chunk] for x in seg[:4]),
                                                    resolution, max_sub)
        if len(k) == 0:
            continue
        row_logw = prep["log_prior_age"][k - 1] + np.log(dee) + const
        bound = row_logw + np.log(hi - lo) + lmax
        skip = _rows_to_skip(bound, cells.z_run + cells.log_half
                             + np.log(len(k) / (2.0 * n_seg * len(k) / min(seg_chunk, n_seg - s0))))
        if skip.any():
            cells.log_skip = np.logaddexp(cells.log_skip, _logsumexp(bound[skip]))
            k, ebv, dee, a, lo, hi, shear, row_logw = (x[~skip] for x in (k, ebv, dee, a, lo, hi, shear, row_logw))
            if len(k) == 0:
                continue
        m, hrow, log_h = _row_grid(lo, hi, sc["h"], row_logw)
        row_data.append((k, ebv, dee, shear, lo, hrow, m))
        for part in _evaluate_rows(sc["tabs"], a, lo, m, hrow, log_h, sc["thr"], row0=n_rows):
            cells.add(*part)
        n_rows += len(k)
    return dict(zip(("k", "ebv", "dee", "shear", "lo", "hrow", "m"),
                    (np.concatenate([r_[c] for r_ in row_data]) if row_data else np.zeros(0) for c in range(7))))


# ----------------------------------------------------------------------------------------------------------
# Summaries of a posterior.

def _cell_cdf(c, h, w, tent, x0, x1, step, shift=None, tent_shift=None, chunk=1 << 16):
    """CDF on the grid x0, x0 + step, ..., of a mixture of cells with weights w centred at c: boxes of width h,
    or tents of half-width h (tent = True). The density's jumps (boxes) and slope jumps (tents) are binned to
    the grid (quantile error <= step) and integrated.

    shift (optional; the mass marginal of sheared cells, see _rows): the cell's shape is moved by u * shift,
    u distributed as the cell's E(B-V) shape (a box on [-1/2, 1/2], or a tent on [-1, 1] where tent_shift).
    The projection is the convolution of the two shapes; it is drawn as the trapezoid box(a1) * box(a2) with
    the same variance (exact for box * box; a tent of half-width h is box(h) * box(h), so a tent * box(g)
    becomes box(h) * box(sqrt(h^2 + g^2)): same mean and variance, the difference is in the shape inside
    one cell). Trapezoids are slope jumps too; boxes with a shift below one grid step stay boxes.
    Cells that reach past [x0, x1] (sheared cells at the prior bounds, whose draws sample_posterior truncates
    to the prior) are integrated on a grid padded beyond it, and the CDF is renormalised to [x0, x1].
    shift may be given as a pair of arrays (a, b), shift = a * b, formed chunk by chunk (no full-size copy)."""
    n_out = int(np.ceil((x1 - x0) / step)) + 3
    x_out = x0 - step + step * np.arange(n_out + 1)
    chunks = [slice(s0, s0 + chunk) for s0 in range(0, len(c), chunk)]   # the temporaries stay in cache
    shift_of = (lambda sl: None) if shift is None else \
        (lambda sl: shift[0][sl] * shift[1][sl]) if isinstance(shift, tuple) else (lambda sl: shift[sl])
    ext = max((np.max(np.abs(shift_of(sl)) * (1.0 + tent_shift[sl]) + h[sl]) for sl in chunks),
              default=0.0) if shift is not None else 0.0
    pad = int(np.ceil(max(ext, np.max(h, initial=0.0)) / step)) + 2
    n = n_out + 2 * pad
    x = x_out[0] - pad * step + step * np.arange(n + 1)
    jumps, kinks = np.zeros(n + 1), np.zeros(n + 1)
    for sl in chunks:
        _cell_terms(c[sl], h[sl], w[sl], tent[sl], shift_of(sl), None if shift is None else tent_shift[sl],
                    x[0], step, jumps, kinks)
    dens = np.cumsum(jumps) + np.cumsum(np.cumsum(kinks) * step)
    cdf = np.concatenate([[0.0], np.cumsum(dens[:-1] * step)])
    c0, c1 = np.interp([x0, x1], x, cdf)
    return x_out, np.clip((cdf[pad:pad + n_out + 1] - c0) / (c1 - c0), 0.0, 1.0)


def _cell_terms(c, h, w, tent, shift, tent_shift, xstart, step, jumps, kinks):
    """Add the cells' density jumps (boxes) and slope jumps (trapezoids) to the grid arrays (see _cell_cdf)."""
    n = len(jumps) - 1
    idx = lambda v: np.clip(np.rint((v - xstart) / step).astype(np.int64), 0, n)
    g2 = np.zeros_like(h) if shift is None else shift * shift * (1.0 + tent_shift)   # x2 for a tent
    b = ~tent & (g2 < step ** 2)                                     # plain boxes
    if b.any():
        jumps += np.bincount(idx(c[b] - h[b] / 2), w[b] / h[b], n + 1)
        jumps -= np.bincount(idx(c[b] + h[b] / 2), w[b] / h[b], n + 1)
        t = ~b                                                       # trapezoids (incl. tents)
        c, h, w, tent, g2 = c[t], h[t], w[t], tent[t], g2[t]
    a2 = np.sqrt(h * h * tent + g2)                                  # box(h) * box(a2); h^2 for a tent
    ic = idx(c)
    iq = np.rint(np.abs(h - a2) / (2 * step)).astype(np.int64)
    ip = np.maximum(np.rint((h + a2) / (2 * step)).astype(np.int64), iq + 1)     # symmetric on the grid
    sl = w / (step ** 2 * (ip * ip - iq * iq))                        # slope: the trapezoid's area is w
    kinks += np.bincount(np.concatenate([np.clip(ic - ip, 0, n), np.clip(ic + ip, 0, n)]),
                         np.concatenate([sl, sl]), n + 1)
    kinks -= np.bincount(np.concatenate([np.clip(ic - iq, 0, n), np.clip(ic + iq, 0, n)]),
                         np.concatenate([sl, sl]), n + 1)


def _marginals(post, rows=None, step_mass=2e-4, step_ebv=1e-4):
    """Fine-grid CDFs of the log-mass and E(B-V) marginals (stored in post; used for quantiles, CDFs, plots).
    The mass marginal is the projection of the sheared cells (see _rows): each cell's mass shape moves along
    its E(B-V) shape by mass_shear * d_ebv. rows (optional): (ebv, d_ebv, prob, tent_ebv) per E(B-V) row;
    the cells of a row share their E(B-V) shape, so the E(B-V) marginal is the mixture of the rows' shapes."""
    p = post["prob"]
    shift = (post["mass_shear"], post["d_ebv"]) if "mass_shear" in post else None
    post["mass_grid"], post["mass_cdf"] = _cell_cdf(post["log10_mass"], post["d_log10_mass"], p,
                                                    post["tent_mass"], *LOG_MASS_RANGE, step_mass, shift,
                                                    post["tent_ebv"])
    ebv, d_ebv, p, tent = rows if rows is not None else (post["ebv"], post["d_ebv"], p, post["tent_ebv"])
    post["ebv_grid"], post["ebv_cdf"] = _cell_cdf(ebv, d_ebv, p, tent, *post["ebv_range"], step_ebv)


def _age_cdf_grid(post):
    """Exact CDF of the label t' at the bin edges k - 1/2 (piecewise linear in t' within a bin)."""
    k = np.arange(post["n_age"] + 1, dtype=np.float64) + 0.5
    return k, np.concatenate([[0.0], np.cumsum(post["age_pmf"])])


def marginal_cdf(post, param, value):
    """1-D marginal CDF of parameter 0 (log10 t'), 1 (log10 m) or 2 (E(B-V)) at value(s)."""
    value = np.asarray(value, dtype=np.float64)
    if "components" in post:                              # R_V marginalised: the node mixture's CDF
        return sum(np.exp(lw) * marginal_cdf(c, param, value) for c, lw in zip(post["components"], post["log_weight"])
                   if np.isfinite(lw))
    if param == 0:
        edges, cdf = _age_cdf_grid(post)
        return np.interp(10.0 ** value, edges, cdf)
    x, cdf = (post["mass_grid"], post["mass_cdf"]) if param == 1 else (post["ebv_grid"], post["ebv_cdf"])
    return np.interp(value, x, cdf)


def posterior_quantiles(post, qs=QUANTILES):
    """(3 parameters, len(qs)) marginal quantiles in physical units (log10 t', log10 m, E(B-V))."""
    qs = np.asarray(qs, dtype=np.float64)
    edges, cdf = _age_cdf_grid(post)
    out = [np.log10(np.interp(qs, cdf, edges))]
    for p, (x, c) in ((1, ("mass_grid", "mass_cdf")), (2, ("ebv_grid", "ebv_cdf"))):
        if "components" in post:                          # the mixture's CDF on the union of the grids
            x = np.unique(np.concatenate([comp[x] for comp in post["components"] if x in comp]))
            c = marginal_cdf(post, p, x)
        else:
            x, c = post[x], post[c]
        out.append(np.interp(qs, c, x))
    return np.stack(out)


def _draw_in_cells(post, i, u):
    """Points of cells i at the in-cell offsets u (n, 5) in [-1/2, 1/2): age bin jitter u0; mass and E(B-V) as a
    box (u1, u2) or a tent (u1 - u3, u2 - u4) of half-width one cell width (see exact_posterior); the cells are
    sheared: the mass moves with the E(B-V) offset by mass_shear (d log10 m / d E(B-V), see _rows)."""
    jm = np.where(post["tent_mass"][i], u[:, 1] - u[:, 3], u[:, 1])
    je = np.where(post["tent_ebv"][i], u[:, 2] - u[:, 4], u[:, 2])
    de = je * post["d_ebv"][i]
    mass = post["log10_mass"][i] + jm * post["d_log10_mass"][i]
    if "mass_shear" in post:
        mass = mass + post["mass_shear"][i] * de
    return np.stack([np.log10(post["k"][i] + u[:, 0]), mass, post["ebv"][i] + de], axis=1)


def _outside_support(post, theta):
    """True where the likelihood of theta (n, 3) is zero: a band with sigma > f/2 (the support edge moves in
    mass with E(B-V), so a cell's jitter can cross it) or theta outside the prior."""
    f, r, d = post["obs"]
    return ~np.isfinite(log_likelihood(theta, f, r, d, post["table"], post["likelihood"])[0])


def sample_posterior(post, n, rng, max_tries=100):
    """n draws (n, 3) of (log10 t', log10 m, E(B-V)): a cell by probability, then within the cell's shape
    (tent or box in mass and E(B-V), see exact_posterior) and uniformly within the 1 Myr age bin (the label
    jitter t' = k + U[-1/2, 1/2]).

    The cells of a mass row start at the support edge sigma_b = f_b/2 at the row's E(B-V), but that edge moves
    in mass with E(B-V), so the E(B-V) jitter can carry a draw of an edge cell past it (2-8 % of the draws of
    some clusters). Such draws are re-drawn inside the same cell until they lie in the support, i.e. each
    cell's shape is truncated to where the likelihood is non-zero (the cell keeps its probability). The cell
    centre is always inside, so this ends; a draw still outside after max_tries rounds takes the centre.
    """
    if "components" in post:                              # R_V marginalised (exact_posterior_rv)
        return _sample_rv(post, n, rng)
    cdf = np.cumsum(post["prob"])
    i = np.minimum(np.searchsorted(cdf, rng.uniform(0.0, cdf[-1], n), side="right"), len(cdf) - 1)
    theta = _draw_in_cells(post, i, rng.uniform(-0.5, 0.5, (n, 5)))
    if "obs" not in post:                                 # a posterior dict without its observation: no check
        return theta
    bad = np.nonzero(_outside_support(post, theta))[0]
    for _ in range(max_tries):
        if len(bad) == 0:
            break
        theta[bad] = _draw_in_cells(post, i[bad], rng.uniform(-0.5, 0.5, (len(bad), 5)))
        bad = bad[_outside_support(post, theta[bad])]
    if len(bad):
        theta[bad] = _draw_in_cells(post, i[bad], np.zeros((len(bad), 5)))
    return theta


def _ln_flux_at(prep, theta):
    """ln F (..., 5) of a prepared table at theta (..., 3), age bin round(t'), linear in E(B-V) (as
    simulate.model_flux); the prior mask, the age bins k and t'."""
    t = 10.0 ** theta[..., 0]
    k = age_bin(theta[..., 0])
    e = prep["e"]
    ok = (t >= 0.5) & (t < prep["A"].shape[0] + 0.5) & (theta[..., 1] >= LOG_MASS_RANGE[0]) \
        & (theta[..., 1] <= LOG_MASS_RANGE[1]) & (theta[..., 2] >= e[0]) & (theta[..., 2] <= e[-1])
    kc = np.clip(k, 1, prep["A"].shape[0])
    ec = np.clip(theta[..., 2], e[0], e[-1])
    j = np.clip(np.searchsorted(e, ec, side="right") - 1, 0, len(e) - 2)
    w = ((ec - e[j]) / prep["de"][j])[..., None]
    return prep["A"][kc - 1, j] * (1.0 - w) + prep["A"][kc - 1, j + 1] * w, ok, kc, t


def log_likelihood(theta, flux_mjy, rel_err, distance_mpc, table=None, likelihood="exact"):
    """Sum over bands of l(y) at theta (..., 3) = (log10 t', log10 m, E(B-V)) for one cluster; age bin =
    round(t'); ln F interpolated linearly in E(B-V) as simulate.model_flux. -inf outside the prior."""
    prep = _table(table)
    theta = np.asarray(theta, dtype=np.float64)
    lnF, ok, kc, t = _ln_flux_at(prep, theta)
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    y = lnF + theta[..., 1:2] * LN10 + _row_offsets(prep, f, d)
    L = band_loglike(y, r, likelihood).sum(axis=-1)
    return np.where(ok, L, -np.inf), kc, t


def log_map_density(theta, flux_mjy, rel_err, distance_mpc, table=None, likelihood="exact"):
    """What post["map"] maximises, at theta (..., 3) of one cluster: log P(k) + ln k + sum_b l_b, the
    unnormalised posterior density in (log10 t', log10 m, E(B-V)) at the centre t' = k of the age bin
    k = round(t') (up to a constant; -inf outside the prior). Returns (value, k). No grid is needed: ranking
    posterior samples by it gives a MAP (evaluate.densest_sample)."""
    L, k, _ = log_likelihood(theta, flux_mjy, rel_err, distance_mpc, table, likelihood)
    return L + _table(table)["map_age"][k - 1], k


def log_density(theta, flux_mjy, rel_err, distance_mpc, posts=None, table=None, likelihood="exact"):
    """Exact log p(theta | x) in the cINN's physical coordinates (log10 t' with the jitter, log10 m, E(B-V)).

    theta (N, 3) (one point per cluster) or (N, M, 3); flux_mjy, rel_err (N, 5); distance_mpc (N,).
    posts: the exact_posterior list of these clusters (computed here if None; it supplies the evidence).
    p(log10 t', log10 m, E | x) = P(k) U(log10 m) U(E) L(k, m, E) / Z * t' ln 10, k = round(t').
    """
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    theta = np.asarray(theta, dtype=np.float64)
    if f.ndim != 2 or theta.shape[0] != len(f) or theta.shape[-1] != 3 or theta.ndim not in (2, 3):
        raise ValueError(f"theta {theta.shape} must be (N, 3) or (N, M, 3) for N = {len(f)} clusters")
    if posts is None:
        posts = exact_posterior(f, r, d, table=table, likelihood=likelihood)
    out = np.empty(theta.shape[:-1])
    for i in range(len(f)):
        out[i] = _log_density_one(theta[i], f[i], r[i], d[i], posts[i], table, likelihood)
    return out


def _log_density_one(theta, f, r, d, post, table, likelihood):
    """log_density of one cluster; with R_V marginalised, the mixture's: log sum_k pi_k p(theta | x, R_k)."""
    if "components" in post:
        table = post["tables"][0]
        L, _, ok = _rv_loglike(theta, post)
        k, t = np.clip(age_bin(theta[..., 0]), 1, None), 10.0 ** theta[..., 0]
    else:
        L, k, t = log_likelihood(theta, f, r, d, table, likelihood)
        ok = True
    prep = _table(table)
    width = (LOG_MASS_RANGE[1] - LOG_MASS_RANGE[0]) * (prep["e"][-1] - prep["e"][0])
    k = np.minimum(k, prep["A"].shape[0])
    return np.where(ok, prep["log_prior_age"][k - 1] - np.log(width) + L + np.log(t * LN10) - post["log_z"], -np.inf)


def _logsumexp_rows(a):
    """log sum exp over axis 0 of (K, ...) values that may be -inf."""
    top = np.max(a, axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.sum(np.exp(a - safe), axis=0))


# ----------------------------------------------------------------------------------------------------------
# R_V marginalised (the nuisance parameter of Walter et al. 2026 Sect. 1): a mixture over quadrature nodes.

RV_SUBSTEPS = 16        # the R_V integral at a point theta: midpoint steps per node interval (against 128:
                        # median error <= 5e-4 nats, largest 5e-3 on the tests' clusters; 32: 4x less, 2x the time)
RV_POOL = 10            # sample_posterior with R_V marginalised: proposals per draw and unit of 1 / ess
RV_RESERVOIR = 100_000  # draws kept of each node posterior (the proposal's), each used once


def _trapezoid_log_weights(x):
    """log weights of the trapezoid rule on sorted nodes x, normalised to sum 1 (one node: weight 1)."""
    if len(x) == 1:
        return np.zeros(1)
    w = np.zeros(len(x))
    w[:-1] += np.diff(x) / 2.0
    w[1:] += np.diff(x) / 2.0
    return np.log(w / w.sum())


def rv_quadrature(rv_prior):
    """The variable-R_V model's table nodes (simulate.rv_nodes) in the prior [lo, hi], whose bounds must be
    nodes, with the log weights of E_{R_V ~ U[lo, hi]}[g] ~ sum_k w_k g(R_k) (the trapezoid rule).
    Returns (nodes, log w)."""
    lo, hi = (float(v) for v in rv_prior)
    nodes = rv_nodes()
    sel = (nodes >= lo - 1e-9) & (nodes <= hi + 1e-9)
    if not sel.any() or abs(nodes[sel][0] - lo) > 1e-9 or abs(nodes[sel][-1] - hi) > 1e-9:
        raise ValueError(f"R_V prior {rv_prior}: its bounds must be R_V nodes ({nodes[0]}, {nodes[1]}, ..., "
                         f"{nodes[-1]})")
    nodes = nodes[sel]
    return nodes, _trapezoid_log_weights(nodes)


def _rv_loglike(theta, post, chunk=2048):
    """log int L(theta, R_V) p(R_V) dR_V at points theta (..., 3), the simulator's model: ln F linear in R_V
    between the nodes, so y_b = ln f_b - ln f*_b is linear in R_V too. Each node interval is cut in
    RV_SUBSTEPS steps; a step counts by the midpoint rule on its part inside the support (y_b >= ln 2 r*_b for
    every band, an interval since y_b is linear: the support edge is a jump the plain rule would blur).
    Returns it, the same integral on the nodes alone (the node mixture's: their weights, their L) and the
    prior mask. Points go in chunks of `chunk` (the sub-step arrays hold n_int x RV_SUBSTEPS x chunk x 5).
    """
    pts = np.asarray(theta, dtype=float).reshape(-1, 3)
    parts = [_rv_loglike_points(pts[i:i + chunk], post) for i in range(0, len(pts), chunk)] or \
        [_rv_loglike_points(pts, post)]
    return tuple(np.concatenate(p).reshape(np.shape(theta)[:-1]) for p in zip(*parts))


def _rv_loglike_points(theta, post):
    """_rv_loglike of points theta (n, 3)."""
    f, r, d = post["obs"]
    lnF = []
    for table in post["tables"]:                     # a gather only: no _table() preparation (83 MB each)
        e = np.asarray(table["ebv_nodes"], dtype=np.float64)
        a, ok, _, _ = _ln_flux_at({"A": table["ln_flux"], "e": e, "de": np.diff(e)}, theta)
        lnF.append(a)
    y = np.stack(lnF) + theta[..., 1:2] * LN10 + _row_offsets(None, f, d)
    shape = (-1, 1, 1)                                                     # (n_nodes, n, 5) broadcasting
    nodes = band_loglike(y, r, post["likelihood"]).sum(axis=-1) \
        + post["node_log_weight"].reshape(shape[:-1])
    s = np.arange(RV_SUBSTEPS + 1).reshape(shape) / RV_SUBSTEPS
    edges = (y[:-1, None] * (1.0 - s) + y[1:, None] * s)                  # (n_int, S + 1, ..., 5)
    y0, y1 = edges[:, :-1], edges[:, 1:]
    lo, hi = np.zeros(y0.shape[:-1]), np.ones(y0.shape[:-1])
    if post["likelihood"] in ("exact", "gaussian", "no_2_over_f"):        # the support edge sigma = f/2
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log(2.0 * r) - y0) / (y1 - y0)                        # where y_b crosses ln 2 r*_b
        up, down = y1 > y0, y1 < y0
        lo = np.maximum(lo, np.max(np.where(up, t, np.where(y0 >= np.log(2.0 * r), 0.0, 2.0)), axis=-1))
        hi = np.minimum(hi, np.min(np.where(down, t, np.inf), axis=-1))
    frac = np.clip(hi - lo, 0.0, 1.0)
    tm = ((lo + hi) / 2.0)[..., None]
    L = band_loglike(y0 + tm * (y1 - y0), r, post["likelihood"]).sum(axis=-1)
    with np.errstate(divide="ignore"):
        L = np.where(frac > 0, L + np.log(frac), -np.inf).reshape((-1,) + L.shape[2:])
    return _logsumexp_rows(L) - np.log(len(L)), _logsumexp_rows(nodes), np.broadcast_to(ok, L.shape[1:])


def _log_ratio(theta, post):
    """log of the marginal's density over the node mixture's at theta: the fine R_V integral of the likelihood
    over its node quadrature (the prior cancels), i.e. what the mixture misses between the nodes."""
    fine, coarse, _ = _rv_loglike(theta, post)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(coarse), fine - coarse, -np.inf)


def _compact_component(post, reservoir, rng):
    """A node posterior as the R_V mixture keeps it: log Z, MAP, marginals and `reservoir` draws, each used once
    (_mixture_draws); not its cells (26 broad node posteriors held 16.7 GB)."""
    out = {k: post[k] for k in ("log_z", "n_age", "age_pmf", "map", "mass_grid", "mass_cdf", "ebv_grid", "ebv_cdf")}
    out.update(draws=sample_posterior(post, reservoir, rng), used=0)
    return out


def _mixture_draws(post, n, rng):
    """n draws of the node mixture sum_k pi_k p(theta | x, R_k) (the proposal of sample_posterior): counts
    by pi_k, then each node's next unused draws."""
    parts = []
    for c, m, v in zip(post["components"], rng.multinomial(n, np.exp(post["log_weight"])), post["rv"]):
        if m == 0:
            continue
        if c["used"] + m > len(c["draws"]):
            raise RuntimeError(f"exact_posterior_rv: the node posterior at R_V = {v:.1f} has no more of its "
                               f"{len(c['draws'])} draws; pass a larger `reservoir`")
        parts.append(c["draws"][c["used"]:c["used"] + m])
        c["used"] += int(m)
    return np.concatenate(parts)[rng.permutation(n)]


def _sample_rv(post, n, rng):
    """n draws of the R_V marginal: RV_POOL * n draws of the node mixture per unit of its effective share
    (post["ess"], at least 0.1), importance-resampled by _log_ratio."""
    pool = _mixture_draws(post, int(np.ceil(RV_POOL / max(post.get("ess", 1.0), 0.1))) * n, rng)
    lr = _log_ratio(pool, post)
    p = np.exp(lr - lr.max())
    return pool[rng.choice(len(pool), n, p=p / p.sum())]


def exact_posterior_rv(flux_mjy, rel_err, distance_mpc, rv_prior, table_at=None, n_check=4000, seed=0,
                       reservoir=RV_RESERVOIR, **kwargs):
    """Exact posterior of one cluster with R_V ~ U[rv_prior] marginalised (Walter et al. 2026, Sect. 1):

        p(theta | x) = p(theta) int L(theta, R_V) p(R_V) dR_V / Z,     Z = int Z(R_V) p(R_V) dR_V.

    The density (log_density) takes the R_V integral at theta itself: on the variable-R_V model's table nodes
    (RV_STEP apart; simulate.load_table(r_v) or table_at(r_v)), RV_SUBSTEPS steps per node interval
    (_rv_loglike). Draws come from a proposal, the mixture sum_k pi_k p(theta | x, R_k) of exact_posterior at
    every node R_k (kwargs go to it; each is kept as `reservoir` draws, not as cells; at every 2nd or 3rd node
    the importance share fell to 0.06 and 0.008), pi_k = w_k Z(R_k) / sum_j w_j Z(R_j) with the evidences
    Z(R_k) and trapezoid weights w_k (rv_quadrature), importance-resampled by the ratio of the two densities
    (_log_ratio; sample_posterior). The mixture alone is the R_V integral on its nodes: where the photometry is
    precise, p(theta | x, R_V) moves by more than its width between two nodes (mostly in mass, by 0.4 E(B-V)
    dA/dR_V), and the mixture is a comb that SBC's HPD rank test rejects. log Z is the mixture's, times the
    mean ratio over n_check of its draws.

    Returns a dict that marginal_cdf, posterior_quantiles, sample_posterior and log_density take like an
    exact_posterior's: `components` (the node posteriors: log Z, MAP, marginals, draws; where the likelihood
    has no support, Z = 0), `log_weight` log pi_k, `rv` their nodes, `tables` (the nodes' tables), `rv_mean`
    and `rv_sd` of p(R_V | x), `log_z`, `ess` (the importance draws' effective share), `age_pmf`, `quantiles`
    (the node mixture's marginals) and `map` (the component MAP of highest density).
    """
    nodes, log_w = rv_quadrature(rv_prior)
    table_at = table_at or (lambda v: load_table(r_v=v))
    tables = [table_at(v) for v in nodes]
    rng = np.random.default_rng(seed)
    comps, keep = [], []
    for table in tables:
        try:
            node = exact_posterior(flux_mjy, rel_err, distance_mpc, table=table, **kwargs)
            comps.append(_compact_component(node, reservoir, rng))
            keep.append(True)
            del node                   # one node posterior's cells at a time
        except RuntimeError:           # no cell in the likelihood's support at this R_V (e.g. mass > 8 needed)
            comps.append({"log_z": -np.inf})
            keep.append(False)
    if not any(keep):
        raise RuntimeError(f"exact_posterior_rv: no R_V node of {rv_prior} has likelihood support")
    keep = np.array(keep)
    log_pi = log_w + np.array([c["log_z"] for c in comps])
    log_z = _logsumexp(log_pi[keep])
    pi = np.exp(log_pi - log_z)
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    post = {"components": comps, "node_log_weight": log_w, "log_weight": log_pi - log_z, "rv": nodes,
            "tables": tables, "obs": (f, r, d), "likelihood": kwargs.get("likelihood", "exact"),
            "n_age": comps[keep.argmax()]["n_age"], "age_pmf": sum(p * c["age_pmf"] for p, c, k in zip(pi, comps, keep) if k),
            "rv_mean": float(pi @ nodes), "rv_sd": float(np.sqrt(max(pi @ (nodes - pi @ nodes) ** 2, 0.0)))}
    lr = _log_ratio(_mixture_draws(post, n_check, rng), post)
    post["log_z"] = log_z + _logsumexp(lr) - np.log(n_check)
    post["ess"] = float(np.exp(2 * _logsumexp(lr) - _logsumexp(2 * lr)) / n_check)
    post["quantiles"] = posterior_quantiles(post)
    maps = np.array([c["map"] for c, k in zip(comps, keep) if k])
    post["map"] = maps[np.argmax(_log_density_one(maps, f, r, d, post, None, None))]
    return post


# ----------------------------------------------------------------------------------------------------------
# CIGALE-style maximum likelihood (minimum chi^2 with Gaussian errors, mass solved analytically).

MLE_KEYS = ("age_myr", "ebv", "log10_mass", "chi2", "age_myr_lo", "age_myr_hi", "ebv_lo", "ebv_hi", "log10_mass_lo",
            "log10_mass_hi")


def _mle_prep(prep):
    """Tables for the MLE (once per model table): blocks of cells
    (age blocks of ~2 % in age, at least 4 ages; 8 E(B-V) nodes) with, per band, the range of the cells'
    colours ln F_b - mean_b' ln F_b', a block-centre cell, and F, F^2 in block order (see mle)."""
    if "mle_blocks" in prep:
        return
    A = prep["A"]
    n_age, n_e = A.shape[:2]
    F = np.exp(A).reshape(-1, 5)
    starts = [0]
    while starts[-1] < n_age:
        starts.append(starts[-1] + max(4, int(0.02 * (starts[-1] + 1))))
    a_edge = np.minimum(np.array(starts), n_age)
    e_edge = np.append(np.arange(0, n_e, 8), n_e)
    colour = A - A.mean(axis=2, keepdims=True)
    lo = np.minimum.reduceat(np.minimum.reduceat(colour, a_edge[:-1], axis=0), e_edge[:-1], axis=1)
    hi = np.maximum.reduceat(np.maximum.reduceat(colour, a_edge[:-1], axis=0), e_edge[:-1], axis=1)
    ca = (a_edge[:-1] + a_edge[1:]) // 2
    ce = (e_edge[:-1] + e_edge[1:]) // 2
    centre = (ca[:, None] * n_e + ce[None, :]).ravel()
    cells = [(np.arange(a0, a1)[:, None] * n_e + np.arange(e0, e1)[None, :]).ravel()
             for a0, a1 in zip(a_edge[:-1], a_edge[1:]) for e0, e1 in zip(e_edge[:-1], e_edge[1:])]
    start = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    cells = np.concatenate(cells)
    prep["mle_blocks"] = {"lo": lo.reshape(-1, 5), "hi": hi.reshape(-1, 5), "Fc": F[centre],
                          "F2c": F[centre] ** 2, "start": start, "cells": cells, "F": F[cells], "F2": F[cells] ** 2}


def mle(flux_mjy, rel_err, distance_mpc, table=None, batch=512, ranges=True, progress=False):
    """Minimum chi^2 over the (age, E(B-V) node) grid, chi^2 = sum_b (f*_b - m F_b)^2 / sigma_b^2 with
    sigma = rel_err * flux and the mass m solved by weighted least squares for each grid point (CIGALE-style;
    real data: rel_err already holds the 5 % systematic of Eq. 10).

    chi^2(cell) = S0 - u^2 / v, u = sum_b F_b f*_b / sigma_b^2, v = sum_b F_b^2 / sigma_b^2, m = u / v.
    Block screen (exact): C = the chi^2 of the best block-centre cell (an upper bound on the minimum), plus 1
    with the ranges. A cell with chi^2 <= C has every band within |1 - m F_b / f*_b| <= r_b sqrt(C), i.e. its
    colours ln F_b - ln F_c lie in windows set by the observed ones; a block of cells whose colour ranges
    (tabulated per block) cannot meet all windows for any mass holds no such cell and is skipped. The other
    blocks are evaluated in float64, block by block for all clusters that pass it (matrix products): the exact
    minimum, then, with the ranges, the blocks whose minimum is within Delta chi^2 <= 1 of it again for the
    1-sigma ranges. Typically ~5 % of the cells are evaluated (all of them for poorly constrained clusters).

    Returns dict of (N,) arrays: age_myr, ebv, log10_mass, chi2, and Delta chi^2 <= 1 profile ranges over the
    grid age_myr_lo/_hi, ebv_lo/_hi, log10_mass_lo/_hi (the mass range includes its least-squares error);
    ranges=False skips the ranges (NaN).
    """
    f, r, d = _check_obs(flux_mjy, rel_err, distance_mpc)
    f, r, d = np.atleast_2d(f), np.atleast_2d(r), np.atleast_1d(d)
    prep = _table(table)
    _mle_prep(prep)
    blk, e = prep["mle_blocks"], prep["e"]
    n_e = prep["A"].shape[1]
    N = len(f)
    out = {key: np.full(N, np.nan) for key in MLE_KEYS}
    t0 = time.time()
    for b0 in range(0, N, batch):
        sl = slice(b0, min(b0 + batch, N))
        passing = _mle_screen(blk, f[sl], r[sl], ranges)         # the best centre cell's block always passes
        _mle_blocks(blk, f[sl], r[sl], d[sl], passing, e, n_e, ranges, {k: v[sl] for k, v in out.items()})
        if progress:
            print(f"mle: {sl.stop}/{N} clusters, {time.time() - t0:.1f} s", file=sys.stderr)
    return out


def _mle_screen(blk, f, r, ranges):
    """(n clusters, n blocks) True where the block may hold a cell with chi^2 <= C (see mle)."""
    sig = r * f
    w1, w2 = f / sig ** 2, 1.0 / sig ** 2
    s0 = np.sum((f / sig) ** 2, axis=1)
    u = blk["Fc"] @ w1.T                                           # (blocks, n): the block-centre cells
    v = blk["F2c"] @ w2.T
    c_best = np.maximum(s0 - np.max(u * u / v, axis=0), 0.0)
    c_lim = c_best * (1.0 + 1e-9) + 1e-9 * s0 + (1.0 if ranges else 0.0)   # float64 rounding of S0-sized sums
    rho = r * np.sqrt(c_lim)[:, None]                             # |1 - m F_b / f*_b| <= rho_b
    with np.errstate(divide="ignore"):
        wlo = np.where(rho < 1.0, np.log(np.maximum(1.0 - rho, 0.0)), -np.inf)
    lnf = np.log(f)
    lo_mu = np.full((len(f), len(blk["lo"])), -np.inf)
    hi_mu = np.full_like(lo_mu, np.inf)
    for band in range(5):                                         # window of mu' = ln m + mean ln F per block
        np.maximum(lo_mu, (wlo[:, band] + lnf[:, band])[:, None] - blk["hi"][:, band][None, :], out=lo_mu)
        np.minimum(hi_mu, (np.log1p(rho[:, band]) + lnf[:, band])[:, None] - blk["lo"][:, band][None, :],
                   out=hi_mu)
    return lo_mu <= hi_mu


def _mle_blocks(blk, f, r, d, passing, e, n_e, ranges, out):
    """Exact minimum (and ranges) over the passing blocks, block by block for all clusters passing it; writes
    into the (views of the) output arrays of these clusters."""
    n = len(f)
    sig = r * f
    w1, w2 = f / sig ** 2, 1.0 / sig ** 2
    s0 = np.sum((f / sig) ** 2, axis=1)
    best, cell, mass = np.full(n, np.inf), np.zeros(n, np.int64), np.full(n, np.nan)
    bmin = np.full(passing.shape, np.inf)                          # per cluster and block: its minimum
    st = blk["start"]

    def block_chi(j, sel):
        Fb, F2b = blk["F"][st[j]:st[j + 1]], blk["F2"][st[j]:st[j + 1]]
        u = Fb @ w1[sel].T
        v = F2b @ w2[sel].T
        return s0[sel] - u * u / v, u, v

    for j in np.nonzero(passing.any(axis=0))[0]:
        sel = np.nonzero(passing[:, j])[0]
        chi, u, v = block_chi(j, sel)
        i = np.argmin(chi, axis=0)
        cmin = chi[i, np.arange(len(sel))]
        bmin[sel, j] = cmin
        better = cmin < best[sel]
        g = sel[better]
        best[g], cell[g] = cmin[better], blk["cells"][st[j] + i[better]]
        mass[g] = (u / v)[i[better], np.nonzero(better)[0]]
    ok_c = np.isfinite(best)
    scale = (PC10_IN_MPC / d) ** 2
    age_i, e_i = np.divmod(cell, n_e)
    out["age_myr"][ok_c] = age_i[ok_c] + 1
    out["ebv"][ok_c] = e[e_i[ok_c]]
    out["log10_mass"][ok_c] = np.log10(mass[ok_c] / scale[ok_c])
    out["chi2"][ok_c] = np.maximum(best[ok_c], 0.0)
    if not ranges:
        return
    big = np.iinfo(np.int64).max
    acc = {"alo": np.full(n, big), "ahi": np.full(n, -1), "elo": np.full(n, big), "ehi": np.full(n, -1),
           "mlo": np.full(n, np.inf), "mhi": np.full(n, -np.inf)}
    near = bmin <= (best + 1.0)[:, None]
    for j in np.nonzero(near.any(axis=0))[0]:
        sel = np.nonzero(near[:, j])[0]
        chi, u, v = block_chi(j, sel)
        ok = chi <= best[sel] + 1.0
        m = u / v
        half = np.sqrt(np.maximum(best[sel] + 1.0 - chi, 0.0) / v)
        a_c, e_c = np.divmod(blk["cells"][st[j]:st[j + 1]], n_e)
        for key, vals, red, fill in (("alo", a_c, np.min, big), ("ahi", a_c, np.max, -1),
                                     ("elo", e_c, np.min, big), ("ehi", e_c, np.max, -1)):
            got = red(np.where(ok, vals[:, None], fill), axis=0)
            acc[key][sel] = np.minimum(acc[key][sel], got) if red is np.min else np.maximum(acc[key][sel], got)
        acc["mlo"][sel] = np.minimum(acc["mlo"][sel], np.min(np.where(ok, np.maximum(m - half, 1e-300), np.inf), 0))
        acc["mhi"][sel] = np.maximum(acc["mhi"][sel], np.max(np.where(ok, m + half, -np.inf), 0))
    out["age_myr_lo"][ok_c], out["age_myr_hi"][ok_c] = acc["alo"][ok_c] + 1, acc["ahi"][ok_c] + 1
    out["ebv_lo"][ok_c], out["ebv_hi"][ok_c] = e[acc["elo"][ok_c]], e[acc["ehi"][ok_c]]
    out["log10_mass_lo"][ok_c] = np.log10(acc["mlo"][ok_c] / scale[ok_c])
    out["log10_mass_hi"][ok_c] = np.log10(acc["mhi"][ok_c] / scale[ok_c])


# ----------------------------------------------------------------------------------------------------------
# A file of clusters, and the command line.

def posterior_summaries(flux_mjy, rel_err, distance_mpc, n_samples, rng, keep=(), **kwargs):
    """exact_posterior of each cluster (rows of (N, 5) arrays), reduced to what a file can hold.

    A cluster whose posterior cannot be computed (past the memory or time caps, or no cell in the screen) gets
    NaN summaries and failed = True; the others are unaffected. kwargs go to exact_posterior.
    Returns:
        dict samples (N, n_samples, 3), quantiles (N, 3, 3) as [q, param], map (N, 3), log_z (N,), failed (N,),
        errors {row: message}, and posts {row: the posterior} for the rows in `keep`.
    """
    n = len(flux_mjy)
    out = dict(samples=np.full((n, n_samples, 3), np.nan), quantiles=np.full((n, 3, 3), np.nan),
               map=np.full((n, 3), np.nan), log_z=np.full(n, np.nan), failed=np.zeros(n, bool), errors={}, posts={})
    t0 = time.time()
    for i in range(n):
        try:
            post = exact_posterior(flux_mjy[i], rel_err[i], distance_mpc[i], **kwargs)
        except (MemoryError, RuntimeError) as err:       # this cluster only: a NaN row, not a lost batch
            out["failed"][i], out["errors"][i] = True, str(err)
            continue
        out["samples"][i] = sample_posterior(post, n_samples, rng)
        out["quantiles"][i] = post["quantiles"].T
        out["map"][i], out["log_z"][i] = post["map"], post["log_z"]
        if i in keep:
            out["posts"][i] = post
        if (i + 1) % 10 == 0 or i + 1 == n:
            print(f"exact posterior: {i + 1}/{n} clusters, {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def _load_table_file(path):
    tab = load_npz(path, required=("ln_flux", "ebv_nodes"))
    return {"ln_flux": tab["ln_flux"], "ebv_nodes": tab["ebv_nodes"]}


def parse_args(argv=None):
    """The command line of grid_posterior.py."""
    ap = argparse.ArgumentParser(description="Exact grid posterior and CIGALE-style MLE of star clusters "
                                             "(Walter et al. 2026 Sect. 3.2.2).")
    ap.add_argument("--obs", required=True, help="observation .npz (flux_mjy, rel_err, distance_mpc; SPEC.md Sect. 4)")
    ap.add_argument("--out", required=True, help="output .npz: samples, quantiles, modes, map, log_z, mle_*")
    ap.add_argument("--samples", type=int, default=1000, help="posterior draws per cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="", help="comma-separated cluster indices to draw (PNG corner plots)")
    ap.add_argument("--plot-dir", default=None, help="folder for the figures (default: next to --out)")
    ap.add_argument("--first", type=int, default=None, help="only the first N clusters of the file")
    ap.add_argument("--likelihood", default="exact", choices=LIKELIHOODS, help="(testing only) likelihood model")
    ap.add_argument("--resolution", type=float, default=2.0, help="quadrature cells per likelihood width")
    ap.add_argument("--table", default=None, help="(testing) model table .npz with ln_flux and ebv_nodes")
    args = ap.parse_args(argv)
    if args.samples < 1 or args.seed < 0 or (args.first is not None and args.first < 1):
        ap.error("--samples and --first must be >= 1, --seed >= 0")
    if not args.resolution > 0:
        ap.error("--resolution must be > 0")
    return args


def main(argv=None):
    import plots                                  # figures only: the library above needs no matplotlib
    args = parse_args(argv)
    try:
        obs = load_npz(args.obs)
        n = checks.observations(obs, args.obs, keys=("flux_mjy", "rel_err", "distance_mpc"))
        checks.output_path(args.out, (".npz",))
        n = n if args.first is None else min(args.first, n)
        table = _load_table_file(args.table) if args.table else None
        plot_rows = [int(i) for i in args.plot.split(",") if i.strip()] if re.fullmatch(r"[\d,\s]*", args.plot) else [-1]
        if any(i < 0 or i >= n for i in plot_rows):
            raise ValueError(f"--plot indices must be in 0..{n - 1}")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"grid_posterior.py: error: {err}") from None
    f, r, d = (np.asarray(obs[k][:n], dtype=np.float64) for k in ("flux_mjy", "rel_err", "distance_mpc"))
    res = posterior_summaries(f, r, d, args.samples, np.random.default_rng(args.seed), keep=plot_rows, table=table,
                              likelihood=args.likelihood, resolution=args.resolution)
    for i, msg in res["errors"].items():
        print(f"{args.obs}: cluster {i}: NaN in the output, exact_failed = True ({msg})", file=sys.stderr)
    m = mle(f, r, d, table=table, progress=n > 256)
    modes = np.full((n, 3, 3), np.nan)
    modes[:, 0] = res["map"]
    out = dict(samples=res["samples"], quantiles=res["quantiles"], modes=modes, map=res["map"], log_z=res["log_z"],
               exact_failed=res["failed"], bands=np.array(BANDS), seed=np.int64(args.seed),
               **{f"mle_{k}": v for k, v in m.items()}, **{k: obs[k][:n] for k in ("id", "theta") if k in obs})
    save_npz(args.out, **out)
    print(f"wrote {args.out}: {n} clusters, {args.samples} samples each ({int(res['failed'].sum())} failed)",
          file=sys.stderr)
    plot_dir = Path(args.plot_dir) if args.plot_dir else Path(args.out).resolve().parent
    for i, post in res["posts"].items():
        plot_dir.mkdir(parents=True, exist_ok=True)
        name = str(obs["id"][i]) if "id" in obs else str(i)
        path = plot_dir / f"grid_posterior_{name}.png"
        plots.plot_posterior(path, post, marginal_cdf, obs["theta"][i] if "theta" in obs else None,
                             np.array([np.log10(m["age_myr"][i]), m["log10_mass"][i], m["ebv"][i]]),
                             title=f"cluster {name}")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
