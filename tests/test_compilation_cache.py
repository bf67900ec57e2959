"""The persistent compilation cache: where it lives, whole entries under concurrent writers, and a rerun of the
main job that compiles nothing while a changed config compiles anew."""
import multiprocessing
import os
import re

import pytest

from conftest import run_main
from vit_jax import compilation_cache


def test_the_cache_lives_beside_the_workdir_unless_told_otherwise(tmp_path):
  assert compilation_cache.directory_for('auto', str(tmp_path / 'runs' / 'a')) == str(
      tmp_path / 'runs' / 'jax_compilation_cache')
  assert compilation_cache.directory_for('auto', 'gs://bucket/runs/a/') == 'gs://bucket/runs/jax_compilation_cache'
  assert compilation_cache.directory_for('', str(tmp_path / 'a')) is None
  assert compilation_cache.directory_for(str(tmp_path / 'shared'), 'gs://b/a') == str(tmp_path / 'shared')


def _write_many(directory, key, byte, times):
  """Writes the entry `times` times; writer 1 also removes it after each write, so the two keep racing."""
  cache = compilation_cache._WholeFileCache(directory)  # pylint: disable=protected-access
  for _ in range(times):
    cache.put(key, bytes([byte]) * 2**22)
    if byte == 1:
      try:
        os.remove(os.path.join(directory, key))
      except FileNotFoundError:
        pass


@pytest.mark.slow
def test_two_processes_writing_one_entry_leave_it_whole(tmp_path):
  directory = str(tmp_path)
  writers = [multiprocessing.get_context('spawn').Process(target=_write_many, args=(directory, 'key', b, 20))
             for b in (1, 2)]
  for w in writers:
    w.start()
  cache = compilation_cache._WholeFileCache(directory)  # pylint: disable=protected-access
  seen = set()
  while any(w.is_alive() for w in writers):
    value = cache.get('key')
    if value is not None:  # Never a part of an entry, never a mix of the two.
      assert len(value) == 2**22 and len(set(value)) == 1, (len(value), set(value))
      seen.add(value[0])
  assert all(w.join() is None and w.exitcode == 0 for w in writers)
  assert cache.get('key') in (b'\x01' * 2**22, b'\x02' * 2**22, None)
  assert not [name for name in os.listdir(directory) if name.endswith('.tmp')]
  assert seen  # The reader did see entries while the writers ran.


def _cache_use(stderr):
  match = re.findall(r'Compilation cache \(end of run\): (\d+) executables loaded, [\d.-]+ s of compiling saved; '
                     r'(\d+) compiled', stderr)
  assert match, stderr[-3000:]
  return tuple(map(int, match[-1]))


@pytest.mark.slow
def test_a_rerun_compiles_nothing_and_a_changed_config_compiles_anew(tmp_path, data_dir):
  # XLA's dot: this jaxlib cannot serialize executables with oneDNN fusions (compilation_cache.py).
  flags = ('--config=configs/digits.py', '--config.model.num_layers=1', '--config.batch_size=32',
           '--config.eval_batch_size=71', '--config.warmup_steps=2', '--config.total_steps=4',
           '--config.cpu_matmul=xla', f'--config.data_dir={data_dir}')
  first = run_main(tmp_path / 'first', *flags, env={'JAX_LOG_COMPILES': '1'})
  loaded, compiled = _cache_use(first.stderr)
  assert loaded == 0 and compiled > 2  # Initialisation, the train and eval steps, and smaller programs.
  # Compiled once, while the first batch was drawn: the loop's first call must not compile it again.
  assert first.stderr.count('Finished XLA compilation of jit(train_step)') == 1, first.stderr[-3000:]
  assert os.listdir(tmp_path / 'jax_compilation_cache')
  again = run_main(tmp_path / 'again', *flags)
  assert _cache_use(again.stderr) == (compiled, 0)  # Everything loaded, nothing compiled.
  final = lambda result: re.search(r'Final test accuracy: .*', result.stdout)[0]
  assert final(again) == final(first)  # The same executables compute the same run.
  changed = run_main(tmp_path / 'changed', *flags, '--config.model.num_layers=2')
  loaded, recompiled = _cache_use(changed.stderr)
  assert recompiled >= 2 and loaded < compiled  # The train and eval steps of the new model, at least.
