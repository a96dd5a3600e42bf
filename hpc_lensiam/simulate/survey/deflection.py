"""Deflection of the survey family's composite mass, fused in compiled loops.

The same physics as lenstronomy's ``LensModel(PROFILES)`` (SERSIC_ELLIPSE_POTENTIAL, NFW_ELLIPSE_CSE, SHEAR,
MULTIPOLE, MULTIPOLE, POINT_MASS; tests/simulate/test_survey.py checks the deflections to 1e-9 of their size and theta_E
to 1e-6"), several times faster. Through lenstronomy, the halo's cored-steep-ellipsoid decomposition (Oguri
2021: 44 CSE terms) is 44 numpy passes over the grid with their temporaries, each multipole takes arctan2, cos
and sin of every point, and the stellar Sersic an incomplete gamma function per point: together 60% of a
survey image (the grid's ray shooting, the adaptive sub-pixels and the theta_E root finding, whose 256-point
circles cost mostly lenstronomy's per-profile dispatch). Here one numba pass visits each point: the CSE terms
are summed in blocks that stay in cache, the multipoles' cos(m phi), sin(m phi) come from the unit vector by
complex powers, and the Sersic's radial deflection alpha(r), which depends on one radius, is interpolated
(cubic Hermite in ln r, with the exact slope d alpha / d ln r = 2 r kappa - alpha) from a table of
lenstronomy's own values at 8192 radii built once per mass (relative error < 1e-10, tested).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# mass.LENS_MODEL_LIST, the order the kwargs come in (mass.py imports this module, not the reverse)
PROFILES = ("SERSIC_ELLIPSE_POTENTIAL", "NFW_ELLIPSE_CSE", "SHEAR", "MULTIPOLE", "MULTIPOLE", "POINT_MASS")


_SERSIC_R = (1e-4, 1e4)  # table radii (arcsec, in the profile's circularised frame): lenstronomy's smoothing
_SERSIC_N = 8192  # radii from it up to beyond any grid or theta_E bracket; beyond, alpha ~ M / (pi r) exactly


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _sersic_frame(xi, yi, p):  # pragma: no cover - compiled
    """(x', y', r) of a point in the Sersic's circularised frame, r floored at p[6] (lenstronomy's smoothing)."""
    cx, cy, c, s, se_m, se_p, rmin = p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    dx, dy = xi - cx, yi - cy
    xp = (c * dx + s * dy) * se_m
    yp = (-s * dx + c * dy) * se_p
    r = math.sqrt(xp * xp + yp * yp)
    return xp, yp, (rmin if r < rmin else r)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sersic_radius(x, y, r, p):  # pragma: no cover - compiled
    """r = the circularised radius of each point (``_sersic_frame``): its logarithm is numpy's (vectorised)."""
    for i in range(x.shape[0]):
        r[i] = _sersic_frame(x[i], y[i], p)[2]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sersic_alpha(x, y, ax, ay, p, g, dg, t0, h, log_r):  # pragma: no cover - compiled
    """ax, ay = SERSIC_ELLIPSE_POTENTIAL deflection (lenstronomy's formulas; alpha(r) from the table g, dg).

    p: (cx, cy, cos phi, sin phi, sqrt(1 - e), sqrt(1 + e), r_min, r_max); g, dg: alpha and d alpha / d ln r at
    ln r = t0 + k h; log_r: ln of ``_sersic_radius``' r (the C library's scalar log per point was ~1/3 of this).
    """
    c, s, se_m, se_p, rmax = p[2], p[3], p[4], p[5], p[7]
    last = g.shape[0] - 1
    for i in range(x.shape[0]):
        xp, yp, r = _sersic_frame(x[i], y[i], p)
        if r >= rmax:
            alpha = g[last] * rmax / r
        else:
            u = (log_r[i] - t0) / h
            k = int(u)
            if k >= last:
                k = last - 1
            f = u - k
            f2, f3 = f * f, f * f * f
            alpha = (
                (2 * f3 - 3 * f2 + 1) * g[k]
                + (f3 - 2 * f2 + f) * h * dg[k]
                + (-2 * f3 + 3 * f2) * g[k + 1]
                + (f3 - f2) * h * dg[k + 1]
            )
        fx = alpha * xp / r * se_m
        fy = alpha * yp / r * se_p
        ax[i] = c * fx - s * fy
        ay[i] = s * fx + c * fy


_BLOCK = 256  # points per block: the block's coordinates and sums stay in L1 while the CSE terms run


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _cse_block(u, v, fx, fy, a_cse, s_cse, q):  # pragma: no cover - compiled
    """fx, fy = sum over CSE terms k of a_k (psi + q^2 s_k) / (s_k psi Phi), a_k (psi + s_k) / (s_k psi Phi)
    (Oguri 2021 eq. 19-20 without the q u, q v factors), terms outer so the point loop vectorises."""
    q2, one_m_q2 = q * q, 1.0 - q * q
    n = u.shape[0]
    for i in range(n):
        fx[i] = 0.0
        fy[i] = 0.0
    for k in range(a_cse.shape[0]):
        s, a = s_cse[k], a_cse[k]
        s2, q2s = s * s, q2 * s
        for i in range(n):
            uu = u[i] * u[i]
            psi = math.sqrt(q2 * (s2 + uu) + v[i] * v[i])
            w = a / (s * psi * ((psi + s) * (psi + s) + one_m_q2 * uu))
            fx[i] += (psi + q2s) * w
            fy[i] += (psi + s) * w


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _multipole_term(xi, yi, m, amp, cpm, spm, mcx, mcy):  # pragma: no cover - compiled
    """(dx, dy) of one MULTIPOLE (m >= 2) at (xi, yi): cos, sin of m phi by complex powers of the unit vector.
    Inlined where m is a constant, the power loop unrolls and the point loop around it vectorises."""
    mx, my = xi - mcx, yi - mcy
    r = math.sqrt(mx * mx + my * my)
    if r > 0.0:
        cp, sp = mx / r, my / r
    else:
        cp, sp = 1.0, 0.0  # arctan2(0, 0) = 0
    cm, sm = 1.0, 0.0
    for _ in range(m):
        cm, sm = cm * cp - sm * sp, sm * cp + cm * sp
    c_ = cm * cpm + sm * spm  # cos(m (phi - phi_m))
    s_ = sm * cpm - cm * spm  # sin(m (phi - phi_m))
    return cp * amp * c_ + sp * m * amp * s_, sp * amp * c_ - cp * m * amp * s_


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _multipole_block(x, y, tx, ty, start, m, amp, cpm, spm, mcx, mcy):  # pragma: no cover - compiled
    """tx, ty += one multipole's deflection at the block's points. The survey's m = 3 and m = 4 get loops of their
    own (a constant m: vectorised, ~5x the generic loop, the same arithmetic and so the same numbers)."""
    if m == 3:
        for j in range(tx.shape[0]):
            dx, dy = _multipole_term(x[start + j], y[start + j], 3, amp, cpm, spm, mcx, mcy)
            tx[j] += dx
            ty[j] += dy
    elif m == 4:
        for j in range(tx.shape[0]):
            dx, dy = _multipole_term(x[start + j], y[start + j], 4, amp, cpm, spm, mcx, mcy)
            tx[j] += dx
            ty[j] += dy
    else:
        for j in range(tx.shape[0]):
            dx, dy = _multipole_term(x[start + j], y[start + j], m, amp, cpm, spm, mcx, mcy)
            tx[j] += dx
            ty[j] += dy


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _composite_alpha(x, y, ax, ay, halo, a_cse, s_cse, shear, mpoles, pm):  # pragma: no cover - compiled
    """ax, ay += halo (CSE set) + shear + multipoles + point mass, in PROFILES' order per point.

    halo: (cx, cy, cos phi, sin phi, 1/Rs, sqrt q, q, const); a_cse: a/q per term; mpoles: rows (m, a_m/(1-m^2),
    cos m phi_m, sin m phi_m, cx, cy); shear: (gamma1, gamma2, ra_0, dec_0); pm: (theta_E^2, cx, cy, r_min).
    Each profile is one loop over a block of points (the block's running sums tx, ty stay in cache), each
    point's terms added in the same order as one loop per point would.
    """
    hcx, hcy, hc, hs, inv_rs, sq, q, const = halo[0], halo[1], halo[2], halo[3], halo[4], halo[5], halo[6], halo[7]
    g1, g2, sx0, sy0 = shear[0], shear[1], shear[2], shear[3]
    te2, pcx, pcy, rmin = pm[0], pm[1], pm[2], pm[3]
    u = np.empty(_BLOCK)
    v = np.empty(_BLOCK)
    fx = np.empty(_BLOCK)
    fy = np.empty(_BLOCK)
    tx_ = np.empty(_BLOCK)
    ty_ = np.empty(_BLOCK)
    n = x.shape[0]
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        m_ = stop - start
        # NFW_ELLIPSE_CSE: shift, rotate to the major axis, product-average coordinates (x sqrt q / Rs)
        for j in range(m_):
            dx, dy = x[start + j] - hcx, y[start + j] - hcy
            u[j] = (dx * hc + dy * hs) * inv_rs * sq
            v[j] = (-dx * hs + dy * hc) * inv_rs * sq
        _cse_block(u[:m_], v[:m_], fx[:m_], fy[:m_], a_cse, s_cse, q)
        tx, ty = tx_[:m_], ty_[:m_]
        for j in range(m_):
            i = start + j
            gx, gy = sq * (q * u[j] * fx[j]), sq * (q * v[j] * fy[j])
            t_x = ax[i] + (gx * hc - gy * hs) * const
            t_y = ay[i] + (gx * hs + gy * hc) * const
            # SHEAR
            ex, ey = x[i] - sx0, y[i] - sy0
            tx[j] = t_x + (g1 * ex + g2 * ey)
            ty[j] = t_y + (g2 * ex - g1 * ey)
        for k in range(mpoles.shape[0]):  # MULTIPOLE (m >= 2)
            m = int(mpoles[k, 0])
            _multipole_block(
                x, y, tx, ty, start, m, mpoles[k, 1], mpoles[k, 2], mpoles[k, 3], mpoles[k, 4], mpoles[k, 5]
            )
        for j in range(m_):  # POINT_MASS
            i = start + j
            px, py = x[i] - pcx, y[i] - pcy
            r = math.sqrt(px * px + py * py)
            if r <= rmin:
                r = rmin
            a = te2 / r
            ax[i] = tx[j] + a * px / r
            ay[i] = ty[j] + a * py / r


class CompositeDeflection:
    """``alpha`` / ``ray_shooting`` of the composite kwargs (``CompositeMass.kwargs``), lenstronomy's numbers."""

    def __init__(self):
        from lenstronomy.LensModel.Profiles.nfw_ellipse_cse import NFW_ELLIPSE_CSE
        from lenstronomy.LensModel.Profiles.point_mass import PointMass
        from lenstronomy.LensModel.Profiles.sersic_ellipse_potential import SersicEllipsePotential

        self._sersic = SersicEllipsePotential()
        self._table_key, self._table = None, None
        nfw = NFW_ELLIPSE_CSE()  # lenstronomy's own CSE coefficients (high accuracy set)
        self._nfw = nfw
        self._a = np.asarray(nfw._a_list, dtype=np.float64)
        self._s = np.asarray(nfw._s_list, dtype=np.float64)
        self._r_min = float(PointMass().r_min)

    def _params(self, kwargs):
        from lenstronomy.Util import param_util

        h = kwargs[1]
        phi_q, q = param_util.ellipticity2phi_q(h["e1"], h["e2"])
        rs = float(h["Rs"])
        const = self._nfw._normalization(h["alpha_Rs"], rs, q) / rs
        halo = np.array(
            [h["center_x"], h["center_y"], math.cos(phi_q), math.sin(phi_q), 1.0 / rs, math.sqrt(q), q, const],
            dtype=np.float64,
        )
        sh = kwargs[2]
        shear = np.array([sh["gamma1"], sh["gamma2"], sh.get("ra_0", 0.0), sh.get("dec_0", 0.0)], dtype=np.float64)
        rows = []
        for mp in kwargs[3:5]:
            m = int(mp["m"])
            if m < 2:
                raise ValueError("CompositeDeflection: multipoles of order m >= 2 only")
            rows.append(
                [
                    m,
                    mp["a_m"] / (1 - m**2),
                    math.cos(m * mp["phi_m"]),
                    math.sin(m * mp["phi_m"]),
                    mp.get("center_x", 0.0),
                    mp.get("center_y", 0.0),
                ]
            )
        pm = kwargs[5]
        point = np.array(
            [pm["theta_E"] ** 2, pm.get("center_x", 0.0), pm.get("center_y", 0.0), self._r_min], dtype=np.float64
        )
        return halo, self._a / q, shear, np.array(rows, dtype=np.float64).reshape(-1, 6), point

    def _sersic_table(self, n: float, r_e: float, k_eff: float):
        """(ln r grid start, step, alpha, d alpha / d ln r) of the circular Sersic deflection (lenstronomy's)."""
        key = (float(n), float(r_e), float(k_eff))
        if key != self._table_key:
            sersic = self._sersic.sersic
            t = np.linspace(math.log(_SERSIC_R[0]), math.log(_SERSIC_R[1]), _SERSIC_N)
            r = np.exp(t)
            alpha = -sersic.alpha_abs(r, np.zeros_like(r), n, r_e, k_eff)
            kappa = k_eff * np.exp(-sersic.b_n(n) * ((r / r_e) ** (1.0 / n) - 1.0))
            self._table_key = key
            self._table = (t[0], t[1] - t[0], alpha, 2.0 * r * kappa - alpha)
        return self._table

    def _sersic_params(self, kw: dict) -> np.ndarray:
        from lenstronomy.Util import param_util

        phi, q = param_util.ellipticity2phi_q(kw["e1"], kw["e2"])
        e = param_util.q2e(q)
        return np.array(
            [
                kw.get("center_x", 0.0),
                kw.get("center_y", 0.0),
                math.cos(phi),
                math.sin(phi),
                math.sqrt(1 - e),
                math.sqrt(1 + e),
                self._sersic.sersic._smoothing,
                _SERSIC_R[1],
            ],
            dtype=np.float64,
        )

    def halo_kappa(self, x, y, kw: dict) -> np.ndarray:
        """Convergence of the NFW_ELLIPSE_CSE halo at (x, y): lenstronomy's CSE hessian (Oguri 2021 eq. 21-23)
        summed over the terms in one broadcast instead of 44 calls (the effective ellipticity's weights)."""
        from lenstronomy.Util import param_util

        phi_q, q = param_util.ellipticity2phi_q(kw["e1"], kw["e2"])
        c, s_ = math.cos(phi_q), math.sin(phi_q)
        dx, dy = np.asarray(x, dtype=np.float64) - kw["center_x"], np.asarray(y, dtype=np.float64) - kw["center_y"]
        rs = float(kw["Rs"])
        u = (dx * c + dy * s_) / rs * math.sqrt(q)
        v = (-dx * s_ + dy * c) / rs * math.sqrt(q)
        a, s = (self._a / q)[:, None], self._s[:, None]
        psi = np.sqrt(q**2 * (s**2 + u**2) + v**2)
        big_phi = (psi + s) ** 2 + (1 - q**2) * u**2
        f_xx = (
            q
            / (s * big_phi)
            * (1 + q**2 * s * (q**2 * s**2 + v**2) / psi**3 - 2 * u**2 * (psi + q**2 * s) ** 2 / (psi**2 * big_phi))
        )
        f_yy = (
            q / (s * big_phi) * (1 + q**2 * s * (s**2 + u**2) / psi**3 - 2 * v**2 * (psi + s) ** 2 / (psi**2 * big_phi))
        )
        trace = q * (a * (f_xx + f_yy)).sum(axis=0)  # CSEProductAvg: q x the major-axis hessian
        return self._nfw._normalization(kw["alpha_Rs"], rs, q) / rs**2 * 0.5 * trace

    def alpha(self, x, y, kwargs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Deflection (arcsec) at image-plane (x, y): the sum of the six profiles."""
        shape = np.shape(x)
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        ax, ay = np.empty_like(x), np.empty_like(y)
        st = kwargs[0]
        t0, h, g, dg = self._sersic_table(st["n_sersic"], st["R_sersic"], st["k_eff"])
        p = self._sersic_params(st)
        log_r = np.empty_like(x)
        _sersic_radius(x, y, log_r, p)
        np.log(log_r, out=log_r)
        _sersic_alpha(x, y, ax, ay, p, g, dg, t0, h, log_r)
        halo, a, shear, mpoles, point = self._params(kwargs)
        _composite_alpha(x, y, ax, ay, halo, a, self._s, shear, mpoles, point)
        return ax.reshape(shape), ay.reshape(shape)

    def ray_shooting(self, x, y, kwargs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Source-plane (x, y) of image-plane (x, y): beta = theta - alpha(theta)."""
        ax, ay = self.alpha(x, y, kwargs)
        return np.asarray(x) - ax, np.asarray(y) - ay
