"""Learning-rate schedule: the numbers of the original toolbox's reference config, edge cases."""

import numpy as np
import pytest

from res_unet.config import config_from_dict
from res_unet.schedule import learning_rate, lr_curve

REFERENCE = {"START_LR": 1e-7, "MIN_LR": 1e-7, "MAX_LR": 1e-5, "RAMPUP_EPOCHS": 20,
             "SUSTAIN_EPOCHS": 0, "EXP_DECAY": 0.9}


def reference_cfg(**changes):
    cfg, _ = config_from_dict({**REFERENCE, **changes})
    return cfg


def test_reference_values_exactly():
    cfg = reference_cfg()
    assert learning_rate(0, cfg) == pytest.approx(1e-7, rel=1e-6)
    assert learning_rate(10, cfg) == pytest.approx((1e-5 - 1e-7) / 20 * 10 + 1e-7, rel=1e-6)
    assert learning_rate(20, cfg) == pytest.approx(1e-5, rel=1e-6)
    assert learning_rate(30, cfg) == pytest.approx((1e-5 - 1e-7) * 0.9**10 + 1e-7, rel=1e-6)


def test_reference_rounded_numbers():
    cfg = reference_cfg()
    for epoch, lr in ((0, 1e-7), (10, 5.05e-6), (20, 1e-5), (30, 3.55e-6)):
        assert learning_rate(epoch, cfg) == pytest.approx(lr, rel=0.01)


def test_no_rampup_starts_at_max_and_sustain_holds_it():
    assert learning_rate(0, reference_cfg(RAMPUP_EPOCHS=0)) == pytest.approx(1e-5)
    cfg = reference_cfg(RAMPUP_EPOCHS=2, SUSTAIN_EPOCHS=3, START_LR=1e-6)
    curve = lr_curve(cfg, 7)
    assert curve[:2] == pytest.approx([1e-6, 5.5e-6])
    assert curve[2:6] == pytest.approx([1e-5] * 4)
    assert curve[6] == pytest.approx((1e-5 - 1e-7) * 0.9 + 1e-7)


def test_curve_decays_towards_the_floor():
    curve = lr_curve(reference_cfg(), 200)
    assert len(curve) == 200 and all(isinstance(v, float) for v in curve)
    assert np.all(np.diff(curve[20:]) < 0)
    assert curve[-1] == pytest.approx(1e-7, rel=1e-3)
