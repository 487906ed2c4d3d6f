"""Adam with one TensorFlow kernel per variable update.

Keras 3's Adam writes each variable's update as about twenty separate operations. Tracing a
training step turns each one into a graph node from Python, and a step run eagerly
dispatches each one: for an EfficientNet U-Net's 400 or so variables that was most of the
seconds a training run spends tracing its step before the first batch, and most of an eager
step. :class:`FusedAdam` computes the same update, Adam's formula as Keras writes it
(epsilon added to the square root of the second moment), with TensorFlow's
``ResourceApplyAdam`` kernel: one operation per variable. Float32 and float64 variables
take the kernel; other variables, AMSGrad, and IndexedSlices gradients take Keras' update.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# The variable dtypes the CPU and GPU kernels of ResourceApplyAdam cover in every build.
_KERNEL_DTYPES = (tf.float32, tf.float64)


def _resource(variable) -> tf.Variable:
    """The tf.Variable behind a Keras variable; under a distribution strategy's update, the
    copy of the device being updated."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if hasattr(value, "_get_on_device_or_primary"):  # a distributed (mirrored) variable
        value = value._get_on_device_or_primary()
    return value


class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose per-variable update is one ResourceApplyAdam kernel.

    Same arguments, variables (so checkpoints and resumes are unchanged) and update as
    Keras' Adam; the result can differ from Keras' only by float rounding.
    """

    def update_step(self, gradient, variable, learning_rate):
        dtype = tf.as_dtype(variable.dtype)
        # Keras' Adam keeps its moments in these lists; a Keras that named them otherwise
        # gets its own update (slower to trace, same numbers).
        momentums, velocities = (getattr(self, "_momentums", None),
                                 getattr(self, "_velocities", None))
        if (self.amsgrad or dtype not in _KERNEL_DTYPES or momentums is None
                or velocities is None or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.constant(self.beta_1, dtype)
        beta_2 = tf.constant(self.beta_2, dtype)
        return tf.raw_ops.ResourceApplyAdam(
            var=_resource(variable).handle,
            m=_resource(momentums[index]).handle, v=_resource(velocities[index]).handle,
            beta1_power=tf.pow(beta_1, local_step), beta2_power=tf.pow(beta_2, local_step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.constant(self.epsilon, dtype), grad=tf.cast(gradient, dtype),
            use_locking=False)
