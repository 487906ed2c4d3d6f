"""Learning-rate schedule: linear warm-up, optional plateau, exponential decay to a floor.

The formula is the original residual-U-Net toolbox's, so existing configs train the same.
"""

from __future__ import annotations

from res_unet.config import Config


def learning_rate(epoch: int, cfg: Config) -> float:
    """Learning rate at 0-based ``epoch`` from START_LR, MAX_LR, MIN_LR, RAMPUP_EPOCHS (R),
    SUSTAIN_EPOCHS (S) and EXP_DECAY (D).

    epoch < R: linear from START_LR (epoch 0) towards MAX_LR; R <= epoch < R + S: MAX_LR;
    later: (MAX_LR - MIN_LR) * D ** (epoch - R - S) + MIN_LR. With R = 0, epoch 0 is MAX_LR.
    """
    ramp, sustain = cfg.RAMPUP_EPOCHS, cfg.SUSTAIN_EPOCHS
    if epoch < ramp:
        return (cfg.MAX_LR - cfg.START_LR) / ramp * epoch + cfg.START_LR
    if epoch < ramp + sustain:
        return cfg.MAX_LR
    return (cfg.MAX_LR - cfg.MIN_LR) * cfg.EXP_DECAY ** (epoch - ramp - sustain) + cfg.MIN_LR


def lr_curve(cfg: Config, n_epochs: int) -> list[float]:
    """Learning rates of epochs 0..n_epochs-1, for plotting."""
    return [learning_rate(epoch, cfg) for epoch in range(n_epochs)]
