"""Smoke test of the benchmark harness (no timing assertions: speed is measured by the harness, not tests)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _analytic_forward_flops(tokens, dim, mlp_dim, layers, patch, channels, classes):
  """Multiply-adds x 2 of the matmuls of a ViT forward pass: QKV/out projections, MLP, attention, embedding."""
  per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * 2 * tokens * tokens * dim
  return layers * per_layer + 2 * (tokens - 1) * patch * patch * channels * dim + 2 * dim * classes


@pytest.mark.slow
def test_benchmark_reports_speed_flops_and_memory_side_by_side(tmp_path):
  compare = ['--compare=timm'] if importlib.util.find_spec('timm') else []
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.benchmark', '--variants=ViT-mu/4', '--image_sizes=16', '--batch_sizes=4',
       '--modes=train,inference',  # train first: its timm worker must not depend on an inference row's files
       '--repeats=2', '--warmup=1', f'--json={out}', *compare],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'GFLOP/s (the peak below)' in result.stdout
  records = json.loads(out.read_text())
  peak = records[0]
  assert peak['kind'] == 'matmul' and peak['flops_per_s'] > 1e8
  rows = {(r['impl'], r['mode']): r for r in records[1:]}
  assert {('vit_jax', 'inference'), ('vit_jax', 'train')} <= set(rows)
  # ViT-mu/4 at 16px: 16 patches + [CLS], width 128, MLP 256, 6 layers, 1000 classes.
  expected = _analytic_forward_flops(17, 128, 256, 6, 4, 3, 1000)
  inference, training = rows['vit_jax', 'inference'], rows['vit_jax', 'train']
  assert 1.0 <= inference['flops_per_image'] / expected < 1.3  # XLA also counts softmax, GELU, LayerNorm.
  assert 2.5 < training['flops_per_image'] / inference['flops_per_image'] < 4.0  # Backward ~ 2x forward.
  for row in (inference, training):
    assert row['images_per_s'] > 0 and row['compile_s'] > 0 and row['peak_rss_gib'] > 0.05
    assert row['temp_gib'] >= 0 and row['argument_gib'] > 0
    assert 0 < row['of_peak'] == row['flops_per_s'] / peak['flops_per_s']
  if compare:
    timm_row = rows['timm', 'inference']
    assert timm_row['max_logit_diff'] <= 1e-4 * max(timm_row['max_logit'], 1.0)  # Same function.
    assert rows['timm', 'train']['images_per_s'] > 0
    assert rows['timm', 'train']['max_logit_diff'] <= 1e-4 * max(rows['timm', 'train']['max_logit'], 1.0)
    assert 'x' in result.stdout.split('vit_jax')[1].splitlines()[0]  # The ours/them ratio is printed.
