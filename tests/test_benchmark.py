"""Smoke test of the benchmark harness (no timing assertions: speed is measured by the harness, not tests)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from vit_jax import benchmark
from vit_jax import config_lib
from vit_jax import flops


def _analytic_forward_flops(tokens, dim, mlp_dim, layers, patch, channels, classes):
  """Multiply-adds x 2 of the matmuls of a ViT forward pass: QKV/out projections, MLP, attention, embedding."""
  per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * 2 * tokens * tokens * dim
  return layers * per_layer + 2 * (tokens - 1) * patch * patch * channels * dim + 2 * dim * classes


@pytest.mark.slow
def test_benchmark_reports_speed_flops_and_memory_side_by_side(tmp_path):
  compare = ['--compare=timm'] if importlib.util.find_spec('timm') else []
  out, table_path = tmp_path / 'bench.json', tmp_path / 'bench.md'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.benchmark', '--variants=ViT-mu/4', '--image_sizes=16', '--batch_sizes=4',
       '--modes=train,inference',  # train first: its timm worker must not depend on an inference row's files
       '--repeats=2', '--warmup=1', '--cpu_matmul=xla,onednn', f'--json={out}',
       f'--table={table_path}', *compare],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'MFU of' in result.stdout and '(measured fp32 matmul)' in result.stdout
  records = json.loads(out.read_text())
  peak = records[0]
  assert peak['kind'] == 'matmul' and peak['flops_per_s'] > 1e8 and peak['backend'] == 'cpu'
  assert peak['peak_flops_per_s'] == peak['flops_per_s']  # CPU: MFU of the matmul measured in this run.
  rows = {(r['impl'], r['mode']): r for r in records[1:]}
  assert {(f'vit_jax[{m}]', mode) for m in ('xla', 'onednn') for mode in ('inference', 'train')} <= set(rows)
  for mode in ('inference', 'train'):  # Each library ran its own kernel.
    assert 'onednn' in rows['vit_jax[onednn]', mode]['kernel']
    assert 'onednn' not in rows['vit_jax[xla]', mode]['kernel']
    assert len(rows['vit_jax[onednn]', mode]['rounds']) == 1
  # Model FLOPs, from the lowered module (flops.py), whatever compiled module ran: the same on every backend.
  config = config_lib.base_config()
  config.model.name, config.image_size = 'ViT-mu/4', 16
  inference, training = rows['vit_jax[onednn]', 'inference'], rows['vit_jax[onednn]', 'train']
  assert inference['flops_per_image'] == flops.forward_flops_per_image(config, 1000, 3)
  assert training['flops_per_image'] == flops.train_flops_per_image(config, 1000, 3)
  for row in (inference, training):
    assert row['images_per_s'] > 0 and row['compile_s'] > 0 and row['peak_rss_gib'] > 0.05
    assert row['temp_gib'] >= 0 and row['argument_gib'] > 0 and row['backend'] == 'cpu'
    assert 0 < row['mfu'] == row['flops_per_s'] / peak['peak_flops_per_s']
  table = table_path.read_text()
  assert table.count('| ViT-mu/4 | 16 | 4 |') == len(records) - 1 and '| vit_jax[onednn] |' in table
  if compare:
    timm_row = rows['timm', 'inference']
    assert timm_row['max_logit_diff'] <= 1e-4 * max(timm_row['max_logit'], 1.0)  # Same function.
    assert rows['timm', 'train']['images_per_s'] > 0
    assert rows['timm', 'train']['max_logit_diff'] <= 1e-4 * max(rows['timm', 'train']['max_logit'], 1.0)
    assert 'x' in result.stdout.split('vit_jax')[1].splitlines()[0]  # The ours/them ratio is printed.


def test_model_flops_are_the_matmuls_of_a_vit_and_a_train_step_is_three_forwards():
  config = config_lib.base_config()  # ViT-B/16 at 224.
  config.model.scan = True  # Counted unrolled all the same.
  analytic = _analytic_forward_flops(197, 768, 3072, 12, 16, 3, 1000)
  counted = flops.forward_flops_per_image(config, 1000, 3)
  assert analytic <= counted <= 1.01 * analytic  # XLA adds the elementwise work (softmax, norms, GELU).
  assert flops.train_flops_per_image(config, 1000, 3) == 3 * counted


@pytest.mark.slow
def test_input_benchmark_times_the_pipeline_pinned_and_derives_the_cores_a_host_needs(tmp_path, data_dir):
  out = tmp_path / 'input.json'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.input_benchmark', '--dataset=imagenet_shaped/200', f'--data_dir={data_dir}',
       '--batch=16', '--seconds=1', '--stages=10', f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = report['pipeline']
  assert len(rows) == 2 * len({row['cores'] for row in rows}) and all(row['images_per_s'] > 0 for row in rows)
  assert {row['cores_used'] for row in rows if row['cores'] == 1} == {1}  # The worker really was pinned.
  per_core = max(row['images_per_s'] for row in rows if row['cores'] == 1 and row['fused'])
  assert len(report['needs']) == 4
  for need in report['needs']:
    assert need['cores_needed'] == pytest.approx(need['images_per_s_per_host'] / per_core)
  assert 'ViT-L/16 on a TPU v5e host (8 chips, 112 cores)' in result.stdout
  assert len(report['stages']) == 5 and all(rate > 0 for rate in report['stages'].values())


@pytest.mark.parametrize('options, kernel', [
    (None, 'ynn'),  # XLA:CPU's default in this jaxlib: YNNPACK, not Eigen.
    ({'xla_cpu_experimental_ynn_fusion_type': ''}, 'eigen'),
    ({'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT'}, 'onednn'),
])
def test_the_benchmark_names_the_kernel_that_runs_the_dot(options, kernel):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  lowered = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(jnp.ones((64, 128)), jnp.ones((128, 256)))
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  assert benchmark.dot_kernels(compiled.as_text(), 'cpu') == kernel


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_rows_are_named_by_what_ran_them_and_timm_runs_on_our_device(backend):
  job = dict(variant='ViT-B/16', image_size=224, batch=256, channels=3, classes=1000, dtype='bfloat16',
             remat=False, scan=False, repeats=3, warmup=1, mode='train')
  rows = dict(benchmark.row_jobs(job, '/tmp/x', backend, ['onednn', 'xla'], ['timm', 'timm_compile']))
  ours = [name for name in rows if name.startswith('vit_jax')]
  # The CPU matmul library names a CPU row; off the CPU it does nothing, and the backend names the one row.
  assert ours == (['vit_jax[onednn]', 'vit_jax[xla]'] if backend == 'cpu' else [f'vit_jax[{backend}]'])
  assert [rows[name]['kind'] for name in ours] == ['jax_train'] * len(ours)
  for impl, compiled in (('timm', False), ('timm_compile', True)):
    timm_job = rows[impl]
    assert timm_job['device'] == ('cuda' if backend == 'gpu' else 'cpu') and timm_job['compile'] == compiled
    assert (timm_job['dtype'], timm_job['batch'], timm_job['mode']) == ('bfloat16', 256, 'train')


def test_rows_take_turns_round_by_round_and_report_their_spread():
  rows = [('a', {}), ('b', {}), ('c', {})]
  assert [name for name, _ in benchmark.turns(rows, 3)] == ['a', 'b', 'c'] * 3  # Never a row's rounds in a row.
  assert benchmark.turns(rows, 1) == rows
  assert benchmark._spread([2.0, 3.5, 1.25]) == '1.25-3.5' and benchmark._spread([120.4, 250.6]) == '120-251'
  assert benchmark._spread([7.0]) == ''  # One round: no spread.


def test_the_table_lists_measured_and_timed_out_rows():
  measured = dict(variant='ViT-B/16', image_size=224, batch=256, dtype='bfloat16', mode='train',
                  impl='vit_jax[gpu]', kernel='cublas', images_per_s=2357.0, compile_s=32.0,
                  flops_per_image=105e9, flops_per_s=2357 * 105e9, mfu=0.25, temp_gib=20.0, argument_gib=4.0,
                  output_gib=3.3, device_peak_gib=27.5, peak_rss_gib=3.0)
  timed_out = dict(variant='ViT-L/16', image_size=224, batch=256, dtype='bfloat16', mode='train', impl='timm',
                   timed_out='no result within 200 s')
  table = benchmark.markdown_table([{'kind': 'matmul'}, measured, timed_out]).splitlines()
  assert len(table) == 4 and all(line.count('|') == 15 for line in table)
  assert '| 2,357.0 | 32.0 | 105.00 | 247.485 | 25.0% | 27.30 | 27.50 |' in table[2]
  assert 'no result within 200 s' in table[3]


@pytest.mark.slow
def test_the_gpu_comparison_script_refuses_a_machine_without_a_gpu(tmp_path):
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_benchmark.sh'), str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2 and 'JAX sees no GPU' in result.stderr, result.stderr[-2000:]
