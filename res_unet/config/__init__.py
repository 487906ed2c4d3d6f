"""What a config is: the keys (``keys.Config``, ``load_config``), the rules between them
(``rules``), the architecture and encoder names (``registry``, Keras-free) and the upgrade of
old key names (``upgrade``).

May import :mod:`res_unet.core` only.
"""
