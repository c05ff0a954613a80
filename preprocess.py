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
(each band's mass estimate, corrected for E[ln f*] = ln f - s^2/2, weighted by its precision; with
`band_moments=True` in the model config the offset s_b^2/2 and the variance s_b^2 are instead those of the exact
band likelihood, band_shape, as in the age profile: 2,000 paired test clusters gain 0.03-0.06 nats). With precise
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
With `ebv_ridge="cdf"` the ridge enters through a CDF instead of a sum: u_E = Phi^-1(G(E)), G the CDF of
(1 - eps) N(e_c, w_e^2) truncated to the prior's [0, 1.5] plus eps of the uniform prior (_cdf_ridge_u_du), so a
posterior piled against E(B-V) = 0 or 1.5 is standard normal in u rather than a scaled Phi^-1 tail; `ridge="cdf"`
does the same for the mass on [floor, 8] (replacing the floor term). Neither lowered the KL to the exact
posterior on the quick profile (README, tenth session): options, not the default.

The age profile (optional, `age_profile=beta` with x): the age posterior of precise photometry is a few 1 Myr
spikes that a smooth flow spreads over a decade. The age coordinate can instead be warped by the CDF of a cheap
approximation of that posterior, P(bin | x) on 1 Myr bins up to 40 Myr and AGE_PROFILE_DEX-wide bins above
(uniform in t' inside each bin, like the jitter):
    u_t = Phi^-1(G(t' | x)),    G the CDF of P = (1 - eps) P_prof + eps P_prior,
    P_prof(bin) ~ P_prior(bin) L(bin)^beta,   L = integral over E(B-V) and log m of the band likelihoods,
with each band's exact likelihood (the log-normal density of f*, the factor p(sigma | f) = 2/f and the support
edge f >= 2 sigma) replaced by the Gaussian in ln f with the same mean and variance (band_shape; variance plus
AGE_PROFILE_FLOOR^2), ln F_b linear in E(B-V) on twelve 0.125 mag segments, the mass integrated analytically
and the prior's mass range [2, 8] and the floor m F_b >= 2 sigma_b imposed at the best E(B-V) of each segment
(_age_profile_rows; a brute-force integration agrees to < 0.013 nats in KL on 30 clusters). On 200 test clusters its age
marginal is 0.097 nats in KL from the exact one (the prior's is 1.36). If the profile were the posterior,
u_t would be standard normal for every x and the flow would only have to learn the mass and E(B-V); eps keeps
the warp bounded where it is wrong, beta < 1 widens it. The map depends on x only, so it stays triangular.

CLI:  python preprocess.py --sim sim.npz --out DIR [--n-val N] [--n-test N] [--seed S]
      writes DIR/train.npz, DIR/val.npz, DIR/test.npz (train.npz also keeps the noiseless 10 pc fluxes and the
      integer ages, so that train.py --online can re-draw distance and noise every epoch).
"""
import argparse
import os
import sys
import time

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr, ndtri

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


def _band_moments(x, moments=False):
    """Per band, the offset E[ln f - ln f*] and the variance of ln f* that the ridges and the age profile weigh
    the bands with: the log-normal's (s^2 / 2, s^2), or with moments=True those of the exact band likelihood
    (band_shape; the support edge f >= 2 sigma makes bands with r* > 0.3 far more informative than the
    log-normal says). Variances floored at RIDGE_MIN_S2."""
    if moments:
        mean, s2 = band_shape(x[..., 5:10])
    else:
        s2 = np.log1p(x[..., 5:10] ** 2)
        mean = s2 / 2.0
    return mean, np.maximum(s2, RIDGE_MIN_S2)


def log_mass_ridge(log_age, ebv, x, moments=False):
    """Centre c (log10 m0) and width w (dex) of the mass the photometry implies at (t', E(B-V)) (module
    docstring, the mass ridge); arguments as log_mass_floor, moments as _band_moments. w depends on x only."""
    x = np.asarray(x, dtype=np.float64)
    mean, s2 = _band_moments(x, moments)
    weight = 1.0 / s2
    est = x[..., 0:5] + mean / LN10 - _log_flux_per_msun(log_age, ebv, x)
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
    plus the ridge term (m - c) / w (ridge = (c, w)); ridge = (c, w, "cdf"): _mass_cdf_u_du instead."""
    if ridge is not None and len(ridge) > 2:
        return _mass_cdf_u_du(m, a, ridge)[0]
    u = _plain_mass_u(m)
    if scale > 0:
        u = u + _floor_term(m - a, scale)
    if ridge is not None:
        u = u + (m - ridge[0]) / ridge[1]
    return u


def _mass_u_du(m, a, scale, ridge=None):
    """(u_m, log du_m/dm) together (the Newton inversion needs both); du_m/dm is a sum of positive terms:
    1 / (6 phi(u0)), (1/scale) / (exp((m - a)/scale) - 1) and 1 / w."""
    if ridge is not None and len(ridge) > 2:
        return _mass_cdf_u_du(m, a, ridge)
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


def _mass_cdf_u_du(m, a, ridge):
    """(u_m, log du_m/dm) of ridge="cdf": _cdf_ridge_u_du on [a, 8], a the floor (2 without it). The floor
    is then the lower end of the truncation, where the exact posterior keeps a finite (often its largest)
    density, instead of the floor term's -infinity."""
    return _cdf_ridge_u_du(m, ridge[0], ridge[1], a, M_HI)


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
    c, w = (np.broadcast_to(v, np.shape(u)).ravel() for v in ridge[:2])
    a = np.broadcast_to(a, np.shape(u)).ravel()
    if len(ridge) > 2 and ridge[2] == "cdf":
        return _solve_increasing(lambda m, i: _mass_cdf_u_du(m, a[i], (c[i], w[i])), u, a, M_HI,
                                 c + w * np.ravel(u), tol)
    return _solve_increasing(lambda m, i: _mass_u_du(m, a[i], scale, (c[i], w[i])),
                             u, a, M_HI, c + w * (np.ravel(u) - _plain_mass_u(c)), tol)


EBV_RIDGE_STEPS = 2      # Gauss-Newton refinements of the E(B-V) ridge (ebv_from_colours)
EBV_RIDGE_CHORD = 0.05   # mag: half-width of the chord giving the local reddening slopes


def _runs(x):
    """Index (N,) of the run of identical consecutive rows each row of x (N, 11) belongs to (posterior samples
    repeat x row after row, so per-cluster work is done once per run)."""
    return np.concatenate([[0], np.cumsum(np.any(x[1:] != x[:-1], axis=1))]) if len(x) else np.zeros(0, int)


def ebv_from_colours(log_age, x, moments=False):
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
        return _ebv_fit(log_age, x, moments)
    _, first, inverse = np.unique(_runs(x) * (simulate.AGE_MAX_MYR + 1) + age_bin(log_age), return_index=True,
                                  return_inverse=True)
    if len(first) > len(x) // 2:                                                 # mostly distinct: no gain
        return _ebv_fit(log_age, x, moments)
    e, w = _ebv_fit(log_age[first], x[first], moments)
    return e[inverse], w[inverse]


def _ebv_fit(log_age, x, moments=False):
    """The fit of ebv_from_colours, row by row."""
    x = np.asarray(x, dtype=np.float64)
    mean, s2 = _band_moments(x, moments)
    weight = LN10 ** 2 / s2                                                  # 1 / variance of log10 f*
    wsum = np.sum(weight, axis=-1, keepdims=True)
    y = x[..., 0:5] + mean / LN10
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


CDF_PRIOR = 0.02    # ridge / ebv_ridge = "cdf": share of the uniform in the mixture (bounds the warp's tails)


def _log_diff_ndtr(a, b):
    """log(Phi(b) - Phi(a)) for a <= b, accurate in both tails (through the upper tail where a > 0)."""
    flip = a > 0
    lo, hi = np.where(flip, -b, a), np.where(flip, -a, b)
    top = log_ndtr(hi)
    return top + np.log(-np.expm1(np.minimum(log_ndtr(lo) - top, -1e-300)))


def _cdf_ridge_u_du(v, c, w, lo, hi):
    """(u, log du/dv) of a ridge entered through a CDF: u = Phi^-1(G(v)), G the CDF of the mixture
    (1 - eps) N(c, w^2) truncated to [lo, hi] + eps U[lo, hi] (eps = CDF_PRIOR). If v were distributed so, u
    would be standard normal, also where the ridge is piled against lo or hi: the posterior's finite density at
    a bound is the CDF's slope there, not a tail the flow has to learn (the additive ridge leaves a Phi^-1 tail
    scaled by that density). du/dv = g(v) / phi(u), g the mixture density. Both tails of G are computed
    directly (log-space differences of Phi), so u keeps its precision there; G is clipped to [EPS, 1 - EPS]."""
    eps, span = CDF_PRIOR, hi - lo
    z, z0, z1 = (v - c) / w, (lo - c) / w, (hi - c) / w
    log_d = _log_diff_ndtr(z0, z1)
    lower = (1 - eps) * np.exp(_log_diff_ndtr(z0, np.clip(z, z0, z1)) - log_d) + eps * (v - lo) / span
    upper = (1 - eps) * np.exp(_log_diff_ndtr(np.clip(z, z0, z1), z1) - log_d) + eps * (hi - v) / span
    lower, upper = np.clip(lower, EPS, 1 - EPS), np.clip(upper, EPS, 1 - EPS)
    u = np.where(lower < 0.5, ndtri(lower), -ndtri(upper))
    log_g = np.logaddexp(np.log(1 - eps) - 0.5 * z * z - 0.5 * np.log(2 * np.pi) - np.log(w) - log_d,
                         np.log(eps / span))
    return u, log_g + 0.5 * u * u + 0.5 * np.log(2 * np.pi)


def _ebv_cdf_u_du(e, ridge):
    """(u_E, log du_E/dE) of ebv_ridge="cdf": _cdf_ridge_u_du on the prior's [0, 1.5]."""
    return _cdf_ridge_u_du(e, ridge[0], ridge[1], E_LO, E_HI)


def _ebv_cdf_from_u(u, ridge):
    """Inverse of _ebv_cdf_u_du on [0, 1.5]: _solve_increasing from E = e_c + w_e u."""
    c, w = (np.broadcast_to(v, np.shape(u)).ravel() for v in ridge)
    return _solve_increasing(lambda e, i: _ebv_cdf_u_du(e, (c[i], w[i])), u, E_LO, E_HI, c + w * np.ravel(u))


def _ebv_terms(e, ridge, kind):
    """(u_E, log du_E/dE) of the E(B-V) ridge: the additive form (kind True) or the CDF form ("cdf")."""
    return _ebv_cdf_u_du(e, ridge) if kind == "cdf" else _ebv_u_du(e, ridge)


# ----------------------------------------------------------------------------------------------------------
# The age profile: a cheap approximation of the age posterior that the age coordinate is warped by.

AGE_PROFILE_SPLIT = 40       # Myr: one bin per integer age up to here, then bins AGE_PROFILE_DEX wide in log t'
AGE_PROFILE_DEX = 0.04
AGE_PROFILE_SEGMENTS = 12    # E(B-V) segments of 0.125 mag, ln F linear in each; 6 segments (chord errors < 0.0012
                             # in ln F, F275W's red leak up to 0.027): age-marginal KL 0.089 instead of 0.074
AGE_PROFILE_FLOOR = 0.02     # ln-flux error added in quadrature: the chords, the bin widths, model-error slack
AGE_PROFILE_BOUNDS = True    # impose the prior's mass range and the floor (False: the bare integral, for tests)
AGE_PROFILE_PRIOR = 0.05     # share of the prior in the mixture (bounds the warp wherever the profile is wrong)
AGE_PROFILE_SHAPE = "moments"   # each band's Gaussian in y = ln f - ln f*: the moments of the exact band
                                 # likelihood (band_shape), or "lognormal" (mean s^2/2, variance s^2, times 2/f:
                                 # the sixth session's models; its age-marginal KL was 0.285 nats, moments 0.097)
_BAND_SHAPE = {}


def _band_shape_table():
    """Mean and sd of the normalised exact band likelihood exp(l(y)) over y (grid_posterior.band_loglike: the
    log-normal density of f*, the factor 2/f and the support edge y >= ln 2r*) at 241 values of ln r* from
    1e-3 to 100, in units of s = sqrt(ln(1 + r*^2)) (the mean minus s^2/2): trapezoid sums on a grid that
    resolves the edge, the main peak and the tail (cached; ~1 s once)."""
    if "lr" in _BAND_SHAPE:
        return _BAND_SHAPE
    from grid_posterior import band_loglike
    lr = np.linspace(np.log(1e-3), np.log(100.0), 241)
    mean, sd = [], []
    for r in np.exp(lr):
        s, edge = np.sqrt(np.log1p(r * r)), np.log(2.0 * r)
        y = np.unique(np.concatenate([np.linspace(edge, edge + 3.0, 3001),
                                      np.linspace(max(edge, -30.0 * s), 30.0 * s, 6001),
                                      np.linspace(edge, edge + 40.0 * s + 3.0, 20001)]))
        ll = band_loglike(y, r)
        p = np.exp(ll - ll.max())
        dy, ym = np.diff(y), 0.5 * (y[1:] + y[:-1])
        pm = 0.5 * (p[1:] + p[:-1]) * dy                          # trapezoid weights of the intervals
        m = np.sum(pm * ym) / pm.sum()
        v = np.sum(pm * (ym - m) ** 2) / pm.sum()
        mean.append((m - s * s / 2.0) / s)
        sd.append(np.sqrt(v) / s)
    _BAND_SHAPE.update(lr=lr, mean=np.array(mean), sd=np.array(sd))
    return _BAND_SHAPE


def band_shape(rstar):
    """(mean, variance) in y = ln f - ln f* of one band's exact likelihood, normalised over y (the Gaussian with
    these moments stands for the band in the age profile). For r* -> 0 the likelihood is the log-normal's
    (mean s^2/2, variance s^2); from r* ~ 0.1 on the edge mode widens it and beyond ~0.3 the support edge
    truncates it: at r* = 0.5 the sd is 0.16 instead of s = 0.47, at r* = 1 0.084 instead of 0.83."""
    r = np.asarray(rstar, dtype=np.float64)
    tab = _band_shape_table()
    s = np.sqrt(np.log1p(r * r))
    with np.errstate(divide="ignore"):                      # r* = 0: the log-normal limit
        lr = np.log(r)
    mean = s * s / 2.0 + s * np.interp(lr, tab["lr"], tab["mean"], left=0.0)
    sd = s * np.interp(lr, tab["lr"], tab["sd"], left=1.0)
    return mean, sd * sd


_AGE_PROFILE = {}


def age_profile_settings():
    """The age profile's constants: a checkpoint stores them, and cinn.load refuses a model whose profile was
    built with other values than this module's (the model config records only beta)."""
    return dict(split=AGE_PROFILE_SPLIT, dex=AGE_PROFILE_DEX, segments=AGE_PROFILE_SEGMENTS,
                floor=AGE_PROFILE_FLOOR, bounds=AGE_PROFILE_BOUNDS, prior=AGE_PROFILE_PRIOR,
                shape=AGE_PROFILE_SHAPE)


def age_profile_grid():
    """Bins of the age profile (cached): edges (B + 1,) in t' [Myr] at half-integers (1 Myr bins up to
    AGE_PROFILE_SPLIT, then ~AGE_PROFILE_DEX dex), log P(bin) under the simulation's age prior (B,), and per
    bin the prior-weighted mean ln F_b of its integer ages at the segment nodes E = 0, 0.25, ..., 1.5 (B, J+1, 5)
    (per Msun at 10 pc)."""
    if "edges" in _AGE_PROFILE:
        return _AGE_PROFILE
    import simulate
    n_age = simulate.AGE_MAX_MYR
    edges = list(np.arange(0.5, AGE_PROFILE_SPLIT + 1.0))
    while edges[-1] < n_age:
        edges.append(min(max(np.floor(edges[-1] * 10 ** AGE_PROFILE_DEX) + 0.5, edges[-1] + 1.0), n_age + 0.5))
    edges = np.array(edges)
    from grid_posterior import log_prior_age                    # P(k) of the simulation's age prior
    k = np.arange(1, n_age + 1, dtype=np.float64)
    p_k = np.exp(log_prior_age(n_age))
    which = np.searchsorted(edges, k) - 1                       # bin of each integer age
    p_bin = np.bincount(which, p_k, len(edges) - 1)
    tab = simulate.load_table()
    nodes = np.rint(np.linspace(0, len(tab["ebv_nodes"]) - 1, AGE_PROFILE_SEGMENTS + 1)).astype(int)
    ln_f = tab["ln_flux"][:, nodes, :]                          # (n_age, J + 1, 5)
    mean_ln_f = np.stack([np.bincount(which, p_k * ln_f[:, j, b], len(edges) - 1)
                          for j in range(len(nodes)) for b in range(5)], axis=1)
    mean_ln_f = (mean_ln_f / p_bin[:, None]).reshape(len(edges) - 1, len(nodes), 5)
    _AGE_PROFILE.update(edges=edges, log_prior=np.log(p_bin), ln_f=mean_ln_f,
                        e_nodes=tab["ebv_nodes"][nodes])
    return _AGE_PROFILE


def _age_profile_rows(x, beta=1.0):
    """log P(bin | x) (N, B) of the age profile for rows of x (N, 11) (module docstring).

    Per bin and E(B-V) segment, with d_b = ln f*_b + mean_b - ln F_b(bin, E_j) (at 10 pc; mean_b, 1 / w_b from
    band_shape) and ln F_b linear in e = E - E_j (slope s_b), the log integrand after integrating ln m
    analytically is, up to constants,
        g(e) = -chi2(e) / 2,   chi2 = sum_b w_b (d_b - s_b e - ln m_hat(e))^2,
        ln m_hat(e) = sum_b w_b (d_b - s_b e) / W,
    a quadratic -c/2 + e dd - e^2 q / 2 whose sums over bands are matrix products over all (bin, segment)
    columns at once. Its integral over the segment is taken as its maximum times the Gaussian width
    sqrt(2 pi / q) (maximum inside) or a Mills-ratio width 1 / (|g'| + sqrt(2 q / pi)) (maximum on an end).
    AGE_PROFILE_SHAPE = "lognormal": mean_b = s_b^2 / 2, 1 / w_b = s_b^2 (plus the floor), and the 2/f factors,
    outside the Gaussians then, add -5 ln m_hat(e) - sum_b ln F_b(e) to g."""
    g = age_profile_grid()
    a = g["ln_f"][:, :-1, :]                                    # (B, J, 5) intercepts at the segment starts
    de = np.diff(g["e_nodes"])                                  # (J,)
    s = np.diff(g["ln_f"], axis=1) / de[None, :, None]         # (B, J, 5) slopes d ln F / dE
    B, J = a.shape[:2]
    a, s = a.reshape(B * J, 5), s.reshape(B * J, 5)
    moments = AGE_PROFILE_SHAPE == "moments"
    y_mean, s2 = _band_moments(x, moments)                      # (N, 5) each
    w = 1.0 / (s2 + AGE_PROFILE_FLOOR ** 2)
    y_raw = x[:, 0:5] * LN10 - 2.0 * np.log(PC10_IN_MPC / x[:, 10:11])         # ln f* at 10 pc
    y = y_raw + y_mean
    W = w.sum(1, keepdims=True)
    ybar = np.sum(w * y, axis=1, keepdims=True) / W
    y = y - ybar                                                # centred: the mass absorbs the shift
    wy = w * y
    sd = -(w @ a.T)                                             # sum w d, d = y - a (sum w y = 0)
    sa = w @ s.T
    sdd = np.sum(wy * y, 1, keepdims=True) - 2.0 * (wy @ a.T) + w @ (a * a).T
    sda = wy @ s.T - w @ (a * s).T
    q = np.maximum(w @ (s * s).T - sa * sa / W, 1e-12)
    c = sdd - sd * sd / W                                       # -2 x the e-independent part of g
    dd = sda - sd * sa / W                                      # g(e) = -c/2 + e dd - e^2 q / 2
    if not moments:
        c, dd = c + 10.0 * sd / W + 2.0 * a.sum(1), dd + 5.0 * sa / W - s.sum(1)
    dmax = np.tile(de, B)
    e = np.clip(dd / q, 0.0, dmax)
    g_top = -0.5 * c + e * dd - 0.5 * e * e * q
    slope = np.abs(dd - e * q)
    inner = (dd > 0.0) & (dd < q * dmax)                        # the maximum inside the segment
    width = np.where(inner, np.sqrt(2.0 * np.pi / q), 1.0 / (slope + np.sqrt(2.0 * q / np.pi)))
    log_l = g_top + np.log(np.minimum(width, dmax))
    if AGE_PROFILE_BOUNDS:          # the prior's mass range and the floor m F_b >= 2 sigma_b, at the best E(B-V)
        ln_m = (sd - e * sa) / W + ybar - (0.0 if moments else 5.0 / W)     # mean of the Gaussian factor in ln m
        with np.errstate(divide="ignore"):                       # r* = 0: no floor from that band
            two_sigma = np.log(2.0 * x[:, 5:10]) + y_raw           # ln 2 sigma_b at 10 pc
        lo = np.full_like(ln_m, M_LO * LN10)
        for b in range(5):
            lo = np.maximum(lo, two_sigma[:, b:b + 1] - a[:, b] - e * s[:, b])
        log_l -= 0.5 * W * (np.maximum(ln_m - M_HI * LN10, 0.0) ** 2 + np.maximum(lo - ln_m, 0.0) ** 2)
    log_l = beta * logsumexp(log_l.reshape(len(x), B, J), axis=2) + g["log_prior"]
    log_l -= logsumexp(log_l, axis=1, keepdims=True)
    return np.logaddexp(np.log1p(-AGE_PROFILE_PRIOR) + log_l, np.log(AGE_PROFILE_PRIOR) + g["log_prior"])


def age_profile(x, beta=1.0, chunk=1000):
    """log P(bin | x) of the age profile: (U, B) for the U distinct runs of rows of x (..., 11), and the index
    (N,) of each row's run (posterior samples repeat x: computed once per cluster). Chunks of 1,000 rows keep the
    (rows, bins x segments) temporaries in cache: 3x faster than 20,000."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 11)
    inverse = _runs(x)
    first = np.flatnonzero(np.diff(inverse, prepend=-1))
    out = np.concatenate([_age_profile_rows(x[first[i:i + chunk]], beta) for i in range(0, len(first), chunk)]) \
        if len(first) else np.zeros((0, len(age_profile_grid()["edges"]) - 1))
    return out, inverse


def _age_cdf(x, beta=1.0):
    """Bin probabilities P (U, B), lower CDF (U, B+1) and upper tail (U, B+1) of the age profile, and the run
    index of each row (age_profile)."""
    log_p, inverse = age_profile(x, beta)
    p = np.exp(log_p)
    lower = np.concatenate([np.zeros((len(p), 1)), np.cumsum(p, axis=1)], axis=1)
    upper = np.concatenate([np.cumsum(p[:, ::-1], axis=1)[:, ::-1], np.zeros((len(p), 1))], axis=1)
    return p, lower, upper, inverse


def _age_u_du(log_age, x, beta=1.0):
    """u_t = Phi^-1(G(t' | x)) and log du_t / dlog10 t' for the age profile's CDF G (uniform in t' inside a bin)."""
    edges = age_profile_grid()["edges"]
    shape = np.shape(log_age)
    t = 10.0 ** np.asarray(log_age, dtype=np.float64).ravel()
    p, lower, upper, inv = _age_cdf(np.broadcast_to(x, shape + (11,)), beta)
    b = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    width = edges[b + 1] - edges[b]
    frac = np.clip((t - edges[b]) / width, 0.0, 1.0)
    pb = p[inv, b]
    g_lo = lower[inv, b] + pb * frac
    g_hi = upper[inv, b + 1] + pb * (1.0 - frac)
    u = np.where(g_lo < 0.5, ndtri(np.clip(g_lo, EPS, 1.0)), -ndtri(np.clip(g_hi, EPS, 1.0)))
    log_du = np.log(pb / width * t * LN10) + 0.5 * u ** 2 + 0.5 * np.log(2.0 * np.pi)
    return u.reshape(shape), log_du.reshape(shape)


def _age_from_u(u, x, beta=1.0):
    """Inverse of _age_u_du: log10 t' from u_t."""
    edges = age_profile_grid()["edges"]
    shape = np.shape(u)
    u = np.asarray(u, dtype=np.float64).ravel()
    p, lower, upper, inv = _age_cdf(np.broadcast_to(x, shape + (11,)), beta)
    n_b = p.shape[1]
    off = 2.0 * np.arange(len(p))[:, None]                   # one sorted array for all runs: CDFs in [0, 1]
    low = u < 0
    b = np.empty(len(u), dtype=np.int64)
    g = ndtr(u[low])
    b[low] = np.searchsorted((lower + off).ravel(), g + off[inv[low], 0], side="right") - 1 - inv[low] * (n_b + 1)
    s = ndtr(-u[~low])
    b[~low] = np.searchsorted((off - upper).ravel(), off[inv[~low], 0] - s, side="left") - 1 - inv[~low] * (n_b + 1)
    b = np.clip(b, 0, n_b - 1)
    frac = np.empty(len(u))
    frac[low] = (g - lower[inv[low], b[low]]) / p[inv[low], b[low]]
    frac[~low] = 1.0 - (s - upper[inv[~low], b[~low] + 1]) / p[inv[~low], b[~low]]
    t = edges[b] + np.clip(frac, 0.0, 1.0) * (edges[b + 1] - edges[b])
    return np.log10(t).reshape(shape)


def depends_on_x(x, scale, ridge, ebv_ridge=False, age_profile=False, moments=False):
    """Whether the target transform depends on x: given x, with the floor (scale > 0), a ridge or the age
    profile (moments only changes how the ridges weigh the bands)."""
    return x is not None and (scale > 0 or ridge or ebv_ridge or age_profile)


def _mass_terms(theta, x, scale, ridge, moments=False):
    """The floor a (2 without the floor term) and the ridge (c, w), (c, w, "cdf") or None at theta's (t', E)."""
    a = log_mass_floor(theta[..., 0], theta[..., 2], x) if scale > 0 else np.full(theta.shape[:-1], M_LO)
    if not ridge:
        return a, None
    c, w = log_mass_ridge(theta[..., 0], theta[..., 2], x, moments)
    return a, ((c, w, "cdf") if ridge == "cdf" else (c, w))


def theta_to_u(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False, age_profile=False,
               moments=False):
    """Bounded physical targets -> unbounded u = Phi^-1((theta - a)/(b - a)); finite on the bounds (clipped).
    With x: log mass gets the floor term (scale > 0; -> -inf at the floor of theta's t', E) and the ridge term
    (ridge=True), E(B-V) its ridge term (ebv_ridge=True), and the age the age profile's CDF warp (age_profile =
    beta > 0) of the module docstring; moments=True: the ridges use band_shape's moments (_band_moments); x None,
    or scale 0 and nothing else, is the plain transform."""
    theta = _check_theta(theta)
    a, b = THETA_BOUNDS[:, 0], THETA_BOUNDS[:, 1]
    u = ndtri(np.clip((theta - a) / (b - a), EPS, 1.0 - EPS))
    if depends_on_x(x, scale, ridge, ebv_ridge, age_profile):
        floor, rg = _mass_terms(theta, x, scale, ridge, moments)
        u[..., 1] = _mass_u(theta[..., 1], floor, scale, rg)
        if ebv_ridge:
            u[..., 2] = _ebv_terms(theta[..., 2], ebv_from_colours(theta[..., 0], x, moments), ebv_ridge)[0]
        if age_profile:
            u[..., 0] = _age_u_du(theta[..., 0], x, age_profile)[0]
    return u


def u_to_theta(u, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False, age_profile=False,
               moments=False):
    """Inverse of theta_to_u: theta = a + (b - a) Phi(u); with x: age first (from the age profile's CDF), then
    E(B-V) (about its ridge at that age), then the mass above the floor (and about the ridge) they set."""
    u = _check_theta(u)
    theta = THETA_BOUNDS[:, 0] + (THETA_BOUNDS[:, 1] - THETA_BOUNDS[:, 0]) * ndtr(u)
    if depends_on_x(x, scale, ridge, ebv_ridge, age_profile):
        if age_profile:
            theta[..., 0] = _age_from_u(u[..., 0], x, age_profile)
        if ebv_ridge:
            inverse = _ebv_cdf_from_u if ebv_ridge == "cdf" else _ebv_from_u
            theta[..., 2] = inverse(u[..., 2], ebv_from_colours(theta[..., 0], x, moments))
        if scale > 0 or ridge:
            floor, rg = _mass_terms(theta, x, scale, ridge, moments)
            theta[..., 1] = _mass_from_u(u[..., 1], floor, scale, rg)
    return theta


def log_du_dtheta(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False, age_profile=False,
                  moments=False):
    """The diagonal of the transform's Jacobian, log du_i/dtheta_i (..., 3): du/dtheta = 1 / ((b - a) phi(u)),
    phi the standard normal density; with x the log-mass and E(B-V) terms of the floor / ridge transforms and
    the age profile's log density."""
    theta = _check_theta(theta)
    terms = np.stack([_log_plain_du(theta[..., j], j) for j in range(3)], axis=-1)
    if depends_on_x(x, scale, ridge, ebv_ridge, age_profile):
        floor, rg = _mass_terms(theta, x, scale, ridge, moments)
        terms[..., 1] = _log_mass_du(theta[..., 1], floor, scale, rg)
        if ebv_ridge:
            terms[..., 2] = _ebv_terms(theta[..., 2], ebv_from_colours(theta[..., 0], x, moments), ebv_ridge)[1]
        if age_profile:
            terms[..., 0] = _age_u_du(theta[..., 0], x, age_profile)[1]
    return terms


def log_det_theta_to_u(theta, x=None, scale=FLOOR_SCALE, ridge=False, ebv_ridge=False, age_profile=False,
                       moments=False):
    """sum_i log|du_i/dtheta_i| (N,) (the Jacobian is triangular, also with the floor and the ridges: a sum of
    the diagonal).  p_theta(theta | x) = p_u(u(theta) | x) * exp(log_det_theta_to_u(theta, x or None)).
    """
    return np.sum(log_du_dtheta(theta, x, scale, ridge, ebv_ridge, age_profile, moments), axis=-1)


def _ridge_kind(value):
    """A config's ridge or ebv_ridge: False, True (the additive ridge) or "cdf" (through a CDF, _cdf_ridge_u_du)."""
    if value == "cdf" or isinstance(value, (bool, int, np.bool_)):
        return value if value == "cdf" else bool(value)
    raise ValueError(f"ridge and ebv_ridge must be true, false or \"cdf\"; got {value!r}")


def target_transform(config):
    """The target transform options of a model config (keyword arguments of theta_to_u and the others);
    configs written before the ridges existed have none."""
    return dict(scale=config.get("floor_scale", 0.0), ridge=_ridge_kind(config.get("ridge", False)),
                ebv_ridge=_ridge_kind(config.get("ebv_ridge", False)), age_profile=float(config.get("age_profile", 0.0)),
                moments=bool(config.get("band_moments", False)))


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
