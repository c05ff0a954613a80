"""Training data for the cINN: noise model, network inputs, bounded targets (Walter et al. 2026, Sect. 2.2).

From a noiseless simulation (simulate.py) to the observation files the network trains on:

    theta = (log10 t'/Myr, log10 m0/Msun, E(B-V))   target, with the age label jittered t' = t + U[-0.5, 0.5]
    x     = (log10 f*_b [mJy] x 5, r*_b x 5, d [Mpc])  condition

Noise (per band): r ~ U[0, 0.5], sigma = r f', ln f* ~ N(ln f' - s^2/2, s^2), s^2 = ln(1 + r^2), so that
f* is log-normal with mean f' and standard deviation sigma; the network sees the *observed* relative error
r* = sigma / f*. The distance d ~ U[1, 30] Mpc scales the 10 pc fluxes by (10 pc / d)^2.

Each target is mapped to the real line by u = Phi^-1((theta - a) / (b - a)) (Phi = standard normal CDF).
Under the uniform prior of Sect. 3 this makes u close to standard normal, so no further standardisation of the
targets is needed. The inputs x are standardised inside the model with statistics of the training split.

The mass floor (optional, `x` passed to the transforms): the noise model allows sigma_b <= f_b / 2 only, so given
x (sigma_b = r*_b f*_b) and (t', E(B-V)) the initial mass is bounded below by
    m >= m_floor = max_b 2 sigma_b / F_b(round(t'), E(B-V), d)        (F_b per Msun at distance d),
a hard edge where the exact posterior is often largest (p(sigma | f) = 2/f favours the faintest model allowed).
A smooth flow cannot end its density on that edge; it leaks ~20 % of its samples below it. With x, the
log-mass coordinate gets a term that sends the floor a = log10 m_floor(t', E) to -infinity:
    u_m = Phi^-1((m - 2) / 6) + log(1 - exp(-(m - a) / s)),        s = FLOOR_SCALE = 0.1 dex,
so the density ends smoothly in u; a few s above the floor the term vanishes and u_m is the plain transform
(bright, low-noise clusters, whose floor lies far below their mass, are modelled as without it). The map is
triangular (a depends on t' and E only), so its log-Jacobian is still the sum of the three diagonal terms; the
mass is recovered from u_m by a bracketed bisection.

The mass ridge (optional, `ridge=True` with x): at a given (t', E(B-V)) the photometry fixes the mass to within
the combined photometric precision, m ~ c(t', E) +- w with, per band, s_b^2 = ln(1 + r*_b^2) and
    c = sum_b w_b (log10 f*_b + s_b^2 / (2 ln 10) - log10 F_b(round(t'), E, d)) / sum_b w_b,   w_b = 1 / s_b^2,
    w = 1 / (ln 10 sqrt(sum_b w_b))                                                         (dex),
(each band's mass estimate, corrected for E[ln f*] = ln f - s^2/2, weighted by its precision). With precise
photometry the posterior is a thin sheet m ~ c(t', E) that tilts with E(B-V) and jumps from one 1 Myr age bin to
the next (F_b depends on the integer age), which a smooth flow can only approximate. The ridge term
    u_m = [plain + floor terms] + (m - c(t', E)) / w
straightens that sheet: in u the mass given (t', E) is close to a standard normal for every (t', E). The term
is increasing in m and depends on t' and E only through c, so the map stays triangular (log-Jacobian: the
diagonal); the mass is recovered by safeguarded Newton steps inside the bracket [floor, 8].

The E(B-V) ridge (optional, `ebv_ridge=True`): likewise the colours fix E(B-V) in each age bin k to within
their precision, E ~ e_c(k) +- w_e (ebv_from_colours: the weighted least-squares fit of the five log fluxes over
(log10 m, E) with the model's reddening slopes), and that centre jumps between age bins too. So
    u_E = Phi^-1(E / 1.5) + (E - e_c(round(t'))) / w_e.
The order of the map is then t' -> E(B-V) -> mass (u_E depends on t', u_m on t' and E): still triangular.

CLI:  python preprocess.py --sim sim.npz --out DIR [--n-val N] [--n-test N] [--seed S]
      writes DIR/train.npz, DIR/val.npz, DIR/test.npz (train.npz also keeps the noiseless 10 pc fluxes and the
      integer ages, so that train.py --online can re-draw distance and noise every epoch).
"""
import argparse
import os
import sys
import time

import numpy as np
from scipy.special import ndtr, ndtri

LN10 = np.log(10.0)

BANDS = ("F275W", "F336W", "F438W", "F555W", "F814W")  # same order as simulate.BANDS
THETA_NAMES = ("log10_age_myr", "log10_mass", "ebv")
# [a, b] per target; wide enough to hold every jittered age label t' in [0.5, 13750.5] Myr.
THETA_BOUNDS = np.array([[np.log10(0.5), np.log10(13750.5)], [2.0, 8.0], [0.0, 1.5]])
EBV_BOUNDS = tuple(THETA_BOUNDS[2])
DISTANCE_RANGE_MPC = (1.0, 30.0)
R_MAX = 0.5          # relative noise level r ~ U[0, R_MAX]
SYS_ERR = 0.05       # Eq. 10: systematic relative error added to real catalogues
EPS = 1e-7           # (theta - a)/(b - a) is clipped to [EPS, 1 - EPS]: |u| <= 5.2 stays finite on the bounds
PC10_IN_MPC = 1e-5
FLOOR_GAP = 1e-3     # the mass floor is kept at least this far (dex) below the upper bound 8
FLOOR_SCALE = 0.1    # dex: width of the floor term of the log-mass transform (module docstring)


def _check_theta(theta):
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape[-1] != 3:
        raise ValueError(f"theta must have last dimension 3 {THETA_NAMES}, got shape {theta.shape}")
    return theta


def age_bin(log_age):
    """The integer age k (Myr) of the bin [k - 1/2, k + 1/2) holding the label t' = 10^log_age."""
    import simulate
    return np.clip(np.floor(10.0 ** np.asarray(log_age) + 0.5), 1, simulate.AGE_MAX_MYR).astype(np.int64)


def age_bin_edges(log_age):
    """log10 of the edges k -/+ 1/2 of the label's 1 Myr bin (the bins tile THETA_BOUNDS[0] exactly)."""
    k = age_bin(log_age)
    return np.log10(k - 0.5), np.log10(k + 0.5)


def rejitter_age(log_age, rng):
    """A fresh label t' = k + U[-1/2, 1/2] in the same bin k (jitter_age again: it is independent of x)."""
    return np.log10(jitter_age(age_bin(log_age), rng))


def _log_flux_per_msun(log_age, ebv, x):
    """log10 F_b(round(t'), E(B-V), d) (..., 5): the model band fluxes [mJy] per Msun formed at x's distance."""
    import simulate
    x = np.asarray(x, dtype=np.float64)
    k = age_bin(log_age)
    e = np.clip(ebv, EBV_BOUNDS[0], EBV_BOUNDS[1])
    return np.log10(simulate.model_flux(k, e, 0.0, x[..., 10]))


def _raw_mass_floor(log_age, ebv, x):
    """max_b log10(2 sigma_b / F_b(round(t'), E, d)), not clipped (may exceed 8: no mass allowed there)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):                                     # r* = 0: no floor from that band
        log_sigma = np.log10(x[..., 5:10]) + x[..., 0:5]                   # sigma_b = r*_b f*_b
        return np.max(np.log10(2.0) + log_sigma - _log_flux_per_msun(log_age, ebv, x), axis=-1)


def log_mass_floor(log_age, ebv, x):
    """Lowest log10 m0 the noise model allows (module docstring), clipped to [2, 8 - FLOOR_GAP].

    log_age: log10 t' (the jittered label; the photometry is that of the bin round(t')), ebv, and x (..., 11)
    the network inputs (log10 f*, r*, d), all broadcast against each other."""
    return np.clip(_raw_mass_floor(log_age, ebv, x), THETA_BOUNDS[1, 0], THETA_BOUNDS[1, 1] - FLOOR_GAP)


RIDGE_MIN_S2 = 1e-12   # ln-flux variance floor of one band in the ridge weights (r* = 0 would weigh infinitely)


def log_mass_ridge(log_age, ebv, x):
    """Centre c (log10 m0) and width w (dex) of the mass the photometry implies at (t', E(B-V)) (module
    docstring, the mass ridge); arguments as log_mass_floor. w depends on x only."""
    x = np.asarray(x, dtype=np.float64)
    s2 = np.maximum(np.log1p(x[..., 5:10] ** 2), RIDGE_MIN_S2)             # ln f* variance per band
    weight = 1.0 / s2
    est = x[..., 0:5] + s2 / (2.0 * LN10) - _log_flux_per_msun(log_age, ebv, x)
    centre = np.sum(weight * est, axis=-1) / np.sum(weight, axis=-1)
    return centre, 1.0 / (LN10 * np.sqrt(np.sum(weight, axis=-1)))


M_LO, M_HI = THETA_BOUNDS[1]


def _plain_u(v, j):
    """The plain transform of target j, Phi^-1((v - a_j) / (b_j - a_j)), clipped like theta_to_u."""
    a, b = THETA_BOUNDS[j]
    return ndtri(np.clip((v - a) / (b - a), EPS, 1.0 - EPS))


def _log_plain_du(v, j, u=None):
    """Its log-derivative, log 1 / ((b_j - a_j) phi(u)) (u = _plain_u(v, j) when already at hand)."""
    a, b = THETA_BOUNDS[j]
    u = _plain_u(v, j) if u is None else u
    return -np.log(b - a) + 0.5 * u ** 2 + 0.5 * np.log(2.0 * np.pi)


def _plain_mass_u(m):
    """The plain log-mass transform Phi^-1((m - 2) / 6)."""
    return _plain_u(m, 1)


def _plain_mass(u):
    """Its inverse, 2 + 6 Phi(u)."""
    return M_LO + (M_HI - M_LO) * ndtr(u)


def _floor_term(w, scale):
    """log(1 - exp(-w / scale)) for the height w = m - floor >= 0: -> -inf at the floor, -> 0 above it."""
    return np.log(-np.expm1(-np.maximum(w, 1e-12) / scale))


def _mass_u(m, a, scale, ridge=None):
    """u_m of the module docstring: the plain log-mass transform, plus the floor term (scale > 0, floor a),
    plus the ridge term (m - c) / w (ridge = (c, w))."""
    u = _plain_mass_u(m)
    if scale > 0:
        u = u + _floor_term(m - a, scale)
    if ridge is not None:
        u = u + (m - ridge[0]) / ridge[1]
    return u


def _mass_u_du(m, a, scale, ridge=None):
    """(u_m, log du_m/dm) together (the Newton inversion needs both); du_m/dm is a sum of positive terms:
    1 / (6 phi(u0)), (1/scale) / (exp((m - a)/scale) - 1) and 1 / w."""
    u = _plain_mass_u(m)
    log_du = _log_plain_du(m, 1, u)
    if scale > 0:
        z = np.maximum(m - a, 1e-12) / scale
        f = _floor_term(m - a, scale)                    # log(1 - exp(-z)); log(exp(z) - 1) = z + f
        u, log_du = u + f, np.logaddexp(log_du, -np.log(scale) - z - f)
    if ridge is not None:
        u, log_du = u + (m - ridge[0]) / ridge[1], np.logaddexp(log_du, -np.log(ridge[1]))
    return u, log_du


def _log_mass_du(m, a, scale, ridge=None):
    """log du_m/dm (see _mass_u_du)."""
    return _mass_u_du(m, a, scale, ridge)[1]


def _solve_increasing(g_and_log_dg, u, lo, hi, start, tol=1e-12):
    """The root m of g(m) = u for g increasing on [lo, hi] (arrays): Newton steps from `start`, each kept inside
    the bracket that the signs of the residuals shrink (a bisection where Newton would leave it), until the
    bracket or the step is below tol. g_and_log_dg(m, i) -> (g, log g') at the entries i still iterating."""
    shape = np.shape(u)
    u = np.ravel(u)
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), shape).ravel().copy()
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), shape).ravel().copy()
    m = np.clip(np.broadcast_to(start, shape).ravel(), lo, hi)
    i = np.arange(len(u))
    for _ in range(100):
        if len(i) == 0:
            break
        mi, li, hi_i = m[i], lo[i], hi[i]
        g, log_dg = g_and_log_dg(mi, i)
        r = g - u[i]
        li, hi_i = np.where(r < 0, mi, li), np.where(r < 0, hi_i, mi)
        new = mi - r * np.exp(-log_dg)
        new = np.where((new > li) & (new < hi_i), new, 0.5 * (li + hi_i))
        m[i], lo[i], hi[i] = new, li, hi_i
        i = i[(np.abs(new - mi) >= tol) & (hi_i - li >= tol)]
    return m.reshape(shape)


def _mass_from_u(u, a, scale, ridge=None, tol=1e-12):
    """Inverse of _mass_u on [a, 8] (u_m increases with m).

    Floor only: bisection in a bracket from the floor term h <= 0: m >= lo = max(a, m_plain(u)), and since h
    rises with m, m <= hi = m_plain(u - h(lo - a)) (m_plain = _plain_mass inverts the plain transform); far
    above the floor the bracket is already tight. With the ridge: _solve_increasing on [a, 8] from
    m = c + w (u - u_plain(c))."""
    if ridge is None:
        lo = np.maximum(a, _plain_mass(u))
        hi = np.maximum(lo, _plain_mass(u - _floor_term(lo - a, scale)))
        for _ in range(64):
            if np.size(lo) == 0 or np.max(hi - lo) < tol:
                break
            mid = 0.5 * (lo + hi)
            up = _mass_u(mid, a, scale) < u
            lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
        return 0.5 * (lo + hi)
    c, w = (np.broadcast_to(v, np.shape(u)).ravel() for v in ridge)
    a = np.broadcast_to(a, np.shape(u)).ravel()
    return _solve_increasing(lambda m, i: _mass_u_du(m, a[i], scale, (c[i], w[i])),
                             u, a, M_HI, c + w * (np.ravel(u) - _plain_mass_u(c)), tol)


EBV_RIDGE_STEPS = 2      # Gauss-Newton refinements of the E(B-V) ridge (ebv_from_colours)
EBV_RIDGE_CHORD = 0.05   # mag: half-width of the chord giving the local reddening slopes


def ebv_from_colours(log_age, x):
    """Centre e_c and width w_e (mag) of the E(B-V) the colours imply in the age bin of t' (module docstring).

    The weighted least-squares fit of log10 f*_b = log10 m + log10 F_b(k, E, d) over (log10 m, E), weights the
    bands' precisions: first with ln F_b linear in E (the chord over the prior range), then EBV_RIDGE_STEPS
    Gauss-Newton steps with the slopes a_b of chords of +-EBV_RIDGE_CHORD about the estimate (the dust
    curve bends: the first fit alone is off by up to 0.06 mag). w_e = 1 / sqrt(sum_b w_b (a_b - a_mean)^2).
    Computed once per distinct (age bin, x) pair: posterior samples repeat x and share a few hundred bins."""
    import simulate
    x = np.asarray(x, dtype=np.float64)
    log_age = np.asarray(log_age, dtype=np.float64)
    if x.ndim != 2 or log_age.shape != x.shape[:1] or len(x) < 2:
        return _ebv_fit(log_age, x)
    run = np.concatenate([[0], np.cumsum(np.any(x[1:] != x[:-1], axis=1))])      # runs of identical x rows
    _, first, inverse = np.unique(run * (simulate.AGE_MAX_MYR + 1) + age_bin(log_age), return_index=True,
                                  return_inverse=True)
    if len(first) > len(x) // 2:                                                 # mostly distinct: no gain
        return _ebv_fit(log_age, x)
    e, w = _ebv_fit(log_age[first], x[first])
    return e[inverse], w[inverse]


def _ebv_fit(log_age, x):
    """The fit of ebv_from_colours, row by row."""
    x = np.asarray(x, dtype=np.float64)
    s2 = np.maximum(np.log1p(x[..., 5:10] ** 2), RIDGE_MIN_S2)
    weight = LN10 ** 2 / s2                                                  # 1 / variance of log10 f*
    wsum = np.sum(weight, axis=-1, keepdims=True)
    y = x[..., 0:5] + s2 / (2.0 * LN10)
    e, lo, hi = np.zeros(np.shape(log_age)), EBV_BOUNDS[0], EBV_BOUNDS[1]
    for step in range(EBV_RIDGE_STEPS + 1):
        e0 = np.clip(e, lo, hi)
        a0, a1 = (lo, hi) if step == 0 else (np.clip(e0 - EBV_RIDGE_CHORD, lo, hi - 2 * EBV_RIDGE_CHORD),
                                             np.clip(e0 + EBV_RIDGE_CHORD, lo + 2 * EBV_RIDGE_CHORD, hi))
        f0, f1 = _log_flux_per_msun(log_age, a0, x), _log_flux_per_msun(log_age, a1, x)
        slope = (f1 - f0) / np.expand_dims(a1 - a0, -1)
        resid = y - (f0 if step == 0 else _log_flux_per_msun(log_age, e0, x))     # about the model at e0
        da = slope - np.sum(weight * slope, axis=-1, keepdims=True) / wsum
        dy = resid - np.sum(weight * resid, axis=-1, keepdims=True) / wsum
        saa = np.sum(weight * da * da, axis=-1)
        e = e0 + np.sum(weight * da * dy, axis=-1) / saa
    return e, 1.0 / np.sqrt(saa)


E_LO, E_HI = THETA_BOUNDS[2]


def _ebv_u(e, ridge):
    """u_E: the plain transform Phi^-1(E / 1.5) plus (E - e_c) / w_e (ridge = (e_c, w_e))."""
    return _plain_u(e, 2) + (e - ridge[0]) / ridge[1]


def _ebv_u_du(e, ridge):
    """(u_E, log du_E/dE); du_E/dE = 1 / (1.5 phi(u0)) + 1 / w_e, both positive."""
    p = _plain_u(e, 2)
    return p + (e - ridge[0]) / ridge[1], np.logaddexp(_log_plain_du(e, 2, p), -np.log(ridge[1]))


def _ebv_from_u(u, ridge):
    """Inverse of _ebv_u on [0, 1.5]: _solve_increasing from E = e_c + w_e (u - u_plain(e_c))."""
    c, w = (np.broadcast_to(v, np.shape(u)).ravel() for v in ridge)
    return _solve_increasing(lambda e, i: _ebv_u_du(e, (c[i], w[i])), u, E_LO, E_HI,
                             c + w * (np.ravel(u) - _plain_u(np.clip(c, E_LO, E_HI), 2)))


def depends_on_x(x, scale, ridge, ebv_ridge=False):
    """Whether the target transform depends on x: given x, with the floor (scale > 0) or a ridge."""
    return x is not None and (scale > 0 or ridge or ebv_ridge)


def _mass_terms(theta, x, scale, ridge):
    """The floor a (2 without the floor term) and the ridge (c, w) or None at theta's (t', E(B-V))."""
    a = log_mass_floor(theta[..., 0], theta[..., 2], x) if scale > 0 else np.full(theta.shape[:-1], M_LO)
    return a, (log_mass_ridge(theta[..., 0], theta[..., 2], x) if ridge else None)


def theta_to_u(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False):
    """Bounded physical targets -> unbounded u = Phi^-1((theta - a)/(b - a)); finite on the bounds (clipped).
    With x: log mass gets the floor term (scale > 0; -> -inf at the floor of theta's t', E) and the ridge term
    (ridge=True), E(B-V) its ridge term (ebv_ridge=True) of the module docstring; x None, or scale 0 and no
    ridge, is the plain transform."""
    theta = _check_theta(theta)
    a, b = THETA_BOUNDS[:, 0], THETA_BOUNDS[:, 1]
    u = ndtri(np.clip((theta - a) / (b - a), EPS, 1.0 - EPS))
    if depends_on_x(x, scale, ridge, ebv_ridge):
        floor, rg = _mass_terms(theta, x, scale, ridge)
        u[..., 1] = _mass_u(theta[..., 1], floor, scale, rg)
        if ebv_ridge:
            u[..., 2] = _ebv_u(theta[..., 2], ebv_from_colours(theta[..., 0], x))
    return u


def u_to_theta(u, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False):
    """Inverse of theta_to_u: theta = a + (b - a) Phi(u); with x: age first, then E(B-V) (about its ridge at
    that age), then the mass above the floor (and about the ridge) they set."""
    u = _check_theta(u)
    theta = THETA_BOUNDS[:, 0] + (THETA_BOUNDS[:, 1] - THETA_BOUNDS[:, 0]) * ndtr(u)
    if depends_on_x(x, scale, ridge, ebv_ridge):
        if ebv_ridge:
            theta[..., 2] = _ebv_from_u(u[..., 2], ebv_from_colours(theta[..., 0], x))
        floor, rg = _mass_terms(theta, x, scale, ridge)
        theta[..., 1] = _mass_from_u(u[..., 1], floor, scale, rg)
    return theta


def log_du_dtheta(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False):
    """The diagonal of the transform's Jacobian, log du_i/dtheta_i (..., 3): du/dtheta = 1 / ((b - a) phi(u)),
    phi the standard normal density; with x the log-mass and E(B-V) terms of the floor / ridge transforms."""
    theta = _check_theta(theta)
    terms = np.stack([_log_plain_du(theta[..., j], j) for j in range(3)], axis=-1)
    if depends_on_x(x, scale, ridge, ebv_ridge):
        floor, rg = _mass_terms(theta, x, scale, ridge)
        terms[..., 1] = _log_mass_du(theta[..., 1], floor, scale, rg)
        if ebv_ridge:
            terms[..., 2] = _ebv_u_du(theta[..., 2], ebv_from_colours(theta[..., 0], x))[1]
    return terms


def log_det_theta_to_u(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False):
    """sum_i log|du_i/dtheta_i| (N,) (the Jacobian is triangular, also with the floor and the ridges: a sum of
    the diagonal).  p_theta(theta | x) = p_u(u(theta) | x) * exp(log_det_theta_to_u(theta, x or None)).
    """
    return np.sum(log_du_dtheta(theta, x, scale, ridge, ebv_ridge), axis=-1)


def target_transform(config):
    """The target transform options of a model config (keyword arguments of theta_to_u and the others);
    configs written before the ridges existed have none."""
    return dict(scale=config.get("floor_scale", 0.0), ridge=bool(config.get("ridge", False)),
                ebv_ridge=bool(config.get("ebv_ridge", False)))


def below_floor(theta, x, tol=1e-6):
    """True where theta lies outside the noise model's support: its log mass more than tol dex below the floor
    of its (t', E), unclipped, so also wherever that floor exceeds the prior's top m = 8 (no mass at all is
    allowed at such a (t', E); the floor transform, clipped to 8 - FLOOR_GAP, cannot exclude those).
    tol absorbs float32 rounding of samples drawn on the floor."""
    theta = _check_theta(theta)
    return theta[..., 1] < _raw_mass_floor(theta[..., 0], theta[..., 2], x) - tol


def add_noise(flux_true_mjy, rng, r_max=R_MAX):
    """Log-normal photometric noise of DESIGN Sect. 3.

    flux_true_mjy: noiseless fluxes f' at the cluster's distance, any shape (..., 5).
    Returns (flux_obs_mjy f*, rel_err_obs r* = sigma / f*), both the shape of the input.
    """
    f = np.asarray(flux_true_mjy, dtype=np.float64)
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError("add_noise: noiseless fluxes must be finite and > 0")
    r = rng.uniform(0.0, r_max, size=f.shape)
    s2 = np.log1p(r ** 2)
    ln_obs = np.log(f) - 0.5 * s2 + np.sqrt(s2) * rng.standard_normal(f.shape)
    flux_obs = np.exp(ln_obs)
    rel_err = r * f / flux_obs            # r* = sigma / f*, sigma = r f'
    return flux_obs, rel_err


def make_x(flux_mjy, rel_err, distance_mpc):
    """Network condition (N, 11): log10 flux [mJy] x 5, relative error x 5, distance [Mpc]."""
    flux = np.atleast_2d(np.asarray(flux_mjy, dtype=np.float64))
    rel = np.atleast_2d(np.asarray(rel_err, dtype=np.float64))
    if flux.shape != rel.shape or flux.shape[-1] != 5:
        raise ValueError(f"make_x: flux {flux.shape} and rel_err {rel.shape} must both be (N, 5)")
    bad = np.flatnonzero(~np.all(np.isfinite(flux) & (flux > 0), axis=1))
    if bad.size:
        raise ValueError(f"make_x: non-positive or non-finite flux in rows {bad[:10].tolist()} "
                         f"({bad.size} rows); drop them before building network inputs")
    d = np.broadcast_to(np.asarray(distance_mpc, dtype=np.float64), flux.shape[:1])
    return np.column_stack([np.log10(flux), rel, d])


def jitter_age(age_myr, rng):
    """Age label t' = t + U[-0.5, 0.5] Myr (on the label only; the photometry uses the grid age t)."""
    age = np.asarray(age_myr, dtype=np.float64)
    return age + rng.uniform(-0.5, 0.5, size=age.shape)


def observe(sim, rng):
    """One noisy observation of each simulated cluster (DESIGN Sect. 3) -> observation dict (Sect. 4).

    sim: dict with age_myr (N,), log10_mass (N,), ebv (N,), flux_10pc_mjy (N, 5) noiseless (mass included).
    Draw order is fixed (jitter, distance, noise), so the result is a deterministic function of rng's state.
    """
    for key in ("age_myr", "log10_mass", "ebv", "flux_10pc_mjy"):
        if key not in sim:
            raise ValueError(f"observe: simulation lacks key '{key}'")
    age = np.asarray(sim["age_myr"])
    n = age.shape[0]
    t_label = jitter_age(age, rng)
    distance = rng.uniform(*DISTANCE_RANGE_MPC, size=n)
    flux_true = np.asarray(sim["flux_10pc_mjy"], dtype=np.float64) * (PC10_IN_MPC / distance[:, None]) ** 2
    flux, rel_err = add_noise(flux_true, rng)
    theta = np.column_stack([np.log10(t_label), sim["log10_mass"], sim["ebv"]])
    return dict(theta=theta, x=make_x(flux, rel_err, distance), flux_mjy=flux, rel_err=rel_err,
                distance_mpc=distance, age_myr=age.astype(np.int64), bands=np.array(BANDS))


def prepare_real(flux_mjy, flux_err_mjy, distance_mpc, sys_err=SYS_ERR, ids=None):
    """Observation dict for measured photometry: r' = sqrt((err/flux)^2 + sys_err^2) (Eq. 10), theta = NaN.

    Every row needs finite, positive fluxes and finite, non-negative errors in all five bands; rows that fail
    raise a ValueError naming them (catalogs.py filters and reports such rows before calling this).
    """
    flux = np.atleast_2d(np.asarray(flux_mjy, dtype=np.float64))
    err = np.atleast_2d(np.asarray(flux_err_mjy, dtype=np.float64))
    if flux.shape != err.shape or flux.shape[-1] != 5:
        raise ValueError(f"prepare_real: flux {flux.shape} and errors {err.shape} must both be (N, 5)")
    bad = np.flatnonzero(~np.all(np.isfinite(err) & (err >= 0), axis=1))
    if bad.size:
        raise ValueError(f"prepare_real: invalid (negative or non-finite) flux errors in rows "
                         f"{bad[:10].tolist()} ({bad.size} rows)")
    n = flux.shape[0]
    distance = np.broadcast_to(np.asarray(distance_mpc, dtype=np.float64), (n,)).copy()
    rel_err = np.sqrt((err / flux) ** 2 + sys_err ** 2)
    obs = dict(theta=np.full((n, 3), np.nan), x=make_x(flux, rel_err, distance), flux_mjy=flux,
               rel_err=rel_err, distance_mpc=distance, bands=np.array(BANDS))
    if ids is not None:
        obs["id"] = np.asarray(ids)
    return obs


def fit_standardization(x):
    """Mean and standard deviation of the network inputs (fit on the training split only)."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def split_indices(n, n_val, n_test, rng):
    """Random disjoint (train, val, test) index arrays."""
    if n_val + n_test >= n:
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training data out of {n} clusters")
    perm = rng.permutation(n)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def preprocess(sim, n_val, n_test, seed):
    """Split a simulation and observe each split once -> dict split -> observation dict.

    train additionally keeps `flux_10pc_mjy`, `log10_mass`, `ebv` (noiseless inputs for online re-drawing)
    and the x standardisation `x_mean`, `x_std` fitted on train only.
    """
    seeds = np.random.SeedSequence(seed).spawn(4)
    idx = dict(zip(("train", "val", "test"), split_indices(len(sim["age_myr"]), n_val, n_test,
                                                           np.random.default_rng(seeds[0]))))
    out = {}
    for (name, ii), ss in zip(idx.items(), seeds[1:]):
        part = {k: np.asarray(sim[k])[ii] for k in ("age_myr", "log10_mass", "ebv", "flux_10pc_mjy")}
        obs = observe(part, np.random.default_rng(ss))
        if name == "train":
            obs.update(flux_10pc_mjy=part["flux_10pc_mjy"], log10_mass=part["log10_mass"], ebv=part["ebv"])
            obs["x_mean"], obs["x_std"] = fit_standardization(obs["x"])
        obs["seed"] = np.int64(seed)
        out[name] = obs
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sim", required=True, help="simulation .npz from simulate.py")
    p.add_argument("--out", required=True, help="output directory for train/val/test .npz")
    p.add_argument("--n-val", type=int, default=20_000, help="validation clusters")
    p.add_argument("--n-test", type=int, default=20_000, help="test clusters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from simulate import load_npz, save_npz
    t0 = time.time()
    sim = load_npz(args.sim, required=("age_myr", "log10_mass", "ebv", "flux_10pc_mjy"))
    splits = preprocess(sim, args.n_val, args.n_test, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, obs in splits.items():
        path = os.path.join(args.out, f"{name}.npz")
        save_npz(path, **obs)
        print(f"wrote {path}: {len(obs['x'])} clusters", file=sys.stderr)
    print(f"preprocess done in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
