"""Learning-rate schedule: the numbers of the original toolbox's reference config, edge cases."""

import numpy as np
import pytest

from res_unet.config.keys import config_from_dict
from res_unet.training.schedule import learning_rate, lr_curve

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


DECAY = [(1e-4 - 1e-7) * 0.9 ** k + 1e-7 for k in range(4)]  # the defaults' decay


@pytest.mark.parametrize("max_epochs,expected", [
    (1, [1e-4]),                                    # no warm-up: the only epoch at MAX_LR
    (2, DECAY[:2]),                                 # no warm-up, then the decay
    (4, [1e-7, *DECAY[:3]]),                        # 1 warm-up epoch
    (6, [1e-7, (1e-4 - 1e-7) / 2 + 1e-7, *DECAY[:4]]),  # 2 warm-up epochs
])
def test_a_warm_up_longer_than_the_run_is_fitted_into_less_than_half(max_epochs, expected):
    """The defaults (START_LR 1e-7, RAMPUP_EPOCHS 10, MAX_LR 1e-4) with a 1-6 epoch run: the
    warm-up takes (MAX_EPOCHS - 1) // 2 epochs, so the run reaches MAX_LR and decays after
    (a 2-epoch trial used to stay at 1e-7 and 1e-5 and learn nothing)."""
    from res_unet.training.schedule import warmup_epochs, warmup_note

    cfg, _ = config_from_dict({"MAX_EPOCHS": max_epochs})
    assert (cfg.START_LR, cfg.RAMPUP_EPOCHS, cfg.MAX_LR) == (1e-7, 10, 1e-4)
    ramp = (max_epochs - 1) // 2
    assert warmup_epochs(cfg) == ramp
    assert lr_curve(cfg, max_epochs) == pytest.approx(expected, rel=1e-9)
    fitted = {0: "no warm-up, the run starts at",
              1: "warming up over 1 epoch instead, so the run reaches",
              2: "warming up over 2 epochs instead, so the run reaches"}[ramp]
    assert warmup_note(cfg) == (
        f"note: RAMPUP_EPOCHS 10 does not end within MAX_EPOCHS {max_epochs}: {fitted} "
        "MAX_LR 0.0001 (set RAMPUP_EPOCHS below MAX_EPOCHS to choose)")


def test_a_warm_up_shorter_than_the_run_is_kept_as_configured():
    """RAMPUP_EPOCHS below MAX_EPOCHS (10 of 11, the reference's 20 of 100) is the
    original formula, without a note: existing configs train the same."""
    from res_unet.training.schedule import warmup_epochs, warmup_note

    cfg, _ = config_from_dict({"MAX_EPOCHS": 11})
    assert warmup_epochs(cfg) == 10 and warmup_note(cfg) is None
    assert learning_rate(10, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx((1e-4 - 1e-7) / 10 * 9 + 1e-7)
    assert warmup_note(reference_cfg()) is None and warmup_epochs(reference_cfg()) == 20
