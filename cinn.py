"""The conditional invertible neural network (cINN) for p(theta | x), in plain PyTorch (Walter et al. 2026,
Sect. 2.1).

The network g maps a cluster's transformed targets u (preprocess.theta_to_u), conditioned on its photometry x,
to a latent z that is standard normal when the model is right:

    z = g(u; x),    p(u | x) = N(z; 0, 1) |det dz/du|,    loss = E[ ||z||^2 / 2 - log|det dz/du| ]   (Eq. 4)

g is a stack of conditional affine coupling blocks (Eqs. 5-7). Each block splits u into u1 (1 dim) and u2 (2 dims):

    v1 = u1 * exp(s2(u2, c)) + t2(u2, c)        (Eq. 5)
    v2 = u2 * exp(s1(v1, c)) + t1(v1, c)        (Eq. 6)
    u2 = (v2 - t1(v1, c)) * exp(-s1(v1, c)),  u1 = (v1 - t2(u2, c)) * exp(-s2(u2, c))     (Eq. 7, the inverse)

with log|det| = sum(s2) + sum(s1). Each subnet is an MLP on [half, c] that outputs scale and shift; the log-scale
is soft-clamped s -> (2 clamp / pi) atan(s / clamp). After each block the three coordinates are shuffled by a
fixed random permutation drawn from its own seeded generator. The condition c is the standardised x passed
through a small MLP (the condition network), trained jointly.

A model is the flow plus its target transform: preprocess.BoundedTransform for the paper's method,
refinements.RefinedTransform for the refined one. A transform has forward(theta, x) -> (u, log du/dtheta per
coordinate) and inverse(u, x) -> theta (for training and sampling), age_u(log_age, x), and sample_batch and
log_prob, which say how the model's posterior is drawn and evaluated through it: the paper's transform maps the
flow's draws and density, the refined one adds the age-bin average and the support truncation.

    model = cinn.load("runs/quick")          # a run directory or a checkpoint file
    samples = model.sample(x, 1000, seed=0)  # (N, 1000, 3): log10 age/Myr, log10 mass/Msun, E(B-V)
    logp = model.log_prob(theta, x)          # (N,) log density in those physical coordinates
"""
import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

import preprocess

FORMAT_VERSION = 2      # checkpoints of version 1 (before the refinements had their own module) are not read
METHODS = ("paper", "refined")


@dataclass(frozen=True)
class FlowConfig:
    """The network's shape (the refinements' settings are refinements.Settings)."""
    n_blocks: int = 8       # coupling blocks (Eqs. 5-7)
    width: int = 128        # hidden units of each subnet
    depth: int = 2          # hidden layers of each subnet
    clamp: float = 2.0      # soft clamp of the log-scale s
    cond_dim: int = 32      # features of the condition network (0: the standardised x itself)
    cond_width: int = 128
    cond_depth: int = 2
    final_init: float = 0.1     # scale of each subnet's last layer at init: blocks start near the identity
    perm_seed: int = 0          # seed of the fixed permutations
    coupling: str = "affine"    # "affine" (Eqs. 5-7, the paper's) or "spline" (rational-quadratic splines)
    bins: int = 8               # spline bins
    tail_bound: float = 5.0     # real domain: the splines act on [-tail_bound, tail_bound], identity outside
    domain: str = "real"        # "real": the flow works on u; "cube": on v = Phi(u) in [0, 1]^3 (splines only),
                                # the latent Phi^-1 of the blocks' output (a uniform latent lost: NOTEBOOK 7.9)

    @classmethod
    def from_dict(cls, d):
        """FlowConfig from a checkpoint's or a config file's dict; unknown keys are an error. The removed key
        `base` is read where it holds the one latent kept ("gaussian"), so earlier checkpoints still load."""
        d = dict(d)
        if d.pop("base", "gaussian") != "gaussian":
            raise ValueError("flow config: the uniform latent of the cube domain was removed (NOTEBOOK 7.9)")
        unknown = set(d) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"unknown flow config keys {sorted(unknown)}")
        return cls(**d)


def mlp(n_in, n_out, width, depth):
    """depth hidden layers of `width` SiLU units, then a linear output layer."""
    layers, n = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.SiLU()]
        n = width
    layers.append(nn.Linear(n, n_out))
    return nn.Sequential(*layers)


def _log_phi(u):
    """log of the standard normal density."""
    return -0.5 * u * u - 0.5 * math.log(2 * math.pi)


def _open_unit(v):
    """v clamped into the open unit interval that Phi^-1 maps to finite values in v's precision."""
    return v.clamp(1e-12, 1 - 1e-7 if v.dtype == torch.float32 else 1 - 1e-12)


def soft_clamp(s, clamp):
    """(2 clamp / pi) atan(s / clamp): ~s for small s, bounded by +-clamp (stabilises exp(s))."""
    return (2.0 * clamp / math.pi) * torch.atan(s / clamp)


class CouplingBlock(nn.Module):
    """One conditional affine coupling block, Eqs. (5)-(7)."""

    def __init__(self, dim, dim_c, width, depth, clamp):
        super().__init__()
        self.d1, self.d2, self.clamp = dim // 2, dim - dim // 2, clamp
        self.net2 = mlp(self.d2 + dim_c, 2 * self.d1, width, depth)   # s2, t2 from (u2, c)
        self.net1 = mlp(self.d1 + dim_c, 2 * self.d2, width, depth)   # s1, t1 from (v1, c)

    def _scale_shift(self, net, h, c):
        s, t = net(torch.cat([h, c], dim=1)).chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, u, c):
        """u -> v (parameter side to latent side) and log|det dv/du| (N,)."""
        u1, u2 = u[:, :self.d1], u[:, self.d1:]
        s2, t2 = self._scale_shift(self.net2, u2, c)
        v1 = u1 * torch.exp(s2) + t2                                   # Eq. 5
        s1, t1 = self._scale_shift(self.net1, v1, c)
        v2 = u2 * torch.exp(s1) + t1                                   # Eq. 6
        return torch.cat([v1, v2], dim=1), s2.sum(dim=1) + s1.sum(dim=1)

    def inverse(self, v, c):
        """v -> u, the exact inverse (Eq. 7)."""
        v1, v2 = v[:, :self.d1], v[:, self.d1:]
        s1, t1 = self._scale_shift(self.net1, v1, c)
        u2 = (v2 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.net2, u2, c)
        u1 = (v1 - t2) * torch.exp(-s2)
        return torch.cat([u1, u2], dim=1)


SPLINE_MIN_WIDTH = 1e-3      # smallest bin width and height, as a share of the spline's range
SPLINE_MIN_SLOPE = 1e-3      # smallest derivative at a knot


def _knots(raw, lo, hi):
    """Knot positions (..., K + 1) from K unconstrained bin sizes: softmax, a floor, cumulative sum."""
    K = raw.shape[-1]
    w = SPLINE_MIN_WIDTH + (1.0 - SPLINE_MIN_WIDTH * K) * torch.softmax(raw, dim=-1)
    knots = torch.nn.functional.pad(torch.cumsum(w, dim=-1), (1, 0))
    knots = lo + (hi - lo) * knots
    return torch.cat([knots[..., :1] * 0 + lo, knots[..., 1:-1], knots[..., -1:] * 0 + hi], dim=-1)


def rq_spline(x, params, bins, bound=None, inverse=False):
    """The monotone rational-quadratic spline of Durkan et al. (2019), elementwise: y = g(x) (or x = g^-1(y)),
    and log|dg/dx| at each element.

    Args:
        x: (N, D) inputs (outputs of g for inverse=True).
        params: (N, D, P) unconstrained parameters: `bins` bin widths and heights (softmax, a floor) and the
            derivatives at the knots (softplus, 1 where the raw value is 0). bound None: the spline maps [0, 1]
            onto itself and all bins + 1 derivatives are learned (P = 3 bins + 1); bound B: it maps [-B, B] onto
            itself with derivative 1 at +-B and the identity outside (P = 3 bins - 1).
    Returns:
        (y, log|dg/dx|) of x's shape; for inverse=True (x, log|dg/dx| at that x).

    In bin k, with knots (x_k, y_k), width w_k, height h_k, slope s_k = h_k / w_k, derivatives d_k and d_k+1 and
    xi = (x - x_k) / w_k in [0, 1] (Durkan et al., Eqs. 4-5):
        g(x)  = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_k+1 + d_k - 2 s_k) xi (1 - xi)]
        g'(x) = s_k^2 [d_k+1 xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2] / [s_k + (d_k+1 + d_k - 2 s_k) xi (1 - xi)]^2
    and the inverse is the root in [0, 1] of the quadratic a xi^2 + b xi + c = 0 (their appendix A.3) with
        a = h_k (s_k - d_k) + (y - y_k) t,  b = h_k d_k - (y - y_k) t,  c = -s_k (y - y_k),  t = d_k+1 + d_k - 2 s_k,
        xi = 2 c / (-b - sqrt(b^2 - 4 a c))    (the form without cancellation).
    """
    lo, hi = (0.0, 1.0) if bound is None else (-bound, bound)
    xk = _knots(params[..., :bins], lo, hi)
    yk = _knots(params[..., bins:2 * bins], lo, hi)
    d = SPLINE_MIN_SLOPE + torch.nn.functional.softplus(params[..., 2 * bins:] + math.log(math.expm1(1 - SPLINE_MIN_SLOPE)))
    if bound is not None:                                    # derivative 1 at the ends: joins the identity tails
        one = torch.ones_like(d[..., :1])
        d = torch.cat([one, d, one], dim=-1)
    inside = (x >= lo) & (x <= hi)
    xc = x.clamp(lo, hi)
    k = (torch.searchsorted((yk if inverse else xk).contiguous(), xc.unsqueeze(-1).contiguous()) - 1).clamp(0, bins - 1)
    take = lambda a, j=0: torch.gather(a, -1, k + j).squeeze(-1)
    x0, w, y0, h = take(xk), take(xk, 1) - take(xk), take(yk), take(yk, 1) - take(yk)
    d0, d1 = take(d), take(d, 1)
    s = h / w
    t = d1 + d0 - 2 * s
    if inverse:
        dy = xc - y0
        a, b, c = h * (s - d0) + dy * t, h * d0 - dy * t, -s * dy
        xi = (2 * c / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0)))).clamp(0, 1)
        out = x0 + xi * w
    else:
        xi = (xc - x0) / w
        out = y0 + h * (s * xi * xi + d0 * xi * (1 - xi)) / (s + t * xi * (1 - xi))
    one_minus = 1 - xi
    den = s + t * xi * one_minus
    logd = 2 * torch.log(s) + torch.log(d1 * xi * xi + 2 * s * xi * one_minus + d0 * one_minus * one_minus) \
        - 2 * torch.log(den)
    if bound is None:
        return out, logd
    return torch.where(inside, out, x), torch.where(inside, logd, torch.zeros_like(logd))


class SplineCouplingBlock(nn.Module):
    """One conditional coupling block with rational-quadratic splines (rq_spline) in place of the affine maps
    of Eqs. 5-7: v1 = g(u1; net2(u2, c)), v2 = g(u2; net1(v1, c)), with log|det| the sum of the splines'
    log-derivatives. The same interface as CouplingBlock; bound None: on the unit cube."""

    def __init__(self, dim, dim_c, width, depth, bins, bound):
        super().__init__()
        self.d1, self.d2, self.bins, self.bound = dim // 2, dim - dim // 2, bins, bound
        self.n_par = 3 * bins + (1 if bound is None else -1)
        self.net2 = mlp(self.d2 + dim_c, self.d1 * self.n_par, width, depth)   # splines of u1 from (u2, c)
        self.net1 = mlp(self.d1 + dim_c, self.d2 * self.n_par, width, depth)   # splines of u2 from (v1, c)

    def _spline(self, net, h, c, v, d, inverse=False):
        params = net(torch.cat([h, c], dim=1)).view(len(h), d, self.n_par)
        return rq_spline(v, params, self.bins, self.bound, inverse)

    def forward(self, u, c):
        """u -> v and log|det dv/du| (N,)."""
        u1, u2 = u[:, :self.d1], u[:, self.d1:]
        v1, ld1 = self._spline(self.net2, u2, c, u1, self.d1)
        v2, ld2 = self._spline(self.net1, v1, c, u2, self.d2)
        return torch.cat([v1, v2], dim=1), ld1.sum(dim=1) + ld2.sum(dim=1)

    def inverse(self, v, c):
        """v -> u, the exact inverse (the quadratic root of rq_spline)."""
        v1, v2 = v[:, :self.d1], v[:, self.d1:]
        u2, _ = self._spline(self.net1, v1, c, v2, self.d2, inverse=True)
        u1, _ = self._spline(self.net2, u2, c, v1, self.d1, inverse=True)
        return torch.cat([u1, u2], dim=1)


def flatten_rows(theta, x):
    """theta (N, 3) with x (N, 11), or theta (N, K, 3) with x (N, 11) -> rows theta (M, 3), x (M, 11), and the
    shape (N,) or (N, K) that per-row results take."""
    theta = np.asarray(theta, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    shape = theta.shape[:-1]
    if theta.ndim == 3:
        x = np.repeat(x, theta.shape[1], axis=0)
    theta = theta.reshape(-1, 3)
    if len(theta) != len(x):
        raise ValueError(f"theta has {len(theta)} rows but x has {len(x)}")
    return theta, x, shape


class CINN(nn.Module):
    """Coupling blocks and permutations, a condition network, the x standardisation, and a target transform
    (default: the paper's, preprocess.BoundedTransform)."""

    def __init__(self, config=FlowConfig(), x_mean=None, x_std=None, seed=0, transform=None):
        super().__init__()
        self.config = config
        self.transform = transform or preprocess.BoundedTransform()
        D, dx = 3, preprocess.DIM_X
        self.register_buffer("x_mean", torch.zeros(dx) if x_mean is None else torch.as_tensor(x_mean).float())
        self.register_buffer("x_std", torch.ones(dx) if x_std is None else torch.as_tensor(x_std).float())
        if config.cond_dim > 0:
            self.cond_net = mlp(dx, config.cond_dim, config.cond_width, config.cond_depth)
        else:
            self.cond_net = nn.Identity()
        dim_c = config.cond_dim or dx
        if config.coupling not in ("affine", "spline") or config.domain not in ("real", "cube"):
            raise ValueError(f"coupling or domain not known: {config}")
        if config.domain == "cube" and config.coupling != "spline":
            raise ValueError("the cube domain needs spline couplings (affine ones leave the cube)")
        if config.coupling == "affine":
            make = lambda: CouplingBlock(D, dim_c, config.width, config.depth, config.clamp)
        else:
            bound = None if config.domain == "cube" else config.tail_bound
            make = lambda: SplineCouplingBlock(D, dim_c, config.width, config.depth, config.bins, bound)
        self.blocks = nn.ModuleList(make() for _ in range(config.n_blocks))
        perm_rng = np.random.default_rng(config.perm_seed)    # its own generator, never global state
        for k in range(config.n_blocks):
            perm = torch.as_tensor(perm_rng.permutation(D))
            self.register_buffer(f"perm{k}", perm)
            self.register_buffer(f"inv_perm{k}", torch.argsort(perm))
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed):
        """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a seeded generator;
        the last layer of every coupling subnet scaled by config.final_init."""
        gen = torch.Generator().manual_seed(int(seed))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for p in (module.weight, module.bias):
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound)
        for block in self.blocks:
            for net in (block.net1, block.net2):
                net[-1].weight.mul_(self.config.final_init)
                net[-1].bias.mul_(self.config.final_init)

    @property
    def device(self):
        return self.x_mean.device

    @property
    def method(self):
        return self.transform.method

    def condition(self, x):
        """Network inputs x (N, 11) as a tensor -> condition features c."""
        return self.cond_net((x - self.x_mean) / self.x_std)

    def to_latent(self, u, x=None, c=None):
        """u -> z and log|det dz/du| (N,). In the cube domain v = Phi(u) enters the blocks, and the latent is
        Phi^-1 of their output."""
        c = self.condition(x) if c is None else c
        logdet = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        cube = self.config.domain == "cube"
        if cube:
            u, logdet = torch.special.ndtr(u), logdet + _log_phi(u).sum(dim=1)
        for k, block in enumerate(self.blocks):
            u, ld = block(u, c)
            u = u[:, getattr(self, f"perm{k}")]
            logdet = logdet + ld
        if cube:
            u = torch.special.ndtri(_open_unit(u))
            logdet = logdet - _log_phi(u).sum(dim=1)
        return u, logdet

    def to_params(self, z, x=None, c=None):
        """z -> u, the inverse of to_latent (used for sampling)."""
        c = self.condition(x) if c is None else c
        cube = self.config.domain == "cube"
        if cube:
            z = torch.special.ndtr(z)
        for k in reversed(range(len(self.blocks))):
            z = z[:, getattr(self, f"inv_perm{k}")]
            z = self.blocks[k].inverse(z, c)
        return torch.special.ndtri(_open_unit(z)) if cube else z

    def log_prob_u(self, u, x):
        """log p(u | x) = log p_base(z) + log|det dz/du| (Eq. 4 without the mean); p_base the standard normal."""
        z, logdet = self.to_latent(u, x)
        return -0.5 * (z ** 2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet

    def _x_tensor(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != preprocess.DIM_X:
            raise ValueError(f"x must have shape (N, {preprocess.DIM_X}), got {x.shape}")
        bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
        if bad.size:
            raise ValueError(f"x has non-finite values in rows {bad[:10].tolist()} ({bad.size} rows)")
        return torch.as_tensor(x, dtype=self.x_mean.dtype, device=self.device)

    # -------------------------------------------------------------------------------------------------------
    # Sampling and densities in physical coordinates.

    @torch.no_grad()
    def sample(self, x, n, seed=None, batch_rows=1 << 17, transform=None):
        """n posterior samples per row of x, drawn through the model's transform (transform.sample_batch).

        Args:
            x: network inputs (N, 11).
            n: samples per cluster.
            seed: the same seed, device, n and batch_rows give identical samples (None: fresh entropy).
            batch_rows: samples per batch (bounds memory); the condition network runs once per cluster.
            transform: draw through this transform instead of the model's (the refined one estimates its
                support's probability from the flow's own draws).
        Returns:
            numpy (N, n, 3) in physical units (log10 t'/Myr, log10 m0/Msun, E(B-V)), float32 for a float32 model.
        """
        was_training = self.training
        self.eval()
        xt = self._x_tensor(x)
        x = np.asarray(x, dtype=np.float64)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 63))
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        rng = np.random.default_rng([int(seed), 1])       # NumPy draws of a transform: their own generator
        out = np.empty((len(x), n, 3), dtype=np.float32 if xt.dtype == torch.float32 else np.float64)
        per, left = max(1, batch_rows // max(n, 1)), 0    # clusters per batch; draws left outside the support
        transform = transform or self.transform
        for i in range(0, len(x), per):
            c = self.condition(xt[i:i + per])
            theta, n_left = transform.sample_batch(self, x[i:i + per], c, n, gen, rng)
            out[i:i + len(c)], left = theta.reshape(len(c), n, 3), left + n_left
        self.train(was_training)
        if left:
            warnings.warn(f"cinn.sample: {left} of {len(x) * n} draws left outside the noise model's support, on "
                          "the mass bound (clusters with under refinements.Settings.support_min_inside of their "
                          "draws inside, or not replaced in support_rounds rounds)")
        return out

    def draw_u(self, c, n, gen, rows=None, batch_rows=1 << 17):
        """n flow draws u per row of the condition features c (or one per entry of the index array `rows`
        into c) -> numpy float64 (len(c) n, 3), cluster by cluster."""
        if rows is not None:
            c, n = c[torch.as_tensor(rows, device=c.device)], 1
        z = torch.randn(len(c) * n, 3, generator=gen, device=self.device, dtype=c.dtype)
        c = c.repeat_interleave(n, dim=0)
        if n > batch_rows:                           # very many samples of one cluster: split further
            u = torch.cat([self.to_params(zz, c=cc) for zz, cc in zip(z.split(batch_rows), c.split(batch_rows))])
        else:
            u = self.to_params(z, c=c)
        return u.double().cpu().numpy()

    def log_prob(self, theta, x, batch_rows=1 << 17):
        """log q(theta | x) in physical coordinates, as the model samples it (transform.log_prob).

        Args:
            theta: (N, 3), or (N, K, 3) for K points per cluster.
            x: network inputs (N, 11).
        Returns:
            (N,) or (N, K); -inf outside preprocess.THETA_BOUNDS and where the posterior is zero.
        """
        theta, x, shape = flatten_rows(theta, x)
        return self.transform.log_prob(self, theta, x, batch_rows).reshape(shape)

    def flow_log_prob(self, theta, x, batch_rows=1 << 17):
        """The flow's own density in physical coordinates, log p(u | x) + sum_i log du_i/dtheta_i, for rows
        theta (M, 3), x (M, 11) (the paper's log_prob; for a refined model without its corrections)."""
        u, log_du = self.transform.forward(theta, x)
        logp = self.log_prob_rows(u, x, batch_rows) + log_du.sum(axis=1)
        logp[~preprocess.inside_prior(theta)] = -np.inf
        return logp

    @torch.no_grad()
    def log_prob_rows(self, u, x, batch_rows=1 << 17):
        """log p(u | x) for numpy u (N, 3), x (N, 11), in batches of batch_rows -> numpy float64 (N,)."""
        was_training = self.training
        self.eval()
        xt = self._x_tensor(x)
        ut = torch.as_tensor(u, dtype=xt.dtype, device=self.device)
        out = [self.log_prob_u(ut[i:i + batch_rows], xt[i:i + batch_rows]).double().cpu().numpy()
               for i in range(0, len(ut), batch_rows)]
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------------------------------------
# Building, saving and loading models.

def build(method="refined", config=FlowConfig(), settings=None, x_mean=None, x_std=None, seed=0):
    """A new model of the given method: the paper's transform ("paper") or refinements.RefinedTransform
    ("refined", with `settings`: a refinements.Settings, its dict, or None for the defaults). refinements.py is
    imported here, only for a refined model, so that a paper-method model never loads it (nor the exact
    posterior it uses); it does not import this module."""
    if method == "paper":
        if settings:
            raise ValueError("refinement settings given for a paper-method model")
        return CINN(config, x_mean, x_std, seed)
    if method == "refined":
        if config.domain == "cube":    # measured: a density above the exact one at the mass floor, then divergence
            raise ValueError("the cube domain is not available with the refined method: its density was not "
                             "normalised near the mass floor (NOTEBOOK.md, section 7.9); use the real domain")
        import refinements
        if not isinstance(settings, refinements.Settings):
            settings = refinements.Settings.from_dict(settings or {})
        return CINN(config, x_mean, x_std, seed, transform=refinements.RefinedTransform(settings))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def save(path, model, extra=None):
    """Write one self-contained checkpoint atomically (temp file + os.replace): the method, the flow config,
    the refinement settings (refined models), the weights (x standardisation included) and `extra`."""
    settings = asdict(model.transform.settings) if model.method == "refined" else None
    ckpt = dict(format_version=FORMAT_VERSION, method=model.method, config=asdict(model.config),
                refinements=settings, theta_names=list(preprocess.THETA_NAMES),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, extra=extra or {})
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def default_device():
    """cuda if available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path, device=None):
    """A trained model from a checkpoint file or a run directory (holding model.pt), ready to sample.

    Args:
        path: model.pt or its run directory.
        device: torch device (default: cuda if available).
    Returns:
        a CINN in eval mode, with `extra` (what train.py stored: epoch, val_nll, ...).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cINN checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                        # empty, truncated or not a torch file at all
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}); retrain, or use the "
                         "model.pt of another run") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a cINN checkpoint (missing format_version/state_dict)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt['format_version']}, this code reads {FORMAT_VERSION} "
                         "(models trained before the refinements had their own module are not read: retrain)")
    try:
        model = build(ckpt["method"], FlowConfig.from_dict(ckpt["config"]), ckpt["refinements"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:      # config and weights do not match
        raise ValueError(f"{path}: its configuration does not match its weights or this code "
                         f"({str(err).splitlines()[0]})") from None
    model.extra = ckpt.get("extra", {})
    model.eval()
    return model.to(default_device() if device is None else torch.device(device))
