"""FusedAdam (res_unet/training/adam.py): Keras' Adam update in one kernel per variable."""

from __future__ import annotations

import json
import textwrap

import forked
import keras
import numpy as np
import pytest
import tensorflow as tf

from res_unet.training.adam import FusedAdam

SHAPES = [(3, 3, 4, 8), (8,), (100,), (5, 5)]
LEARNING_RATES = [1e-2] * 3 + [5e-3] * 3  # halved after three steps, as the schedule does


def adam_reference(start: list[np.ndarray], gradients: list[list[np.ndarray]],
                   learning_rates: list[float]) -> list[np.ndarray]:
    """Adam in float64 NumPy, as Keras writes it (epsilon 1e-7 added to sqrt(v))."""
    variables = [a.astype(np.float64) for a in start]
    m = [np.zeros_like(a) for a in variables]
    v = [np.zeros_like(a) for a in variables]
    for t, (step, lr) in enumerate(zip(gradients, learning_rates, strict=True), start=1):
        alpha = np.float64(np.float32(lr)) * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for i, g in enumerate(step):
            m[i] += (g - m[i]) * (1 - 0.9)
            v[i] += (g * g - v[i]) * (1 - 0.999)
            variables[i] -= m[i] * alpha / (np.sqrt(v[i]) + 1e-7)
    return variables


def seeded(dtype: str, steps: int = 6) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Start values and ``steps`` gradients for the variables of SHAPES."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    return start, [[rng.standard_normal(s).astype(dtype) for s in SHAPES]
                   for _ in range(steps)]


def run_steps(optimizer: keras.optimizers.Optimizer, dtype: str, traced: bool = True
              ) -> list[np.ndarray]:
    """The variables after :func:`seeded`'s updates with LEARNING_RATES."""
    start, gradients = seeded(dtype)
    variables = [keras.Variable(a) for a in start]
    optimizer.build(variables)

    def step(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    step = tf.function(step) if traced else step
    for grads, lr in zip(gradients, LEARNING_RATES, strict=True):
        optimizer.learning_rate.assign(lr)
        step([tf.constant(g) for g in grads])
    assert int(optimizer.iterations) == len(gradients)
    return [np.asarray(v) for v in variables]


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_adam_is_adam(dtype, traced):
    """Six steps (the learning rate halved after three) give Adam's hand-computed values:
    to float64 rounding in float64 (where Keras' own Adam is 3e-7 off), and in float32 the
    same as Keras' Adam up to float32 rounding."""
    start, gradients = seeded(dtype)
    expected = adam_reference(start, gradients, LEARNING_RATES)
    fused = run_steps(FusedAdam(learning_rate=1e-2), dtype, traced=traced)
    for a, b, s in zip(fused, expected, start, strict=True):
        assert a.dtype == dtype
        assert np.abs(b - s).max() > 1e-2, "the variables moved"
        np.testing.assert_allclose(a, b, rtol=1e-12 if dtype == "float64" else 1e-5,
                                   atol=1e-12 if dtype == "float64" else 1e-6)
    if dtype == "float32":
        keras_ = run_steps(keras.optimizers.Adam(learning_rate=1e-2), dtype, traced=traced)
        for a, b in zip(fused, keras_, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_each_variable_is_updated_by_one_kernel():
    """The traced step holds one ResourceApplyAdam per variable (not Keras' update: a Keras
    that renamed Adam's moment lists would get it, slower to trace, and fail here)."""
    variables = [keras.Variable(a) for a in seeded("float32")[0]]
    optimizer = FusedAdam(learning_rate=1e-2)
    optimizer.build(variables)
    step = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables,
                                                                   strict=True)))
    graph = step.get_concrete_function([tf.TensorSpec(s, tf.float32) for s in SHAPES]).graph
    kinds = [op.type for op in graph.get_operations()]
    assert kinds.count("ResourceApplyAdam") == len(SHAPES)


@pytest.mark.parametrize("options", [{"amsgrad": True}, {}], ids=["amsgrad", "float16"])
def test_what_the_kernel_does_not_cover_is_keras_update(options):
    """AMSGrad and float16 variables take Keras' own update: the same numbers exactly."""
    dtype = "float32" if options else "float16"
    fused = run_steps(FusedAdam(learning_rate=1e-2, **options), dtype)
    keras_ = run_steps(keras.optimizers.Adam(learning_rate=1e-2, **options), dtype)
    for a, b in zip(fused, keras_, strict=True):
        np.testing.assert_array_equal(a, b)


def scaled_step(optimizer: keras.optimizers.LossScaleOptimizer, variables: list):
    """A training step's update: gradients scaled as the scaled loss's would be."""
    def step(grads):
        scale = optimizer.dynamic_scale
        optimizer.apply_gradients(zip([g * scale for g in grads], variables, strict=True))
    return step


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "eager"])
def test_fused_adam_under_loss_scaling_is_keras_update(traced):
    """PRECISION mixed_float16 wraps the optimizer in Keras' LossScaleOptimizer: the wrapped
    FusedAdam makes Keras' Adam's updates of the unscaled gradients, and a step whose scaled
    gradients overflow is skipped by both (the variables keep their values)."""
    start, gradients = seeded("float32", steps=4)
    gradients[2][0][0, 0, 0, 0] = np.inf  # an overflowed step
    results = []
    for inner in (FusedAdam(learning_rate=1e-2), keras.optimizers.Adam(learning_rate=1e-2)):
        variables = [keras.Variable(a) for a in start]
        optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=1024.0)
        optimizer.build(variables)

        step = scaled_step(optimizer, variables)
        step = tf.function(step) if traced else step
        after = []
        for grads in gradients:
            step([tf.constant(g) for g in grads])
            after.append([np.asarray(v) for v in variables])
        for a, b in zip(after[1], after[2], strict=True):
            np.testing.assert_array_equal(a, b)  # the overflowed step changed nothing
        assert int(inner.iterations) == 3
        results.append(after[-1])
    for a, b, s in zip(*results, start, strict=True):
        assert np.abs(a - s).max() > 1e-3, "the variables moved"
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_checkpoint_of_keras_adam_restores_into_fused_adam(tmp_path):
    """The backup of a run killed before FusedAdam (a tf.train.Checkpoint of Keras' Adam)
    resumes: the moments and step count come back, and the next step is Keras' next step."""
    rng = np.random.default_rng(1)
    start = [rng.standard_normal(s).astype("float32") for s in SHAPES]
    gradients = [[rng.standard_normal(s).astype("float32") for s in SHAPES] for _ in range(3)]

    def make(cls):
        variables = [keras.Variable(a) for a in start]
        optimizer = cls(learning_rate=1e-2)
        optimizer.build(variables)
        return variables, optimizer

    variables, adam = make(keras.optimizers.Adam)
    for g in gradients[:2]:
        adam.apply_gradients(zip(g, variables, strict=True))
    path = tf.train.Checkpoint(optimizer=adam, variables=variables).write(
        str(tmp_path / "ckpt"))
    adam.apply_gradients(zip(gradients[2], variables, strict=True))

    restored, fused = make(FusedAdam)
    tf.train.Checkpoint(optimizer=fused, variables=restored).read(path).assert_consumed()
    assert int(fused.iterations) == 2
    fused.apply_gradients(zip(gradients[2], restored, strict=True))
    for a, b in zip(restored, variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


MIRRORED = textwrap.dedent("""
    import json, keras, numpy as np, tensorflow as tf
    from res_unet.training.adam import FusedAdam
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    start, x = np.array(json.loads(START)), np.array(json.loads(X))
    with strategy.scope():
        w = keras.Variable(start)
        opt = FusedAdam(learning_rate=0.05)
        opt.build([w])

    @tf.function
    def step(batch):
        def replica(xb):  # each replica: half the batch; the gradients are summed
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(xb @ w)) / 8.0
            opt.apply_gradients([(tape.gradient(loss, w), w)])
        strategy.run(replica, args=(batch,))

    it = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).repeat().batch(8)))
    for _ in range(4):
        step(next(it))
    print(json.dumps([np.asarray(c).tolist() for c in w.value.values]))
""")


def test_fused_adam_under_a_mirrored_strategy_updates_each_replica():
    """Two logical CPU devices (a forked process: devices are set before TensorFlow
    starts), float64: after four steps both copies of the variable are Adam's hand-computed
    value for the whole batch's gradient."""
    rng = np.random.default_rng(2)
    start, x = rng.standard_normal((4, 3)), rng.standard_normal((8, 4))
    code = f"START, X = {json.dumps(json.dumps(start.tolist()))}, " \
           f"{json.dumps(json.dumps(x.tolist()))}\n" + MIRRORED
    status, out, err = forked.run(["-c", code], timeout=300)
    assert status == 0, err[-2000:]
    copies = [np.array(c) for c in json.loads(out.strip().splitlines()[-1])]
    w, gradients = start.copy(), []
    expected = start
    for _ in range(4):  # the gradient of sum((x @ w)^2) / 8 at the current weights
        gradients.append([2.0 * x.T @ (x @ w) / 8.0])
        w = adam_reference([start], gradients, [0.05] * len(gradients))[0]
        expected = w
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_allclose(copy, expected, rtol=1e-10, atol=1e-12)
