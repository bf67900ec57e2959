"""The TPU planner (`vit_jax.plan`): slice names, the compiled module read right (loops, collectives), the
roofline on a plain matmul, and plans of small models that libtpu compiles here, on the CPU, for small slices."""
import json
import os
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import recording_gcloud
from conftest import ROOT
from vit_jax import errors
from vit_jax import flops
from vit_jax import plan
from vit_jax import tpu

# libtpu comes with the `tpu` and `test` extras. Without it these tests skip, unless VIT_JAX_REQUIRE_LIBTPU=1 (CI).
if os.environ.get('VIT_JAX_REQUIRE_LIBTPU') == '1':
  import libtpu  # pylint: disable=unused-import
else:
  libtpu = pytest.importorskip('libtpu', reason="the planner's compiles need libtpu (the tpu or test extra)")

# Small enough to compile for a TPU in seconds here.
SMALL = ('--config=configs/vit_imagenet.py:Ti/16', '--config.model.num_layers=2', '--config.image_size=32')
# Its train state (1.4B parameters with Adam's moments, 15.9 GiB) alone fills a v5e chip's 16 GiB: fsdp must
# split it. Two wide layers compile faster than more narrower ones.
WIDE = (*SMALL, '--config.model.num_layers=2', '--config.model.hidden_size=7680', '--config.model.mlp_dim=30720',
        '--config.model.num_heads=60', '--config.batch_size=8')

# 1.6B parameters: with Adam's moments more than a v5e chip's 16 GiB, so on one chip no lever can fit it.
TOO_BIG_FOR_ONE_CHIP = {'model.num_layers': 8, 'model.hidden_size': 4096, 'model.mlp_dim': 16384,
                        'model.num_heads': 32, 'batch_size': 8}


def run_plan(*flags, json_path=None):
  command = [sys.executable, '-m', 'vit_jax.plan', *flags, *([f'--json={json_path}'] if json_path else [])]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('name, torus, chips, devices', [
    ('v4-32', 'v4:2x2x4', 16, 16), ('v4-8', 'v4:2x2x1', 4, 4), ('v4-64', 'v4:2x4x4', 32, 32),
    ('v5p-128', 'v5p:4x4x4', 64, 64), ('v5litepod-16', 'v5e:4x4', 16, 16), ('v5e-64', 'v5e:8x8', 64, 64),
    ('v5litepod-1', 'v5e:1x1', 1, 1), ('v6e-64', 'v6e:8x8', 64, 64), ('v3-32', 'v3:4x4', 16, 32),
    ('v2-8', 'v2:2x2', 4, 8), ('v4:2x2x4', 'v4:2x2x4', 16, 16)])
def test_slice_names_users_type_map_to_libtpu_topologies(name, torus, chips, devices):
  tpu_slice = tpu.parse(name)
  assert (tpu_slice.topology_name, tpu_slice.chips, tpu_slice.num_devices) == (torus, chips, devices)
  assert tpu.parse(tpu_slice.accelerator_type).topology_name == torus  # gcloud's name for it maps back.


@pytest.mark.parametrize('name, says', [('v7-8', 'Unknown TPU topology'), ('v4-12', 'v4-8, v4-16'),
                                        ('v5e-2', 'v5e-1, v5e-4'), ('v4:2x2', 'v4:2x2x1')])
def test_unknown_slices_are_refused_naming_valid_ones(name, says):
  with pytest.raises(errors.ConfigError, match=says):
    tpu.parse(name)


def test_the_devices_libtpu_lists_are_the_slices():
  for name in ('v4-32', 'v5litepod-16', 'v3-8'):
    tpu_slice = tpu.parse(name)
    devices = tpu.compile_only_devices(tpu_slice)
    assert len(devices) == tpu_slice.num_devices
    assert devices[0].device_kind == tpu_slice.chip.device_kind


# A compiled module as XLA prints it, cut to what the planner reads: a scan of 12 layers whose body gathers a
# weight (async) and all-reduces; a reduce-scatter fused as TPU fuses it; an all-reduce outside the loop.
HLO = """HloModule jit_step

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %constant.9 = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[] compare(%i, %constant.9), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ags = (bf16[128,1024]{1,0}, bf16[256,1024]{1,0:T(8,128)}) all-gather-start(%w), replica_groups=[2,2]<=[4]
  %agd = bf16[256,1024]{1,0} all-gather-done(%ags)
  %ar = f32[16,197,192]{2,1,0} all-reduce(%x), replica_groups={{0,1},{2,3}}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.3 (param: f32[1024,1024]) -> f32[512,1024] {
  %inner = f32[1024,1024]{1,0} all-reduce(%param), replica_groups=[2,2]<=[4], to_apply=%add
  ROOT %slice = f32[512,1024]{1,0} dynamic-slice(%inner, %o, %z), dynamic_slice_sizes={512,1024}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %f = f32[512,1024]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3
  %grad = (f32[100]{0}, s32[]{:T(128)}) all-reduce(%h, %k), replica_groups={{0,1,2,3}}, to_apply=%add
}
"""


def test_the_compiled_module_is_read_with_its_loops_and_collectives():
  runs = plan.executions(HLO)
  assert runs['main'] == 1 and runs['body'] == 12 and runs['all-reduce-scatter.3'] == 1
  found = plan.collectives(HLO)
  assert found['all-gather'] == {'count': 12, 'bytes': 12 * 256 * 1024 * 2}  # The gathered array, 12 times.
  assert found['all-reduce'] == {'count': 12 + 1, 'bytes': 12 * 16 * 197 * 192 * 4 + 100 * 4 + 4}
  assert found['reduce-scatter'] == {'count': 1, 'bytes': 1024 * 1024 * 4}
  assert plan.collective_traffic(found) == (found['all-gather']['bytes'] + 2 * found['all-reduce']['bytes'] +
                                            found['reduce-scatter']['bytes'])
  assert plan.array_bytes('(bf16[2,3]{1,0:T(8,128)(2,1)}, pred[7])') == 2 * 3 * 2 + 7


def test_roofline_of_a_plain_matmul_compiled_for_a_tpu():
  tpu_slice = tpu.parse('v5litepod-1')
  device = tpu.compile_only_devices(tpu_slice)[0]
  n = 4096
  operand = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
  compiled = jax.jit(jnp.matmul).lower(operand, operand).compile()
  cost = plan._cost_analysis(compiled)  # pylint: disable=protected-access
  assert cost['flops'] == pytest.approx(2 * n**3, rel=0.01)  # The TPU compile counts its dots.
  assert cost['bytes'] >= 3 * n * n * 2  # Both operands read, the product written, in bf16.
  bound = plan.roofline(tpu_slice.chip, cost['flops'], cost['bytes'], 0.0)
  assert bound['seconds']['compute'] == pytest.approx(2 * n**3 / 197e12)
  assert bound['seconds']['hbm'] == pytest.approx(cost['bytes'] / 819e9)
  assert bound['bound'] == 'compute'  # 1,365 FLOPs a byte at n=4096, above v5e's 240.
  assert bound['step_seconds'] == bound['seconds']['compute']


@pytest.mark.slow
def test_a_small_model_compiles_for_a_slice_and_its_plan_is_reported(tmp_path):
  result = run_plan(*SMALL, '--config.batch_size=32', '--topology=v5litepod-4', json_path=tmp_path / 'plan.json')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Fits: ViT-Ti/16 at batch 32 on v5litepod-4' in result.stdout
  for said in ('4 TPU v5 lite chips in a 2x2 torus', 'memory per device', 'roofline', 'MFU ceiling',
               'collectives per step'):
    assert said in result.stdout, result.stdout
  assert 'Traceback' not in result.stderr and 'TPU_WORKER_HOSTNAMES' not in result.stderr, result.stderr[-3000:]
  report = json.loads((tmp_path / 'plan.json').read_text())
  configured = report['configured']
  assert configured['fits'] and report['devices'] == 4
  memory = configured['memory']
  assert memory['state'] > 0 and memory['train_temporaries'] > 0 and memory['code'] > 0
  assert memory['state'] + memory['train_temporaries'] <= configured['needed_bytes'] < configured['hbm_bytes']
  assert configured['hbm_bytes'] == 16 * 1024**3
  # Model FLOPs: the MFU convention, per device (8 of the 32 images); the compiled step does at least that.
  from vit_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file('configs/vit_imagenet.py:Ti/16')
  config.model.num_layers, config.image_size = 2, 32
  per_image = flops.train_flops_per_image(config, 1000, 3)
  assert configured['cost']['model_flops'] == pytest.approx(per_image * 8)
  assert configured['cost']['compiled_flops'] >= 0.9 * configured['cost']['model_flops']
  # The gradients of the 4 data-parallel devices are summed over the interconnect.
  assert configured['collectives']['all-reduce']['bytes'] > 0
  roofline = configured['roofline']
  assert math.isclose(roofline['step_seconds'], max(roofline['seconds'].values()))
  assert roofline['images_per_s_per_chip'] == pytest.approx(32 / roofline['step_seconds'] / 4)


@pytest.mark.slow
def test_a_config_too_big_for_the_chip_gets_a_setting_that_fits_and_that_setting_compiles(tmp_path):
  result = run_plan(*WIDE, '--topology=v5litepod-4', json_path=tmp_path / 'plan.json')
  assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(error) == 1 and 'does not fit as configured. It fits with' in error[0], result.stderr[-3000:]
  report = json.loads((tmp_path / 'plan.json').read_text())
  assert not report['configured']['fits'] and report['suggested']['fits']
  suggested = report['suggested']['settings']
  assert suggested['fsdp'] > 1  # The state alone does not fit unsplit.
  fix = error[0].split('It fits with ')[1].split(' (')[0].split()
  assert fix == plan.Settings(**suggested).flags().split()
  row = plan.markdown_table([report]).splitlines()[-1]
  assert (f'| fsdp {suggested["fsdp"]}, remat {suggested["remat"]}, scan {suggested["scan"]}, accum '
          f'{suggested["accum_steps"]} (found) |') in row
  again = run_plan(*WIDE, '--topology=v5litepod-4', *fix)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Fits: ' in again.stdout


@pytest.mark.parametrize('topology, overrides, says', [
    ('v9-8', {}, 'Unknown TPU topology'),
    ('v5litepod-4', {'batch_size': 30}, 'not divisible by the number of devices'),
    ('v5litepod-4', {'dataset': 'imagenet21k'}, '--num_classes')])
def test_bad_input_is_refused_before_any_compile(topology, overrides, says):
  """(The command turns these into one line and exit 2, as the too-big test sees.)"""
  from vit_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.override(config_lib.load_config_file('configs/vit_imagenet.py:Ti/16'),
                               {'model.num_layers': 2, 'image_size': 32, 'batch_size': 32, **overrides})
  with pytest.raises(errors.UserError, match=says):
    plan.plan(config, topology, say=lambda line: None)


def test_without_libtpu_the_planner_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'libtpu', None)  # `import libtpu` raises ImportError.
  with pytest.raises(errors.ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    tpu.compile_only_devices(tpu.parse('v4-8'))


@pytest.mark.slow
def test_the_tpu_launcher_plans_first_and_refuses_a_config_that_does_not_fit_before_creating_anything(tmp_path):
  env, calls = recording_gcloud(tmp_path)
  env.update(PLAN='1', PYTHON=sys.executable)
  config, *config_flags = SMALL
  launch = lambda *flags: subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'tpu_vm.sh'), 'vit', 'zone-a', 'v5litepod-1', config.split('=', 1)[1],
       'gs://bucket/run', *config_flags, *flags, '--heartbeat_timeout_seconds=60'],
      env=env, capture_output=True, text=True, timeout=600)
  # Too big for one chip whatever the levers (the refusal the planner's own test below reads in full).
  refused = launch(*(f'--config.{key}={value}' for key, value in TOO_BIG_FOR_ONE_CHIP.items()))
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert 'even with every lever' in refused.stderr and 'nothing was created' in refused.stderr
  assert not calls.exists() or ' create ' not in calls.read_text()
  # A config that fits goes on to create the slice.
  planned = launch('--config.batch_size=32')
  assert 'Fits: ' in planned.stderr, planned.stderr[-3000:]
  assert ' create ' in calls.read_text()


@pytest.mark.slow
def test_a_config_no_lever_can_fit_is_refused_naming_the_smallest():
  from vit_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.override(config_lib.load_config_file('configs/vit_imagenet.py:Ti/16'),
                               {'image_size': 32, **TOO_BIG_FOR_ONE_CHIP})
  report, problem = plan.plan(config, 'v5litepod-1', say=lambda line: None)  # One chip: fsdp cannot help.
  assert not report['configured']['fits'] and 'suggested' not in report
  assert report['configured']['memory']['state'] > plan.USABLE_HBM * 16 * 1024**3  # 1.6B parameters + Adam.
  assert problem.startswith('ViT-Ti/16 at batch 8 does not fit on v5litepod-1 even with every lever')
  assert 'Use a larger slice or a smaller --config.batch_size' in problem
