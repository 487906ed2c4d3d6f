"""Learning-rate schedule: linear warm-up, optional plateau, exponential decay to a floor.

The formula is the original residual-U-Net toolbox's, so existing configs train the same. A
warm-up at least as long as the run (RAMPUP_EPOCHS >= MAX_EPOCHS, e.g. the default 10 with
a 2-epoch trial) is fitted into less than half of it (:func:`warmup_epochs`): the run
reaches MAX_LR instead of ending near START_LR having learnt nothing.
"""

from __future__ import annotations

from res_unet.config.keys import Config


def warmup_epochs(cfg: Config) -> int:
    """The warm-up epochs the schedule uses: RAMPUP_EPOCHS, or (MAX_EPOCHS - 1) // 2 when
    RAMPUP_EPOCHS would not end before the last epoch (so more than half the run trains at
    MAX_LR and after: a 1- or 2-epoch trial has no warm-up)."""
    if cfg.RAMPUP_EPOCHS >= cfg.MAX_EPOCHS:
        return (cfg.MAX_EPOCHS - 1) // 2
    return cfg.RAMPUP_EPOCHS


def warmup_note(cfg: Config) -> str | None:
    """The one line saying the warm-up was fitted into the run, or None when it was not."""
    ramp = warmup_epochs(cfg)
    if ramp == cfg.RAMPUP_EPOCHS:
        return None
    fitted = (f"warming up over {ramp} epoch{'s' * (ramp != 1)} instead, so the run reaches"
              if ramp else "no warm-up, the run starts at")
    return (f"note: RAMPUP_EPOCHS {cfg.RAMPUP_EPOCHS} does not end within MAX_EPOCHS "
            f"{cfg.MAX_EPOCHS}: {fitted} MAX_LR {cfg.MAX_LR:g} (set RAMPUP_EPOCHS below "
            "MAX_EPOCHS to choose)")


def learning_rate(epoch: int, cfg: Config) -> float:
    """Learning rate at 0-based ``epoch`` from START_LR, MAX_LR, MIN_LR, the warm-up R
    (:func:`warmup_epochs`: RAMPUP_EPOCHS unless fitted), SUSTAIN_EPOCHS (S) and EXP_DECAY (D).

    epoch < R: linear from START_LR (epoch 0) towards MAX_LR; R <= epoch < R + S: MAX_LR;
    later: (MAX_LR - MIN_LR) * D ** (epoch - R - S) + MIN_LR. With R = 0, epoch 0 is MAX_LR.
    """
    ramp, sustain = warmup_epochs(cfg), cfg.SUSTAIN_EPOCHS
    if epoch < ramp:
        return (cfg.MAX_LR - cfg.START_LR) / ramp * epoch + cfg.START_LR
    if epoch < ramp + sustain:
        return cfg.MAX_LR
    return (cfg.MAX_LR - cfg.MIN_LR) * cfg.EXP_DECAY ** (epoch - ramp - sustain) + cfg.MIN_LR


def lr_curve(cfg: Config, n_epochs: int) -> list[float]:
    """Learning rates of epochs 0..n_epochs-1, for plotting."""
    return [learning_rate(epoch, cfg) for epoch in range(n_epochs)]
