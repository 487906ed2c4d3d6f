"""Old config keys: Segmentation Gym's keys and values mapped to ours, in one function.

:func:`upgrade_keys` is the one place that knows them; :func:`res_unet.config.keys.config_from_dict`
runs every raw config through it before validation, so an old key is either mapped (with a
notice), said to have no effect here, or refused with the fix.
"""

from __future__ import annotations

from typing import Any

from res_unet.config.registry import LOSS_TERMS, MODELS
from res_unet.core.errors import UserError, either

_GYM_NO_EFFECT = {
    "STRIDE": "down-sampling here is always 2x max-pooling",
    "SET_PCI_BUS_ID": "devices are chosen with SET_GPU",
    "LOAD_DATA_WITH_CPU": "the tf.data pipeline already runs on the CPU",
    "CLEAR_MEMORY": "memory is bounded by streaming",
    "WRITE_MODELMETADATA": "model_card.json is always written",
    "FILTER_VALUE": "use OPENING_RADIUS / CLOSING_RADIUS for mask clean-up",
    "AUG_LOOPS": "examples are streamed, so memory is bounded anyway; AUG_COPIES sets how "
                 "many augmented copies are written",
}
_GYM_MODELS = {"resunet": "resunet", "simple_resunet": "resunet", "unet": "resunet",
               "simple_unet": "resunet"}
_GYM_LOSSES = {"dice": {"dice": 1.0}, "cat": {"ce": 1.0}}


def upgrade_keys(raw: dict[str, Any], source: str = "config") -> tuple[dict[str, Any], list[str]]:
    """Map old (Segmentation Gym) keys and values to ours.

    Returns the upgraded dict and a list of one-line notices for the user. Raises UserError for
    values that have no equivalent here.
    """
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    notices: list[str] = []
    problems: list[str] = []
    if "KERNEL" in cfg:
        kernel = cfg.pop("KERNEL")
        cfg.setdefault("KERNEL_SIZE", kernel)
        notices.append(f"{source}: KERNEL read as KERNEL_SIZE={cfg['KERNEL_SIZE']}")
    for key, why in _GYM_NO_EFFECT.items():
        if key in cfg:
            cfg.pop(key)
            notices.append(f"{source}: {key} has no effect here ({why})")
    model = cfg.get("MODEL")
    if isinstance(model, str) and model in _GYM_MODELS:
        cfg["MODEL"] = _GYM_MODELS[model]
        if model != cfg["MODEL"]:
            notices.append(f"{source}: MODEL '{model}' is built as '{cfg['MODEL']}' "
                           f"({MODELS[cfg['MODEL']].description})")
    elif isinstance(model, str) and model in ("satunet", "segformer"):
        problems.append(f"{source}: MODEL '{model}' is not available here; use "
                        f"{either(repr(m) for m in MODELS)}")
    loss = cfg.get("LOSS")
    if isinstance(loss, str) and loss.lower() in ("hinge", "kld"):
        problems.append(f"{source}: LOSS '{loss}' is not available here; use a weighted sum of "
                        f"{', '.join(LOSS_TERMS)}, e.g. \"dice+focal\"")
    elif isinstance(loss, str) and loss.lower() in _GYM_LOSSES:
        cfg["LOSS"] = dict(_GYM_LOSSES[loss.lower()])
    if "LOSS_WEIGHTS" in cfg:
        weights = cfg.pop("LOSS_WEIGHTS")
        if weights is True:
            cfg.setdefault("CLASS_WEIGHTS", "auto")
        elif isinstance(weights, list):
            cfg.setdefault("CLASS_WEIGHTS", weights)
        notices.append(f"{source}: LOSS_WEIGHTS read as CLASS_WEIGHTS={cfg.get('CLASS_WEIGHTS')}")
    if cfg.pop("OTSU_THRESHOLD", None) is True:
        cfg.setdefault("THRESHOLD", "otsu")
        notices.append(f"{source}: OTSU_THRESHOLD read as THRESHOLD='otsu'")
    if isinstance(cfg.get("SET_GPU"), int):
        cfg["SET_GPU"] = str(cfg["SET_GPU"])
    if problems:
        raise UserError("\n".join(problems))
    return cfg, notices
