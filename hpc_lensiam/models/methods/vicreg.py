"""VICReg (Bardes, Ponce & LeCun, "Variance-Invariance-Covariance Regularization", ICLR 2022).

No predictor, no momentum encoder, no negatives: the expander's outputs ``Z, Z'`` (n x d) of the two
views are pulled together and kept informative by two regularisers (paper, eqs. 1-6)::

    s(Z, Z') = 1/n sum_i ||z_i - z'_i||^2 / d          (invariance; the mean squared error)
    v(Z)     = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + 1e-4))   (variance hinge, per dimension)
    c(Z)     = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = (Z - mean)^T (Z - mean) / (n - 1)
    loss     = lambda s + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')],  lambda = mu = 25, nu = 1

(the official code halves the variance term, ``mu/2 [v(Z) + v(Z')]``; this follows the paper).
With several ranks the variance and covariance are taken over the global batch (embeddings
gathered with gradients, as the official ``FullGatherLayer``); the invariance term is local,
which averages to the global one.

Recipe: LARS, lr = 0.2 x batch/256, weight decay 1e-6, expander 8192-8192-8192
(``--proj-hidden-dim``/``--proj-dim``; tests use small widths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.errors import ConfigError
from .base import SSLMethod, gather_with_grad, mlp


@dataclass(frozen=True)
class VICRegParams:
    """VICReg's own hyperparameters (``method_params:``): the paper's loss weights lambda, mu, nu."""

    sim_coeff: float = 25.0  # invariance
    std_coeff: float = 25.0  # variance
    cov_coeff: float = 1.0  # covariance

    def validate(self, where: str) -> None:
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = (zc.T @ zc) / (n - 1)
    return _off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = VICRegParams.sim_coeff,
    std_coeff: float = VICRegParams.std_coeff,
    cov_coeff: float = VICRegParams.cov_coeff,
) -> torch.Tensor:
    """The paper's loss on local embeddings; variance and covariance over the global batch."""
    z1, z2 = z1.float(), z2.float()
    inv = F.mse_loss(z1, z2)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    var = variance_term(g1) + variance_term(g2)
    cov = covariance_term(g1) + covariance_term(g2)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


class VICReg(SSLMethod):
    name = "vicreg"
    paper = "Bardes, Ponce & LeCun 2022, VICReg (ICLR)"
    recipe = dict(
        optimizer="lars",
        base_lr=0.2,
        weight_decay=1e-6,
        proj_hidden_dim=8192,
        proj_dim=8192,
    )
    Params = VICRegParams

    def __init__(
        self,
        arch: str,
        proj_hidden_dim: int,
        proj_dim: int,
        params: VICRegParams = VICRegParams(),
        zero_init_residual: bool = True,
        img_size: int | None = None,
    ):
        super().__init__(arch, zero_init_residual, img_size)
        self.set_projector(mlp([self.feature_dim, proj_hidden_dim, proj_hidden_dim, proj_dim]))
        self.coeffs = (params.sim_coeff, params.std_coeff, params.cov_coeff)

    @classmethod
    def from_config(cls, cfg, img_size):
        return cls(
            cfg.arch,
            cfg.proj_hidden_dim or cfg.proj_dim,
            cfg.proj_dim,
            cls.params_of(cfg),
            cfg.zero_init_residual,
            img_size,
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        return self.encoder(x1), self.encoder(x2)

    def loss(self, z1, z2):
        return vicreg_loss(z1, z2, *self.coeffs), z1.detach()
