"""Real multi-process runs on one machine: two OS processes joined by jax.distributed (127.0.0.1 coordinator,
gloo collectives between their CPU devices), launched by launch/local_multiprocess.sh as a user would."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

LAUNCH = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')
# 2 processes x 2 devices = a data=2 x fsdp=2 mesh: the kernels are split across devices of one process and
# the batch across both processes.
FLAGS = ('--config=configs/digits.py', '--config.model.num_layers=2', '--config.batch_size=32',
         '--config.eval_batch_size=72', '--config.mesh.data=2', '--config.mesh.fsdp=2',
         '--config.mesh.min_shard_size=1024', '--config.checkpoint_every_steps=3', '--config.log_every_steps=3',
         '--config.warmup_steps=2')


def _launch(log_dir, workdir, data_dir, total_steps):
  result = subprocess.run(
      [LAUNCH, '-n', '2', '-d', '2', '-l', str(log_dir), '--', *FLAGS, f'--workdir={workdir}',
       f'--config.data_dir={data_dir}', f'--config.total_steps={total_steps}'],
      cwd=ROOT, env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
  logs = [open(os.path.join(log_dir, f'process_{i}.log')).read() for i in range(2)]
  assert result.returncode == 0, result.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
  return logs


def _final(log):
  accuracy = re.search(r'Final test accuracy: ([\d.]+) \((\d+)/355', log)
  loss = re.search(r'Process \d: last train loss ([\d.]+)', log)
  assert accuracy and loss, log[-3000:]
  return accuracy[1], loss[1]


@pytest.mark.slow
def test_two_processes_train_agree_and_a_second_pair_resumes_their_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  first = _launch(tmp_path / 'logs_first', workdir, data_dir, total_steps=6)
  for i, log in enumerate(first):
    assert f'Process {i} of 2; 2 local devices of 4.' in log
  assert "mesh {'data': 2, 'fsdp': 2}, 2 processes" in first[0]
  assert _final(first[0]) == _final(first[1])  # Same loss and accuracy, computed by each process.
  # Only process 0 reports progress and writes summaries.
  assert 'step 6/6' in first[0] and 'step 6/6' not in first[1]
  assert len(glob.glob(str(workdir / 'events.out.tfevents.*'))) == 1
  assert sorted(p for p in os.listdir(workdir / 'checkpoints') if p.isdigit()) == ['3', '6']

  second = _launch(tmp_path / 'logs_second', workdir, data_dir, total_steps=9)
  for log in second:
    assert 'Resumed from the checkpoint of step 6' in log
    assert 'after 9 steps' in log
  assert _final(second[0]) == _final(second[1])


@pytest.mark.slow
def test_launch_scripts_parse_and_explain_themselves():
  for script in ('local_multiprocess.sh', 'tpu_vm.sh', 'slurm_gpu.sbatch'):
    path = os.path.join(ROOT, 'launch', script)
    subprocess.run(['bash', '-n', path], check=True)
    usage = subprocess.run(['bash', path, '--help' if script != 'local_multiprocess.sh' else '-h'],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and 'usage' in usage.stdout.lower(), (script, usage.stdout, usage.stderr)
  # Without the main job's flags the local launcher refuses, saying what is missing.
  missing = subprocess.run(['bash', LAUNCH, '-n', '2'], capture_output=True, text=True, timeout=30)
  assert missing.returncode == 2 and "give the main job's flags after --" in missing.stderr
