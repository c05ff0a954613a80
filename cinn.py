"""Conditional invertible neural network (cINN) for p(theta | x), in plain PyTorch (Walter et al. 2026, Sect. 2.1).

The network g maps the (transformed) parameters u = Phi^-1((theta - a)/(b - a)) of a cluster, conditioned on its
photometry x, to a latent z that is standard normal when the model is right (with the config's floor_scale,
ridge and ebv_ridge, u_m and u_E also depend on x and on the age bin: the mass floor and the ridges of
preprocess.py; with age_profile, u_t is the CDF warp of preprocess's age profile; a triangular map whose
log-Jacobian is the sum of its diagonal):

    z = g(u; x),    p(u | x) = N(z; 0, 1) |det dz/du|,    loss = E[ ||z||^2 / 2 - log|det dz/du| ]   (Eq. 4)

g is a stack of conditional affine coupling blocks (Eqs. 5-7). Each block splits u into u1 (1 dim) and u2 (2 dims):

    v1 = u1 * exp(s2(u2, c)) + t2(u2, c)        (Eq. 5)
    v2 = u2 * exp(s1(v1, c)) + t1(v1, c)        (Eq. 6)
    u2 = (v2 - t1(v1, c)) * exp(-s1(v1, c)),  u1 = (v1 - t2(u2, c)) * exp(-s2(u2, c))     (Eq. 7, the inverse)

with log|det| = sum(s2) + sum(s1). Each subnet is an MLP on [half, c] that outputs scale and shift; the log-scale
is soft-clamped s -> (2 clamp / pi) atan(s / clamp). After each block the three coordinates are shuffled by a
fixed random permutation drawn from the block's own seeded generator. The condition c is the standardised x
passed through a small MLP (the condition network), trained jointly.

Age bins. The photometry depends on the integer age k only; the label t' = k + U[-1/2, 1/2] Myr is jittered
independently of x (preprocess.jitter_age). So the true posterior is P(k, m, E | x) times a uniform density in
t' inside the bin: in log10 t' it is t' ln 10 per Myr, a staircase at young ages that a smooth flow can only
approximate. By default `sample` and `log_prob` use the flow averaged over each bin, the projection of the flow
q onto posteriors of that form:

    q_bin(log t', m, E | x) = Q(k, m, E | x) t' ln 10,    Q(k, m, E | x) = integral of q(l, m, E | x) over bin k

(Q by 16-point Gauss-Legendre in u_0, where the integrand stays smooth up to the 0.5 Myr bound; u_m and u_E
depend on t' only through the bin, so they stay fixed; the age profile's bins are unions of 1 Myr bins).
Sampling it is sampling q and re-drawing t' uniformly inside its bin. By the chain rule of the KL divergence,
KL(p || q) = KL(P || Q) + E[KL(uniform || q within the bin)] >= KL(p || q_bin): the projection never moves q
away from the true posterior. `age_bins=False` gives the flow.

Support. The noise model allows no mass below the floor of preprocess.py, and for noisy clusters at some (t', E)
(old or dusty models, high mass-to-light) that floor lies above the prior's top m = 8: no mass at all is allowed
there, yet the flow leaks into such regions (runs/ridge3: 2 % of all samples, over 10 % in 9 of 200 test
clusters, 85 % in the worst; the floor transform can only push them onto m = 8). For models with the floor (config floor_scale > 0) `sample` and
`log_prob` therefore use q truncated to the support S(x) = {theta: m >= floor(t', E)}:

    q_S(theta | x) = q(theta | x) 1[theta in S(x)] / Z(x),     Z(x) = P_q(theta in S(x))

Sampling it is rejection (draws outside S are re-drawn); Z(x) is estimated from `n_support` draws per cluster
with a fixed seed (so log_prob is deterministic). Since the true posterior is zero outside S,
KL(p || q_S) = KL(p || q) + log Z(x) <= KL(p || q): the truncation never moves q away from it either. (This is
the leakage correction of Greenberg et al. 2019, applied to a support that depends on x.)

Directions: `to_latent` (u -> z, with log|det J|, for densities and training) and `to_params` (z -> u, for
sampling). Public interface for the other scripts:

    model = cinn.load("runs/quick")          # a run directory or a checkpoint file
    samples = model.sample(x, 1000, seed=0)  # (N, 1000, 3): log10 age/Myr, log10 mass/Msun, E(B-V)
    logp = model.log_prob(theta, x)          # (N,) log density in those physical coordinates
"""
import math
import os

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

import preprocess

FORMAT_VERSION = 1
DEFAULT_CONFIG = dict(
    dim_theta=3,      # log10 age, log10 mass, E(B-V)
    dim_x=11,         # 5 log10 fluxes, 5 relative errors, distance
    n_blocks=8,       # coupling blocks
    width=128,        # subnet hidden width
    depth=2,          # subnet hidden layers
    clamp=2.0,        # soft clamp of the log-scale s
    cond_dim=32,      # output size of the condition network (0: feed standardised x directly)
    cond_width=128,
    cond_depth=2,
    final_init=0.1,   # scale of the subnets' last layer at init (small: blocks start close to identity)
    perm_seed=0,      # seed of the fixed permutations
    floor_scale=0.0,  # > 0: log-mass transform with the noise model's mass floor at this scale in dex
    ridge=False,      # log-mass transform centred on the mass the photometry implies (preprocess docstring)
    ebv_ridge=False,  # E(B-V) transform centred on the reddening the colours imply at the age
                      # (preprocess docstring; 0 = the plain transform of the paper; "cdf": through the
                      # CDF of the truncated ridge Gaussian)
    age_profile=False,  # beta > 0: age coordinate warped by the CDF of a cheap approximate age posterior
                        # with its likelihood to the power beta (preprocess docstring; 0 = off)
    band_moments=False,  # the ridges weigh the bands by the moments of their exact likelihood
                         # (preprocess.band_shape) instead of the log-normal's (False: as before)
)


def mlp(n_in, n_out, width, depth):
    """depth hidden layers of `width` SiLU units, then a linear output layer."""
    layers, n = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.SiLU()]
        n = width
    layers.append(nn.Linear(n, n_out))
    return nn.Sequential(*layers)


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


class CINN(nn.Module):
    """Stack of coupling blocks and permutations, a condition network, and the x standardisation."""

    def __init__(self, config=None, x_mean=None, x_std=None, seed=0):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config or {})
        unknown = set(cfg) - set(DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"unknown cINN config keys: {sorted(unknown)}")
        self.config = cfg
        D, dx = cfg["dim_theta"], cfg["dim_x"]
        self.register_buffer("x_mean", torch.zeros(dx) if x_mean is None else torch.as_tensor(x_mean).float())
        self.register_buffer("x_std", torch.ones(dx) if x_std is None else torch.as_tensor(x_std).float())
        self.register_buffer("theta_bounds", torch.as_tensor(preprocess.THETA_BOUNDS).float())
        if cfg["cond_dim"] > 0:
            self.cond_net = mlp(dx, cfg["cond_dim"], cfg["cond_width"], cfg["cond_depth"])
            dim_c = cfg["cond_dim"]
        else:
            self.cond_net = nn.Identity()
            dim_c = dx
        self.blocks = nn.ModuleList(CouplingBlock(D, dim_c, cfg["width"], cfg["depth"], cfg["clamp"])
                                    for _ in range(cfg["n_blocks"]))
        perm_rng = np.random.default_rng(cfg["perm_seed"])    # its own generator, never global state
        for k in range(cfg["n_blocks"]):
            perm = torch.as_tensor(perm_rng.permutation(D))
            self.register_buffer(f"perm{k}", perm)
            self.register_buffer(f"inv_perm{k}", torch.argsort(perm))
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed):
        """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a seeded generator;
        the last layer of every coupling subnet scaled by config['final_init']."""
        gen = torch.Generator().manual_seed(int(seed))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                for p in (module.weight, module.bias):
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound)
        for block in self.blocks:
            for net in (block.net1, block.net2):
                net[-1].weight.mul_(self.config["final_init"])
                net[-1].bias.mul_(self.config["final_init"])

    @property
    def device(self):
        return self.x_mean.device

    def condition(self, x):
        """Raw network inputs x (N, 11) -> condition features c."""
        return self.cond_net((x - self.x_mean) / self.x_std)

    def to_latent(self, u, x=None, c=None):
        """u -> z and log|det dz/du| (N,)."""
        c = self.condition(x) if c is None else c
        logdet = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for k, block in enumerate(self.blocks):
            u, ld = block(u, c)
            u = u[:, getattr(self, f"perm{k}")]
            logdet = logdet + ld
        return u, logdet

    def to_params(self, z, x=None, c=None):
        """z -> u, the inverse of to_latent (used for sampling)."""
        c = self.condition(x) if c is None else c
        for k in reversed(range(len(self.blocks))):
            z = z[:, getattr(self, f"inv_perm{k}")]
            z = self.blocks[k].inverse(z, c)
        return z

    def log_prob_u(self, u, x):
        """log p(u | x) = log N(z; 0, I) + log|det dz/du|."""
        z, logdet = self.to_latent(u, x)
        return -0.5 * (z ** 2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet

    def u_to_theta(self, u):
        """theta = a + (b - a) Phi(u), in torch (same as preprocess.u_to_theta)."""
        a, b = self.theta_bounds[:, 0].to(u.dtype), self.theta_bounds[:, 1].to(u.dtype)
        return a + (b - a) * torch.special.ndtr(u)

    def _x_tensor(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.config["dim_x"]:
            raise ValueError(f"x must have shape (N, {self.config['dim_x']}), got {x.shape}")
        bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
        if bad.size:
            raise ValueError(f"x has non-finite values in rows {bad[:10].tolist()} ({bad.size} rows)")
        return torch.as_tensor(x, dtype=self.x_mean.dtype, device=self.device)

    @torch.no_grad()
    def sample(self, x, n, seed=None, batch_rows=1 << 17, age_bins=True, support=True, max_rounds=8,
               min_inside=0.01):
        """n posterior samples per row of x -> numpy (N, n, 3) in physical units.

        Work is done in batches of about `batch_rows` samples; the condition network runs once per cluster.
        The same seed, device, n and batch_rows give identical samples. age_bins: re-draw each age label
        uniformly inside its 1 Myr bin (samples of q_bin, module docstring); False: the flow's own samples.
        support (models with the floor): draws outside the noise model's support are re-drawn (q_S, module
        docstring), in up to max_rounds rounds of 1, 2, 4, ... 16 candidates per missing draw; clusters with
        less than min_inside of their first draws inside (q has almost nothing there: the flow is no use for
        them) and draws still outside after the last round stay where the floor transform put them (on the
        mass bound), with a warning.
        """
        was_training = self.training
        self.eval()
        xt = self._x_tensor(x)
        N, D = xt.shape[0], self.config["dim_theta"]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 63))
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        age_rng = np.random.default_rng([int(seed), 1])       # the bin re-draws: their own generator
        out = np.empty((N, n, D), dtype=np.float32 if xt.dtype == torch.float32 else np.float64)
        mt = preprocess.target_transform(self.config)
        per = max(1, batch_rows // max(n, 1))          # clusters per batch
        left = []                                      # draws left outside the support, as cluster indices
        for i in range(0, N, per):
            c = self.condition(xt[i:i + per])
            m = c.shape[0]
            z = torch.randn(m * n, D, generator=gen, device=self.device, dtype=xt.dtype)
            if n > batch_rows:                           # very many samples of one cluster: split further
                u = torch.cat([self.to_params(zz, c=c.expand(zz.shape[0], -1))
                               for zz in z.split(batch_rows)])
            else:
                u = self.to_params(z, c=c.repeat_interleave(n, dim=0))
            xr = (np.repeat(np.asarray(x, dtype=np.float64)[i:i + m], n, axis=0)
                  if preprocess.depends_on_x(x, **mt) else None)
            theta = self._to_physical(u, xr, mt, age_bins, age_rng)
            if support and mt["scale"] > 0:
                left.append(i + self._redraw_outside_support(theta, xr, c, n, gen, age_rng, age_bins, mt,
                                                             max_rounds, min_inside))
            out[i:i + m] = theta.reshape(m, n, D)
        self.train(was_training)
        left = np.concatenate(left) if left else np.zeros(0, dtype=int)
        if left.size:
            import warnings
            warnings.warn(f"cinn.sample: {left.size} of {N * n} draws left outside the noise model's support, on the "
                          f"mass bound (clusters {np.unique(left)[:10].tolist()}: under {min_inside:.0%} of their "
                          f"draws inside, or not replaced in {max_rounds} rounds)")
        return out

    def _to_physical(self, u, xr, mt, age_bins, age_rng):
        """Flow outputs u -> physical theta (numpy float64): the target transform (NumPy where it depends on x,
        xr the rows of x; torch otherwise), then each age label re-drawn inside its 1 Myr bin (age_bins)."""
        if xr is not None:
            theta = preprocess.u_to_theta(u.double().cpu().numpy(), xr, **mt)
        else:
            theta = self.u_to_theta(u).double().cpu().numpy()
        if age_bins:
            theta[:, 0] = preprocess.rejitter_age(theta[:, 0], age_rng)
        return theta

    def _redraw_outside_support(self, theta, xr, c, n, gen, age_rng, age_bins, mt, max_rounds, min_inside):
        """In place: replace the draws of theta (rows of xr; row j belongs to cluster j // n of condition c)
        that lie outside the support (preprocess.below_floor) by the first candidate inside it, drawing 1, 2, 4,
        ... 16 candidates per missing draw and round (clusters with under min_inside of their draws inside are
        left as they are). Deterministic given the generators' states. Returns the batch's cluster index of
        each draw left outside."""
        outside = preprocess.below_floor(theta, xr)
        hopeless = np.repeat(np.mean(~outside.reshape(-1, n), axis=1) < min_inside, n)
        todo = np.flatnonzero(outside & ~hopeless)
        for r in range(max_rounds):
            if todo.size == 0:
                break
            k = min(2 ** r, 16)
            rows = np.repeat(todo, k)
            z = torch.randn(len(rows), theta.shape[1], generator=gen, device=self.device, dtype=c.dtype)
            u = self.to_params(z, c=c[torch.as_tensor(rows // n, device=self.device)])
            cand = self._to_physical(u, xr[rows], mt, age_bins, age_rng)
            ok = ~preprocess.below_floor(cand, xr[rows]).reshape(len(todo), k)
            hit = ok.any(axis=1)
            first = np.argmax(ok, axis=1)
            theta[todo[hit]] = cand.reshape(len(todo), k, -1)[hit, first[hit]]
            todo = todo[~hit]
        return np.sort(np.concatenate([todo, np.flatnonzero(outside & hopeless)])) // n

    def log_support(self, x, n_support=1024, seed=0):
        """log Z(x) (N,): log of the share of the flow's draws inside the noise model's support (module
        docstring), from n_support draws per distinct row of x with a fixed seed; 0 for models without the
        floor. Standard error ~ sqrt((1 - Z) / (n_support Z)) nats."""
        x = np.asarray(x, dtype=np.float64)
        if preprocess.target_transform(self.config)["scale"] <= 0:
            return np.zeros(len(x))
        uniq, inverse = np.unique(x, axis=0, return_inverse=True)
        draws = self.sample(uniq, n_support, seed=seed, age_bins=False, support=False)
        inside = ~preprocess.below_floor(draws, uniq[:, None, :])
        share = np.maximum(np.sum(inside, axis=1), 0.5) / n_support    # none inside: "below 1 in n_support"
        return np.log(share)[np.ravel(inverse)]

    def log_prob(self, theta, x, batch_rows=1 << 17, age_bins=True, n_nodes=16, support=True, n_support=1024):
        """log p(theta | x) in physical coordinates (N,) (or (N, K) for theta (N, K, 3) and x (N, 11)).

        Includes the bounded transform's Jacobian: log p(theta|x) = log p(u|x) + sum log|du/dtheta|.
        Points outside THETA_BOUNDS (or, with config floor_scale > 0, outside the noise model's support) get
        -inf. age_bins: the density of q_bin (module docstring), the flow integrated over the age bin with n_nodes
        Gauss-Legendre nodes in u (n_nodes times the cost; in u the integrand is smooth up to the bound, in
        log t' it is not); False: the flow's own density. support (models with the floor): the density of q_S,
        the flow truncated to the support, i.e. minus log_support(x, n_support) (module docstring; the same
        distribution `sample` draws from); False: not renormalised.
        """
        theta = np.asarray(theta, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        shape = theta.shape[:-1]
        if theta.ndim == 3:
            x = np.repeat(x, theta.shape[1], axis=0)
        theta = theta.reshape(-1, self.config["dim_theta"])
        if len(theta) != len(x):
            raise ValueError(f"theta has {len(theta)} rows but x has {len(x)}")
        mt = preprocess.target_transform(self.config)
        bounds = preprocess.THETA_BOUNDS
        inside = np.all((theta >= bounds[:, 0]) & (theta <= bounds[:, 1]), axis=1)
        if mt["scale"] > 0:
            inside &= ~preprocess.below_floor(theta, x)
        u = preprocess.theta_to_u(theta, x, **mt)
        log_du = preprocess.log_du_dtheta(theta, x, **mt)
        if age_bins:   # log Q(k, m, E) + log(t' ln 10): integral over the bin's u_0 range, then uniform in t'
            edges = np.zeros((len(u), 2, 3))
            edges[..., 0] = np.column_stack(preprocess.age_bin_edges(theta[:, 0]))
            u_edges = (preprocess._age_u_du(edges[..., 0], x[:, None, :], mt["age_profile"])[0] if mt["age_profile"]
                       else preprocess.theta_to_u(edges)[..., 0])                        # (N, 2)
            nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
            half = 0.5 * (u_edges[:, 1] - u_edges[:, 0])[:, None]
            u_nodes = np.repeat(u[:, None, :], n_nodes, axis=1)
            u_nodes[..., 0] = 0.5 * (u_edges[:, 1] + u_edges[:, 0])[:, None] + half * nodes
            log_pu = self._log_prob_u_numpy(u_nodes.reshape(-1, 3), np.repeat(x, n_nodes, axis=0), batch_rows)
            with np.errstate(divide="ignore"):
                log_bin = logsumexp(log_pu.reshape(-1, n_nodes) + np.log(half * weights), axis=1)
                logp = log_bin + log_du[:, 1] + log_du[:, 2] + np.log(10.0 ** theta[:, 0] * np.log(10.0))
        else:
            logp = self._log_prob_u_numpy(u, x, batch_rows) + log_du.sum(axis=1)
        logp[~inside] = -np.inf
        if support and mt["scale"] > 0:
            logp = logp - self.log_support(x, n_support)
        return logp.reshape(shape)

    @torch.no_grad()
    def _log_prob_u_numpy(self, u, x, batch_rows):
        """log p(u | x) for numpy u (N, 3), x (N, 11), in batches of batch_rows -> numpy float64 (N,)."""
        was_training = self.training
        self.eval()
        xt = self._x_tensor(x)
        ut = torch.as_tensor(u, dtype=xt.dtype, device=self.device)
        out = [self.log_prob_u(ut[i:i + batch_rows], xt[i:i + batch_rows]).double().cpu().numpy()
               for i in range(0, len(ut), batch_rows)]
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)


def save(path, model, extra=None):
    """Write one self-contained checkpoint atomically (temp file + os.replace)."""
    ckpt = dict(format_version=FORMAT_VERSION, config=dict(model.config),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                x_mean=model.x_mean.detach().cpu().double(), x_std=model.x_std.detach().cpu().double(),
                theta_bounds=model.theta_bounds.detach().cpu().double(),
                theta_names=list(preprocess.THETA_NAMES), age_profile=preprocess.age_profile_settings(),
                extra=extra or {})
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path, device=None):
    """Load a model from a checkpoint file or a run directory (which holds model.pt); ready for sample/log_prob."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cINN checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a cINN checkpoint (missing format_version/state_dict)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {ckpt['format_version']}, this code reads {FORMAT_VERSION}")
    model = CINN(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    bounds = np.asarray(ckpt["theta_bounds"])
    if not np.allclose(bounds, preprocess.THETA_BOUNDS, rtol=0, atol=1e-6):
        raise ValueError(f"{path}: theta bounds {bounds.tolist()} differ from preprocess.THETA_BOUNDS")
    settings = ckpt.get("age_profile")          # checkpoints written before this check have none
    if settings is not None and "shape" not in settings:     # written before band_shape: the log-normal shape
        settings = dict(settings, shape="lognormal")
    if model.config["age_profile"] and settings is not None and settings != preprocess.age_profile_settings():
        raise ValueError(f"{path}: its age profile was built with {settings}, but preprocess.py now has "
                         f"{preprocess.age_profile_settings()}; restore the AGE_PROFILE_* constants to read it")
    model.extra = ckpt.get("extra", {})
    model.eval()
    return model.to(default_device() if device is None else torch.device(device))
