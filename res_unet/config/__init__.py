"""What a config is: the keys (``keys.Config``, ``load_config``, ``with_overrides``), the
check of one value (``values``), the rules between them (``rules``), the architecture and
encoder names (``registry``, Keras-free), the upgrade of old key names (``upgrade``) and what
each key is, read from its declaration: its roles, the version that added it and the config
reference (``reference``).

May import :mod:`res_unet.core` only.
"""
