"""Detector pixel grid of one InstrumentConfig, in lenstronomy's coordinate convention.

The grid is built once per process. Surface brightness is evaluated on the supersampled grid
(``supersampling_factor`` points per pixel side) and averaged back to detector pixels, exactly as
lenstronomy's ``ImageModel`` does with ``supersampling_convolution=False``; the PSF is applied to
the binned image afterwards.
"""

from __future__ import annotations

import numpy as np

from .config import InstrumentConfig


def numpy_grid(num_pix: int, pixel_scale: float, supersampling: int):
    """lenstronomy's grid of :class:`DetectorGrid` without lenstronomy (its ``data_configure_simple``
    + ``RegularGrid``: x to the right, pixel (0, 0) at -(N-1)/2 pixels, sub-samples at the centres of
    an s x s split of each pixel, row-major): the supersampled x, y (flattened) and the pixel centres
    (N, N). Equal to lenstronomy's to rounding (~1e-15 arcsec; tests/test_simulator.py)."""
    n, d, s = int(num_pix), float(pixel_scale), int(supersampling)
    centres = (np.arange(n) - (n - 1) / 2.0) * d
    x_pix, y_pix = np.meshgrid(centres, centres)  # [row = y, column = x]
    off = d * (-0.5 + 1 / (2.0 * s) + np.arange(s) / float(s))
    shape = (n, s, n, s)  # (pixel row, sub-row, pixel column, sub-column)
    x = np.broadcast_to(x_pix[:, None, :, None] + off[None, None, None, :], shape)
    y = np.broadcast_to(y_pix[:, None, :, None] + off[None, :, None, None], shape)
    return np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(y).reshape(-1), x_pix, y_pix


class DetectorGrid:
    """A square ``num_pix`` x ``num_pix`` detector of ``pixel_scale_arcsec`` pixels, centred on 0.

    ``x_arcsec``/``y_arcsec`` are the flattened supersampled evaluation coordinates (lenstronomy's
    RegularGrid order), ``bin(flux)`` averages them back to a (num_pix, num_pix) image.
    """

    def __init__(self, num_pix: int, pixel_scale_arcsec: float, supersampling_factor: int = 1):
        self.num_pix = int(num_pix)
        self.pixel_scale_arcsec = float(pixel_scale_arcsec)
        self.supersampling_factor = int(supersampling_factor)
        try:
            from lenstronomy.Data.imaging_data import ImageData
            from lenstronomy.ImSim.Numerics.grid import RegularGrid
            from lenstronomy.Util.simulation_util import data_configure_simple
        except ImportError:  # the GPU machine's bare image: the torch renderer needs only the numbers
            self.kwargs_data = None
            self.x_arcsec, self.y_arcsec, self.x_pix_arcsec, self.y_pix_arcsec = numpy_grid(
                self.num_pix, self.pixel_scale_arcsec, self.supersampling_factor
            )
        else:
            # kwargs for lenstronomy's ImageData (also used by the naive baseline in bench/simulate.py)
            self.kwargs_data = data_configure_simple(
                num_pix=self.num_pix, delta_pix=self.pixel_scale_arcsec, exposure_time=None, background_rms=None
            )
            data = ImageData(**self.kwargs_data)
            grid = RegularGrid(
                self.num_pix,
                self.num_pix,
                data.transform_pix2angle,
                *data.radec_at_xy_0,
                supersampling_factor=self.supersampling_factor,
            )
            x, y = grid.coordinates_evaluate
            self.x_arcsec = np.ascontiguousarray(x, dtype=np.float64)
            self.y_arcsec = np.ascontiguousarray(y, dtype=np.float64)
            # detector-pixel centres (no supersampling), as 2-D images
            self.x_pix_arcsec, self.y_pix_arcsec = data.pixel_coordinates
        self.pixel_area_arcsec2 = self.pixel_scale_arcsec**2

    @classmethod
    def from_config(cls, instrument: InstrumentConfig) -> DetectorGrid:
        return cls(instrument.num_pix, instrument.pixel_scale_arcsec, instrument.supersampling_factor)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_pix, self.num_pix)

    def bin(self, flux: np.ndarray) -> np.ndarray:
        """Supersampled surface brightness (1-D, grid order) -> mean per detector pixel (N, N)."""
        s, n = self.supersampling_factor, self.num_pix
        img = np.asarray(flux, dtype=np.float64).reshape(n * s, n * s)
        if s == 1:
            return img.copy()
        return img.reshape(n, s, n, s).mean(axis=(1, 3))

    def spread(self, flux: np.ndarray) -> np.ndarray:
        """Max minus min of each detector pixel's sub-samples (N, N): where the pixel average is unsure."""
        s, n = self.supersampling_factor, self.num_pix
        img = np.asarray(flux, dtype=np.float64).reshape(n, s, n, s)
        return img.max(axis=(1, 3)) - img.min(axis=(1, 3))

    def subpixel_points(self, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
        """factor x factor evaluation points (arcsec, flattened, pixel by pixel) in each pixel of ``mask``."""
        off = ((np.arange(factor) + 0.5) / factor - 0.5) * self.pixel_scale_arcsec
        ox, oy = (a.ravel() for a in np.meshgrid(off, off))
        x = self.x_pix_arcsec[mask][:, None] + ox[None, :]
        y = self.y_pix_arcsec[mask][:, None] + oy[None, :]
        return x.ravel(), y.ravel()

    def bin_adaptive(self, sb: np.ndarray, evaluate, factor: int, threshold: float) -> np.ndarray:
        """Binned image of supersampled surface brightness ``sb``, refined where the pixel average is unsure.

        With ``factor`` F > 0, pixels whose sub-samples spread by more than ``threshold`` x the image peak
        are re-averaged over F x F points, ``evaluate(mask)`` giving the surface brightness at the points
        ``subpixel_points(mask, F)`` (a callable, not the points, so a caller can reuse ray-shot positions).
        Compact or cuspy light (magnified compact sources, core-Sersic cusps, n ~ 5 lens light) converges
        slowly with a uniform factor, and few pixels hold it (bench/numerics.py).
        With ``supersampling_factor`` 1 there is no spread to see, so nothing is refined.
        """
        image = self.bin(sb)
        if factor <= 0 or self.supersampling_factor < 2 or not image.max() > 0:
            return image
        mask = self.spread(sb) > threshold * image.max()
        if mask.any():
            image[mask] = np.asarray(evaluate(mask), dtype=np.float64).reshape(-1, factor * factor).mean(axis=1)
        return image
