"""Run one training process for the distribution tests (not collected by pytest).

    python distributed_worker.py mirrored CONFIG.json DATA OUT
    python distributed_worker.py worker CONFIG.json DATA OUT     (TF_CONFIG set by the test)

'mirrored' splits the CPU into two logical devices and trains with MirroredStrategy over
them; 'worker' is one member of a MultiWorkerMirroredStrategy cluster.
"""

import json
import sys

import tensorflow as tf


def main() -> None:
    mode, config_path, data, out = sys.argv[1:5]
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = None  # train() picks MultiWorkerMirroredStrategy from TF_CONFIG
    from res_unet.config.keys import load_config
    from res_unet.training.train import train

    card = train(load_config(config_path), data, out, strategy=strategy, progress=False,
                 export_saved_model=False)
    print("CARD " + json.dumps({"strategy": card.training.strategy,
                                "replicas": card.training.replicas,
                                "epochs_run": card.training.epochs_run,
                                "best_val_loss": card.training.best_val_loss}))


if __name__ == "__main__":
    main()
