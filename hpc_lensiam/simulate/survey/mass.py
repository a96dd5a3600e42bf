"""Composite deflector mass of the survey family, and its Einstein radius computed numerically.

Mass model (lenstronomy profiles, in this order):
  SERSIC_ELLIPSE_POTENTIAL  stellar mass following the lens light (same R_e, n), mass-to-light ratio fixed
                            by the stellar fraction f_* of the mass inside theta_E (Auger et al. 2010,
                            ApJ 724, 511: SLACS f_* ~ 0.6-0.8 inside R_e/2), capped so that M*/L_r <=
                            ``stellar_ml_r_max`` (8: an old population has M/L_r ~ 5-6 with a Salpeter IMF,
                            Bell & de Jong 2001, Maraston 2005, and up to ~8 with the bottom-heavy IMFs of
                            the most massive ellipticals, Treu et al. 2010, Conroy & van Dokkum 2012): the
                            mass a higher f_* would give the stars goes to the halo. (A cap of 6 moved the mean
                            slope gamma from 2.03 to 1.95, 8 to 1.99, SLACS: 2.08 +- 0.16; 200 euclid lenses.)
                            Its ellipticity is that of the potential; the convergence's is about 3x larger for
                            isothermal-like profiles (Golse & Kneib 2002), so e_potential = e_light / 3.
                            SERSIC_ELLIPSE_KAPPA (exact elliptical convergence) is 10^4x slower here (80 s per
                            96^2 grid), hence this choice.
  NFW_ELLIPSE_CSE           dark-matter halo, elliptical convergence (Oguri 2021 cored-steep-ellipsoid
                            decomposition). Its M200 (200 x critical density) is the one whose projected mass
                            inside theta_E_SIS is the (1 - f_*) share, with the concentration of the
                            Duffy et al. (2008, MNRAS 390, L64) c(M, z) relation for NFW fits of relaxed and
                            all haloes (full sample, M200c: c = 5.71 (M / 2e12 h^-1 Msun)^-0.084 (1+z)^-0.47),
                            times a log-normal scatter (0.11 dex, Dutton & Maccio 2014); r_s = r200 / c.
                            (Before issue 28 (5) r_s was drawn freely, ~80 kpc, with no link to the mass.)
  SHEAR                     external shear, log-normal |gamma| with median 0.04 (Holder & Schechter 2003).
  MULTIPOLE m=3, m=4        small angular structure, a_m / theta_E ~ N(0, 0.005 | 0.01)
                            (Van de Vyvere et al. 2022), m=4 aligned with the mass.
The total is normalised so the stellar + halo mass inside the SIS Einstein radius of the deflector's
velocity dispersion equals that of the SIS (both computed for circular versions of the profiles).

theta_E (what the label means, as for the power law): the radius of the circle, centred on the lens,
inside which the mean convergence is 1. By the divergence theorem, mean kappa(<R) = <alpha_r>(R) / R,
the azimuthal mean of the radial deflection on the circle, so it is found by root finding on a few
hundred deflections per step. Shear and multipoles (m >= 1) add nothing to that mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .config import MassPrior

LENS_MODEL_LIST = ("SERSIC_ELLIPSE_POTENTIAL", "NFW_ELLIPSE_CSE", "SHEAR", "MULTIPOLE", "MULTIPOLE", "POINT_MASS")
# Kormendy & Ho (2013, ARA&A 51, 511) M_BH-sigma relation of ellipticals and classical bulges:
# M_BH = 0.309e9 Msun (sigma / 200 km/s)^4.38, intrinsic scatter 0.29 dex.
KH13_M_BH_AT_200_MSUN, KH13_SLOPE, KH13_SCATTER_DEX = 0.309e9, 4.38, 0.29
G_OVER_C2_PC_PER_MSUN = 4.785e-14  # G M_sun / c^2 in parsec


def black_hole_mass_msun(sigma_km_s: float) -> float:
    """Mean central black-hole mass of a galaxy of velocity dispersion sigma (Kormendy & Ho 2013)."""
    return KH13_M_BH_AT_200_MSUN * (sigma_km_s / 200.0) ** KH13_SLOPE


def point_mass_theta_E_arcsec(m_msun: float, d_l_mpc: float, d_s_mpc: float, d_ls_mpc: float) -> float:
    """Einstein radius of a point mass: sqrt(4 G M / c^2 D_ls / (D_l D_s)) (angular diameter distances)."""
    from .population import RAD_TO_ARCSEC

    theta2 = 4.0 * G_OVER_C2_PC_PER_MSUN * m_msun * d_ls_mpc / (d_l_mpc * d_s_mpc * 1e6)
    return math.sqrt(theta2) * RAD_TO_ARCSEC


_N_PHI = 256


def ellipticity(q: float, phi_rad: float) -> tuple[float, float]:
    """lenstronomy (e1, e2) of axis ratio q and position angle phi."""
    e = (1.0 - q) / (1.0 + q)
    return e * math.cos(2 * phi_rad), e * math.sin(2 * phi_rad)


def mean_radial_deflection(
    lens_model, kwargs: list[dict], radius: float, cx: float, cy: float, n_phi: int = _N_PHI
) -> float:
    """Azimuthal mean of the radial deflection on the circle of ``radius`` around (cx, cy)."""
    phi = (np.arange(n_phi) + 0.5) * (2 * math.pi / n_phi)
    c, s = np.cos(phi), np.sin(phi)
    ax, ay = lens_model.alpha(cx + radius * c, cy + radius * s, kwargs)
    return float(np.mean(ax * c + ay * s))


def einstein_radius(
    lens_model, kwargs: list[dict], cx: float = 0.0, cy: float = 0.0, guess: float = 1.0, tol: float = 1e-6
) -> float:
    """Circularised Einstein radius: the R with mean convergence 1 inside the circle (see module doc).

    Brent's method on f(R) = <alpha_r>(R) - R, bracketed by growing/shrinking ``guess``.
    """
    from scipy.optimize import brentq

    def f(r):
        return mean_radial_deflection(lens_model, kwargs, r, cx, cy) - r

    lo, hi = guess, guess
    while f(lo) <= 0:
        lo /= 2
        if lo < 1e-4:
            return 0.0  # subcritical everywhere: no Einstein radius
    while f(hi) > 0:
        hi *= 2
        if hi > 1e3:
            raise ValueError("einstein_radius: mean convergence stays above 1 to 1000 arcsec")
    return float(brentq(f, lo, hi, xtol=tol))


def effective_slope(lens_model, kwargs: list[dict], theta_E: float, cx: float, cy: float, step: float = 0.02) -> float:
    """Power-law-equivalent slope at theta_E: gamma = 2 - dln<alpha_r>/dlnR (exact for a power law)."""
    a_hi = mean_radial_deflection(lens_model, kwargs, theta_E * (1 + step), cx, cy)
    a_lo = mean_radial_deflection(lens_model, kwargs, theta_E * (1 - step), cx, cy)
    return 2.0 - math.log(a_hi / a_lo) / math.log((1 + step) / (1 - step))


# Duffy et al. (2008) c(M200c, z), NFW, full sample, 0 < z < 2: c = A (M / M_pivot)^B (1 + z)^C
DUFFY08_A, DUFFY08_B, DUFFY08_C, DUFFY08_M_PIVOT_MSUN_H = 5.71, -0.084, -0.47, 2e12


def concentration_duffy08(m200_msun: float, z: float, h: float) -> float:
    """Mean concentration c200 of an NFW halo of mass M200c (Msun) at redshift z (Duffy et al. 2008)."""
    return DUFFY08_A * (m200_msun * h / DUFFY08_M_PIVOT_MSUN_H) ** DUFFY08_B * (1.0 + z) ** DUFFY08_C


def nfw_from_m200(m200_msun: float, c200: float, rho_crit_msun_kpc3: float) -> tuple[float, float]:
    """(r_s in kpc, rho_s in Msun/kpc^3) of the NFW halo with mass M200c and concentration c200."""
    r200_kpc = (3.0 * m200_msun / (4.0 * math.pi * 200.0 * rho_crit_msun_kpc3)) ** (1.0 / 3.0)
    m_c = math.log(1.0 + c200) - c200 / (1.0 + c200)
    rho_s = 200.0 / 3.0 * rho_crit_msun_kpc3 * c200**3 / m_c
    return r200_kpc / c200, rho_s


def nfw_alpha_Rs_arcsec(rho_s_msun_kpc3: float, rs_kpc: float, kpc_per_arcsec: float, sigma_crit: float) -> float:
    """lenstronomy's NFW ``alpha_Rs`` (deflection at r_s, arcsec) of a halo with physical rho_s and r_s;
    ``sigma_crit`` in Msun/arcsec^2 (lenstronomy LensCosmo.nfw_physical2angle, in these units)."""
    rs_arcsec = rs_kpc / kpc_per_arcsec
    rho_arcsec3 = rho_s_msun_kpc3 * kpc_per_arcsec**3
    return 4.0 * rho_arcsec3 * rs_arcsec**2 * (1.0 + math.log(0.5)) / sigma_crit


class CompositeMass:
    """Builds the composite kwargs from a drawn deflector and computes its effective parameters."""

    def __init__(self, prior: MassPrior, cosmo=None, h: float = 0.7):
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LensModel.Profiles.nfw import NFW
        from lenstronomy.LensModel.Profiles.sersic import Sersic

        from .deflection import PROFILES, CompositeDeflection

        self.prior = prior
        self.lens_model = LensModel(list(LENS_MODEL_LIST))  # the reference ``deflection`` matches
        assert PROFILES == LENS_MODEL_LIST
        self.deflection = CompositeDeflection()  # lenstronomy's numbers, fused (deflection.py): ray shooting
        self._deflectors = LensModel(list(LENS_MODEL_LIST[:2]))  # stellar + halo, for the components' kappa
        self._sersic, self._nfw = Sersic(), NFW()
        if cosmo is None:
            from .population import Cosmology

            cosmo = Cosmology(70.0, 0.3)
        self.cosmo, self.h = cosmo, float(h)
        from lenstronomy.LightModel.Profiles.sersic import Sersic as SersicLight

        self._sersic_light = SersicLight()

    def halo_for_mass_inside(
        self, alpha_target: float, theta: float, z_l: float, kpc_per_arcsec: float, sigma_crit: float, dlog_c: float
    ) -> dict:
        """The NFW halo on the c(M) relation (times 10^dlog_c) whose deflection at ``theta`` (arcsec) is
        ``alpha_target``, i.e. whose projected mass inside theta is pi theta alpha_target Sigma_crit: M200 by
        root finding in log M (the deflection at fixed radius grows with M along the relation)."""
        from scipy.optimize import brentq

        rho_c = self.cosmo.rho_crit_msun_kpc3(z_l)

        def halo(log_m):
            m = 10.0**log_m
            c = concentration_duffy08(m, z_l, self.h) * 10.0**dlog_c
            rs_kpc, rho_s = nfw_from_m200(m, c, rho_c)
            rs = rs_kpc / kpc_per_arcsec
            alpha_rs = nfw_alpha_Rs_arcsec(rho_s, rs_kpc, kpc_per_arcsec, sigma_crit)
            a, _ = self._nfw.derivatives(theta, 0.0, Rs=rs, alpha_Rs=alpha_rs)
            return {"M200_msun": m, "c200": c, "Rs": rs, "alpha_Rs": alpha_rs, "_alpha": float(a)}

        lo, hi = 8.0, 17.0
        if alpha_target <= halo(lo)["_alpha"]:
            out = halo(lo)
        elif alpha_target >= halo(hi)["_alpha"]:
            out = halo(hi)
        else:
            out = halo(brentq(lambda lm: halo(lm)["_alpha"] - alpha_target, lo, hi, xtol=1e-6))
        out.pop("_alpha")
        return out

    def _unit_alpha(self, theta: float, R_sersic: float, n_sersic: float, Rs: float) -> tuple[float, float]:
        """Deflection at radius theta of circular Sersic (k_eff=1) and NFW (alpha_Rs=1)."""
        a_s, _ = self._sersic.derivatives(theta, 0.0, n_sersic=n_sersic, R_sersic=R_sersic, k_eff=1.0)
        a_h, _ = self._nfw.derivatives(theta, 0.0, Rs=Rs, alpha_Rs=1.0)
        return float(a_s), float(a_h)

    def draw(
        self,
        rng: np.random.Generator,
        defl: dict,
        light: dict,
        q_light: float,
        phi_light: float,
        center: tuple[float, float],
        kpc_per_arcsec: float,
    ) -> dict:
        """Composite mass parameters (a JSON-able dict) for a deflector with the given light.

        ``defl``: theta_E_sis, z_lens, z_source (the halo's c(M, z) and Sigma_crit); ``light``: R_sersic,
        n_sersic and abs_mag (the M*/L cap; without it, no cap).
        """
        p = self.prior
        cx, cy = center
        theta_sis = defl["theta_E_sis"]
        z_l, z_s = defl["z_lens"], defl["z_source"]
        sigma_crit = self.cosmo.sigma_crit_msun_arcsec2(z_l, z_s)
        f_star_drawn = f_star = float(rng.uniform(*p.stellar_fraction_theta_E))
        dlog_c = float(rng.normal(0.0, p.halo_concentration_scatter_dex))
        phi_mass = phi_light + math.radians(float(rng.normal(0.0, p.misalignment_deg_sigma)))
        q_star = float(np.clip(q_light + rng.normal(0.0, p.mass_light_q_sigma), 0.4, 1.0))
        q_halo = float(np.clip(rng.normal(p.halo_q_mean, p.halo_q_sigma), 0.5, 1.0))
        a_s, _ = self._unit_alpha(theta_sis, light["R_sersic"], light["n_sersic"], 1.0)
        if "abs_mag" in light:
            ml = self.stellar_ml_r(f_star * theta_sis / a_s, light, sigma_crit)
            if ml > p.stellar_ml_r_max:
                f_star *= p.stellar_ml_r_max / ml
        k_eff = f_star * theta_sis / a_s
        halo = self.halo_for_mass_inside((1.0 - f_star) * theta_sis, theta_sis, z_l, kpc_per_arcsec, sigma_crit, dlog_c)
        es1, es2 = ellipticity(q_star, phi_mass)
        eh1, eh2 = ellipticity(q_halo, phi_mass)
        shear = p.shear_median * 10 ** float(rng.normal(0.0, p.shear_scatter_dex))
        shear = min(shear, p.shear_max)
        phi_shear = float(rng.uniform(0.0, math.pi))
        a3 = abs(float(rng.normal(0.0, p.a3_sigma_theta_E))) * theta_sis
        phi3 = float(rng.uniform(-math.pi, math.pi))
        a4 = float(rng.normal(0.0, p.a4_sigma_theta_E)) * theta_sis
        m_bh = black_hole_mass_msun(defl.get("sigma_v_km_s", 200.0)) * 10 ** float(rng.normal(0.0, KH13_SCATTER_DEX))
        c = self.cosmo
        theta_bh = point_mass_theta_E_arcsec(m_bh, c.d_a(z_l), c.d_a(z_s), c.d_a12(z_l, z_s))
        return {
            "black_hole": {"M_msun": m_bh, "theta_E": theta_bh},
            "stellar": {
                "k_eff": k_eff,
                "R_sersic": light["R_sersic"],
                "n_sersic": light["n_sersic"],
                "e1": es1 / 3.0,
                "e2": es2 / 3.0,
                "q_kappa": q_star,
                "center_x": cx,
                "center_y": cy,
                "stellar_fraction_theta_E_sis": f_star,
                "stellar_fraction_drawn": f_star_drawn,
            },
            "halo": {
                "Rs": halo["Rs"],
                "alpha_Rs": halo["alpha_Rs"],
                "M200_msun": halo["M200_msun"],
                "c200": halo["c200"],
                "c200_dex_offset": dlog_c,
                "e1": eh1,
                "e2": eh2,
                "q": q_halo,
                "center_x": cx,
                "center_y": cy,
            },
            "shear": {"gamma1": shear * math.cos(2 * phi_shear), "gamma2": shear * math.sin(2 * phi_shear)},
            "multipoles": [
                {"m": 3, "a_m": a3, "phi_m": phi3},
                {"m": 4, "a_m": abs(a4), "phi_m": phi_mass + (0.0 if a4 >= 0 else math.pi / 4)},
            ],
            "position_angle_rad": phi_mass,
            "center_x": cx,
            "center_y": cy,
        }

    def stellar_ml_r(self, k_eff: float, light: dict, sigma_crit: float) -> float:
        """r-band stellar mass-to-light ratio (solar) of a stellar Sersic convergence k_eff with this light."""
        from .population import M_SUN_R

        m_star = self._sersic_light.total_flux(amp=k_eff, R_sersic=light["R_sersic"], n_sersic=light["n_sersic"])
        return float(m_star * sigma_crit / 10 ** (-0.4 * (light["abs_mag"] - M_SUN_R)))

    @staticmethod
    def kwargs(mass: dict) -> list[dict]:
        """lenstronomy kwargs for ``LENS_MODEL_LIST`` from a composite mass dict."""
        s, h, sh = mass["stellar"], mass["halo"], mass["shear"]
        cx, cy = mass["center_x"], mass["center_y"]
        out = [
            {k: float(s[k]) for k in ("k_eff", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")},
            {k: float(h[k]) for k in ("Rs", "alpha_Rs", "e1", "e2", "center_x", "center_y")},
            {"gamma1": float(sh["gamma1"]), "gamma2": float(sh["gamma2"]), "ra_0": cx, "dec_0": cy},
        ]
        for mp in mass["multipoles"]:
            out.append(
                {
                    "m": int(mp["m"]),
                    "a_m": float(mp["a_m"]),
                    "phi_m": float(mp["phi_m"]),
                    "center_x": cx,
                    "center_y": cy,
                }
            )
        bh = mass.get("black_hole", {"theta_E": 0.0})  # params written before issue 28 (6): none
        out.append({"theta_E": float(bh["theta_E"]), "center_x": cx, "center_y": cy})
        return out

    def effective(self, mass: dict, guess: float) -> dict:
        """The 8 ``params.json`` lens values of a composite mass (their meaning: module doc, docs/survey.md).

        theta_E: circularised Einstein radius (mean kappa inside = 1); gamma: 2 - dln<alpha_r>/dlnR at
        theta_E; e1, e2: the stellar and halo convergence ellipticities averaged with weights their
        azimuthally averaged convergence at theta_E; centre; gamma1, gamma2: the external shear.
        """
        kw = self.kwargs(mass)
        cx, cy = mass["center_x"], mass["center_y"]
        theta_E = einstein_radius(self.deflection, kw, cx, cy, guess=guess)
        gamma = effective_slope(self.deflection, kw, theta_E, cx, cy) if theta_E > 0 else 2.0
        weights = self._component_kappa(kw, theta_E if theta_E > 0 else guess, cx, cy)
        s, h = mass["stellar"], mass["halo"]
        e_star = ellipticity(s["q_kappa"], mass["position_angle_rad"])
        wsum = sum(weights) or 1.0
        e1 = (weights[0] * e_star[0] + weights[1] * h["e1"]) / wsum
        e2 = (weights[0] * e_star[1] + weights[1] * h["e2"]) / wsum
        return {
            "theta_E": theta_E,
            "gamma": gamma,
            "e1": e1,
            "e2": e2,
            "center_x": cx,
            "center_y": cy,
            "gamma1": mass["shear"]["gamma1"],
            "gamma2": mass["shear"]["gamma2"],
        }

    def _component_kappa(self, kw: Sequence[dict], radius: float, cx: float, cy: float) -> list[float]:
        phi = (np.arange(64) + 0.5) * (2 * math.pi / 64)
        x, y = cx + radius * np.cos(phi), cy + radius * np.sin(phi)
        stellar = self._deflectors.kappa(x, y, [kw[0], kw[1]], k=0)
        return [float(np.mean(stellar)), float(np.mean(self.deflection.halo_kappa(x, y, kw[1])))]
