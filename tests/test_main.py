"""The main job end to end, as a user runs it: train, evaluate, checkpoint, resume, clear errors. (Kills, damaged
checkpoints and other faults: test_faults.py.)"""
import glob
import json
import os
import re

import pytest

from conftest import load_config, run_main
from vit_jax import config_lib
from vit_jax import flops

TINY = ('--config=configs/digits.py', '--config.model.num_layers=2', '--config.model.hidden_size=64',
        '--config.model.mlp_dim=128', '--config.batch_size=32', '--config.eval_batch_size=71',
        '--config.warmup_steps=10')


@pytest.mark.slow
def test_main_job_trains_evaluates_checkpoints_and_writes_summaries(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  result = run_main(workdir, *TINY, f'--config.data_dir={data_dir}', '--config.total_steps=150',
                    '--config.log_every_steps=50', '--config.checkpoint_every_steps=100',
                    '--config.eval_every_steps=100', '--config.profile_steps=(20, 22)')
  match = re.search(r'Final test accuracy: ([\d.]+) \((\d+)/355', result.stdout)
  assert match, result.stdout + result.stderr[-3000:]
  assert float(match[1]) > 0.5  # 10 classes: chance is 0.1.
  speed = re.search(r'step 100/150 +loss [\d.]+ +accuracy [\d.]+ +[\d.]+ steps/s +(\d+) images/s +([\d.e-]+) '
                    r'TFLOP/s/device +MFU ([\d.]+)% +ETA 0:', result.stderr)
  assert speed, result.stderr[-3000:]
  # Model FLOP/s = images/s x 3 forward passes of XLA's count (one device here).
  config = config_lib.override(load_config('digits.py'), {'model.num_layers': 2, 'model.hidden_size': 64,
                                                          'model.mlp_dim': 128})
  expected = int(speed[1]) * flops.train_flops_per_image(config, 10, 1) / 1e12
  assert float(speed[2]) == pytest.approx(expected, rel=0.02)
  assert 0 < float(speed[3]) < 100
  assert glob.glob(str(workdir / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert 'Profiler trace of steps 20-22 written to' in result.stderr
  assert 'eval accuracy' in result.stderr
  steps = sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit())
  assert steps == [100, 150]
  events = glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(workdir))
  accumulator.Reload()
  tags = set(accumulator.Tags()['tensors'])
  assert {'train/loss', 'train/images_per_sec', 'train/tflops_per_device', 'train/mfu', 'eval/accuracy'} <= tags

  # A second run with the same workdir resumes from the final checkpoint and only evaluates.
  # On other code (as a launcher that ships commit abc123 says), and it says so.
  written_by = json.loads((workdir / 'code.json').read_text())['code']
  assert written_by == config_lib.code_version()
  again = run_main(workdir, *TINY, f'--config.data_dir={data_dir}', '--config.total_steps=150',
                   env={'VIT_JAX_COMMIT': 'abc123'})
  assert 'Resumed from the checkpoint of step 150' in again.stderr
  assert f'were written by code {written_by}; this run is code abc123' in again.stderr
  assert f'Final test accuracy: {match[1]}' in again.stdout
  # Resuming under another setting (not only a longer run) is refused, naming what changed.
  changed = run_main(workdir, *TINY, f'--config.data_dir={data_dir}', '--config.total_steps=150',
                     '--config.lr=0.001', check=False)
  assert changed.returncode != 0 and 'lr: 0.002 -> 0.001' in changed.stderr, changed.stderr[-3000:]
  assert 'Give a new --workdir' in changed.stderr


@pytest.mark.slow
def test_main_job_on_several_devices_and_an_indivisible_batch(tmp_path, data_dir):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  # A device count in XLA_FLAGS wins over config.cpu_devices.
  result = run_main(tmp_path / 'two', *TINY, f'--config.data_dir={data_dir}', '--config.total_steps=20',
                    '--config.eval_batch_size=72', '--config.cpu_devices=3', env=env)
  assert 'on 2 devices' in result.stderr and 'Final test accuracy' in result.stdout
  # Without it, config.cpu_devices splits the CPU.
  bad = run_main(tmp_path / 'bad', *TINY, f'--config.data_dir={data_dir}', '--config.batch_size=33',
                 '--config.cpu_devices=2', env={'XLA_FLAGS': ''}, check=False)
  assert bad.returncode != 0
  assert 'batch size 33 is not divisible by the number of devices it is split over (2: data=2 x fsdp=1)' in bad.stderr


@pytest.mark.slow
def test_main_job_errors_are_clear(tmp_path, data_dir):
  missing = run_main(tmp_path / 'a', '--config=configs/vit_imagenet.py:B/16',
                     f'--config.data_dir={tmp_path}/empty', check=False)
  assert missing.returncode != 0 and "'imagenet2012' is not prepared in" in missing.stderr
  assert 'tfds build imagenet2012' in missing.stderr
  unknown = run_main(tmp_path / 'b', *TINY, f'--config.data_dir={data_dir}', '--config.model.name=ViT-Q/16',
                     check=False)
  assert unknown.returncode != 0 and 'Known variants: ViT-Ti/16' in unknown.stderr
  patch = run_main(tmp_path / 'c', *TINY, f'--config.data_dir={data_dir}', '--config.model.name=ViT-mu/3',
                   check=False)
  assert patch.returncode != 0 and 'image size 8x8 is not divisible by the patch size 3' in patch.stderr
  # Config-only mistakes fail before JAX or TensorFlow start work: no dataset is built, no workdir written.
  ascent = run_main(tmp_path / 'd', *TINY, f'--config.data_dir={tmp_path}/untouched', '--config.lr=-0.001',
                    check=False)
  assert ascent.returncode != 0 and 'config.lr=-0.001: the learning rate must be positive' in ascent.stderr
  assert not os.path.exists(tmp_path / 'd') and not os.path.exists(tmp_path / 'untouched')


SLURM_TASK = {'SLURM_JOB_ID': '4242', 'SLURM_STEP_NODELIST': 'node[1-4]', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}


def test_multi_process_jobs_are_detected_from_the_cluster_environment(monkeypatch):
  from vit_jax import main  # pylint: disable=g-import-not-at-top
  for name in (*SLURM_TASK, 'SLURM_NTASKS', 'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert main.cluster_process_count() == 1
  for name, value in SLURM_TASK.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv('SLURM_NTASKS', '1')  # A single-task SLURM job is one process.
  assert main.cluster_process_count() == 1
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert main.cluster_process_count() == 16
  for name in (*SLURM_TASK, 'SLURM_NTASKS'):
    monkeypatch.delenv(name)
  monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.96.0.1:34911')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  assert main.cluster_process_count() == 4


def test_processes_of_one_job_kept_apart_are_refused_before_they_share_a_workdir(tmp_path, data_dir):
  # One of the 2 tasks of a SLURM job told not to join the others: it would train alone into their workdir.
  result = run_main(tmp_path / 'run', '--config=configs/digits.py', f'--config.data_dir={data_dir}',
                    '--distributed=no', env={**SLURM_TASK, 'SLURM_NTASKS': '2'}, check=False)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'This process is one of 2 that the cluster started for this job, but --distributed=no' in result.stderr
  assert not (tmp_path / 'run').exists()
