"""The survey family (``simulate --family survey``): an independent, survey-realistic generative model
with lenses and non-lenses, for evaluation and the lens-finding task. See docs/survey.md."""

from .config import FAMILY, SurveySimulationConfig, default_lens_fraction, survey_config

__all__ = ["FAMILY", "SurveySimulationConfig", "default_lens_fraction", "survey_config"]
