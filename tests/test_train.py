"""Optimizer, schedule and the jitted train/eval steps over the device mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
import tolerances
from vit_jax import host_cpu
from vit_jax import sharding
from vit_jax import train


def _small_config(**overrides):
  config = load_config('digits.py')
  config.model.num_layers = 2
  config.update(overrides)
  return config


def test_schedule_warms_up_linearly_then_decays_to_zero():
  for kind in ('linear', 'cosine'):
    config = _small_config(lr=1e-3, warmup_steps=10, schedule=kind)
    schedule = train.learning_rate_schedule(config, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-5)  # Halfway: linear and cosine agree.
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
  # Between warmup and the middle, cosine stays above linear.
  linear = train.learning_rate_schedule(_small_config(lr=1e-3, warmup_steps=10, schedule='linear'), 110)
  cosine = train.learning_rate_schedule(_small_config(lr=1e-3, warmup_steps=10, schedule='cosine'), 110)
  assert float(cosine(35)) > float(linear(35)) + 1e-5
  with pytest.raises(ValueError, match='Unknown schedule'):
    train.learning_rate_schedule(_small_config(schedule='step', warmup_steps=0), 10)
  # With num_epochs the step count is known only from the data: a warmup as long as the run fails there.
  with pytest.raises(ValueError, match='warmup_steps=10 is not below the 10 training steps'):
    train.learning_rate_schedule(_small_config(warmup_steps=10), 10)


def test_weight_decay_spares_biases_and_norms():
  config = _small_config(lr=1.0, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0, schedule='linear')
  optimizer = train.create_optimizer(config, num_steps=1000)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  assert np.allclose(updates['kernel'], -0.5)  # lr * wd * w, with a zero gradient.
  assert np.allclose(updates['bias'], 0.0)


def test_sgd_fine_tuning_optimizer_clips_the_global_norm():
  config = _small_config(optimizer='sgd', lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip_norm=1.0,
                         momentum=0.9)
  optimizer = train.create_optimizer(config, num_steps=1000)
  params = {'w': jnp.zeros((4,))}
  updates, _ = optimizer.update({'w': jnp.full((4,), 10.0)}, optimizer.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
  with pytest.raises(ValueError, match='Unknown optimizer'):
    train.create_optimizer(_small_config(optimizer='lamb', warmup_steps=0), 10)


def test_train_steps_lower_the_loss_on_a_fixed_batch():
  config = _small_config(lr=3e-3, warmup_steps=0, label_smoothing=0.0)
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=10, num_steps=100, channels=1)
  state = run.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = sharding.to_global_batch({'image': rng.uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32),
                                 'label': rng.integers(0, 10, 64).astype(np.int32)}, mesh)
  step = run.train_fn
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 10
  assert losses[0] == pytest.approx(np.log(10), rel=1e-4)  # Zero-initialised head: uniform predictions.
  assert losses[-1] < losses[0] - 0.3

  eval_fn = run.eval_fn
  sums = eval_fn(state.params, {**batch, 'mask': jnp.ones((64,))})
  assert float(sums['count']) == 64 and 0 <= float(sums['correct']) <= 64
  masked = eval_fn(state.params, {**batch, 'mask': jnp.zeros((64,)).at[:10].set(1.0)})
  assert float(masked['count']) == 10 and float(masked['correct']) <= 10


def test_moving_average_of_the_parameters_follows_the_polyak_update():
  config = _small_config(lr=3e-3, warmup_steps=0, ema_decay=0.9)
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=10, num_steps=100, channels=1)
  state = run.init_state(jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    assert np.array_equal(a, b)  # The average starts at the initial parameters.
  rng = np.random.default_rng(0)
  batch = sharding.to_global_batch({'image': rng.uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32),
                                 'label': rng.integers(0, 10, 64).astype(np.int32)}, mesh)
  expected = jax.device_get(state.params)  # The step donates (deletes) its input state.
  for _ in range(3):
    state, _ = run.train_fn(state, batch)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, state.params)
  # Three roundings of the same average, computed in and outside the step.
  tolerances.assert_close(state.ema_params, expected, tolerances.tolerance(3), 'moving average')
  head = state.ema_params['head']['kernel']
  assert np.any(head) and not np.allclose(head, state.params['head']['kernel'])
  assert train.setup(_small_config(), mesh, 10, 1000, 1).abstract_state.ema_params is None  # Off: no copy.
  with pytest.raises(ValueError, match='ema_decay'):
    train.setup(_small_config(ema_decay=1.0), mesh, num_classes=10, num_steps=100, channels=1)


def test_the_initialisation_compiled_with_less_optimisation_draws_the_same_weights():
  # The default's stem, [CLS] and a moving average: every kind of initialiser and the optimizer's state.
  config = load_config('default.py')
  config.ema_decay = 0.999
  mesh = sharding.make_mesh(config.mesh)
  run = train.setup(config, mesh, num_classes=10, num_steps=3281, channels=1)
  state = run.init_state(jax.random.PRNGKey(3))
  optimised = jax.jit(lambda rng: train.init_state(run.model, run.optimizer, rng, run.image_shape, run.objective,
                                                   run.ema), out_shardings=run.state_sharding)
  expected = optimised(jax.random.PRNGKey(3))
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  # Elementwise float programs (random bits to distributions): the same arithmetic at both levels; an
  # optimisation that reassociated or dropped a fused multiply-add would show as ulps here.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert host_cpu.light_compile_options('cpu') and host_cpu.light_compile_options('tpu') is None
