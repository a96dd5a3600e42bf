"""Survey family: simulation rate (images/s on one core) and the picture grid beside the real Euclid lens.

    .venv/bin/python -m bench.survey --n 20 [--grid docs/survey_grid.png] [--numerics 12]
    .venv/bin/python -m bench.survey --side-by-side OLD_CHECKOUT [--rounds 3] [--n 16]

Side by side (``--side-by-side``): the rates below (survey and paper singles, survey pairs, paper pairs with and
without adaptive supersampling) of an earlier commit's checkout and of this one, in alternating subprocess rounds
(the shared machine's load falls on both), best round each, printed with the after/before ratios.

Rate: ``sample_single`` / ``sample_pair`` of one SurveySimulator in this process (one core,
OMP/MKL threads 1), at the preset's own grid (euclid: 110 x 110 at 0.1"/px, supersampling 2 + adaptive
16), after a warm-up sample (numba JIT); the time includes the rejection sampling of the selection. Also
printed, measured side by side in this process: single images without adaptive supersampling (the scheme
before it), with COSMOS sources (when ``../shared/data/cosmos_23.5_sample`` exists), the paper family's
rate on the same grid, and the population numbers of the samples.

Numerics (``--numerics N``): N lenses re-rendered noiseless (``render_model``) at uniform factors 1, 2, 4
and at 2 + adaptive 16 (the default), against uniform factor 10; the error of an image is the largest
|model - reference| over pixels in units of that pixel's noise sigma (sky, read and Poisson noise).

Population (``--population N``; issue 28's re-measurement): N single images per preset (``--presets``) at the
preset's pixel scale and field, supersampling 1 + adaptive (``--pop-grid`` overrides num_pix), one row per sample
appended to ``--pop-rows`` (JSON lines, sample i drawn from the Generator seeded (seed, i): a killed run resumes
where it stopped, and rows of another code version can be summarised the same way, ``--summarise-only``).
Per preset: stored source magnitudes against the source prior; the edge-glow fraction (the background galaxy's
PSF-convolved light above the background noise sigma in some pixel of the outer 3-pixel frame) of lenses and
non-lenses with Wilson 95% intervals; two-sample KS p of image maximum and of noise/maximum between the classes;
non-lenses by ``negative_kind``; theta_E and deflector-magnitude quantiles; halo c200 and stellar M/L ranges.

Grid: the real Euclid Q1 lens (``../shared/data/euclid_q1``, VIS_FLUX, 0.1"/px like the euclid preset,
so "resampled to the same grid" is a centre crop of num_pix) beside simulated lenses and non-lenses,
each divided by its maximum, shown with the same asinh stretch.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

from .common import parse_quick, print_ratio

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = SHARED / "euclid_q1" / "102020532_NEG589257492489565961.fits"
COSMOS = SHARED / "cosmos_23.5_sample"
SCHEMES = {
    "1": {"supersampling_factor": 1, "adaptive_supersampling_factor": 0},
    "2": {"supersampling_factor": 2, "adaptive_supersampling_factor": 0},
    "4": {"supersampling_factor": 4, "adaptive_supersampling_factor": 0},
    "2+a16 (default)": {},
}
REFERENCE = {"supersampling_factor": 10, "adaptive_supersampling_factor": 0}


def real_lens(num_pix: int) -> np.ndarray | None:
    """The Euclid Q1 lens, VIS, centre crop of ``num_pix`` (already 0.1"/px), divided by its max."""
    if not REAL.is_file():
        return None
    from astropy.io import fits

    data = fits.getdata(REAL, "VIS_FLUX").astype(np.float64)
    c, h = data.shape[0] // 2, num_pix // 2
    crop = data[c - h : c - h + num_pix, c - h : c - h + num_pix]
    return crop / crop.max()


def rate(sim, draw: str, n: int, seed: int = 0) -> tuple[float, list[dict], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    getattr(sim, draw)(rng)  # warm-up: numba JIT, PSF FFT caches
    params, images = [], []
    t = time.perf_counter()
    for _ in range(n):
        s = getattr(sim, draw)(rng)
        params.append(s["params"])
        images.append(s.get("image", s.get("view1")))
    dt = time.perf_counter() - t
    per_sample_images = 2 if draw == "sample_pair" else 1
    return n * per_sample_images / dt, params, images


def rates(preset: str, n: int) -> dict:
    """Images/s (pairs/s for the paper pairs) on one core of the code on PYTHONPATH: the survey and paper families'
    singles and pairs, the paper pairs with and without adaptive supersampling (``--side-by-side``)."""
    from hpc_lensiam.simulate.config import simulation_config
    from hpc_lensiam.simulate.simulator import LensSimulator
    from hpc_lensiam.simulate.survey import survey_config
    from hpc_lensiam.simulate.survey.simulator import SurveySimulator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paper = LensSimulator(simulation_config(preset=preset))
        plain = LensSimulator(simulation_config(preset=preset, instrument={"adaptive_supersampling_factor": 0}))
    survey = SurveySimulator(survey_config(preset=preset, mode="single"))
    survey_pairs = SurveySimulator(survey_config(preset=preset, mode="lensiam"))
    return {
        "survey single images/s": rate(survey, "sample_single", n)[0],
        "survey pair images/s": rate(survey_pairs, "sample_pair", max(2, n // 2))[0],
        "paper single images/s": rate(paper, "sample_single", 2 * n)[0],
        "paper adaptive pairs/s": rate(paper, "sample_pair", 2 * n)[0] / 2,
        "paper plain pairs/s": rate(plain, "sample_pair", 2 * n)[0] / 2,
    }


def side_by_side(old: str, preset: str, n: int, rounds: int) -> None:
    """``rates`` of the code in ``old`` (a checkout of an earlier commit) and of this checkout, alternating in
    ``rounds`` so the machine's load falls on both alike; best round of each, and their ratios."""
    import json
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parents[1])
    best: dict[str, dict] = {"before": {}, "after": {}}
    print(f"load before: {os.getloadavg()[0]:.1f}")
    for r in range(rounds):
        for name, code in (("before", str(Path(old).resolve())), ("after", here)):
            # this checkout's bench package (a regular package wins over an old checkout's plain folder),
            # the package code of ``code`` (first on the path: the subprocess starts in it)
            env = {**os.environ, "PYTHONPATH": f"{code}:{here}"}
            cmd = [sys.executable, "-m", "bench.survey", "--rates-json", "--preset", preset, "--n", str(n)]
            run = subprocess.run(cmd, env=env, cwd=code, check=True, capture_output=True, text=True)
            got = json.loads(run.stdout)
            for k, v in got.items():
                best[name][k] = max(best[name].get(k, 0.0), v)
            print(f"  round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}; best of {rounds} rounds, {preset} preset, one core:")
    for k in best["after"]:
        b, a = best["before"][k], best["after"][k]
        print(f"  {k:>24}: before {b:7.2f}  after {a:7.2f}  after/before {a / b:5.2f}x")
    for name, r in best.items():
        print(
            f"  {name}: survey/paper single {r['survey single images/s'] / r['paper single images/s']:.2f}, "
            f"adaptive cost per pair {r['paper plain pairs/s'] / r['paper adaptive pairs/s']:.2f}x"
        )
    print(
        f"  after survey / before paper single: "
        f"{best['after']['survey single images/s'] / best['before']['paper single images/s']:.2f}"
    )


def numerics(preset: str, n: int, seed: int = 0) -> None:
    """Supersampling convergence of the survey family (module doc), printed per scheme."""
    from hpc_lensiam.simulate.survey import survey_config
    from hpc_lensiam.simulate.survey.simulator import SurveySimulator

    def sim(inst):
        return SurveySimulator(survey_config(preset=preset, mode="single", lens_fraction=1.0, instrument=inst))

    rng = np.random.default_rng(seed)
    base = sim({})
    params = [base.sample_single(rng)["params"] for _ in range(n)]
    reference = [sim(REFERENCE).render_model(p) for p in params]
    cost, errors = {}, {}
    for name, inst in SCHEMES.items():
        s = sim(inst)
        t = time.perf_counter()
        models = [s.render_model(p)[0] for p in params]
        cost[name] = (time.perf_counter() - t) / n
        errors[name] = np.array([(np.abs(m - r) / sigma).max() for m, (r, sigma) in zip(models, reference)])
    print(f"supersampling vs uniform 10, {n} lenses (error: max over pixels of |model - ref| / noise sigma):")
    for name, err in errors.items():
        print(
            f"  {name:>16}: within 1 sigma {np.mean(err <= 1):.0%}, median {np.median(err):.2f}, "
            f"max {err.max():.2f}; render {cost[name] * 1e3:.0f} ms ({cost[name] / cost['2']:.1f}x factor 2)"
        )


def _edge_glow(sim, p, n_frame: int = 3) -> bool:
    """The background galaxy's PSF-convolved light above the background sigma in the outer n_frame pixels."""
    v = p["views"][0]
    if v["source"] is None:
        return False
    try:
        rays = sim.rays(p["mass"], p["lens"]["theta_E"])
    except TypeError:  # code before issue 28 (6)
        rays = sim.rays(p["mass"])
    img = sim.psf_bank.convolve(sim._source_cps(rays, v["source"]), v["psf_id"])
    frame = np.ones(img.shape, bool)
    frame[n_frame:-n_frame, n_frame:-n_frame] = False
    return bool((img[frame] > v["background_sigma_cps"]).any())


def _row(sim, p: dict) -> dict:
    """The numbers of one sample the population report needs (JSON-able)."""
    v = p["views"][0]
    src, m = v["source"], p["mass"]
    pop = sim.population
    row = {
        "is_lens": int(p["is_lens"]),
        "negative_kind": p.get("negative_kind", None if p["is_lens"] else "elliptical (lone)"),
        "theta_E": p["lens"]["theta_E"],
        "defl_mag": v["lens_light"]["mag"],
        "image_max_cps": v["image_max_cps"],
        "noise_over_max": v["background_sigma_cps"] / v["image_max_cps"],
        "n_images": v["n_images"],
        "edge_glow": _edge_glow(sim, p),
        "companion": any(c["kind"] == "sersic" for c in v.get("lookalike", [])),
        "spiral": any(c["kind"] == "spiral" for c in v.get("lookalike", [])),
        "ml_r": m.get("stellar_mass_to_light_r"),
        "c200": m.get("halo", {}).get("c200"),
        "src_mag": None,
        "src_mag_in_prior": None,
    }
    if src is not None:
        z = m["z_source"]
        shift = pop.cosmo.distance_modulus(z) - 2.5 * np.log10(1.0 + z)
        lo, hi = pop.prior.source_M
        row["src_mag"] = src["mag"]
        row["src_mag_in_prior"] = bool(lo + shift - 1e-6 <= src["mag"] <= hi + shift + 1e-6)
    return row


def population(presets: list[str], n: int, rows_path: str, num_pix: int | None, seed: int, run: bool) -> None:
    """Simulate (resumably) and summarise the population (module doc)."""
    import json

    from hpc_lensiam.simulate.survey import survey_config
    from hpc_lensiam.simulate.survey.simulator import SurveySimulator

    path = Path(rows_path)
    done: dict[str, list[dict]] = {p: [] for p in presets}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.setdefault(r["preset"], []).append(r)
    for preset in presets:
        inst = {"supersampling_factor": 1, **({"num_pix": num_pix} if num_pix else {})}
        sim = SurveySimulator(survey_config(preset=preset, mode="single", instrument=inst))
        have = {r["i"] for r in done[preset]}
        t = time.perf_counter()
        with path.open("a") as f:
            for i in range(n) if run else ():
                if i in have:
                    continue
                p = sim.sample_single(np.random.default_rng([seed, i]))["params"]
                r = {"preset": preset, "i": i, **_row(sim, p)}
                f.write(json.dumps(r) + "\n")
                f.flush()
                done[preset].append(r)
        if run:
            print(f"[{preset}: {time.perf_counter() - t:.0f} s]")
        summarise(preset, sim, [r for r in done[preset] if r["i"] < n])


def _wilson(k: int, n: int) -> str:
    if n == 0:
        return "n/a"
    z = 1.96
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.1%} [{max(c - h, 0):.1%}, {min(c + h, 1):.1%}] ({k}/{n})"


def summarise(preset: str, sim, rows: list[dict]) -> None:
    from collections import Counter

    from scipy.stats import ks_2samp

    lens = [r for r in rows if r["is_lens"]]
    non = [r for r in rows if not r["is_lens"]]
    g = sim.grid
    print(
        f"## {preset}: {len(rows)} single images ({len(lens)} lenses, {len(non)} non-lenses), "
        f'{g.num_pix} px at {g.pixel_scale_arcsec}"/px, supersampling 1 + adaptive'
    )
    mags = [r for r in rows if r["src_mag"] is not None]
    bad = [r for r in mags if not r["src_mag_in_prior"]]
    print(
        f"  stored source magnitudes: {len(mags)} images with a background galaxy, {len(bad)} outside the source "
        f"prior (non-lenses {sum(not r['is_lens'] for r in bad)}); lowest {min(r['src_mag'] for r in mags):.1f}"
    )
    for name, group in (("lenses", lens), ("non-lenses", non)):
        print(f"  edge glow, {name}: {_wilson(sum(r['edge_glow'] for r in group), len(group))}")
    for key in ("image_max_cps", "noise_over_max"):
        p = ks_2samp([r[key] for r in lens], [r[key] for r in non]).pvalue
        print(f"  KS lenses vs non-lenses, {key}: p = {p:.3g}")
    for name, group in (("lenses", lens), ("non-lenses", non)):
        print(f"  with a companion galaxy, {name}: {_wilson(sum(r.get('companion', 0) for r in group), len(group))}")
        print(f"  spiral central galaxy, {name}: {_wilson(sum(r.get('spiral', 0) for r in group), len(group))}")
    kinds = Counter(r["negative_kind"] for r in non)
    print("  non-lenses by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    th = np.array([r["theta_E"] for r in rows])
    dm = np.array([r["defl_mag"] for r in rows])
    q = lambda a: "/".join(f"{x:.2f}" for x in np.percentile(a, [5, 50, 95]))  # noqa: E731
    print(f'  theta_E (5/50/95%): {q(th)}"; below 0.3": {np.mean(th < 0.3):.1%}; min {th.min():.3f}"')
    print(f"  deflector mag (5/50/95%): {q(dm)}; fainter than 22.5: {np.mean(dm > 22.5):.1%}")
    ml = np.array([r["ml_r"] for r in rows if r["ml_r"] is not None])
    print(
        f"  stellar M/L_r: {ml.min():.2f}-{ml.max():.2f}, above 8: {np.mean(ml > 8 * (1 + 1e-9)):.1%}, "
        f"above 6: {np.mean(ml > 6):.1%}"
    )
    c = [r["c200"] for r in rows if r["c200"] is not None]
    if c:
        print(f"  halo c200 (5/50/95%): {q(c)}")


def draw_grid(images, params, real, out: str, n_cols: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lenses = [(i, p) for i, p in zip(images, params) if p["is_lens"]][: n_cols - 1]
    first, rest, seen = [], [], set()  # one non-lens per look-alike kind first, then the rest
    for i, p in zip(images, params):
        if not p["is_lens"]:
            (rest if p.get("negative_kind") in seen else first).append((i, p))
            seen.add(p.get("negative_kind"))
    non = (first + rest)[:n_cols]
    stretch = lambda im: np.arcsinh(np.clip(im, 0, None) / 0.02) / np.arcsinh(1 / 0.02)  # noqa: E731
    fig, axes = plt.subplots(2, n_cols, figsize=(1.6 * n_cols, 3.5))
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    if real is not None:
        axes[0, 0].imshow(stretch(real), origin="lower", cmap="gray", vmin=0, vmax=1)
        axes[0, 0].set_title("real: Euclid Q1 VIS", fontsize=7)
    for ax, (im, p) in zip(axes[0, 1:], lenses):
        ax.imshow(stretch(im), origin="lower", cmap="gray", vmin=0, vmax=1)
        v = p["views"][0]
        ax.set_title(f'lens θE={p["lens"]["theta_E"]:.2f}" n={v["n_images"]}', fontsize=7)
    for ax, (im, p) in zip(axes[1], non):
        ax.imshow(stretch(im), origin="lower", cmap="gray", vmin=0, vmax=1)
        kind = p.get("negative_kind") or ""
        ax.set_title(f"non-lens {kind}" + (" +gal" if p["views"][0]["source"] else ""), fontsize=7)
    fig.tight_layout(pad=0.3)
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    Image.open(buf).convert("L").quantize(32).save(out, optimize=True)  # grey, 32 levels: a small PNG


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="samples timed per mode")
    ap.add_argument("--preset", default="euclid")
    ap.add_argument("--grid", default=None, help="write the picture grid PNG here")
    ap.add_argument("--numerics", type=int, default=0, help="lenses for the supersampling convergence (0: skip)")
    ap.add_argument("--population", type=int, default=0, help="samples per preset for the population report")
    ap.add_argument("--presets", default="euclid,hst")
    ap.add_argument("--pop-rows", default="survey_population.jsonl", help="rows of the population (resumable)")
    ap.add_argument("--pop-grid", type=int, default=None, help="num_pix of the population (default: preset's)")
    ap.add_argument("--summarise-only", action="store_true", help="summarise --pop-rows without simulating")
    ap.add_argument("--side-by-side", default=None, help="a checkout of an earlier commit: its rates beside these")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --side-by-side")
    ap.add_argument("--rates-json", action="store_true", help=argparse.SUPPRESS)
    a = parse_quick(ap, None, dict(n=3))
    if a.rates_json:
        import json

        print(json.dumps(rates(a.preset, a.n)))
        return
    if a.side_by_side:
        side_by_side(a.side_by_side, a.preset, a.n, a.rounds)
        return
    if a.population:
        population(a.presets.split(","), a.population, a.pop_rows, a.pop_grid, 0, not a.summarise_only)
        return

    from hpc_lensiam.simulate.config import simulation_config
    from hpc_lensiam.simulate.simulator import LensSimulator
    from hpc_lensiam.simulate.survey import survey_config
    from hpc_lensiam.simulate.survey.simulator import SurveySimulator

    single = SurveySimulator(survey_config(preset=a.preset, mode="single"))
    pairs = SurveySimulator(survey_config(preset=a.preset, mode="lensiam"))
    no_adaptive = SurveySimulator(
        survey_config(preset=a.preset, mode="single", instrument={"adaptive_supersampling_factor": 0})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paper = LensSimulator(simulation_config(preset=a.preset))
    r_single, params, images = rate(single, "sample_single", a.n)
    r_old, _, _ = rate(no_adaptive, "sample_single", a.n)
    r_pair, _, _ = rate(pairs, "sample_pair", max(2, a.n // 2))
    r_paper, _, _ = rate(paper, "sample_single", a.n)
    g = single.grid
    print(
        f'survey family, {a.preset} {g.num_pix}x{g.num_pix} at {g.pixel_scale_arcsec}"/px, supersampling '
        f"{g.supersampling_factor} + adaptive {single.config.instrument.adaptive_supersampling_factor}, one core:"
    )
    print(
        f"  single (lens fraction 0.5): {r_single:.2f} images/s (without adaptive supersampling: {r_old:.2f}); "
        f"lensiam pairs: {r_pair:.2f} images/s; paper family single: {r_paper:.2f} images/s "
        f"(survey/paper = {r_single / r_paper:.2f})"
    )
    if (COSMOS / "real_galaxy_catalog_23.5.fits").is_file():
        cosmos = SurveySimulator(survey_config(preset=a.preset, mode="single", cosmos_dir=str(COSMOS)))
        r_cosmos, cparams, _ = rate(cosmos, "sample_single", a.n)
        kinds = [p["views"][0]["source"]["kind"] for p in cparams if p["views"][0]["source"]]
        print(
            f"  single with --cosmos-dir (cosmos_fraction {cosmos.config.source.cosmos_fraction}): "
            f"{r_cosmos:.2f} images/s; sources: {kinds.count('cosmos')} COSMOS, {kinds.count('sersic')} Sersic"
        )
    lens = [p for p in params if p["is_lens"]]
    if lens:
        arc = np.median([p["views"][0]["arc_flux_fraction"] for p in lens])
        th = np.median([p["lens"]["theta_E"] for p in lens])
        draws = np.mean([p["deflector_draws"] for p in params])
        print(
            f"  {len(lens)} lenses of {len(params)}: median arc flux fraction {arc:.2f}, median theta_E "
            f'{th:.2f}", mean deflector draws per sample {draws:.2f}'
        )
    if a.grid:
        draw_grid(images, params, real_lens(g.num_pix), a.grid)
        print(f"  picture grid: {a.grid}")
    if a.numerics:
        numerics(a.preset, a.numerics)
    print_ratio(r_single / r_paper, "survey-family over paper-family single images/s")


if __name__ == "__main__":
    main()
