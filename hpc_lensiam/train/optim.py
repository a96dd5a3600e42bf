"""Optimizers of the method recipes: SGD (SimSiam), LARS (BYOL, SimCLR, VICReg), AdamW (ViTs).

``build_optimizer(cfg, groups)`` takes the method's parameter groups (``{"params", "lr",
"fix_lr"}``) and, for LARS and AdamW, splits each into weights and 1-D parameters (biases, norm
scales): the latter get no weight decay and, under LARS, no trust-ratio adaptation, as in the
BYOL, SimCLR and VICReg papers and in MoCo v3/timm for ViTs. SGD keeps SimSiam's reference
behaviour (weight decay on every parameter).
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017), as the SSL papers use it.

    Per parameter: ``g <- g + wd w``; ``g <- g * eta |w| / |g|`` (when both norms are > 0);
    ``m <- momentum m + g``; ``w <- w - lr m``. Groups with ``lars_exclude`` skip the weight decay
    and the trust ratio (plain momentum SGD), as the papers do for biases and BatchNorm.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not g["lars_exclude"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(dp)
                    q = torch.where((w_norm > 0) & (g_norm > 0), g["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def _split_1d(groups: list[dict], weight_decay: float, exclude_key: str | None) -> list[dict]:
    out = []
    for g in groups:
        weights = [p for p in g["params"] if p.ndim > 1]
        flat = [p for p in g["params"] if p.ndim <= 1]
        out.append({**g, "params": weights, "weight_decay": weight_decay})
        if flat:
            extra = {exclude_key: True} if exclude_key else {}
            out.append({**g, "params": flat, "weight_decay": 0.0, **extra})
    return [g for g in out if g["params"]]


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``groups`` with ``cfg.momentum``/``cfg.weight_decay``."""
    lr = groups[0]["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(
            _split_1d(groups, cfg.weight_decay, "lars_exclude"),
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(_split_1d(groups, cfg.weight_decay, None), lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected one of: {', '.join(OPTIMIZERS)})")
