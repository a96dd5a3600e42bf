"""TorchLensSimulator: ``LensSimulator``'s physics, batched over systems in torch, on any device.

Why: the lenstronomy path renders ~80 pairs/s per CPU core, while a GPU trainer consumes thousands
per second; rendering on the training device lets every step see fresh pairs (``train --data
online``) and makes ``simulate --renderer torch`` fast on a GPU.

Same physics, step for step (each step names the numpy code it mirrors; the tests compare images):

1. the supersampled detector grid of ``DetectorGrid.from_config`` (same coordinates, same factor);
2. EPL + SHEAR ray shooting (``EPLShearRayShooter``), the EPL series summed to a stated relative
   tolerance at the prior's most elliptical, steepest corner (``epl_series_terms``);
3. source light at the source-plane positions: SERSIC_ELLIPSE, CORE_SERSIC, COSMOS stamps through
   a bilinear stamp bank (``SourceRenderer``), merger partners and lists of sources summed;
4. mean over each pixel's sub-pixels (``DetectorGrid.bin``);
5. Sersic lens light, amplitude from ``amp`` or ``peak_ratio`` x the source's binned peak;
6. PSF by FFT with the same bank and the same zero boundary (``PSFBank.convolve``);
7. Gaussian noise of ``noise_sigma`` x the noiseless peak, then division by the maximum.

A LenSiam pair ray-shoots its mass once; both views evaluate their own source on those positions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ..core.errors import UserError
from ..shards.manifest import LENS_PARAMS
from . import torch_priors as tp
from .config import SimulationConfig
from .instrument import (
    ADAPTIVE_CENTRE_RADIUS_PIX,
    ADAPTIVE_NEIGHBOUR_FACTOR,
    ADAPTIVE_NEIGHBOUR_THRESHOLD,
    DetectorGrid,
)
from .psf import PSFBank
from .simulator import check_lens
from .torch_physics import (
    PSFStack,
    StampBank,
    core_sersic,
    ellipticity_f,
    epl_series_terms,
    epl_shear_deflection,
    sersic_elliptic,
)

# relative accuracy of the EPL angular series: the numpy path's own (EPLShearRayShooter.series_tol)
# in float64; in float32 a deflection error of 1e-7 x alpha is at the level of float32 rounding
SERIES_TOL = {torch.float64: 1e-10, torch.float32: 1e-7}
_LENS_DEFAULTS = {"gamma": 2.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0, "gamma1": 0.0, "gamma2": 0.0}
# per kind: the profile's parameters and the defaults sources._pick gives the optional ones
_PROFILE_KEYS = {
    tp.SERSIC: ("amp", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y"),
    tp.CORE_SERSIC: ("amp", "R_sersic", "Rb", "n_sersic", "gamma", "alpha", "e1", "e2", "center_x", "center_y"),
    tp.COSMOS: ("stamp", "amp", "center_x", "center_y", "phi_G", "scale"),
}
_OPTIONAL = {
    "center_x": 0.0,
    "center_y": 0.0,
    "e1": 0.0,
    "e2": 0.0,
    "amp": 1.0,
    "alpha": 3.0,
    "gamma": 0.0,
    "phi_G": 0.0,
}
_RECORD_KEYS = {  # what params.json stores per source kind (the numpy sampler's dicts)
    tp.CORE_SERSIC: ("R_sersic", "n_sersic", "e1", "e2", "Rb", "gamma", "alpha", "center_x", "center_y", "amp"),
    tp.SERSIC: ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y", "amp"),
    tp.COSMOS: ("center_x", "center_y", "phi_G", "scale", "amp"),
}
LENS_LIGHT_RECORD_KEYS = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y", "peak_ratio", "amp")


def _take(tree, index):
    """The systems ``index`` (a slice or index tensor) of a nested dict/list of (B,) tensors."""
    if isinstance(tree, dict):
        return {k: _take(v, index) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_take(v, index) for v in tree]
    return tree[index]


def _cat(trees):
    """Concatenate nested dicts/lists of (b,) tensors along the batch (inverse of :func:`_take`)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _cat([t[k] for t in trees]) for k in first}
    if isinstance(first, list):
        return [_cat([t[i] for t in trees]) for i in range(len(first))]
    return torch.cat(trees)


def torch_generator(rng: np.random.Generator, device) -> torch.Generator:
    """A torch Generator on ``device`` seeded from a numpy Generator (shards keep numpy seeding)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(rng.integers(2**62)))
    return g


def resolve_device(device, flag: str = "device") -> torch.device:
    """A usable torch device or a UserError naming ``flag`` (checked before any work)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{flag}: {device!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: CUDA is not available on this machine (use cpu)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


class TorchLensSimulator:
    """Batched twin of :class:`~hpc_lensiam.simulate.simulator.LensSimulator` on ``device``.

    ``render`` takes a chosen batch of systems; ``sample_pairs`` / ``sample_singles`` draw from the
    config priors. ``series_tol`` (default by dtype, :data:`SERIES_TOL`) sets the EPL series' relative
    accuracy; ``chunk_systems`` bounds how many systems are ray-traced at once (memory: about
    12 x chunk x (num_pix x supersampling)^2 x dtype bytes); ``max_stamps`` caps the COSMOS bank
    (default: every stamp that passes the paper's cuts); ``compile`` runs the ray shooting and the
    Sersic profiles through ``torch.compile`` (worth it for long runs: the first batches pay it).
    """

    def __init__(
        self,
        config: SimulationConfig | None = None,
        device="cpu",
        dtype=torch.float32,
        series_tol: float | None = None,
        chunk_systems: int = 512,
        max_stamps: int | None = None,
        compile: bool = False,
    ):
        from .sources import CosmosCatalog

        self.config = config if config is not None else SimulationConfig()
        self.device, self.dtype = resolve_device(device), dtype
        self.grid = DetectorGrid.from_config(self.config.instrument)
        self.num_pix, self.supersampling = self.grid.num_pix, self.grid.supersampling_factor
        self.x = torch.as_tensor(self.grid.x_arcsec, dtype=dtype, device=self.device)
        self.y = torch.as_tensor(self.grid.y_arcsec, dtype=dtype, device=self.device)
        self.x_pix = torch.as_tensor(self.grid.x_pix_arcsec, dtype=dtype, device=self.device)
        self.y_pix = torch.as_tensor(self.grid.y_pix_arcsec, dtype=dtype, device=self.device)
        inst = self.config.instrument
        self.adaptive_factor, self.adaptive_threshold = inst.adaptive_supersampling_factor, inst.adaptive_threshold
        if self.adaptive_factor > 0:  # DetectorGrid.subpixel_points' offsets, F x F per pixel (and for neighbours)
            self.sub_ox, self.sub_oy = self._offsets(self.adaptive_factor)
            self.sub_light = self._offsets(ADAPTIVE_NEIGHBOUR_FACTOR)
        self.psf_bank = PSFBank.from_config(self.config)
        self.psf = PSFStack(self.psf_bank.kernels, self.grid.shape, self.device, dtype)
        self.series_tol = float(series_tol) if series_tol is not None else SERIES_TOL.get(dtype, 1e-7)
        self.chunk_systems = int(chunk_systems)
        # torch.compile fuses the series loop into one kernel (measured ~18x faster on a CPU, after
        # a one-off compile of minutes); shapes are static: one compile per chunk size
        self._deflection = torch.compile(epl_shear_deflection, dynamic=False) if compile else epl_shear_deflection
        # the adaptive-supersampling points vary in number from batch to batch: a shape-generic compile
        self._deflection_points = torch.compile(epl_shear_deflection, dynamic=True) if compile else epl_shear_deflection
        self._sersic = torch.compile(sersic_elliptic) if compile else sersic_elliptic  # light: fused too
        self._core_sersic = torch.compile(core_sersic) if compile else core_sersic
        self.catalog, self.stamps, self._bank_of_row = None, None, {}
        if self.config.cosmos_dir:
            sp = self.config.source
            self.catalog = CosmosCatalog(
                self.config.cosmos_dir,
                min_size_pix=sp.cosmos_min_size_pix,
                max_noise_frac=sp.cosmos_max_noise_frac,
                clean_k_sigma=sp.cosmos_clean_k_sigma,
            )
            rows = self.catalog.accepted()[:max_stamps]
            self.stamps = StampBank(
                [self.catalog.stamp(r).image for r in rows],
                [self.catalog.pixel_scale[r] for r in rows],
                self.device,
                dtype,
            )
            self.stamp_rows = rows
            self._bank_of_row = {r: i for i, r in enumerate(rows)}
        else:
            warnings.warn(
                "no cosmos_dir given: simulating analytic core-Sersic sources only "
                "(set cosmos_dir to a GalSim COSMOS real-galaxy catalog for the paper's mix)",
                UserWarning,
                stacklevel=2,
            )
        lp = self.config.lens
        f_max = math.hypot(max(abs(v) for v in lp.e1), max(abs(v) for v in lp.e2))
        self.prior_series_terms = self.series_terms(f_max, lp.gamma)

    def series_terms(self, f_max: float, gamma_range) -> int:
        """EPL series terms for ellipticity modulus <= f_max and slopes in gamma_range (rounded outward
        to a 1e-3 grid in f and 1e-2 in gamma: never fewer terms, and few distinct cached tables)."""
        f = min(math.ceil(float(f_max) * 1e3 - 1e-9) / 1e3, 0.9999)
        t_lo = math.floor(float(gamma_range[0]) * 100 + 1e-9) / 100 - 1
        t_hi = math.ceil(float(gamma_range[1]) * 100 - 1e-9) / 100 - 1
        return epl_series_terms(f, (t_lo, t_hi), self.series_tol)

    # ------------------------------------------------------------------------------ building blocks
    def batch_series_terms(self, lens: dict) -> int:
        """Series terms for a chosen batch: enough for its own largest |e| and slope (one sync)."""
        f_max = float(ellipticity_f(lens["e1"], lens["e2"]).max())
        return self.series_terms(f_max, (float(lens["gamma"].min()), float(lens["gamma"].max())))

    def ray_shoot(self, lens: dict, n_terms: int | None = None, x=None, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Source-plane (beta_x, beta_y), arcsec, of the supersampled grid (B, P), or of points ``x, y``
        (B, Q) with one row per system (their number varies: compiled shape-generic)."""
        p = {k: lens[k][:, None] for k in LENS_PARAMS}
        n_terms = self.batch_series_terms(lens) if n_terms is None else n_terms
        if x is None:
            ax, ay = self._deflection(self.x, self.y, n_terms=n_terms, **p)
            return self.x - ax, self.y - ay
        ax, ay = self._deflection_points(x, y, n_terms=n_terms, **p)
        return x - ax, y - ay

    def adaptive(self, sb: torch.Tensor, evaluate, cx=None, cy=None) -> torch.Tensor:
        """``LensSimulator._adaptive``, batched: the binned image of ``sb`` (B, P), with every pixel
        whose sub-samples spread by more than ``adaptive_threshold`` x its image's peak re-averaged
        over F x F points, and with them their 8 neighbours whose spread exceeds ADAPTIVE_NEIGHBOUR_THRESHOLD
        x the peak (at F x F points where they are a peak, ridge or valley of the binned image, else at
        ADAPTIVE_NEIGHBOUR_FACTOR) and the pixels within ADAPTIVE_CENTRE_RADIUS_PIX of the centre (cx, cy) (B,)
        when given; ``evaluate(x, y, rows)`` gives the surface brightness at (K, points) of the systems ``rows``."""
        image = self.bin(sb)
        if self.adaptive_factor <= 0 or self.supersampling < 2:
            return image
        n, s = self.num_pix, self.supersampling
        sub = sb.reshape(-1, n, s, n, s)
        spread = sub.amax(dim=(2, 4)) - sub.amin(dim=(2, 4))
        peak = image.amax(dim=(1, 2))[:, None, None]
        mask = spread > self.adaptive_threshold * peak
        grown = torch.nn.functional.max_pool2d(mask[:, None].to(image.dtype), 3, stride=1, padding=1)[:, 0] > 0
        near = grown & (spread > ADAPTIVE_NEIGHBOUR_THRESHOLD * peak) & ~mask
        ridge = near & self._line_extremum(image)
        mask |= ridge
        light = near & ~ridge
        if cx is not None:
            r = ADAPTIVE_CENTRE_RADIUS_PIX * self.grid.pixel_scale_arcsec
            d2 = (self.x_pix[None] - cx[:, None, None]) ** 2 + (self.y_pix[None] - cy[:, None, None]) ** 2
            mask |= d2 <= r * r
            light &= ~mask
        image = image.clone()
        for m, (ox, oy) in ((mask, (self.sub_ox, self.sub_oy)), (light, self.sub_light)):
            b, i, j = (m & (peak > 0)).nonzero(as_tuple=True)
            if b.numel() == 0:
                continue
            x = self.x_pix[i, j][:, None] + ox
            y = self.y_pix[i, j][:, None] + oy
            rows = max(1, self.chunk_systems * self.x.numel() // ox.numel())  # bounded memory
            vals = torch.cat(
                [
                    evaluate(x[k : k + rows], y[k : k + rows], b[k : k + rows]).mean(dim=1)
                    for k in range(0, b.numel(), rows)
                ]
            )
            image[b, i, j] = vals
        return image

    def _offsets(self, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        off = ((torch.arange(factor, dtype=self.dtype) + 0.5) / factor - 0.5) * self.grid.pixel_scale_arcsec
        oy, ox = torch.meshgrid(off, off, indexing="ij")
        return ox.reshape(-1).to(self.device), oy.reshape(-1).to(self.device)

    @staticmethod
    def _line_extremum(image: torch.Tensor) -> torch.Tensor:
        """``instrument.line_extremum`` of each (num_pix, num_pix) image of the batch (B, N, N)."""
        pad = torch.nn.functional.pad(image[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        n, m = image.shape[1:]

        def at(di: int, dj: int) -> torch.Tensor:
            return pad[:, 1 + di : 1 + di + n, 1 + dj : 1 + dj + m]

        out = torch.zeros_like(image, dtype=torch.bool)
        for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
            a, b = at(di, dj), at(-di, -dj)
            out |= ((image > a) & (image > b)) | ((image < a) & (image < b))
        return out

    def bin(self, flux: torch.Tensor) -> torch.Tensor:
        """(B, P) supersampled surface brightness -> (B, num_pix, num_pix) pixel means."""
        n, s = self.num_pix, self.supersampling
        return flux.reshape(-1, n, s, n, s).mean(dim=(2, 4))

    def source_light(self, bx, by, components: list) -> torch.Tensor:
        """Summed surface brightness (B, P) of the component batches (mixed kinds per system)."""
        out = torch.zeros_like(bx)
        for comp in components:
            kind = comp["kind"]
            for code in (tp.SERSIC, tp.CORE_SERSIC, tp.COSMOS):
                sel = kind == code
                if not bool(sel.any()):
                    continue
                every = bool(sel.all())
                idx = slice(None) if every else sel.nonzero().squeeze(1)
                args = {k: (comp[k][idx] if k == "stamp" else comp[k][idx][:, None]) for k in _PROFILE_KEYS[code]}
                if code == tp.SERSIC:
                    val = self._sersic(bx[idx], by[idx], **args)
                elif code == tp.CORE_SERSIC:
                    val = self._core_sersic(bx[idx], by[idx], **args)
                else:
                    val = self.stamps(bx[idx], by[idx], index=args.pop("stamp"), **args)
                if every:
                    out = out + val
                else:
                    out = out.index_add(0, idx, val)
        return out

    def lens_light_unit(self, ll: dict) -> torch.Tensor:
        """Lens light with amp = 1 on the image-plane grid, binned (adaptively): (B, num_pix, num_pix)."""
        keys = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")
        p = {k: ll[k][:, None] for k in keys}
        one = torch.ones_like(p["R_sersic"])

        def evaluate(x, y, rows):
            q = {k: ll[k][rows][:, None] for k in keys}
            return self._sersic(x, y, torch.ones_like(q["R_sersic"]), **q)

        return self.adaptive(self._sersic(self.x, self.y, one, **p), evaluate, ll["center_x"], ll["center_y"])

    def source_image(self, bx, by, components: list, lens: dict | None, n_terms: int | None) -> torch.Tensor:
        """Lensed source, binned (adaptively when the ``lens`` is given, as ``LensSimulator``)."""
        sb = self.source_light(bx, by, components)
        if lens is None:
            return self.bin(sb)

        def evaluate(x, y, rows):
            sx, sy = self.ray_shoot(_take(lens, rows), n_terms, x, y)
            return self.source_light(sx, sy, _take(components, rows))

        return self.adaptive(sb, evaluate, lens["center_x"], lens["center_y"])

    def compose(
        self,
        bx,
        by,
        components: list,
        lens_light: dict | None,
        psf_id,
        noise_sigma,
        generator: torch.Generator | None,
        lens: dict | None = None,
        n_terms: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, num_pix, num_pix) normalised to max 1, and the lens-light amps used."""
        image = self.source_image(bx, by, components, lens, n_terms)
        amp = None
        if lens_light is not None:
            unit = self.lens_light_unit(lens_light)
            if lens_light.get("amp") is not None:
                amp = lens_light["amp"]
            else:
                src_peak, ll_peak = image.amax(dim=(1, 2)), unit.amax(dim=(1, 2))
                ratio = lens_light["peak_ratio"]
                ok = (src_peak > 0) & (ll_peak > 0)
                amp = torch.where(ok, ratio * src_peak / torch.where(ok, ll_peak, 1.0), ratio)
            image = image + amp[:, None, None] * unit
        if psf_id is not None:
            image = self.psf.convolve(image, psf_id)
        peak = image.amax(dim=(1, 2))
        if noise_sigma is not None and bool((noise_sigma > 0).any()):
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
            image = image + noise * (noise_sigma * peak)[:, None, None]
        top = image.amax(dim=(1, 2))
        bad = ~(torch.isfinite(top) & (top > 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise UserError(f"render: image {i} of the batch has no positive flux (is the source inside the field?)")
        return image / top[:, None, None], amp

    # ----------------------------------------------------------------------------- chosen systems
    def render(
        self,
        lens: dict,
        source,
        lens_light: dict | None = None,
        psf=None,
        noise_sigma=0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Render a chosen batch of systems: (B, num_pix, num_pix) on ``device``, max 1 per image.

        The arguments of ``LensSimulator.render``, each parameter a float or a (B,) tensor: lens (the
        8 names of ``LENS_PARAMS``, theta_E required), source (a dict with ``kind`` "sersic" |
        "core_sersic" | "cosmos" and that profile's kwargs, a cosmos source by "id" (IDENT), "row"
        or bank index "stamp"; an optional merger "second"; or a list of such dicts, summed),
        lens_light (SERSIC_ELLIPSE kwargs with "amp" or "peak_ratio"), psf (None, a PSF-bank index or
        a (B,) index tensor), noise_sigma (fraction of the noiseless peak; needs ``generator``).
        """
        check_lens(lens)
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        for s in sources:
            if not isinstance(s, dict):
                raise UserError(f"source: expected a dict with a 'kind' key, got {type(s).__name__}")
        values = (
            [lens, lens_light or {}, {"psf": psf, "noise_sigma": noise_sigma}]
            + sources
            + [s["second"] for s in sources if s.get("merger") and s.get("second") is not None]
        )
        batch = max(
            [1]
            + [
                torch.as_tensor(v).numel()
                for d in values
                for v in d.values()
                if isinstance(v, (torch.Tensor, np.ndarray, list, tuple))
            ]
        )
        vec = self._batched(batch)
        full = {k: vec(v, f"lens.{k}") for k, v in {**_LENS_DEFAULTS, **lens}.items()}
        components = []
        for s in sources:
            components.append(self._component(s, vec))
            if s.get("merger") and s.get("second") is not None:
                components.append(self._component(s["second"], vec))
        ll = None
        if lens_light is not None:
            missing = [k for k in ("R_sersic", "n_sersic") if k not in lens_light]
            if missing:
                raise UserError(f"lens_light: missing key {missing[0]!r} (SERSIC_ELLIPSE kwargs)")
            if lens_light.get("amp") is None and lens_light.get("peak_ratio") is None:
                raise UserError("lens_light: expected an 'amp' or a 'peak_ratio' key")
            given = {"e1": 0.0, "e2": 0.0, "center_x": full["center_x"], "center_y": full["center_y"], **lens_light}
            ll = {k: vec(v, f"lens_light.{k}") for k, v in given.items() if v is not None}
        psf_id = None
        if psf is not None:
            psf_id = torch.as_tensor(psf, device=self.device)
            if psf_id.dtype.is_floating_point or psf_id.dim() > 1:
                raise UserError(
                    "psf: expected a PSF-bank index or a (B,) tensor of indices "
                    "(the torch renderer convolves with its PSF bank only)"
                )
            psf_id = psf_id.long().expand(batch) if psf_id.dim() == 0 else psf_id.long()
            if bool(((psf_id < 0) | (psf_id >= len(self.psf))).any()):
                raise UserError(f"psf: index out of range (the bank has {len(self.psf)} PSFs)")
        sigma = vec(noise_sigma, "noise_sigma")
        if bool((sigma > 0).any()) and generator is None:
            raise UserError("noise_sigma > 0 needs a generator (torch.Generator) for the noise draw")
        n_terms = self.batch_series_terms(full)
        bx, by = self.ray_shoot(full, n_terms)
        img, _ = self.compose(bx, by, components, ll, psf_id, sigma, generator, full, n_terms)
        return img

    def _batched(self, batch: int):
        def vec(value, where: str) -> torch.Tensor:
            t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
            if t.dim() == 0:
                return t.expand(batch)
            if t.shape != (batch,):
                raise UserError(f"{where}: expected a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
            return t

        return vec

    def _component(self, src: dict, vec) -> dict:
        """A user source dict -> a component batch (``kind`` codes + the profile's parameters)."""
        kind = src.get("kind")
        if kind not in tp.KIND_CODES:
            raise UserError(f"source.kind: unknown source kind {kind!r} (expected one of: {', '.join(tp.KIND_CODES)})")
        code = tp.KIND_CODES[kind]
        src = dict(src)
        if code == tp.COSMOS:
            src["stamp"] = self._stamp_index(src, vec)
            if "scale" not in src:
                src["scale"] = self.stamps.pixel_scales_arcsec[src["stamp"]]
            if "amp" not in src:
                src["amp"] = 1.0 / vec(src["scale"], "source.scale") ** 2
        out = {}
        for k in _PROFILE_KEYS[code]:
            if k == "stamp":
                out[k] = src[k]
            elif k in src:
                out[k] = vec(src[k], f"source.{k}")
            elif k in _OPTIONAL:
                out[k] = vec(_OPTIONAL[k], k)
            else:
                raise UserError(f"source: {kind} source needs key {k!r} (lenstronomy {kind.upper()} kwargs)")
        out["kind"] = torch.full_like(out["amp"], code, dtype=torch.long)
        return out

    def _stamp_index(self, src: dict, vec) -> torch.Tensor:
        if self.stamps is None:
            raise UserError("source.kind 'cosmos' needs cosmos_dir in the config (the torch renderer's stamp bank)")
        n = vec(0.0, "source").numel()
        if "stamp" in src:
            idx = torch.as_tensor(src["stamp"], device=self.device).long()
        else:
            if "row" in src:
                rows = np.atleast_1d(np.asarray(torch.as_tensor(src["row"]).cpu())).astype(int)
            elif "id" in src:
                rows = [self.catalog.row_of(i) for i in np.atleast_1d(np.asarray(torch.as_tensor(src["id"]).cpu()))]
            else:
                raise UserError("source: a 'cosmos' source needs an 'id' (IDENT), a 'row' or a bank 'stamp'")
            missing = [r for r in rows if r not in self._bank_of_row]
            if missing:
                raise UserError(
                    f"source: COSMOS row {missing[0]} is not in the stamp bank (it fails the "
                    f"paper's cuts or is beyond max_stamps)"
                )
            idx = torch.as_tensor([self._bank_of_row[int(r)] for r in rows], device=self.device)
        idx = idx.expand(n) if idx.numel() == 1 else idx
        if idx.shape != (n,) or bool(((idx < 0) | (idx >= len(self.stamps))).any()):
            raise UserError(f"source.stamp: expected bank indices in [0, {len(self.stamps)}), one or {n}")
        return idx

    # ----------------------------------------------------------------------------- random samples
    def _like(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=self.dtype, device=self.device)

    def draw_params(self, batch_size: int, generator: torch.Generator, n_views: int) -> dict:
        """Prior draws for ``batch_size`` systems: {"lens": ..., "views": [...]} of (B,) tensors."""
        cfg, like = self.config, self._like(batch_size)
        lens = tp.draw_lens(generator, cfg.lens, batch_size, like)
        views = [tp.draw_view_nuisance(generator, cfg, lens, self.stamps, len(self.psf)) for _ in range(n_views)]
        return {"lens": lens, "views": views}

    def _sample(self, batch_size: int, generator: torch.Generator, n_views: int):
        params = self.draw_params(batch_size, generator, n_views)
        images = [[] for _ in range(n_views)]
        amps = [[] for _ in range(n_views)]
        for start in range(0, batch_size, self.chunk_systems):
            part = _take(params, slice(start, start + self.chunk_systems))
            bx, by = self.ray_shoot(part["lens"], self.prior_series_terms)  # once for every view
            for v, view in enumerate(part["views"]):
                img, amp = self.compose(
                    bx,
                    by,
                    view["source"],
                    view["lens_light"],
                    view["psf_id"],
                    view["noise_sigma"],
                    generator,
                    part["lens"],
                    self.prior_series_terms,
                )
                images[v].append(img)
                amps[v].append(amp)
        for v, view in enumerate(params["views"]):
            view["lens_light"]["amp"] = torch.cat(amps[v])
        return [torch.cat(i) for i in images], params

    @torch.no_grad()
    def sample_pairs(self, batch_size: int, generator: torch.Generator) -> dict:
        """LenSiam pairs: {"view1", "view2": (B, num_pix, num_pix), "params"}; one mass per pair."""
        (v1, v2), params = self._sample(batch_size, generator, 2)
        return {"view1": v1, "view2": v2, "params": params}

    @torch.no_grad()
    def sample_singles(self, batch_size: int, generator: torch.Generator) -> dict:
        """Single images: {"image": (B, num_pix, num_pix), "params"} (one view)."""
        (img,), params = self._sample(batch_size, generator, 1)
        return {"image": img, "params": params}

    # ------------------------------------------------------------------------- records and shards
    def records(self, params: dict) -> list[dict]:
        """Batched params -> one params.json dict per system, in the numpy sampler's format."""
        host = _to_host(params)
        out = []
        for b in range(len(host["lens"]["theta_E"])):
            views = []
            for view in host["views"]:
                first, second = view["source"]
                src = self._source_record(first, b)
                src["merger"] = bool(first["merger"][b])
                if src["merger"]:
                    src["second"] = self._source_record(second, b)
                    src["second"]["flux_ratio"] = float(second["flux_ratio"][b])
                pid = int(view["psf_id"][b])
                views.append(
                    {
                        "lens_light": {k: float(view["lens_light"][k][b]) for k in LENS_LIGHT_RECORD_KEYS},
                        "source": src,
                        "psf_id": pid,
                        "noise_sigma": float(view["noise_sigma"][b]),
                        "psf_name": self.psf_bank.names[pid],
                    }
                )
            out.append({"lens": {k: float(host["lens"][k][b]) for k in LENS_PARAMS}, "views": views})
        return out

    def _source_record(self, comp: dict, b: int) -> dict:
        code = int(comp["kind"][b])
        rec = {"kind": tp.KIND_NAMES[code], **{k: float(comp[k][b]) for k in _RECORD_KEYS[code]}}
        if code == tp.COSMOS:
            row = self.stamp_rows[int(comp["stamp"][b])]
            rec["row"], rec["id"] = int(row), int(self.catalog.ident[row])
        return rec

    def iter_samples(self, mode: str, rng: np.random.Generator, num: int):
        """``num`` samples for a shard, as ``LensSimulator.sample_pair/single`` dicts (numpy images),
        rendered ``chunk_systems`` at a time from a generator seeded by ``rng``."""
        g = torch_generator(rng, self.device)
        for start in range(0, num, self.chunk_systems):
            n = min(self.chunk_systems, num - start)
            if mode == "lensiam":
                out = self.sample_pairs(n, g)
                names = ("view1", "view2")
            else:
                out = self.sample_singles(n, g)
                names = ("image",)
            arrays = {k: out[k].to(torch.float32).cpu().numpy() for k in names}
            for j, rec in enumerate(self.records(out["params"])):
                yield {**{k: arrays[k][j] for k in names}, "params": rec}


def _to_host(tree):
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_host(v) for v in tree]
    return tree.detach().cpu().numpy()
