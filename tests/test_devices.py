"""res_unet.devices and the oneDNN default that importing res_unet sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import res_unet, tensorflow; from res_unet.devices import onednn_enabled; "
         "import os; print(os.environ['TF_ENABLE_ONEDNN_OPTS'], onednn_enabled())")


@pytest.mark.parametrize("setting,expected", [(None, "1 True"), ("0", "0 False")])
def test_importing_res_unet_turns_onednn_on_unless_the_user_chose(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split()[-2:] == expected.split()
