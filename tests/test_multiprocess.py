"""Real multi-process runs on one machine: two OS processes joined by jax.distributed (127.0.0.1 coordinator,
gloo collectives between their CPU devices), launched by launch/local_multiprocess.sh as a user would."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import recording_gcloud, ROOT, run_main
import tolerances
from vit_jax import checkpoints

LAUNCH = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')
# 2 processes x 2 devices = a data=2 x fsdp=2 mesh: the kernels are split across devices of one process and
# the batch across both processes.
FLAGS = ('--config=configs/digits.py', '--config.model.num_layers=2', '--config.batch_size=32',
         '--config.eval_batch_size=72', '--config.mesh.data=2', '--config.mesh.fsdp=2',
         '--config.mesh.min_shard_size=1024', '--config.checkpoint_every_steps=3', '--config.log_every_steps=3',
         '--config.warmup_steps=2')


def _launcher(log_dir, workdir, data_dir, total_steps):
  return [LAUNCH, '-n', '2', '-d', '2', '-l', str(log_dir), '--', *FLAGS, f'--workdir={workdir}',
          f'--config.data_dir={data_dir}', f'--config.total_steps={total_steps}']


def _logs(log_dir):
  return [open(os.path.join(log_dir, f'process_{i}.log')).read() for i in range(2)]


def _launch(log_dir, workdir, data_dir, total_steps):
  result = subprocess.run(_launcher(log_dir, workdir, data_dir, total_steps), cwd=ROOT,
                          env={**os.environ, 'PYTHON': sys.executable}, capture_output=True, text=True, timeout=600)
  logs = _logs(log_dir)
  assert result.returncode == 0, result.stderr[-3000:] + logs[0][-3000:] + logs[1][-3000:]
  return logs


def _final(log):
  accuracy = re.search(r'Final test accuracy: ([\d.]+) \((\d+)/355', log)
  loss = re.search(r'Process \d: last train loss ([\d.]+)', log)
  assert accuracy and loss, log[-3000:]
  return accuracy[1], loss[1]


@pytest.mark.slow
def test_two_processes_train_agree_stop_together_on_sigterm_and_resume_to_the_same_parameters(tmp_path, data_dir):
  reference = tmp_path / 'reference'
  straight = _launch(tmp_path / 'logs_reference', reference, data_dir, total_steps=9)
  for i, log in enumerate(straight):
    assert f'Process {i} of 2; 2 local devices of 4.' in log
  assert "mesh {'data': 2, 'fsdp': 2}, 2 processes" in straight[0]
  assert _final(straight[0]) == _final(straight[1])  # Same loss and accuracy, computed by each process.
  # Only process 0 reports progress and evaluations, and writes summaries.
  assert 'step 9/9' in straight[0] and 'step 9/9' not in straight[1]
  assert 'step 9: eval accuracy' in straight[0] and 'eval accuracy' not in straight[1]
  assert len(glob.glob(str(reference / 'events.out.tfevents.*'))) == 1
  assert sorted(int(p) for p in os.listdir(reference / 'checkpoints') if p.isdigit()) == [3, 6, 9]

  # SIGTERM to process 1 alone, once both have joined (process 0 then holds the workdir's lock): JAX's
  # preemption service tells process 0, and both save the same step and stop.
  workdir = tmp_path / 'preempted'
  launcher = subprocess.Popen(_launcher(tmp_path / 'logs_preempted', workdir, data_dir, 9), cwd=ROOT,
                              env={**os.environ, 'PYTHON': sys.executable}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (os.path.exists(workdir / 'lock') and os.path.getsize(workdir / 'lock')):
    assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
    time.sleep(0.05)
  worker = subprocess.run(['pgrep', '-f', '--', f'--process_id=1 .*--workdir={workdir}'], capture_output=True,
                          text=True)
  os.kill(int(worker.stdout.split()[0]), signal.SIGTERM)
  stdout, stderr = launcher.communicate(timeout=300)
  logs = _logs(tmp_path / 'logs_preempted')
  assert launcher.returncode == 75 and 'rerun the same command to resume' in stderr, stderr + logs[0][-3000:]
  stops = [re.search(r'Stopped by SIGTERM \(preemption\) at step (\d+) of 9', log) for log in logs]
  assert all(stops), logs[0][-3000:] + logs[1][-3000:]
  assert stops[0][1] == stops[1][1]  # The same step on both.
  step = int(stops[0][1])
  assert step in [int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()]

  resumed = _launch(tmp_path / 'logs_resumed', workdir, data_dir, total_steps=9)
  for log in resumed:
    assert f'Resumed from the checkpoint of step {step}' in log and 'after 9 steps' in log
    assert 'global example order differs' not in log
  tolerances.assert_close(checkpoints.restore_params(str(workdir), 9, ema=False)[0],
                          checkpoints.restore_params(str(reference), 9, ema=False)[0], tolerances.RESUMED_RUN,
                          'parameters')

  # Extended by one process (its 4 devices simulated): the data is sharded differently, and it says so.
  extended = run_main(reference, *FLAGS, '--config.cpu_devices=4', f'--config.data_dir={data_dir}',
                      '--config.total_steps=12')
  assert ('The checkpoint of step 9 was written by 2 processes; this run has 1.' in extended.stderr and
          'the global example order differs' in extended.stderr), extended.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('killed', [1, 0])
def test_when_a_process_dies_the_other_says_which_and_stops_at_once(tmp_path, data_dir, killed):
  """kill -9 mid-run. Of process 1 (a worker): process 0 (waiting in a collective, or failing one) notices within
  a second that process 1's pid is gone (same host), says so and exits 3; without the watch it waited out the
  heartbeat timeout and JAX aborted it (docs/faults.md). Of process 0 (the coordinator, which hosts JAX's
  coordination service): JAX aborts process 1 at once with its own message; the launcher quotes it."""
  workdir = tmp_path / 'run'
  flags = list(_launcher(tmp_path / 'logs', workdir, data_dir, 3000))
  launcher = subprocess.Popen([*flags, '--config.checkpoint_every_steps=1000'], cwd=ROOT,
                              env={**os.environ, 'PYTHON': sys.executable}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
  log_0 = tmp_path / 'logs' / 'process_0.log'
  deadline = time.time() + 300
  while not (log_0.exists() and 'step 3/3000' in log_0.read_text()):  # Training, past compilation.
    assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
    time.sleep(0.1)
  victim = subprocess.run(['pgrep', '-f', '--', f'--process_id={killed} .*--workdir={workdir}'],
                          capture_output=True, text=True)
  victim_pid = int(victim.stdout.split()[0])
  os.kill(victim_pid, signal.SIGKILL)
  killed_at = time.time()
  stderr = launcher.communicate(timeout=300)[1]
  seconds = time.time() - killed_at
  survivor = 1 - killed
  log = (tmp_path / 'logs' / f'process_{survivor}.log').read_text()
  if killed == 1:
    assert re.search(rf'Error: process 0 of 2 stops: process 1 \(pid {victim_pid} on host .*\) is gone', log), \
        log[-3000:]
    assert 'Rerun the same command on every host: the run resumes' in log
    assert 'process 0 failed (exit 3): Error: process 0 of 2 stops: process 1' in stderr, stderr
  else:
    assert 'Terminating process because the JAX distributed service detected fatal errors' in log, log[-3000:]
    assert 'process 1 failed (exit 134): ' in stderr and 'detected fatal errors' in stderr, stderr
  assert 'rerun the same command: the run resumes from its newest checkpoint' in stderr
  assert seconds < 30, seconds


@pytest.mark.slow
def test_launch_scripts_parse_and_explain_themselves():
  for script in ('local_multiprocess.sh', 'tpu_vm.sh', 'slurm_gpu.sbatch', 'gpu_benchmark.sh'):
    path = os.path.join(ROOT, 'launch', script)
    subprocess.run(['bash', '-n', path], check=True)
    usage = subprocess.run(['bash', path, '--help' if script != 'local_multiprocess.sh' else '-h'],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and 'usage' in usage.stdout.lower(), (script, usage.stdout, usage.stderr)
  # Without the main job's flags the local launcher refuses, saying what is missing.
  missing = subprocess.run(['bash', LAUNCH, '-n', '2'], capture_output=True, text=True, timeout=30)
  assert missing.returncode == 2 and "give the main job's flags after --" in missing.stderr


FAKE_SRUN = r'''#!{python}
"""srun, as far as process setup goes: one task per GPU of one node, each with the environment SLURM gives
it (its GPUs limited to one under --gpus-per-task=1). Instead of the job's command, each task reports the
local device ids JAX's SLURM detection would use and the GPUs the task can see."""
import json, os, subprocess, sys
options = [a for a in sys.argv[1:] if a.startswith('--')]
gpus = int(os.environ['SLURM_GPUS_ON_NODE'])
probe = ('import json, os; from jax._src import clusters; '
         'ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None)[3]; '
         'print(json.dumps({{"local_device_ids": list(ids), '
         '"visible": os.environ["CUDA_VISIBLE_DEVICES"].split(",")}}))')
for task in range(gpus):
  env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS=str(gpus),
             SLURM_STEP_NODELIST='node001', JAX_PLATFORMS='cpu',
             CUDA_VISIBLE_DEVICES=str(task) if '--gpus-per-task=1' in options else
             ','.join(str(g) for g in range(gpus)))
  subprocess.run([sys.executable, '-c', probe], env=env, check=True)
sys.exit(int(os.environ.get('FAKE_EXIT', '0')))  # As the job's tasks would end.
'''


def test_slurm_script_gives_every_task_the_gpu_jax_will_ask_for(tmp_path):
  """JAX's SLURM detection makes task i of a node use local device i: every task must see all the node's
  GPUs (with --gpus-per-task=1 task 3 would see one GPU and ask for ordinal 3)."""
  bin_dir, venv = tmp_path / 'bin', tmp_path / 'venv'
  bin_dir.mkdir()
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'activate').write_text('')
  srun = bin_dir / 'srun'
  srun.write_text(FAKE_SRUN.format(python=sys.executable))
  srun.chmod(0o755)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'VENV': str(venv), 'SLURM_JOB_ID': '4242',
         'SLURM_GPUS_ON_NODE': '4'}
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch'), 'configs/default.py',
                           str(tmp_path / 'run')], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  tasks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert len(tasks) == 4
  for task in tasks:
    assert all(0 <= i < len(task['visible']) for i in task['local_device_ids']), task
  assert not (tmp_path / 'requeued').exists()

  # Preempted (the tasks exit 75): the job puts itself back in the queue and reports 75.
  scontrol = bin_dir / 'scontrol'
  scontrol.write_text(f'#!/usr/bin/env bash\necho "$*" > {tmp_path / "requeued"}\n')
  scontrol.chmod(0o755)
  preempted = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch'), 'configs/default.py',
                              str(tmp_path / 'run')], env={**env, 'FAKE_EXIT': '75'}, capture_output=True,
                             text=True, timeout=120)
  assert preempted.returncode == 75 and 'requeueing job 4242' in preempted.stderr
  assert (tmp_path / 'requeued').read_text().split() == ['requeue', '4242']


FAKE_GCLOUD = r'''#!/usr/bin/env bash
# gcloud, as far as tpu_vm.sh uses it: records each call; `scp FILE NAME:DEST` copies FILE to $HOME/DEST and
# `ssh --command CMD` runs CMD in $HOME, as the one worker.
echo "gcloud $*" >> "$CALLS"
if [[ "$*" == *"queued-resources describe"* ]]; then  # None until created; then waits once, then is granted.
  grep -q 'queued-resources create' "$CALLS" || exit 1
  [[ $(grep -c 'queued-resources describe' "$CALLS") -eq 2 ]] && echo WAITING_FOR_RESOURCES || echo ACTIVE
  exit 0
fi
[[ "$*" == *"tpu-vm describe"* ]] && exit 1  # No such VM yet.
if [[ "$3 $4" == "tpu-vm scp" ]]; then cp "$5" "$HOME/${6#*:}"; exit 0; fi
for arg in "$@"; do
  if [[ "$take" == 1 ]]; then command="$arg"; take=0; fi
  [[ "$arg" == --command ]] && take=1
  [[ "$arg" == --command=* ]] && command="${arg#--command=}"
done
if [[ -n "${command:-}" ]]; then cd "$HOME" && bash -c "$command"; fi
'''

FAKE_PYTHON311 = r'''#!/usr/bin/env bash
# The worker's python3.11: `-m venv DIR` makes DIR/bin/python, a fake of the virtualenv's python.
echo "python3.11 $*" >> "$CALLS"
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin" && cp "$FAKE_VENV_PYTHON" "$3/bin/python"; fi
'''

FAKE_SYSTEMCTL = r'''#!/usr/bin/env bash
# systemctl, as far as tpu_vm.sh uses it: records each call; `restart UNIT` runs the unit as systemd would, in
# the background: ExecStart with its output appended, again after an exit other than 0 and the unit's
# RestartPreventExitStatus (RestartSec is not waited for).
echo "systemctl $*" >> "$CALLS"
[[ "$1" == restart ]] || exit 0
unit="$SYSTEMD_UNIT_DIR/$2"
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
log=$(sed -n 's/^StandardOutput=append://p' "$unit")
prevent=" $(sed -n 's/^RestartPreventExitStatus=//p' "$unit") "
(while true; do $exec_start >> "$log" 2>&1; s=$?; echo "exit $s" >> "$CALLS"
   [[ $s -eq 0 || "$prevent" == *" $s "* ]] && break; done) > /dev/null 2>&1 &
'''

FAKE_VENV_PYTHON = r'''#!/usr/bin/env bash
# The virtualenv's python: pip succeeds; the main job is preempted (exit 75) on its first run, then finishes.
echo "venv-python $* (commit $VIT_JAX_COMMIT, in $PWD)" >> "$CALLS"
if [[ "$*" == *vit_jax.main* ]]; then
  runs=$(grep -c '^venv-python .*vit_jax.main' "$CALLS")
  [[ "$runs" -eq 1 ]] && exit 75
  echo finished >> "$CALLS"
fi
exit 0
'''


@pytest.mark.parametrize('queued', [False, True])
def test_tpu_vm_script_ships_the_commit_creates_a_spot_slice_and_reruns_a_preempted_job(tmp_path, queued):
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  units = tmp_path / 'systemd'
  units.mkdir()
  for name, text in (('gcloud', FAKE_GCLOUD), ('python3.11', FAKE_PYTHON311), ('venv_python', FAKE_VENV_PYTHON),
                     ('systemctl', FAKE_SYSTEMCTL), ('sudo', '#!/usr/bin/env bash\nexec "$@"\n')):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  calls = tmp_path / 'calls'
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'HOME': str(home), 'CALLS': str(calls),
         'FAKE_VENV_PYTHON': str(bin_dir / 'venv_python'), 'SYSTEMD_UNIT_DIR': str(units), 'SPOT': '1',
         'QUEUED': str(int(queued)), 'POLL_SECONDS': '0'}
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'vit-l16', 'us-central2-b', 'v4-64',
                           'configs/vit_l16.py', 'gs://bucket/vit_l16', '--config.lr=0.0004'], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  deadline = time.time() + 30  # The job runs as a service: wait for its last attempt to end.
  while 'exit 0' not in calls.read_text() and time.time() < deadline:
    time.sleep(0.1)
  lines = calls.read_text().splitlines()
  if queued:  # Asked for as a queued resource, waited for until granted, never created directly.
    assert any(line.startswith('gcloud compute tpus queued-resources create vit-l16 --node-id=vit-l16') and
               '--spot' in line for line in lines)
    assert sum('queued-resources describe vit-l16' in line for line in lines) == 3  # Absent, waiting, granted.
    assert 'waiting for capacity' in result.stderr and not any('tpu-vm create' in line for line in lines)
  else:
    assert any(line.startswith('gcloud compute tpus tpu-vm create vit-l16') and '--spot' in line for line in lines)
  assert any(' create vit-l16' in line and '--autocheckpoint-enabled' in line for line in lines)  # v4: warned.
  # The checkout's commit, shipped and unpacked whole; a 3.11 virtualenv; an install under the pinned versions.
  commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short=12', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  source = home / 'vit_jax_src' / commit
  assert (source / 'launch' / 'constraints.txt').read_text() == open(
      os.path.join(ROOT, 'launch', 'constraints.txt')).read()
  assert (source / 'vit_jax' / 'main.py').exists() and not (source / '.git').exists()
  assert any(line.startswith('python3.11 -m venv') for line in lines)
  assert any(line.startswith(f'venv-python -m pip install -q -c {source}/launch/constraints.txt -e {source}[tpu]')
             for line in lines), lines
  # A service that starts at boot and after a preemption, not after a bug, a user error or Ctrl-C.
  unit = (units / 'vit_jax.service').read_text().splitlines()
  for line in ('Restart=on-failure', 'RestartPreventExitStatus=1 2 130', 'WantedBy=multi-user.target',
               f'ExecStart=/bin/bash {home}/vit_jax_run.sh', f'StandardOutput=append:{home}/vit_jax.log'):
    assert line in unit, unit
  assert [line for line in lines if line.startswith('systemctl')] == [
      'systemctl daemon-reload', 'systemctl enable vit_jax.service', 'systemctl restart vit_jax.service']
  runs = [line for line in lines if line.startswith('venv-python -m vit_jax.main')]
  assert len(runs) == 2 and 'finished' in lines, lines  # Preempted once (75), restarted, finished.
  assert [line for line in lines if line.startswith('exit ')] == ['exit 75', 'exit 0']
  assert all(f'(commit {commit}, in {source})' in run for run in runs), runs  # Recorded by the job.
  deadline = time.time() + 30  # Each attempt's end copies the worker's log into the workdir.
  while len([line for line in calls.read_text().splitlines() if 'gcloud storage cp' in line]) < 2:
    assert time.time() < deadline, calls.read_text()
    time.sleep(0.1)
  gathered = [line for line in calls.read_text().splitlines() if line.startswith('gcloud storage cp')]
  assert all(f'gs://bucket/vit_l16/logs/{socket.gethostname()}.log' in line for line in gathered), gathered
  assert (home / 'vit_jax.log').read_text().count(f'vit_jax.main, commit {commit}') == 2  # Appended to.
  delete = ('gcloud compute tpus queued-resources delete vit-l16 --zone=us-central2-b --force' if queued else
            'gcloud compute tpus tpu-vm delete vit-l16 --zone=us-central2-b')
  assert f'When done: {delete}' in result.stdout
  assert ('--config=configs/vit_l16.py --workdir=gs://bucket/vit_l16 --distributed=yes --config.lr=0.0004'
          in runs[0])


@pytest.mark.parametrize('accelerator, runtime', [('v3-8', 'tpu-ubuntu2204-base'), ('v4-32', 'tpu-ubuntu2204-base'),
                                                  ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                                  ('v5p-128', 'v2-alpha-tpuv5'), ('v6e-64', 'v2-alpha-tpuv6e')])
def test_tpu_vm_script_picks_the_runtime_version_of_the_accelerator_type(tmp_path, accelerator, runtime):
  env, calls = recording_gcloud(tmp_path)
  env['REPO'] = 'https://example.com/vit_jax.git'
  script = ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'vit', 'zone-a', accelerator, 'configs/vit_l16.py',
            'gs://bucket/run']
  for queued, flag in (('0', '--version'), ('1', '--runtime-version')):
    calls.write_text('')
    result = subprocess.run(script, env={**env, 'QUEUED': queued, 'POLL_SECONDS': '0'}, capture_output=True,
                            text=True, timeout=60)
    assert f'accelerator {accelerator}: runtime version {runtime}' in result.stderr
    create = [line for line in calls.read_text().splitlines() if ' create ' in line]
    assert len(create) == 1 and f'{flag}={runtime}' in create[0], create
    # Cloud TPU's maintenance warning (SIGTERM first) where it exists: v2-v4 and v5e.
    assert ('--autocheckpoint-enabled' in create[0]) == (accelerator[:3] in ('v3-', 'v4-', 'v5l')), create
  calls.write_text('')
  overridden = subprocess.run(script, env={**env, 'RUNTIME_VERSION': 'my-image'}, capture_output=True, text=True,
                              timeout=60)
  assert '--version=my-image' in calls.read_text() and '(RUNTIME_VERSION)' in overridden.stderr


def test_tpu_vm_script_refuses_an_unknown_accelerator_type_before_creating_anything(tmp_path):
  calls = tmp_path / 'calls'
  result = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'vit', 'zone-a', 'v9-8',
                           'configs/vit_l16.py', 'gs://bucket/run'], env={**os.environ, 'CALLS': str(calls),
                          'REPO': 'https://example.com/vit_jax.git', 'PATH': '/usr/bin:/bin'},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'unknown accelerator type v9-8' in result.stderr
  assert not calls.exists()


@pytest.mark.parametrize('queued, lost, live', [(True, 'SUSPENDED', 'ACTIVE'), (False, 'PREEMPTED', 'READY')])
def test_tpu_vm_script_recreates_a_reclaimed_slice_only_when_asked_and_reuses_a_live_one(tmp_path, queued, lost,
                                                                                     live):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(  # Records; a describe answers $STATE, nothing once deleted, $LIVE once created.
      '#!/usr/bin/env bash\necho "gcloud $*" >> "$CALLS"\n[[ "$*" == *describe* ]] || exit 0\n'
      'if grep -q " create " "$CALLS"; then echo "$LIVE"; elif grep -q " delete " "$CALLS"; then exit 1; '
      'else echo "$STATE"; fi\n')
  (bin_dir / 'gcloud').chmod(0o755)
  calls = tmp_path / 'calls'
  kind = 'queued-resources' if queued else 'tpu-vm'

  def launch(state, **extra):
    calls.write_text('')
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'CALLS': str(calls), 'STATE': state,
           'LIVE': live, 'QUEUED': str(int(queued)), 'POLL_SECONDS': '0', **extra}
    result = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'vit', 'zone-a', 'v4-32',
                             'configs/vit_l16.py', 'gs://bucket/run'], env=env, capture_output=True, text=True,
                            timeout=60)
    return result, [line for line in calls.read_text().splitlines() if ' delete ' in line or ' create ' in line]

  refused, changes = launch(lost)  # Reclaimed: the script stops before touching anything, and says how.
  assert refused.returncode == 2 and f'vit exists but is {lost}' in refused.stderr and 'RECREATE=1' in refused.stderr
  assert changes == []
  recreated, changes = launch(lost, RECREATE='1')
  assert recreated.returncode == 0, recreated.stderr
  assert [line.split(' vit ')[0] for line in changes] == [f'gcloud compute tpus {kind} delete',
                                                          f'gcloud compute tpus {kind} create']
  reused, changes = launch(live)
  assert reused.returncode == 0 and f'reusing vit ({live})' in reused.stderr and changes == []
