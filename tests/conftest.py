"""Shared fixtures: a tfds data_dir per test session, the configs, and a helper that runs the main job."""
import os
import subprocess
import sys

import pytest

# The suite runs on the CPU. The test extra installs libtpu (the planner compiles for TPU topologies), which a
# process would otherwise start by probing for TPU chips, printing errors (tests that want that set it empty).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

try:
  # PyTorch (the optional `torch` extra) must load before TensorFlow, which other test modules import:
  # triton's native library, which torchvision pulls in, crashes the process when loaded after TensorFlow's.
  import torch  # pylint: disable=unused-import
  import timm  # pylint: disable=unused-import
except ImportError:
  pass

from vit_jax import config_lib
from vit_jax import host_cpu

# The tolerance survey (tests/tolerances.py): every compiled function of the session under one CPU matmul
# library. 'onednn' sets it for every compile, subprocesses included; 'xla' turns the configs' oneDNN off.
TEST_CPU_MATMUL = os.environ.get('VIT_JAX_TEST_CPU_MATMUL')
if TEST_CPU_MATMUL == 'onednn':
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_use_onednn=true '
                             '--xla_cpu_experimental_onednn_fusion_type=individual_dot').strip()
elif TEST_CPU_MATMUL == 'xla':
  host_cpu.compiler_options = lambda cpu_matmul='onednn', platform=None: None
elif TEST_CPU_MATMUL:
  raise ValueError(f'VIT_JAX_TEST_CPU_MATMUL={TEST_CPU_MATMUL!r}: choose onednn or xla.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, 'configs')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: starts subprocesses or trains end to end (deselect with '
                          '-m "not slow" for the fast loop)')


def load_config(name: str):
  """A config of `configs/` by file name, with its argument if any (`vit_imagenet.py:L/16`)."""
  return config_lib.load_config_file(os.path.join(CONFIG_DIR, name))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One tfds data_dir for the session: embedded datasets are built into it once, then reused."""
  return str(tmp_path_factory.mktemp('tensorflow_datasets'))


# The small run that the fault and object-store tests interrupt and compare against: digits, one block,
# 60 steps, checkpoints at 20, 40 and 60 (at most 3 kept).
REFERENCE_STEPS = 60
REFERENCE_FLAGS = ('--config=configs/digits.py', '--config.model.num_layers=1', '--config.batch_size=32',
                   '--config.eval_batch_size=71', '--config.warmup_steps=10',
                   f'--config.total_steps={REFERENCE_STEPS}', '--config.log_every_steps=20',
                   '--config.eval_every_steps=1000', '--config.checkpoint_every_steps=20',
                   '--config.keep_checkpoints=3')


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory, data_dir):
  """The reference run, uninterrupted, trained once per session; copy it before changing it."""
  workdir = tmp_path_factory.mktemp('reference') / 'reference'
  run_main(workdir, *REFERENCE_FLAGS, f'--config.data_dir={data_dir}')
  return workdir


def run_main(workdir, *flags, env=None, check=True, timeout=600):
  """Runs `python -m vit_jax.main` as a user would, in a fresh process; returns the CompletedProcess."""
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *flags]
  result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed ({result.returncode}):\n{result.stderr[-5000:]}')
  return result


def recording_gcloud(tmp_path):
  """A fake `gcloud` first on PATH that records each call in `calls` (returned with the environment): a
  describe finds nothing before a create and is granted (ACTIVE) after one; everything else succeeds."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(
      '#!/usr/bin/env bash\necho "gcloud $*" >> "$CALLS"\n[[ "$*" == *describe* ]] || exit 0\n'
      'grep -q " create " "$CALLS" && echo ACTIVE || exit 1\n')
  (bin_dir / 'gcloud').chmod(0o755)
  calls = tmp_path / 'calls'
  return {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'CALLS': str(calls)}, calls
