"""The host setup of JAX's CPU backend (`host_cpu.setup`): device count, synchronous dispatch, the allocator;
every entry point gets the same one."""
import os
import re
import subprocess
import sys

import pytest

from conftest import CONFIG_DIR, ROOT, run_main


_FAULTS_PER_BUFFER = '''
import ctypes, resource, sys
from vit_jax import host_cpu
if sys.argv[1] == 'tuned':
  assert host_cpu.keep_freed_buffers_mapped()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

def page_faults(size):  # A buffer like a step's temporaries, allocated as XLA does.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

size = int(sys.argv[2]) << 20
page_faults(size)  # The first one maps its pages either way.
print(min(page_faults(size) for _ in range(3)))
'''


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning')
def test_cpu_training_reuses_large_host_buffers_instead_of_refaulting_them():
  def faults(mode, mib):
    out = subprocess.run([sys.executable, '-c', _FAULTS_PER_BUFFER, mode, str(mib)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return int(out.stdout.split()[-1])
  # glibc unmaps a freed block above 32 MiB: all its pages fault in again next time (4 KiB pages).
  assert faults('plain', 64) > 10_000  # The default's 63 MiB.
  assert faults('tuned', 64) < 1_000
  assert faults('plain', 1024) > 200_000  # The order of ViT-B/16's 2.2 GiB: kept as well.
  assert faults('tuned', 1024) < 1_000


_DISPATCH_PROBE = '''
import sys
import jax, jax.numpy as jnp
from vit_jax import host_cpu
host_cpu.setup(cpu_devices=None if sys.argv[1] == 'None' else int(sys.argv[1]))
heavy = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x))
x = jnp.full((1024, 1024), 1e-3)
heavy(x).block_until_ready()  # Compiled; the next call only runs (~0.1-0.5 s on 2 cores).
out = heavy(x)
print(jax.config.read('jax_cpu_enable_async_dispatch'), out.is_ready(), jax.device_count())
'''


@pytest.mark.slow
def test_one_cpu_device_runs_each_step_on_the_calling_thread():
  """With one CPU device the main job turns off async dispatch (`host_cpu.setup`); a jitted call
  then returns with its result computed. Several devices keep dispatching asynchronously."""
  def probe(num_devices, xla_flags=''):
    result = subprocess.run([sys.executable, '-c', _DISPATCH_PROBE, str(num_devices)], cwd=ROOT,
                            env={**os.environ, 'XLA_FLAGS': xla_flags}, capture_output=True, text=True,
                            timeout=300, check=True)
    return result.stdout.split()
  assert probe(None) == ['False', 'True', '1']
  assert probe(2) == ['True', 'False', '2']  # Returned while the 20 matmuls still ran.
  assert probe(None, '--xla_force_host_platform_device_count=4') == ['True', 'False', '4']
  assert probe(None, '--xla_force_host_platform_device_count=1') == ['False', 'True', '1']


STUDY_FILE = '''
import os
from vit_jax import config_lib

def get_config():
  config = config_lib.load_config_file(os.path.join({config_dir!r}, 'digits.py'))
  config.model.num_layers = 1
  config.total_steps, config.warmup_steps = 4, 1
  config.eval_batch_size = 64
  config.data_dir = {data_dir!r}
  return config

STUDIES = {{'one': {{'only row': {{}}}}}}
'''


def _host_setup(stderr: str):
  """What a run's log says of its host: the setup line, and the devices the run trained on."""
  return re.findall(r'Host setup: .*', stderr), re.findall(r'steps of batch \d+ on (\d+) devices', stderr)


def _host_setup_of(command):
  """`_host_setup` of a command's log, read until the run has said both (then it is stopped: the training that
  would follow tells nothing more of the host)."""
  process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  lines = []
  try:
    for line in process.stderr:
      lines.append(line)
      if all(_host_setup(''.join(lines))):
        break
  finally:
    process.kill()
    process.wait(timeout=60)
  assert all(_host_setup(''.join(lines))), ''.join(lines)[-5000:]
  return _host_setup(''.join(lines))


@pytest.mark.slow
@pytest.mark.parametrize('cpu_devices', [None, 2])
def test_an_ablation_run_gets_the_same_host_setup_as_the_main_job(cpu_devices, tmp_path, data_dir):
  study = tmp_path / 'study.py'
  study.write_text(STUDY_FILE.format(config_dir=CONFIG_DIR, data_dir=data_dir))
  devices = [] if cpu_devices is None else [f'--config.cpu_devices={cpu_devices}']
  main = _host_setup_of([sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "main"}',
                         '--config=configs/digits.py', f'--config.data_dir={data_dir}', '--config.model.num_layers=1',
                         '--config.total_steps=4', '--config.warmup_steps=1', '--config.eval_batch_size=64',
                         *devices])
  ablate = _host_setup_of([sys.executable, '-m', 'vit_jax.ablate', '--study=one', f'--config={study}',
                           f'--workdir={tmp_path / "ab"}',
                           *([] if cpu_devices is None else [f'--set=cpu_devices={cpu_devices}'])])
  expected = (['Host setup: 1 CPU device(s), async dispatch off, freed buffers kept mapped: True.'], ['1'])
  if cpu_devices == 2:
    expected = (['Host setup: 2 CPU device(s), async dispatch on, freed buffers kept mapped: True.'], ['2'])
  assert main == expected
  assert ablate == expected


@pytest.mark.slow
def test_an_installed_accelerator_plugin_leaves_the_host_alone(tmp_path):
  """Decided before JAX starts: a PJRT plugin in the `jax_plugins` namespace means an accelerator backend
  (its buffers are not the host allocator's business); JAX_PLATFORMS=cpu means the CPU all the same."""
  (tmp_path / 'jax_plugins' / 'xla_fake_accelerator').mkdir(parents=True)
  (tmp_path / 'jax_plugins' / 'xla_fake_accelerator' / '__init__.py').write_text('')
  probe = 'from vit_jax import host_cpu; print(host_cpu.runs_on_cpu())'

  def runs_on_cpu(**env):
    result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'JAX_PLATFORMS': '', **env}, check=True)
    return result.stdout.split()[-1]
  assert runs_on_cpu() == 'True'
  assert runs_on_cpu(PYTHONPATH=str(tmp_path)) == 'False'
  assert runs_on_cpu(PYTHONPATH=str(tmp_path), JAX_PLATFORMS='cpu') == 'True'
  # libtpu installed on a host without TPU chips (to compile for a TPU topology): still the CPU. The package
  # as JAX looks for it: importable, naming its shared library (here one that is not there).
  (tmp_path / 'tpu' / 'libtpu').mkdir(parents=True)
  (tmp_path / 'tpu' / 'libtpu' / '__init__.py').write_text(
      'def get_library_path():\n  return "/nonexistent/libtpu.so"\n')
  assert runs_on_cpu(PYTHONPATH=str(tmp_path / 'tpu')) == 'True'


@pytest.mark.slow
def test_the_main_job_on_a_cpu_host_with_libtpu_installed_runs_as_without_it(tmp_path, data_dir):
  """libtpu (the `tpu` extra, for `vit_jax.plan`) on a host without TPU chips: the job picks the CPU outright,
  without libtpu probing for chips and printing errors."""
  if os.environ.get('VIT_JAX_REQUIRE_LIBTPU') == '1':
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
  else:
    pytest.importorskip('libtpu')
  result = run_main(tmp_path / 'run', '--config=configs/digits.py', '--config.model.num_layers=1',
                    '--config.total_steps=4', '--config.warmup_steps=1', '--config.log_every_steps=2',
                    f'--config.data_dir={data_dir}', env={**os.environ, 'JAX_PLATFORMS': ''})
  assert 'Final test accuracy' in result.stdout
  assert 'Host setup: 1 CPU device(s)' in result.stderr
  for noise in ('TPU_WORKER_HOSTNAMES', 'libtpu', 'TPU_ACCELERATOR_TYPE'):
    assert noise not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_tensorflow_starts_without_keras_unless_the_user_chose_a_keras():
  """TensorFlow imported after vit_jax leaves Keras unimported (tf.data and tfds work); a TF_USE_LEGACY_KERAS
  the user set is kept, and Keras 3 still imports on its own."""
  script = ('import sys, vit_jax, tensorflow as tf, tensorflow_datasets; '
            'imported = "keras" in sys.modules; '
            'total = int(tf.data.Dataset.range(4).map(lambda x: 2 * x).reduce(tf.constant(0, tf.int64), '
            'lambda a, b: a + b)); '
            'import keras; print(imported, total, keras.__version__.split(".")[0])')
  run = lambda env: subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                                   timeout=300, env={**{k: v for k, v in os.environ.items()
                                                        if k != 'TF_USE_LEGACY_KERAS'}, **env})
  ours, theirs = run({}), run({'TF_USE_LEGACY_KERAS': '0'})
  assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr[-3000:] + theirs.stderr[-3000:]
  assert ours.stdout.split() == ['False', '12', '3']
  assert theirs.stdout.split() == ['True', '12', '3']  # TensorFlow's own choice: Keras at its import.
