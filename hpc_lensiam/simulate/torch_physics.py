"""Batched torch versions of the lenstronomy profiles ``LensSimulator`` uses, term for term.

Every function takes coordinates ``x, y`` of shape (P,) or (B, P) (arcsec) and parameters of shape
(B, 1), and returns (B, P). Each one transcribes the lenstronomy code path the numpy simulator
calls (named in its docstring), including its guards (radius floors, ``nan_to_num``, truncation),
so that the float64 results agree to rounding; the tests compare them image by image.

- :func:`epl_shear_deflection`: ``EPL_NUMBA`` (Tessore & Metcalf 2015) through the angular series'
  recurrence in real arithmetic, plus ``SHEAR`` about the lens centre;
- :func:`epl_series_terms`: how many series terms reach a relative tolerance at the prior's corner;
- :func:`sersic_elliptic`, :func:`core_sersic`: ``SERSIC_ELLIPSE`` and ``CORE_SERSIC`` light;
- :class:`StampBank`: ``INTERPOL`` (bilinear ``RectBivariateSpline`` with a one-pixel zero border)
  for a bank of COSMOS stamps stored ragged in one flat tensor;
- :class:`PSFStack`: ``convolve_same`` (linear FFT convolution, zero boundary, centred crop) for a
  bank of kernels, gathered per image by index.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

# lenstronomy's numerical guards (sersic_utils.SersicUtil, param_util), kept identical
SERSIC_SMOOTHING_ARCSEC = 1e-4  # SersicUtil(smoothing=0.0001): radius floor of Sersic light
SERSIC_MAX_R_FRAC = 1000.0  # SERSIC_ELLIPSE is zero beyond 1000 R_sersic
MAX_ELLIPTICITY_MODULUS = 0.9999  # ellipticity2phi_q clips |e| here before q = (1 - |e|)/(1 + |e|)


def ellipticity_f(e1, e2):
    """Tessore & Metcalf's f = (1 - q)/(1 + q) for lenstronomy's (e1, e2): simply |e|, clipped."""
    return torch.sqrt(e1 * e1 + e2 * e2).clamp(max=MAX_ELLIPTICITY_MODULUS)


@functools.lru_cache(maxsize=64)
def epl_series_terms(f_max: float, t_range: tuple[float, float], tol: float, n_max: int = 400) -> int:
    """Smallest N such that the N-term angular series is within ``tol`` (relative) of the converged
    sum for every f <= ``f_max``, t in ``t_range`` and every angle.

    The terms shrink like f^n n^-(2-t), so the slowest case is the prior's corner (largest f,
    largest t); the error is measured there (and at the smallest t) on 721 angles against a
    ``n_max``-term float64 reference, not bounded analytically, so the tolerance is what it says.
    """
    f = min(max(float(f_max), 0.0), MAX_ELLIPTICITY_MODULUS)
    if f == 0.0:
        return 1
    phi = np.linspace(0.0, np.pi, 721)
    worst = np.zeros(n_max)
    for t in {float(t_range[0]), float(t_range[1])}:
        omega_n = np.exp(1j * phi)
        fact = -f * np.exp(2j * phi)
        partial = np.empty((n_max, phi.size), dtype=np.complex128)
        total = np.zeros_like(omega_n)
        for n in range(n_max):
            total = total + omega_n
            partial[n] = total
            omega_n = omega_n * (2 * (n + 1) - (2 - t)) / (2 * (n + 1) + (2 - t)) * fact
        err = np.max(np.abs(partial - total) / np.abs(total), axis=1)  # err[k]: error with k + 1 terms
        worst = np.maximum(worst, err)
    # the error is not monotone at the few-ulp level: take the first N after which it stays below
    bad = np.flatnonzero(worst > tol)
    return int(bad[-1] + 2) if bad.size else 1


def epl_shear_deflection(x, y, theta_E, gamma, e1, e2, center_x, center_y, gamma1, gamma2, n_terms: int):
    """Deflection (alpha_x, alpha_y), arcsec, of lenstronomy ``["EPL_NUMBA", "SHEAR"]``.

    EPL (``epl_numba.param_transform``, ``alpha``, ``omega``): t = gamma - 1, q from |e|,
    b = theta_E sqrt(q); rotate by -phi_G, z = q x + i y = R e^{i phi};
    alpha = 2b/(1+q) (b/R)^t (R/b) Omega(phi), Omega = sum_{n<N} Omega_n, Omega_0 = e^{i phi},
    Omega_n = -f (2n - (2-t))/(2n + (2-t)) e^{2 i phi} Omega_{n-1} (summed by Horner's rule);
    rotate back by +phi_G.
    lenstronomy's ``nan_to_num`` makes alpha 0 at R = 0 exactly; so does this.
    SHEAR with ra_0, dec_0 = the lens centre: (gamma1 dx + gamma2 dy, gamma2 dx - gamma1 dy).
    """
    f = ellipticity_f(e1, e2)
    q = (1 - f) / (1 + f)
    phi_G = torch.atan2(e2, e1) / 2
    cos_g, sin_g = torch.cos(phi_G), torch.sin(phi_G)
    t = gamma - 1
    b = theta_E * torch.sqrt(q)
    dx, dy = x - center_x, y - center_y
    zx = cos_g * dx + sin_g * dy
    zy = -sin_g * dx + cos_g * dy
    a = q * zx
    R = torch.sqrt(a * a + zy * zy)
    inside = R > 0
    R_safe = torch.where(inside, R, torch.ones_like(R))
    u, v = a / R_safe, zy / R_safe  # e^{i phi}
    # Omega = e^{i phi} sum_n c_n w^n with w = -f e^{2 i phi}, c_n = prod_k (2k - (2-t))/(2k + (2-t)):
    # the same N terms as the recurrence, summed by Horner's rule (w^n c_n is the recurrence's
    # Omega_n / e^{i phi}), which needs half the passes over the (B, P) arrays and no extra buffers
    wx, wy = -f * (u * u - v * v), -f * (2 * u * v)
    two_minus_t = 2 - t
    coef = [torch.ones_like(t)]
    for n in range(1, n_terms):
        coef.append(coef[-1] * (2 * n - two_minus_t) / (2 * n + two_minus_t))
    px = coef[-1].expand_as(wx).clone()
    py = torch.zeros_like(wx)
    for n in range(n_terms - 2, -1, -1):
        nx = wx * px
        nx.addcmul_(wy, py, value=-1).add_(coef[n])
        py.mul_(wx).addcmul_(wy, px)
        px = nx
    sx, sy = u * px - v * py, u * py + v * px  # e^{i phi} P(w)
    scale = (2 * b / (1 + q)) * torch.pow(b / R_safe, t - 1)
    scale = torch.where(inside, scale, torch.zeros_like(scale))
    ax, ay = scale * sx, scale * sy
    alpha_x = cos_g * ax - sin_g * ay + gamma1 * dx + gamma2 * dy
    alpha_y = sin_g * ax + cos_g * ay + gamma2 * dx - gamma1 * dy
    return alpha_x, alpha_y


def sersic_b_n(n_sersic):
    """lenstronomy ``SersicUtil.b_n``: 1.9992 n - 0.3271, floored at 1e-5."""
    return (1.9992 * n_sersic - 0.3271).clamp(min=0.00001)


def _product_average_radius(x, y, e1, e2, center_x, center_y):
    """lenstronomy ``transform_e1e2_product_average`` then the radius (R = sqrt(a b) convention)."""
    xs, ys = x - center_x, y - center_y
    norm = torch.sqrt(torch.abs(1 - e1 * e1 - e2 * e2).clamp(min=0.000001))
    x_ = ((1 - e1) * xs - e2 * ys) / norm
    y_ = (-e2 * xs + (1 + e1) * ys) / norm
    return torch.sqrt(x_ * x_ + y_ * y_)


def sersic_elliptic(x, y, amp, R_sersic, n_sersic, e1, e2, center_x, center_y):
    """lenstronomy ``SersicElliptic.function`` (``SERSIC_ELLIPSE``), amp = brightness at R_sersic."""
    R = _product_average_radius(x, y, e1, e2, center_x, center_y).clamp(min=SERSIC_SMOOTHING_ARCSEC)
    R_sersic = R_sersic.clamp(min=0).clamp(min=SERSIC_SMOOTHING_ARCSEC)
    frac = R / R_sersic
    val = torch.exp(-sersic_b_n(n_sersic) * (torch.pow(frac, 1.0 / n_sersic) - 1.0))
    val = torch.where(frac <= SERSIC_MAX_R_FRAC, val, torch.zeros_like(val))
    return amp * torch.nan_to_num(val)


def core_sersic(x, y, amp, R_sersic, Rb, n_sersic, gamma, alpha, e1, e2, center_x, center_y):
    """lenstronomy ``CoreSersic.function`` (``CORE_SERSIC``; it has no outer truncation)."""
    R = _product_average_radius(x, y, e1, e2, center_x, center_y).clamp(min=SERSIC_SMOOTHING_ARCSEC)
    bn = sersic_b_n(n_sersic)
    val = (
        amp
        * torch.pow(1 + torch.pow(Rb / R, alpha), gamma / alpha)
        * torch.exp(
            -bn
            * (
                torch.pow(
                    (torch.pow(R, alpha) + torch.pow(Rb, alpha)) / torch.pow(R_sersic, alpha), 1.0 / (alpha * n_sersic)
                )
                - 1.0
            )
        )
    )
    return torch.nan_to_num(val)


def core_sersic_unit_flux_amp(R_sersic, n_sersic, Rb, gamma, alpha, steps: int = 4000):
    """1 / total flux of CORE_SERSIC with amp = 1, by its own radial integral: the torch twin of
    ``sources.core_sersic_amp_for_unit_flux`` (2 pi R^2 I(R) dlnR, trapezoid over ``steps`` log
    steps from 1e-6 to 100 R_sersic; the elliptical radius preserves area). A test keeps the two
    equal, so a change of the numpy normalisation shows up there. (B,) parameters -> (B,)."""
    grid = torch.linspace(math.log(1e-6), math.log(100.0), steps, dtype=R_sersic.dtype, device=R_sersic.device)
    lnr = torch.log(R_sersic)[:, None] + grid
    r = torch.exp(lnr)
    zero = torch.zeros_like(R_sersic)[:, None]
    sb = core_sersic(
        r,
        torch.zeros_like(r),
        1.0,
        R_sersic[:, None],
        Rb[:, None],
        n_sersic[:, None],
        gamma[:, None],
        alpha[:, None],
        zero,
        zero,
        zero,
        zero,
    )
    flux = torch.trapezoid(2 * math.pi * r * r * sb, lnr, dim=-1)
    ok = torch.isfinite(flux) & (flux > 0)
    return torch.where(ok, 1.0 / torch.where(ok, flux, 1.0), torch.ones_like(flux))


class StampBank:
    """COSMOS stamps (each normalised to unit pixel sum) as one ragged flat tensor on the device.

    ``__call__`` is lenstronomy ``Interpol.function`` as ``CosmosStamp.surface_brightness`` uses
    it: source-plane coordinates -> stamp pixels ((x - c)/scale, rotated by phi_G), a first-order
    ``RectBivariateSpline`` (= bilinear) over the stamp padded with one zero pixel on every side,
    rows indexed by y and columns by x, and exactly 0 outside the padded stamp.
    """

    def __init__(self, stamps: Sequence[np.ndarray], pixel_scales_arcsec: Sequence[float], device, dtype):
        if len(stamps) == 0:
            raise ValueError("StampBank: no stamps")
        flat, offsets, heights, widths = [], [], [], []
        start = 0
        for img in stamps:
            padded = np.pad(np.asarray(img, dtype=np.float64), 1)
            flat.append(padded.ravel())
            offsets.append(start)
            heights.append(img.shape[0])
            widths.append(img.shape[1])
            start += padded.size
        self.data = torch.as_tensor(np.concatenate(flat), dtype=dtype, device=device)
        self.offsets = torch.as_tensor(offsets, dtype=torch.long, device=device)
        self.heights = torch.as_tensor(heights, dtype=dtype, device=device)
        self.widths = torch.as_tensor(widths, dtype=dtype, device=device)
        self.pixel_scales_arcsec = torch.as_tensor(pixel_scales_arcsec, dtype=dtype, device=device)

    def __len__(self) -> int:
        return int(self.offsets.numel())

    def __call__(self, x, y, index, amp, center_x, center_y, phi_G, scale):
        """Surface brightness (B, P) of stamps ``index`` (B,) placed by (B, 1) parameters."""
        xs, ys = (x - center_x) / scale, (y - center_y) / scale
        cos_p, sin_p = torch.cos(phi_G), torch.sin(phi_G)
        xp = xs * cos_p + ys * sin_p
        yp = -xs * sin_p + ys * cos_p
        h, w = self.heights[index][:, None], self.widths[index][:, None]
        inside = (torch.abs(yp) < (h + 1) / 2) & (torch.abs(xp) < (w + 1) / 2)
        row = torch.where(inside, yp + (h + 1) / 2, torch.zeros_like(yp))  # in [0, h + 1)
        col = torch.where(inside, xp + (w + 1) / 2, torch.zeros_like(xp))
        r0, c0 = torch.floor(row), torch.floor(col)
        fr, fc = row - r0, col - c0
        stride = (w + 2).long()
        base = self.offsets[index][:, None] + r0.long() * stride + c0.long()
        d = self.data
        val = (1 - fr) * ((1 - fc) * d[base] + fc * d[base + 1]) + fr * (
            (1 - fc) * d[base + stride] + fc * d[base + stride + 1]
        )
        return torch.where(inside, amp * val, torch.zeros_like(val))


class PSFStack:
    """The PSF bank's kernels and their FFTs for one image size; ``convolve(img, idx)`` per image.

    Kernels of different (odd) sizes are zero-padded to the largest, centred, which leaves the
    'same' convolution unchanged. The FFT size is scipy's ``next_fast_len`` of the linear size, as
    in ``psf.convolve_same``, so there is no wrap-around: the boundary is zero, like the numpy path.
    """

    def __init__(self, kernels: Sequence[np.ndarray], image_shape: tuple[int, int], device, dtype):
        from scipy import fft as sfft

        kh = max(k.shape[0] for k in kernels)
        kw = max(k.shape[1] for k in kernels)
        stack = np.zeros((len(kernels), kh, kw))
        for i, k in enumerate(kernels):
            r, c = (kh - k.shape[0]) // 2, (kw - k.shape[1]) // 2
            stack[i, r : r + k.shape[0], c : c + k.shape[1]] = k
        self.kernel_shape = (kh, kw)
        self.image_shape = tuple(image_shape)
        self.fshape = tuple(sfft.next_fast_len(n + k - 1, real=True) for n, k in zip(self.image_shape, (kh, kw)))
        kernels_t = torch.as_tensor(stack, dtype=dtype, device=device)
        self.kernel_fft = torch.fft.rfft2(kernels_t, s=self.fshape)

    def __len__(self) -> int:
        return int(self.kernel_fft.shape[0])

    def convolve(self, image, index):
        """(B, H, W) images, each convolved with kernel ``index[b]``; output (B, H, W)."""
        out = torch.fft.irfft2(torch.fft.rfft2(image, s=self.fshape) * self.kernel_fft[index], s=self.fshape)
        r0, c0 = (self.kernel_shape[0] - 1) // 2, (self.kernel_shape[1] - 1) // 2
        return out[:, r0 : r0 + image.shape[-2], c0 : c0 + image.shape[-1]]
