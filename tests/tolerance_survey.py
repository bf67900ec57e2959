"""The tolerance survey: every float comparison of the suite under 1 and 2 CPU threads and both CPU matmul
libraries, with the worst error per comparison against its tolerance (docs/tolerances.md).

  python tests/tolerance_survey.py --out /tmp/survey                 # runs the four settings, then the table
  python tests/tolerance_survey.py --out /tmp/survey --table_only    # the table of logs already there

Each setting runs the files that compare floating-point results in a fresh pytest, pinned with `taskset`
(`-c 0`: one thread; `-c 0,1`: two), with VIT_JAX_TEST_CPU_MATMUL=xla or onednn (conftest: every compile of
the session under that library) and VIT_JAX_TOLERANCE_LOG (each comparison appends its error). test_onednn
compares the two libraries itself, so it runs under its own settings (`config`) with 1 and 2 threads.
"""
import argparse
import collections
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ['tests/test_published_functions.py', 'tests/test_models.py', 'tests/test_checkpoints.py',
         'tests/test_analysis.py', 'tests/test_fewshot.py', 'tests/test_masked_patches.py', 'tests/test_train.py',
         'tests/test_timm_layout.py', 'tests/test_parallel.py', 'tests/test_faults.py',
         'tests/test_object_store.py', 'tests/test_multiprocess.py']


def run(out: str, cpus: str, matmul: str) -> None:
  name = f'cpu{cpus.replace(",", "_")}-{matmul}'
  log = os.path.join(out, f'{name}.jsonl')
  if os.path.exists(log):
    os.remove(log)
  env = dict(os.environ, VIT_JAX_TOLERANCE_LOG=log)
  files = ['tests/test_onednn.py'] if matmul == 'config' else FILES
  if matmul != 'config':
    env['VIT_JAX_TEST_CPU_MATMUL'] = matmul
  with open(os.path.join(out, f'{name}.log'), 'w') as output:
    subprocess.run(['taskset', '-c', cpus, sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *files],
                   cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, check=False)


def table(out: str) -> str:
  worst, limits = collections.defaultdict(dict), {}
  for path in sorted(glob.glob(os.path.join(out, '*.jsonl'))):
    setting = os.path.basename(path)[:-len('.jsonl')]
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        key = (record['test'].replace('tests/', ''), record['what'])
        worst[key][setting] = max(worst[key].get(setting, 0.0), record['error'])
        limits[key] = record['tolerance']
  settings = sorted({s for row in worst.values() for s in row})
  lines = ['| comparison | ' + ' | '.join(settings) + ' | worst | tolerance | tolerance / worst |',
           '|---|' + '---:|' * (len(settings) + 3)]
  for key in sorted(worst):
    row = worst[key]
    highest = max(row.values())
    ratio = f'{limits[key] / highest:.3g}' if highest else ('exact' if not limits[key] else 'inf')
    lines.append(f'| `{key[0]}` {key[1]} | ' + ' | '.join(f'{row[s]:.2g}' if s in row else '-' for s in settings) +
                 f' | {highest:.2g} | {limits[key]:.2g} | {ratio} |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--table_only', action='store_true')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if not args.table_only:
    for cpus in ('0', '0,1'):
      for matmul in ('xla', 'onednn', 'config'):
        run(args.out, cpus, matmul)
  print(table(args.out), end='')


if __name__ == '__main__':
  main()
