"""The simulation families behind ``simulate --family``: their config resolution and simulator class.

"paper" is the LenSiam paper's generative model (simulator.py, config.SimulationConfig); "survey" is the
independent survey-realistic one with lenses and non-lenses (simulate/survey/). Both give the writer
the same interface (``sample_pair``, ``sample_single``, a dataclass config with ``preset`` and
``instrument``), so everything after the shards is family-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.config import merge
from ..core.errors import UserError
from .config import FAMILIES, SimulationConfig, simulation_config


def resolve_config(
    preset=None,
    config_path=None,
    cosmos_dir=None,
    psf_files=None,
    psf_pixel_scale_arcsec=None,
    overrides: dict | None = None,
) -> SimulationConfig:
    """The paper family's validated config: preset, then YAML, then flags, then ``overrides``."""
    cfg = simulation_config(
        preset=preset,
        config_path=config_path,
        cosmos_dir=cosmos_dir,
        psf_files=list(psf_files) if psf_files else None,
        psf_pixel_scale_arcsec=psf_pixel_scale_arcsec,
    )
    return merge(cfg, overrides, "overrides") if overrides else cfg


def resolve_family(
    family: str,
    mode: str,
    preset=None,
    config_path=None,
    cosmos_dir=None,
    psf_files=None,
    psf_pixel_scale_arcsec=None,
    overrides: dict | None = None,
    lens_fraction: float | None = None,
    match: dict | None = None,
) -> tuple[object, Callable]:
    """(validated config, simulator factory) of ``family``; bad flags are UserErrors, before any work.

    ``match``: the paper family with a real image's instrument (simulate/match.py): a dict of
    ``file`` (``--match``), ``num_pix``, ``correlated_noise_rho``, ``psf``; also taken for a matched
    preset (``hst-f140w``) with or without it."""
    if family not in FAMILIES:
        raise UserError(f"--family: {family!r} is not one of {', '.join(FAMILIES)}")
    from .match import PRESETS as MATCHED_PRESETS

    match = {k: v for k, v in (match or {}).items() if v is not None}
    if match or preset in MATCHED_PRESETS:
        if family != "paper":
            raise UserError(f"--match / --preset {preset}: the paper family only, not --family {family}")
        if lens_fraction is not None:
            raise UserError("--lens-fraction: only the survey family has non-lenses (add --family survey)")
        if match.get("file") is None and preset not in MATCHED_PRESETS:
            raise UserError("--num-pix / --correlated-noise / --match-psf: need --match FILE or --preset hst-f140w")
        if match.get("file") is not None and preset is not None:
            raise UserError(f"--match and --preset {preset}: give one instrument, not both")
        if psf_files or psf_pixel_scale_arcsec is not None:
            raise UserError("--psf: a matched instrument uses its own PSF (drop --psf, or --match-psf FILE)")
        from .match import MatchedSimulator, matched_config

        cfg = matched_config(
            match=match.get("file"),
            preset=preset,
            config_path=config_path,
            num_pix=match.get("num_pix"),
            correlated_noise_rho=match.get("correlated_noise_rho"),
            cosmos_dir=cosmos_dir,
            match_psf=match.get("psf"),
        )
        if overrides:
            cfg = merge(cfg, overrides, "overrides")
        return cfg, MatchedSimulator
    if family == "paper":
        if lens_fraction is not None:
            raise UserError("--lens-fraction: only the survey family has non-lenses (add --family survey)")
        from .simulator import LensSimulator

        return resolve_config(
            preset, config_path, cosmos_dir, psf_files, psf_pixel_scale_arcsec, overrides
        ), LensSimulator
    if lens_fraction is not None and not 0.0 <= lens_fraction <= 1.0:
        raise UserError(f"--lens-fraction: expected a fraction in [0, 1], got {lens_fraction}")
    from .survey import survey_config
    from .survey.simulator import SurveySimulator

    cfg = survey_config(
        preset=preset,
        config_path=config_path,
        mode=mode,
        lens_fraction=lens_fraction,
        cosmos_dir=cosmos_dir,
        psf_files=list(psf_files) if psf_files else None,
        psf_pixel_scale_arcsec=psf_pixel_scale_arcsec,
        **(overrides or {}),
    )
    return cfg, SurveySimulator
