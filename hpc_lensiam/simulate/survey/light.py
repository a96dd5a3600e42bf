"""The elliptical Sersic surface brightness of lenstronomy's ``SersicElliptic`` in one compiled pass.

Every survey image evaluates it on the supersampled grid and the adaptive sub-pixels several times (the
deflector's light per view, the sources of every try, companions and interlopers): through lenstronomy that
was ~28% of an image (a dozen numpy temporaries, a boolean-mask scatter for the 1000 R_e window, nan_to_num).
Same formula and constants (product-average radius, b_n = 1.9992 n - 0.3271, radii floored at lenstronomy's
smoothing, zero beyond ``max_R_frac``); tests/simulate/test_survey.py checks it against lenstronomy to 1e-13.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _sersic(x, y, out, amp, r_sersic, n, e1, e2, cx, cy, smoothing, max_r_frac):  # pragma: no cover - compiled
    norm = math.sqrt(max(abs(1 - e1**2 - e2**2), 0.000001))
    r_s = max(smoothing, max(0.0, r_sersic))
    bn = max(1.9992 * n - 0.3271, 0.00001)
    inv_n = 1.0 / n
    for i in range(x.shape[0]):
        xs, ys = x[i] - cx, y[i] - cy
        u = ((1 - e1) * xs - e2 * ys) / norm
        v = (-e2 * xs + (1 + e1) * ys) / norm
        r = max(smoothing, math.sqrt(u**2 + v**2))
        frac = r / r_s
        val = math.exp(-bn * (frac**inv_n - 1.0)) if frac <= max_r_frac else 0.0
        out[i] = amp * (0.0 if math.isnan(val) else val)


class SersicLight:
    """``function(x, y, amp, R_sersic, n_sersic, e1, e2, center_x, center_y)`` as lenstronomy's SersicElliptic."""

    def __init__(self):
        from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

        self._smoothing = float(SersicElliptic()._smoothing)

    def function(self, x, y, amp, R_sersic, n_sersic, e1, e2, center_x=0.0, center_y=0.0, max_R_frac=1000.0):
        shape = np.shape(x)
        x = np.ascontiguousarray(x, dtype=np.float64).ravel()
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        out = np.empty_like(x)
        _sersic(
            x,
            y,
            out,
            float(amp),
            float(R_sersic),
            float(n_sersic),
            float(e1),
            float(e2),
            float(center_x),
            float(center_y),
            self._smoothing,
            float(max_R_frac),
        )
        return out.reshape(shape)
