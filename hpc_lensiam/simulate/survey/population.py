"""Deflector and source populations of the survey family: redshifts, velocity dispersions, light.

Where each prior comes from:
- cosmology: flat LambdaCDM (astropy ``FlatLambdaCDM``), H0 = 70, Omega_m = 0.3 by default;
- deflectors: velocity dispersion function of Choi, Park & Vogeley (2007, ApJ 658, 884), a modified
  Schechter function (sigma* = 161 km/s, alpha = 2.32, beta = 2.67), constant comoving density in
  z (dV_c/dz), weighted by the lensing cross-section (area ~ theta_E^2 ~ sigma^4 (D_ls/D_s)^2) as in
  Collett (2015, ApJ 811, 20);
- deflector light: Faber-Jackson L ~ sigma^4 with M_r(200 km/s) = -21.5 and 0.5 mag scatter (Bernardi
  et al. 2003, AJ 125, 1849; Hyde & Bernardi 2009); size-luminosity relation of early types R_e ~ L^0.65
  with 0.11 dex scatter (Shen et al. 2003, MNRAS 343, 978), which together are the fundamental plane's
  projections; de Vaucouleurs-like Sersic n in [3, 5]; axis ratios q ~ N(0.75, 0.12) (Padilla & Strauss
  2008, MNRAS 388, 1321);
- sources: n(z) ~ z^2 exp(-(z/z0)^1.5) (Smail et al. 1994, MNRAS 271, 431), a Schechter luminosity
  function (M* = -21, alpha = -1.3), size R ~ L^0.25 (Shen et al. 2003, late types) shrinking as
  (1+z)^-0.75 (van der Wel et al. 2014, ApJ 788, 28), disk-like Sersic n in [0.5, 2];
- interlopers: field galaxies with counts dN/dm ~ 10^(0.3 m), in lenses and non-lenses alike.

Everything is drawn from the numpy Generator passed in, in a fixed order (reproducible from the seed).
Distances come from tables built once per process (astropy is slow per call).
"""

from __future__ import annotations

import math

import numpy as np

from .config import PopulationPrior

C_KM_S = 299792.458
RAD_TO_ARCSEC = 180.0 / math.pi * 3600.0
# Choi, Park & Vogeley (2007): early-type velocity dispersion function
VDF_SIGMA_STAR, VDF_ALPHA, VDF_BETA = 161.0, 2.32, 2.67
M_SUN_R = 4.65  # absolute magnitude of the Sun in r (Willmer 2018), for stellar mass-to-light ratios


class Cosmology:
    """Distance tables of a flat LambdaCDM cosmology (astropy), interpolated: D_A, D_ls, distance modulus."""

    def __init__(self, H0: float, Omega_m: float, z_max: float = 6.0, n: int = 4000):
        from astropy.cosmology import FlatLambdaCDM

        self.astropy = FlatLambdaCDM(H0=H0, Om0=Omega_m)
        self.z = np.linspace(0.0, z_max, n)
        self.d_m_mpc = self.astropy.comoving_transverse_distance(self.z).value  # flat: = comoving distance
        self.dvdz = self.astropy.differential_comoving_volume(self.z).value

    def d_m(self, z: float) -> float:
        return float(np.interp(z, self.z, self.d_m_mpc))

    def d_a(self, z: float) -> float:
        return self.d_m(z) / (1.0 + z)

    def d_a12(self, z1: float, z2: float) -> float:
        """Angular diameter distance between z1 < z2 (flat universe)."""
        return (self.d_m(z2) - self.d_m(z1)) / (1.0 + z2)

    def distance_modulus(self, z: float) -> float:
        d_l_pc = self.d_m(z) * (1.0 + z) * 1e6
        return 5.0 * math.log10(d_l_pc) - 5.0

    def rho_crit_msun_kpc3(self, z: float) -> float:
        """Critical density of the universe at z (Msun / kpc^3, physical): the halo's overdensity reference."""
        import astropy.units as u

        return float(self.astropy.critical_density(z).to(u.Msun / u.kpc**3).value)

    def kpc_per_arcsec(self, z: float) -> float:
        return self.d_a(z) * 1e3 / RAD_TO_ARCSEC

    def sigma_crit_msun_arcsec2(self, z_l: float, z_s: float) -> float:
        """Critical surface density in solar masses per arcsec^2 (c^2 D_s / (4 pi G D_l D_ls))."""
        g_mpc = 4.30091e-9  # G in Mpc (km/s)^2 / Msun
        d_l, d_s, d_ls = self.d_a(z_l), self.d_a(z_s), self.d_a12(z_l, z_s)
        per_mpc2 = C_KM_S**2 * d_s / (4 * math.pi * g_mpc * d_l * d_ls)
        return per_mpc2 * (d_l / RAD_TO_ARCSEC) ** 2


def _trapezoids(x: np.ndarray, pdf: np.ndarray) -> np.ndarray:
    """Areas of the trapezoids between consecutive table points: the steps of ``_table_sampler``'s CDF."""
    return 0.5 * (pdf[1:] + pdf[:-1]) * np.diff(x)


def _table_sampler(x: np.ndarray, pdf: np.ndarray):
    """Inverse-CDF sampler of a tabulated density (trapezoid CDF, linear interpolation)."""
    cdf = np.concatenate([[0.0], np.cumsum(_trapezoids(x, pdf))])
    cdf /= cdf[-1]
    return lambda u: float(np.interp(u, cdf, x))


def _cdf_sample(x: np.ndarray, segments: np.ndarray, u: float) -> float:
    """``_table_sampler(x, pdf)(u)`` given ``_trapezoids(x, pdf)`` (the same operations, so the same number)."""
    cdf = np.concatenate([[0.0], np.cumsum(segments)])
    cdf /= cdf[-1]
    return float(np.interp(u, cdf, x))


def theta_E_sis_arcsec(sigma_km_s: float, d_ls_over_d_s: float) -> float:
    """Einstein radius of a singular isothermal sphere: 4 pi (sigma/c)^2 D_ls/D_s."""
    return 4 * math.pi * (sigma_km_s / C_KM_S) ** 2 * d_ls_over_d_s * RAD_TO_ARCSEC


def schechter_mag_pdf(m: np.ndarray, m_star: float, alpha: float) -> np.ndarray:
    """Schechter luminosity function per unit magnitude."""
    x = 10 ** (-0.4 * (m - m_star))
    return x ** (alpha + 1) * np.exp(-x)


class Population:
    """Draws deflectors (sigma, z_l, z_s, light) and sources for the survey family."""

    def __init__(self, prior: PopulationPrior):
        self.prior = p = prior
        self.cosmo = Cosmology(p.H0_km_s_Mpc, p.Omega_m, z_max=max(6.0, p.z_source_max + 0.5))
        s = np.linspace(*p.sigma_v_km_s, 2000)
        x = s / VDF_SIGMA_STAR
        vdf = x**VDF_ALPHA * np.exp(-(x**VDF_BETA)) / s  # Choi et al. (2007) shape (norm irrelevant)
        self._sigma = _table_sampler(s, vdf * s**4)  # lensing cross-section ~ theta_E^2 ~ sigma^4
        zl = np.linspace(*p.z_lens, 2000)
        self._z_l = _table_sampler(zl, np.interp(zl, self.cosmo.z, self.cosmo.dvdz))
        zs = np.linspace(1e-3, p.z_source_max, 4000)
        self._nz_s = (zs, zs**2 * np.exp(-((zs / p.z_source_z0) ** 1.5)))
        self._nz_s_segments = _trapezoids(*self._nz_s)  # _z_source's CDF steps, whatever z_l cuts off
        m = np.linspace(*p.source_M, 2000)
        self._source_M = _table_sampler(m, schechter_mag_pdf(m, p.source_M_star, p.source_alpha))
        mi = np.linspace(*p.interloper_mag, 2000)
        self._interloper_m = _table_sampler(mi, 10 ** (p.interloper_count_slope * mi))

    # ---------------------------------------------------------------------------------- deflector
    def _z_source(self, rng: np.random.Generator, z_l: float) -> float:
        """z_s from n(z) above z_l + gap: ``_table_sampler`` of the table's points there (a suffix of the sorted
        table), whose trapezoids are the whole table's from that point on; so only the cumulative sum is
        computed per draw (~6 per deflector draw), the same numbers as building the sampler each time."""
        zs = self._nz_s[0]
        first = int(np.searchsorted(zs, z_l + self.prior.z_source_min_gap, side="left"))  # first zs >= z_l + gap
        return _cdf_sample(zs[first:], self._nz_s_segments[first:], rng.random())

    def draw_redshifts_sigma(self, rng: np.random.Generator, max_tries: int = 10000) -> dict:
        """(sigma_v, z_l, z_s) weighted by the lensing cross-section (D_ls/D_s)^2 by rejection."""
        for _ in range(max_tries):
            sigma = self._sigma(rng.random())
            z_l = self._z_l(rng.random())
            z_s = self._z_source(rng, z_l)
            ratio = self.cosmo.d_a12(z_l, z_s) / self.cosmo.d_a(z_s)
            if rng.random() < ratio**2:
                return {
                    "sigma_v_km_s": sigma,
                    "z_lens": z_l,
                    "z_source": z_s,
                    "d_ls_over_d_s": ratio,
                    "theta_E_sis": theta_E_sis_arcsec(sigma, ratio),
                }
        raise RuntimeError("draw_redshifts_sigma: no accepted draw")  # pragma: no cover

    def draw_lens_light(self, rng: np.random.Generator, defl: dict, fj_offset_mag: float | None = None) -> dict:
        """Faber-Jackson magnitude and fundamental-plane-like size for the deflector's sigma and z.

        ``fj_offset_mag``: the scatter draw (None: drawn here). The returned dict carries the apparent
        magnitude (``mag``), the half-light radius (arcsec) and Sersic index; centre and shape are
        the caller's (they follow the mass).
        """
        p = self.prior
        off = float(rng.normal(0.0, p.fj_scatter_mag)) if fj_offset_mag is None else float(fj_offset_mag)
        M = p.fj_M_at_200 + p.fj_slope * math.log10(defl["sigma_v_km_s"] / 200.0) + off
        z = defl["z_lens"]
        mag = M + self.cosmo.distance_modulus(z) + p.k_correction_per_z * z
        log_r = (
            math.log10(p.size_R_kpc_at_M0)
            + p.size_dlogR_dM * (M - p.fj_M_at_200)
            + float(rng.normal(0.0, p.size_scatter_dex))
        )
        R_arcsec = 10**log_r / self.cosmo.kpc_per_arcsec(z)
        return {
            "abs_mag": M,
            "mag": mag,
            "fj_offset_mag": off,
            "R_sersic": R_arcsec,
            "n_sersic": float(rng.uniform(*p.n_sersic_lens)),
        }

    def draw_q_light(self, rng: np.random.Generator) -> float:
        p = self.prior
        return float(np.clip(rng.normal(p.q_light_mean, p.q_light_sigma), p.q_min, 1.0))

    def draw_center(self, rng: np.random.Generator) -> tuple[float, float]:
        lo, hi = self.prior.lens_center_arcsec
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))

    # ---------------------------------------------------------------------------------- sources
    def draw_source(self, rng: np.random.Generator, z_s: float) -> dict:
        """Sersic source at redshift z_s: apparent magnitude and size from its luminosity; no position."""
        p = self.prior
        M = self._source_M(rng.random())
        mag = M + self.cosmo.distance_modulus(z_s) - 2.5 * math.log10(1.0 + z_s)  # flat-f_nu K-correction
        log_r = (
            math.log10(p.source_size_R_kpc_at_M_star)
            + p.source_size_dlogR_dM * (M - p.source_M_star)
            + p.source_size_z_power * math.log10(1.0 + z_s)
            + float(rng.normal(0.0, p.source_size_scatter_dex))
        )
        q = float(rng.uniform(*p.source_q))
        phi = float(rng.uniform(0.0, math.pi))
        e = (1 - q) / (1 + q)
        return {
            "kind": "sersic",
            "abs_mag": M,
            "mag": mag,
            "R_sersic": 10**log_r / self.cosmo.kpc_per_arcsec(z_s),
            "n_sersic": float(rng.uniform(*p.source_n_sersic)),
            "e1": e * math.cos(2 * phi),
            "e2": e * math.sin(2 * phi),
        }

    def draw_interlopers(self, rng: np.random.Generator, field_arcsec: float) -> list[dict]:
        """Unlensed field galaxies anywhere in the field (Poisson number), same law in both classes."""
        p = self.prior
        n = int(rng.poisson(p.interloper_density_arcmin2 * (field_arcsec / 60.0) ** 2))
        out = []
        for _ in range(n):
            m = self._interloper_m(rng.random())
            q = float(rng.uniform(0.3, 1.0))
            phi = float(rng.uniform(0.0, math.pi))
            e = (1 - q) / (1 + q)
            half = field_arcsec / 2
            out.append(
                {
                    "kind": "sersic",
                    "mag": m,
                    "R_sersic": float(10 ** (math.log10(0.3) - 0.1 * (m - 23.0) + rng.normal(0, 0.2))),
                    "n_sersic": float(rng.uniform(0.5, 4.0)),
                    "e1": e * math.cos(2 * phi),
                    "e2": e * math.sin(2 * phi),
                    "center_x": float(rng.uniform(-half, half)),
                    "center_y": float(rng.uniform(-half, half)),
                }
            )
        return out
