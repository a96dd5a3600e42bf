"""``simulate --match`` against the real files it matches (issue 28): a table and a side-by-side figure.

For every shared HST lens file (``../shared/data/real_lenses``: desi_hst, desj0408_hst, dolphin_hst)
and the Euclid Q1 lens: ``simulate --match FILE --samples single`` (in-process, the CLI's code path) and
the measured match: pixel scale, PSF FWHM (the file's kernel vs every kernel the simulated images
used, Gaussian fit of the pixel kernel), background noise (the file's ``background_rms``; a robust
std of the border strips of the real image and of the simulated images in e-/s), neighbour
correlation of the border noise. The figure puts the five DESI-HST lenses with a theta_E label
beside two matched simulations each, drawn with the label's theta_E, in the same asinh stretch
(``hpc_lensiam.shards.display``; softening 2 x the file's background RMS).

    .venv/bin/python -m bench.match --out docs/real_images/matched_sims.png
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

from .common import parse_quick, print_ratio

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REAL = SHARED / "real_lenses"


def _images(out: Path) -> list[tuple[np.ndarray, dict]]:
    """(image in e-/s, params) of every sample, through the package's one sample reader."""
    from hpc_lensiam.shards.reader import iter_samples

    return [
        (s["image"].astype(np.float64) * s["params"]["views"][0]["peak_e_per_s"], s["params"])
        for s in iter_samples(out)
    ]


def border(image: np.ndarray, width: int = 8) -> np.ndarray:
    b = width
    return np.concatenate([image[:b].ravel(), image[-b:].ravel(), image[b:-b, :b].ravel(), image[b:-b, -b:].ravel()])


def robust_std(values: np.ndarray) -> float:
    """1.4826 x MAD: the sky's std with the odd neighbour galaxy in the strip ignored."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def border_correlation(image: np.ndarray, width: int = 8) -> float:
    from hpc_lensiam.simulate.match import neighbour_correlation

    strips = [image[:width], image[-width:]]
    return float(np.mean([neighbour_correlation(np.clip(s, *np.quantile(s, [0.02, 0.98]))) for s in strips]))


def simulate(path: Path, out: Path, n: int, seed: int, theta_e: float | None = None) -> tuple[dict, list]:
    from hpc_lensiam.simulate.writer import simulate_shards

    config = None
    if theta_e:
        config = out.with_suffix(".yaml")
        lo, hi = 0.97 * theta_e, 1.03 * theta_e
        config.write_text(f"lens:\n  theta_E_arcsec: [{lo:.4f}, {hi:.4f}]\n")
    manifest = simulate_shards(
        out, n, mode="single", seed=seed, match={"file": str(path)}, config_path=config and str(config), progress=False
    )
    return manifest, _images(out)


def measure(path: Path, tmp: Path, n: int = 4) -> dict:
    import warnings

    from hpc_lensiam.simulate.families import resolve_family
    from hpc_lensiam.simulate.match import read_instrument
    from hpc_lensiam.simulate.psf import fwhm_arcsec

    real = read_instrument(str(path))
    manifest, sims = simulate(path, tmp / path.stem, n, seed=0)
    cfg, make = resolve_family("paper", "single", match={"file": str(path)})
    bank = make(cfg).psf_bank
    scale = real.pixel_scale_arcsec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fw_real = fwhm_arcsec(real.psf_kernel, scale)
        fw_sim = [fwhm_arcsec(bank.kernels[p["views"][0]["psf_id"]], scale) for _, p in sims]
    return {
        "file": f"{path.parent.name}/{path.name}",
        "shape": real.shape,
        "scale_real": scale,
        "scale_sim": manifest["config"]["instrument"]["pixel_scale_arcsec"],
        "fwhm_real": fw_real,
        "fwhm_sim": (min(fw_sim), max(fw_sim)),
        "rms_file": real.background_rms_e_per_s,
        "rms_real_border": robust_std(border(real.image)),
        "rms_sim_border": float(np.median([robust_std(border(img)) for img, _ in sims])),
        "rho_real": border_correlation(real.image),
        "zp": f"{cfg.zero_point_mag:.2f} ({cfg.zero_point_from.split(':')[0]})",
    }


def figure(out: str, tmp: Path) -> None:
    from hpc_lensiam.shards.display import draw_panels
    from hpc_lensiam.simulate.match import read_instrument

    rows = [r for r in csv.DictReader(open(REAL / "desi_hst" / "labels.csv")) if r["theta_E_arcsec"]]
    panels = []
    for i, r in enumerate(rows[:5]):
        path = REAL / "desi_hst" / r["file"]
        real = read_instrument(str(path))
        theta = float(r["theta_E_arcsec"])
        _, sims = simulate(path, tmp / f"fig_{path.stem}", 2, seed=i, theta_e=theta)
        rms, scale = real.background_rms_e_per_s, real.pixel_scale_arcsec
        panels.append({"image": real.image, "sigma": rms, "pixel_scale": scale, "caption": f"{r['name']} (real)"})
        for k, (img, p) in enumerate(sims):
            mag = p["views"][0]["lens_light"]["mag"]
            cap = f'sim {k + 1}: theta_E {p["lens"]["theta_E"]:.2f}", lens {mag:.1f} mag'
            panels.append({"image": img, "sigma": rms, "pixel_scale": scale, "caption": cap})
    draw_panels(
        panels,
        out,
        title="DESI-HST F140W lenses (real, left) and simulate --match of each file (theta_E from labels.csv)",
        max_cols=6,
        step=3,
        dpi=110,
    )
    from PIL import Image  # a docs figure: a 256-colour palette keeps it near 300 KB (noise compresses badly)

    with Image.open(out) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE)
    small.save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "real_images" / "matched_sims.png"))
    ap.add_argument("--no-figure", action="store_true")
    a = parse_quick(ap, None, dict(no_figure=True))
    files = (
        sorted((REAL / "desi_hst").glob("DESIJ*_F140W.h5"))
        + sorted((REAL / "desj0408_hst").glob("data_*.hdf5"))
        + sorted((REAL / "dolphin_hst").glob("**/image_*.h5"))
        + sorted((SHARED / "euclid_q1").glob("*.fits"))
    )
    if not files:
        sys.exit(f"no shared data under {SHARED}")
    ratios = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(
            '| file | px | pixel scale real / sim (") | PSF FWHM real / sim (") | background rms: file / real border'
            " / sim border (e-/s) | real border rho | zero point |"
        )
        print("|---|---|---|---|---|---|---|")
        for path in files:
            m = measure(path, tmp)
            lo, hi = m["fwhm_sim"]
            ratios.append((lo + hi) / 2 / m["fwhm_real"])
            print(
                f"| {m['file']} | {m['shape'][0]} | {m['scale_real']:.4f} / {m['scale_sim']:.4f} | "
                f"{m['fwhm_real']:.3f} / {lo:.3f}-{hi:.3f} | {m['rms_file']:.4f} / {m['rms_real_border']:.4f} / "
                f"{m['rms_sim_border']:.4f} | {m['rho_real']:.2f} | {m['zp']} |",
                flush=True,
            )
        if not a.no_figure:
            figure(a.out, tmp)
            print(f"figure: {a.out}")
    print_ratio(float(np.median(ratios)), "simulated over real PSF FWHM, median over files")


if __name__ == "__main__":
    main()
