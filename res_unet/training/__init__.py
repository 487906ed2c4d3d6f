"""Training a model: devices and precision, losses, metrics, the learning-rate schedule, the
loop, resume, the run folder (its format, ``runfolder``; its one writer, ``runwriter``) and
the evaluation written into it.

May import every package before it (core, config, geo, data, models), never inference.
"""
