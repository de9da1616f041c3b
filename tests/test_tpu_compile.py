"""The TPU compiler on this CPU host (libtpu from PyPI): the toy configs of both architectures compile for a
v5e and a megacore v4 slice, their memory is the compiler's own, and the collectives are the ones the mesh
implies (data parallel: a gradient all-reduce, no parameter gather; FSDP: parameter all-gather and gradient
reduce-scatter)."""
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from maskformer_jax import slices
from maskformer_jax import train_step as train_step_lib
from maskformer_jax.bench import tpu_compile
from maskformer_jax.config import load_config

ROOT = pathlib.Path(__file__).parent.parent
MASKFORMER = f"{ROOT}/configs/coco_panoptic.py:runlocal"
MASK2FORMER = f"{ROOT}/configs/mask2former.py:runlocal"


def test_slice_names_give_the_topologies_cloud_tpu_uses():
  expect = {"v4-8": ("v4:2x2x1", 4), "v4-32": ("v4:2x2x4", 16), "v4-64": ("v4:2x4x4", 32),
            "v4-128": ("v4:4x4x4", 64), "v5e-16": ("v5e:4x4", 16), "v5litepod-64": ("v5e:8x8", 64),
            "v5e-8": ("v5e:2x4", 8), "v5p-8": ("v5:2x2x1", 4), "v6e-4": ("v6e:2x2", 4), "v6e-256": ("v6e:16x16", 256),
            "v5e:2x2": ("v5e:2x2", 4), "v4:2x2x1": ("v4:2x2x1", 4)}
  for name, (topology, chips) in expect.items():
    s = slices.parse(name)
    assert (s.topology, s.chips) == (topology, chips), name
  assert slices.parse("v5e-16").accelerator_type == "v5litepod-16" and slices.parse("v4:2x2x4").name == "v4-32"
  assert slices.parse("v4-8", num_slices=2).devices == 8 and str(slices.parse("v4-8", 2)) == "2xv4-8"
  for bad, message in (("v3-8", "expected e.g. v4-8"), ("v4-7", "two a chip"), ("v5e-12", "power of two"),
                       ("v4:2x2", "3 axes")):
    with pytest.raises(ValueError, match=message):
      slices.parse(bad)


def test_hbm_is_what_the_compiler_says_each_chip_has():
  assert tpu_compile.hbm_bytes("v5e") == int(15.75 * 2 ** 30)
  assert tpu_compile.hbm_bytes("v4") == int(30.75 * 2 ** 30)


def test_collectives_are_read_from_optimised_hlo_async_pairs_once():
  hlo = """
  %all-reduce.4 = f32[1024,1024]{1,0:T(8,128)} all-reduce(%fusion.1), channel_id=5, to_apply=%add
  %ar = (f32[]{:T(128)}, f32[16]{0}, /*index=2*/f32[3,3,16,16]{3,2,1,0}) all-reduce(%a, %b, %c), channel_id=6
  %ag = (bf16[64,256]{1,0}, bf16[256,256]{1,0}) all-gather-start(%p), dimensions={0}
  %agd = bf16[256,256]{1,0} all-gather-done(%ag)
  %rs = f32[16,8]{1,0} reduce-scatter(%x), dimensions={0}, to_apply=%add
  %fusion.2341 = (f32[3,3,32,16]{2,3,1,0}, f32[8]{0}) fusion(%g, %h), kind=kCustom, calls=%all-reduce-scatter.4
  %f = f32[8]{0} fusion(%all-reduce.4), kind=kLoop, calls=%fused_computation
  """
  assert tpu_compile.collectives(hlo) == {
      "all-reduce": {"count": 2, "bytes": 4 * 2 ** 20 + 4 * (1 + 16 + 9 * 256)},
      "all-gather": {"count": 1, "bytes": 256 * 256 * 2},
      "reduce-scatter": {"count": 2, "bytes": 16 * 8 * 4 + 4 * (9 * 32 * 16 + 8)}}


def test_oom_messages_are_read_for_both_numbers():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
         "(55.10G) exceeds available HBM (30.75G).")
  assert tpu_compile.oom_capacity(msg) == int(30.75 * 2 ** 30)
  assert tpu_compile.oom_required(msg) == int(55.10 * 2 ** 30)


def param_bytes(config):
  from maskformer_jax.models import build_model
  shapes = jax.eval_shape(train_step_lib.init_fn(config, build_model(config.model)), jax.random.key(0))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["params"]))


def check_data_parallel(r, config, topology):
  """A compiled toy train step on 4 devices: it fits, its memory adds up, and with replicated parameters
  every gradient is summed across the devices and nothing is gathered or scattered."""
  assert r.fits and 0 < r.per_device_bytes < 2 ** 30 and r.devices == 4
  assert r.hbm_bytes == tpu_compile.hbm_bytes(slices.parse(topology).chip.generation)
  assert r.per_device_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes
  assert r.alias_bytes > 0  # the state is donated
  assert r.flops_per_device > 0 and r.flops_per_image == pytest.approx(r.flops_per_device * 4 / 4)
  assert r.hlo_instructions > 1000 and r.step_s_at_40pct > 0
  assert r.collectives["all-reduce"]["bytes"] >= param_bytes(config), r.collectives
  assert set(r.collectives) == {"all-reduce"}, r.collectives
  assert json.loads(json.dumps(r.to_json()))["per_device_bytes"] == r.per_device_bytes


def independent_memory(config, topology):
  """The per-device bytes of the same train step, compiled here by hand (inputs written out, not taken
  from the data pipeline's padding example)."""
  from maskformer_jax import sharding
  from maskformer_jax.models import build_model
  devices = tpu_compile.topology_devices(slices.parse(topology))
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config.model)
  shardings = train_step_lib.state_shardings(config, model, mesh)
  shapes = jax.eval_shape(train_step_lib.init_fn(config, model), jax.random.key(0))
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
  bs, (h, w), m, b = sharding.batch_sharding(mesh), config.data.image_size, config.data.max_instances, 4
  batch = {"image": jax.ShapeDtypeStruct((b, h, w, 3), np.uint8, sharding=bs),
           "segments": jax.ShapeDtypeStruct((b, h, w), np.int32, sharding=bs),
           "labels": jax.ShapeDtypeStruct((b, m), np.int32, sharding=bs),
           "valid": jax.ShapeDtypeStruct((b, m), np.bool_, sharding=bs),
           "image_size": jax.ShapeDtypeStruct((b, 2), np.int32, sharding=bs),
           "orig_size": jax.ShapeDtypeStruct((b, 2), np.int32, sharding=bs),
           "image_id": jax.ShapeDtypeStruct((b,), np.int32, sharding=bs)}
  mem = train_step_lib.make_train_step(config, model, mesh, shardings).lower(state, batch).compile().memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)


def test_largest_temporaries_name_the_big_values(tmp_path):
  """XLA's buffer assignment, read back: a 256 MiB f32 product and its 128 MiB bf16 copy cannot live in a
  v5e core's memory, so they are the largest HBM temporaries, largest first, named by the JAX op."""
  devices = tpu_compile.topology_devices(slices.parse("v5e-1"))
  sh = jax.sharding.SingleDeviceSharding(devices[0])
  x = jax.ShapeDtypeStruct((8192, 64), np.float32, sharding=sh)

  def f(a):
    outer = a @ a.T  # [8192, 8192] f32: 256 MiB
    return (jax.nn.relu(outer).astype(jax.numpy.bfloat16) @ a.astype(jax.numpy.bfloat16)).sum() + outer.max()

  compiled = jax.jit(f).lower(x).compile({"xla_dump_to": str(tmp_path)})
  temps = tpu_compile.largest_temporaries(tmp_path)
  assert temps, sorted(p.name for p in tmp_path.iterdir())
  size, shape, op = temps[0]
  assert [s for s, _, _ in temps] == sorted((s for s, _, _ in temps), reverse=True)
  assert size >= 8192 * 8192 * 2 and "8192,8192" in shape, temps
  assert size <= compiled.memory_analysis().temp_size_in_bytes
  assert all(op for _, _, op in temps), temps


# Four tests of one or two compilations each, so that pytest's workers share them out.

def test_maskformer_on_v5e_reports_the_compilers_own_memory():
  config = load_config(MASKFORMER)
  r = tpu_compile.compile_step(config, slices.parse("v5e-4"), "train", config_name=MASKFORMER)
  check_data_parallel(r, config, "v5e-4")
  # The toy step's arrays all live in the chip's on-core memory (VMEM): its HBM temporaries may hold
  # none; test_largest_temporaries_name_the_big_values reads them from a program that has some.
  sizes = [size for size, _, _ in r.largest_temporaries]
  assert sizes == sorted(sizes, reverse=True) and all(s <= r.temp_bytes for s in sizes)
  assert r.per_device_bytes == pytest.approx(independent_memory(config, "v5e-4"), rel=0.02)
  # Twice the batch in two accumulated halves: the same work per image, though XLA counts the
  # accumulation loop's body once.
  config.batch_size, config.grad_accum_steps = 2 * config.batch_size, 2
  a = tpu_compile.compile_step(config, slices.parse("v5e-4"), "train", config_name=MASKFORMER, dump=False)
  assert a.flops_per_image == pytest.approx(r.flops_per_image, rel=0.05)
  assert a.flops_per_device == pytest.approx(2 * r.flops_per_device, rel=0.05)
  assert "FITS" in tpu_compile.describe(r) and "all-reduce x" in tpu_compile.describe(r)


def test_maskformer_on_megacore_v4_and_with_fsdp():
  config = load_config(MASKFORMER)
  config.init.torchvision_resnet = "/on/the/workers/resnet.pth"  # not here: it changes no shape
  r = tpu_compile.compile_step(config, slices.parse("v4-8"), "train", config_name=MASKFORMER, dump=False)
  check_data_parallel(r, config, "v4-8")
  config.mesh.fsdp = True  # parameters and moments sharded: gathered for use, gradients reduce-scattered
  f = tpu_compile.compile_step(config, slices.parse("v4-8"), "train", config_name=MASKFORMER, dump=False)
  assert f.collectives["all-gather"]["count"] > 0 and f.collectives["reduce-scatter"]["count"] > 0, f.collectives
  assert f.argument_bytes < r.argument_bytes  # the sharded state is smaller on each device


@pytest.mark.parametrize("topology", ["v5e-4", "v4-8"])
def test_mask2former_compiles_data_parallel(topology):
  """Mask2Former's deformable sampling gathers rows per image: no all-gather of the value maps across the
  data axis (indexing the batch with arange(B) had the compiler gather every layer's maps)."""
  config = load_config(MASK2FORMER)
  r = tpu_compile.compile_step(config, slices.parse(topology), "train", config_name=MASK2FORMER, dump=False)
  check_data_parallel(r, config, topology)


def test_what_fits_compiles_accumulation_remat_and_larger_slices(monkeypatch):
  """The search's order and stopping, with the compiler replaced by a memory model (each variant still
  goes through compile_step, which is what the real search calls)."""
  config = load_config(MASKFORMER)
  config.batch_size = 64
  calls = []
  hbm = 16 * 2 ** 30

  def fake(cfg, s, which, config_name="", dump=True):
    calls.append((int(cfg.grad_accum_steps), bool(cfg.model.remat), str(s)))
    per_device = 2 * 2 ** 30 + 40 * 2 ** 30 // int(cfg.grad_accum_steps) * 4 // s.devices \
        // (2 if cfg.model.remat else 1)
    return tpu_compile.StepReport("train", "", str(s), s.topology, 1, s.devices, 64, (64, 64), {},
                                  per_device <= hbm, per_device, hbm, 1.0, argument_bytes=2 * 2 ** 30)

  monkeypatch.setattr(tpu_compile, "compile_step", fake)
  s = slices.parse("v5e-4")
  first = fake(config, s, "train")
  found = tpu_compile.what_fits(config, s, first, log=lambda *_: None)
  labels = [label for label, _ in found]
  assert labels[0] == "--config.grad_accum_steps=4"  # 2 + 40/4 = 12 GiB: the estimate, confirmed by compiling
  assert "--config.model.remat=True" not in labels  # 2 + 20 = 22 GiB: compiled, does not fit
  assert labels[-1] == "--topology v5e-16" and all(r.fits for _, r in found)
  assert (1, True, "v5e-4") in calls  # remat was compiled


def run_cli(*args):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "maskformer_jax.bench.tpu_compile", *args], capture_output=True,
                        text=True, cwd=ROOT)


def test_cli_refuses_bad_arguments_in_one_line_and_summarises_reports(tmp_path):
  for args, message in ((["--config", "configs/demo.py", "--topology", "v3-8"], "error: --topology: TPU slice 'v3-8'"),
                        (["--config", "configs/demo.py", "--topology", "v4-8", "--config.total_stepz=3"],
                         'Did you mean "total_steps"'),
                        (["--topology", "v4-8"], "--config is required"),
                        (["--config", "configs/demo.py", "--topology", "v4-32"],
                         "config.batch_size=8 (per micro-batch 8) is not divisible")):  # checked before compiling
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr.strip().splitlines()[-1] + r.stderr, r.stderr[-500:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
  row = {"step": "train", "config": "c.py", "slice": "v4-8", "global_batch": 64, "fits": False,
         "settings": {"model.dtype": "float32", "grad_accum_steps": 1}, "per_device_bytes": 39 * 2 ** 30,
         "hbm_bytes": int(30.75 * 2 ** 30), "flops_per_device": 3e13, "step_s_at_40pct": 0.27, "compile_s": 39,
         "fits_with": [{"step": "train", "config": "c.py", "slice": "v4-8", "global_batch": 64, "fits": True,
                        "setting": "--config.grad_accum_steps=2", "per_device_bytes": 29 * 2 ** 30,
                        "settings": {"model.dtype": "float32", "grad_accum_steps": 2},
                        "hbm_bytes": int(30.75 * 2 ** 30), "flops_per_device": None, "step_s_at_40pct": None,
                        "compile_s": 600}]}
  (tmp_path / "r.json").write_text(json.dumps(row))
  r = run_cli("--table", str(tmp_path / "r.json"))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert lines[2] == "| c.py | v4-8 | 64 | model.dtype=float32 | 39.00 | 30.75 | **no** | 30.00 | 0.270 | 39 |"
  row["error"] = "RESOURCE_EXHAUSTED: ..."
  (tmp_path / "r.json").write_text(json.dumps(row))
  assert "| > 30.75 (refused at 39.00) |" in run_cli("--table", str(tmp_path / "r.json")).stdout
  assert lines[3].startswith("| c.py (--config.grad_accum_steps=2) | v4-8 | 64 | model.dtype=float32, "
                             "grad_accum_steps=2 | 29.00 | 30.75 | yes | - | - | 600 |")
