"""The figures of the diagnostics (Walter et al. 2026, Figs. 3-8 and B.3): numbers in, PNG files out.

Each function takes what evaluate.py or grid_posterior.py computed and writes one or more PNGs; nothing here
computes a diagnostic. Matplotlib's object-oriented interface (no pyplot state, no display needed).
"""
import numpy as np
from matplotlib.figure import Figure

from simulate import BANDS

PARAM_LABELS = (r"$\log_{10}(t/\mathrm{Myr})$", r"$\log_{10}(m_0/M_\odot)$", r"$E(B-V)$ [mag]")
MSTAR_LABEL = r"$\log_{10}(M_*/M_\odot)$"
WAVELENGTH_NM = [int(b[1:4]) for b in BANDS]       # the nominal wavelength in each WFC3 filter name


def _figure(rows, cols, width, height, **kw):
    fig = Figure(figsize=(width, height), layout="tight")
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def plot_sbc(path, sbc):
    """Fig. 3: rank histograms (+-1 sigma band of a uniform histogram, grey) on top, ECDF - uniform CDF with the
    simultaneous (shaded) and pointwise (dotted) binomial bands below. sbc: evaluate.sbc_check's dict."""
    ranks, L, alpha = sbc["ranks"], sbc["L"], sbc["alpha"]
    edges, mean, sig = sbc["hist_edges"], sbc["hist_mean"], sbc["hist_sigma"]
    fig, axes = _figure(2, ranks.shape[1], 2.6 * ranks.shape[1], 5.2, sharex="row")
    w = np.diff(edges)                        # rank values per bin: plot clusters per rank value
    for k, name in enumerate(sbc["names"]):
        ax = axes[0, k]
        ax.stairs(np.histogram(ranks[:, k], bins=edges)[0] / w, edges, fill=True, color="C0", alpha=0.8)
        ax.stairs((mean + sig) / w, edges, baseline=(mean - sig) / w, fill=True, color="0.6", alpha=0.5, lw=0)
        ax.stairs(mean / w, edges, color="k", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"rank (0..{L})")
        ax = axes[1, k]
        ax.fill_between(sbc["z"], *sbc["band_simultaneous"], color="C1", alpha=0.25, lw=0,
                        label=f"simultaneous {1 - alpha:.0%}")
        ax.plot(sbc["z"], sbc["band_pointwise"][0], "k:", lw=0.8, label=f"pointwise {alpha / 2:.2f}-{1 - alpha / 2:.2f}")
        ax.plot(sbc["z"], sbc["band_pointwise"][1], "k:", lw=0.8)
        ax.plot(sbc["z"], sbc["ecdf_diff"][k], color="C0", lw=1.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("fractional rank")
    axes[0, 0].set_ylabel("test clusters per rank value")
    axes[1, 0].set_ylabel("ECDF - uniform CDF")
    axes[1, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SBC, {len(ranks)} test clusters, L = {L}", fontsize=10)
    fig.savefig(path, dpi=120)


def plot_ppc(path, flux_obs, res, n_examples=3):
    """Fig. 4: mean predictive vs observed flux per band, example SEDs with the predictive 16-84 %, and the
    histogram of the observation's rank among the predictive draws. res: evaluate.ppc's dict."""
    nb = flux_obs.shape[1]
    fig, axes = _figure(2, nb, 3.0 * nb, 6.0)
    for b in range(nb):
        ax = axes[0, b]
        lo, mp = np.log10(flux_obs[:, b]), np.log10(res["pred_mean"][:, b])
        ax.plot(lo, mp, ".", ms=2, alpha=0.5)
        lim = [np.nanmin([lo.min(), mp.min()]), np.nanmax([lo.max(), mp.max()])]
        ax.plot(lim, lim, "k-", lw=0.7)
        ax.set_title(BANDS[b], fontsize=10)
        ax.set_xlabel(r"observed $\log_{10}(f/\mathrm{mJy})$")
    axes[0, 0].set_ylabel(r"mean predictive $\log_{10}(f/\mathrm{mJy})$")
    n_ex = min(n_examples, nb - 1, len(flux_obs))
    for j in range(n_ex):
        ax = axes[1, j]
        q = res["pred_q"][j]
        ax.fill_between(WAVELENGTH_NM, q[0], q[2], color="C0", alpha=0.3, label="predictive 16-84 %")
        ax.plot(WAVELENGTH_NM, res["pred_mean"][j], "C0-", label="mean predictive")
        ax.errorbar(WAVELENGTH_NM, flux_obs[j], yerr=res["sigma"][j], fmt="ko", ms=3, label="observed")
        ax.set_yscale("log")
        ax.set_xlabel("filter wavelength [nm]")
        ax.set_title(f"cluster {j}", fontsize=9)
    axes[1, 0].set_ylabel("flux [mJy]")
    axes[1, 0].legend(fontsize=7)
    for ax in axes[1, n_ex:-1]:
        ax.axis("off")
    ax = axes[1, -1]
    for b in range(nb):
        ax.hist(res["rank"][:, b] / res["n_samples"], bins=10, range=(0, 1), histtype="step", label=BANDS[b])
    ax.set_xlabel("rank of observation / S")
    ax.set_ylabel("number of clusters")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def plot_modes(path, samples, summary, n_examples=3):
    """Example posteriors: 2-d sample histograms (age-mass, age-E(B-V)) with the mean-shift modes (MAP = star)
    and the marginal histograms with the 16/50/84 % quantiles. summary: evaluate.summarize's dict."""
    n = min(n_examples, len(samples))
    fig, axes = _figure(n, 5, 16, 3.0 * n)
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
    fig.savefig(path, dpi=110)


def plot_compare(prefix, res, labels=PARAM_LABELS):
    """Fig. 6 (MAP and closest mode vs MLE), Fig. 8 (chi^2 of MAP and MLE), Fig. B.3 (|MAP - MLE| against the
    cINN 16-84 % width): <prefix>_map_vs_mle.png, _chi2.png, _width.png. res: evaluate.compare_with_mle."""
    fig, axes = _figure(2, 3, 12, 7.5)
    for row, (key, name) in enumerate([("map", "cINN MAP"), ("closest", "closest cINN mode")]):
        for p in range(3):
            x, y = res["mle"][:, p], res[key][:, p]
            axes[row, p].plot(x, y, ".", ms=3, alpha=0.5)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                lim = [min(x[ok].min(), y[ok].min()), max(x[ok].max(), y[ok].max())]
                axes[row, p].plot(lim, lim, "k-", lw=0.7)
            axes[row, p].set_xlabel("MLE " + labels[p])
            axes[row, p].set_ylabel(name + " " + labels[p])
    fig.savefig(f"{prefix}_map_vs_mle.png", dpi=110)

    fig, ax = _figure(1, 1, 5.5, 4)
    ax = ax[0, 0]
    both = np.concatenate([res["chi2_map"], res["chi2_mle"]])
    both = both[np.isfinite(both) & (both > 0)]
    bins = np.logspace(np.log10(max(both.min(), 1e-4)), np.log10(both.max()), 40) if both.size else 10
    ax.hist(res["chi2_map"], bins=bins, histtype="step", lw=1.5, label="cINN MAP")
    ax.hist(res["chi2_mle"], bins=bins, histtype="step", lw=1.5, label="MLE")
    ax.set_xscale("log")
    ax.set_xlabel(r"re-simulation $\chi^2$ (Eq. 11, $\nu$ = %d bands)" % res["nu"])
    ax.set_ylabel("number of clusters")
    ax.legend()
    fig.savefig(f"{prefix}_chi2.png", dpi=110)

    fig, axes = _figure(1, 3, 12, 3.8)
    width = res["quantiles"][:, 2] - res["quantiles"][:, 0]
    for p in range(3):
        ax = axes[0, p]
        ax.plot(width[:, p], np.abs(res["map"][:, p] - res["mle"][:, p]), ".", ms=3, alpha=0.5)
        w = np.linspace(0, np.nanmax(width[:, p]) if np.isfinite(width[:, p]).any() else 1, 10)
        ax.plot(w, w / 2, "k--", lw=0.8, label="half 16-84 % width")
        ax.set_xlabel("cINN 16-84 % width of " + labels[p])
        ax.set_ylabel("|MAP - MLE| of " + labels[p])
    axes[0, 0].legend(fontsize=8)
    fig.savefig(f"{prefix}_width.png", dpi=110)


def plot_exact_examples(path, samples, grids, truth=None):
    """Fig. 5: the cINN's marginals (histograms of its samples) beside the exact grid posterior's (curves).
    grids: per cluster a dict with, per parameter p, 'x{p}' (grid centres) and 'p{p}' (density)."""
    n = len(grids)
    fig, axes = _figure(n, 3, 11, 2.8 * n)
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
    fig.savefig(path, dpi=110)


def plot_exact_summary(path, kl, dlog, ratio, dage):
    """Histograms of log p_exact - log q (with the mean kl), of the 16-84 % width ratios and of the age MAP
    differences."""
    fig, axes = _figure(1, 3, 13, 3.8)
    axes = axes[0]
    axes[0].hist(dlog[np.isfinite(dlog)], bins=40, color="0.5")
    axes[0].axvline(kl, color="C3", label=f"mean {kl:.3f} nats")
    axes[0].set_xlabel(r"$\log p_\mathrm{exact}(\theta_\mathrm{true}|x) - \log q_\mathrm{cINN}$ [nats]")
    axes[0].set_ylabel("number of clusters")
    axes[0].legend(fontsize=8)
    for p in range(3):
        r = ratio[:, p][np.isfinite(ratio[:, p]) & (ratio[:, p] > 0)]
        axes[1].hist(np.log10(r), bins=40, histtype="step", label=PARAM_LABELS[p])
    axes[1].axvline(0, color="k", lw=0.7)
    axes[1].set_xlabel(r"$\log_{10}$ (cINN / exact 16-84 % width)")
    axes[1].legend(fontsize=8)
    axes[2].hist(np.log10(np.maximum(dage[np.isfinite(dage)], 1e-4)), bins=40, color="0.5")
    axes[2].axvline(-1, color="C3", label="0.1 dex")
    axes[2].set_xlabel(r"$\log_{10}$ |MAP$_\mathrm{cINN}$ - MAP$_\mathrm{exact}$| in log age [dex]")
    axes[2].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_posterior(path, post, marginal_cdf, truth=None, mle_point=None, title=""):
    """Corner plot of an exact grid posterior (grid_posterior.exact_posterior): 1-D marginals on the diagonal
    from marginal_cdf(post, param, values), 2-D marginals below (cell-weighted histograms); truth (3,), MLE (3,)
    and the MAP marked."""
    cols = np.stack([np.log10(post["k"]), post["log10_mass"], post["ebv"]], axis=1)
    q = post["quantiles"]
    lo = np.maximum(q[:, 0] - 2.5 * (q[:, 1] - q[:, 0]) - 0.05, [np.log10(0.5), 2.0, post["ebv_range"][0]])
    hi = np.minimum(q[:, 2] + 2.5 * (q[:, 2] - q[:, 1]) + 0.05,
                    [np.log10(post["n_age"] + 0.5), 8.0, post["ebv_range"][1]])
    fig, ax = _figure(3, 3, 8, 8)
    for i in range(3):
        for j in range(3):
            a = ax[i, j]
            if j > i:
                a.axis("off")
                continue
            if i == j:
                x = np.linspace(lo[i], hi[i], 201)
                a.step(0.5 * (x[1:] + x[:-1]), np.diff(marginal_cdf(post, i, x)) / np.diff(x), where="mid", color="k")
                for v in q[i]:
                    a.axvline(v, color="0.5", ls=":", lw=1)
                a.set_yticks([])
                a.set_ylim(bottom=0.0)
            else:
                h, xe, ye = np.histogram2d(cols[:, j], cols[:, i], bins=60, weights=post["prob"],
                                           range=[[lo[j], hi[j]], [lo[i], hi[i]]])
                a.pcolormesh(xe, ye, h.T, cmap="Greys", shading="flat")
                a.set_ylim(lo[i], hi[i])
            _mark_points(a, i, j, ((truth, "tab:red", "*"), (mle_point, "tab:blue", "x"), (post["map"], "tab:green", "o")))
            a.set_xlim(lo[j], hi[j])
            if i == 2:
                a.set_xlabel(PARAM_LABELS[j])
            if j == 0 and i > 0:
                a.set_ylabel(PARAM_LABELS[i])
    ax[0, 2].text(0, 0.9, "exact grid posterior\n" + title, transform=ax[0, 2].transAxes, va="top")
    ax[0, 2].text(0, 0.5, "red: truth, blue x: MLE (min chi$^2$)\ngreen o: MAP, dotted: 16/50/84 %",
                  transform=ax[0, 2].transAxes, va="top", fontsize=8)
    fig.savefig(path, dpi=110)


def _mark_points(a, i, j, points):
    """Mark (point, colour, marker) triples on the corner panel (i, j): a line on the diagonal, a marker below."""
    for pt, c, mk in points:
        if pt is None or not np.all(np.isfinite(pt)):
            continue
        if i == j:
            a.axvline(pt[i], color=c, lw=1)
        else:
            a.plot(pt[j], pt[i], mk, color=c, ms=7, mfc="none" if mk == "o" else c)
