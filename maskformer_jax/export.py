"""python -m maskformer_jax.export: a checkpoint's inference forward as a file another runtime can serve.

  python -m maskformer_jax.export --checkpoint DIR --format stablehlo --out DIR [--size H W]
      [--platforms cpu,cuda,tpu]

--checkpoint is a training workdir (its newest checkpoint; --step picks another), a step directory in
it, or a converted checkpoint (python -m maskformer_jax.convert); the model config comes from its
config.json. The exported function is the eval step's forward: uint8 (or 0-255 float) RGB images
[b, H, W, 3] -> {'pred_logits' [b, Q, K+1], 'pred_masks' [b, Q, H/4, W/4]} of the last decoder layer,
normalisation included. The batch b is symbolic (any size); H, W are fixed (default the config's
data.eval_size). The weights are baked into the exported program as constants: the file alone is the
model, nothing else has to be shipped or fed to serve it.

Every export is checked before the command succeeds: the written file is read back and run on seeded
probe images at two batch sizes, and its outputs must match the JAX model's to 1e-4 (max-abs, float32).
OUT/export.json records the input signature, the outputs, the differences and the verdict.

Formats:
  stablehlo   OUT/model.stablehlo, jax.export's serialisation (load with jax.export.deserialize; any
              StableHLO consumer: IREE, XLA, TF's XlaCallModule), lowered for --platforms (default this
              machine's backend only; the check runs the variant of the machine exporting).
  onnx        OUT/model.onnx through jax2onnx, run and checked with onnxruntime (both in the test extra).
  savedmodel  OUT/savedmodel/ through orbax-export, a TensorFlow SavedModel ('serving_default': uint8
              'images' [None, H, W, 3] -> the outputs by name), loaded back with TensorFlow and checked;
              needs the optional extra (pip install -c constraints.txt -e '.[tf]').
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskformer_jax import card as card_lib
from maskformer_jax import checkpoint
from maskformer_jax import paths
from maskformer_jax import sharding
from maskformer_jax.models import build_model
from maskformer_jax.models import normalize_image

FORMATS = ("stablehlo", "onnx", "savedmodel")
OUTPUTS = ("pred_logits", "pred_masks")
PANOPTIC_OUTPUTS = ("panoptic", "segment_class", "segment_score", "segment_isthing", "query_segment")
PANOPTIC_KEYS = ("panoptic", "segment_class", "segment_score", "isthing", "query_segment")  # inference's
TOLERANCE = 1e-4
PROBE_BATCHES = (1, 3)  # two batch sizes: the symbolic batch dimension is exercised, not just traced


class ExportError(Exception):
  """An export that cannot be made or does not match the JAX model (the CLI prints it and exits 1)."""


def load_config(ckpt_dir) -> ml_collections.ConfigDict:
  """checkpoint.load_config on one device: export traces a single-device program."""
  try:
    config = checkpoint.load_config(ckpt_dir)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None
  with config.unlocked():
    config.mesh.data, config.mesh.model = 1, 1
  return config


def load(ckpt_dir, which="latest"):
  """(config, model, variables, step) from a checkpoint directory, on one local device."""
  ckpt_dir = paths.absolute(str(ckpt_dir))
  if not os.path.isdir(ckpt_dir):
    raise ExportError(f"--checkpoint {ckpt_dir} is not a directory: give a training workdir, a step "
                      "directory in one, or a converted checkpoint.")
  config = load_config(ckpt_dir)
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  model = build_model(config.model)
  try:
    state, step = checkpoint.load_state(config, model, mesh, ckpt_dir, which)
  except SystemExit as e:  # load_state's message for a directory without a checkpoint
    raise ExportError(str(e)) from None
  variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  return config, model, variables, step


def forward_fn(model, variables):
  """images [b, H, W, 3] -> {'pred_logits', 'pred_masks'}: make_eval_step's forward (no padding mask:
  an exported model gets images at its canvas size), the variables closed over (constants)."""
  def forward(images):
    out = model.apply(variables, normalize_image(images), train=False)
    return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
  return forward


def frozen_norms(config, variables):
  """(model, variables) computing the same inference with trainable BatchNorms ('bn') folded into
  FrozenBatchNorm: at inference both are the affine map of the running statistics, so only where the
  leaves live changes (params scale/bias join batch_stats mean/var). Exporters that pattern-match flax's
  BatchNorm (jax2onnx) then see plain multiplies and adds. Other models come back unchanged."""
  model = build_model(config.model)
  if config.model.backbone != "resnet" or config.model.backbone_norm != "bn":
    return model, variables
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
  for key in [k for k in stats if k.endswith("/mean")]:
    module = key[:-len("/mean")]
    for leaf in ("scale", "bias"):
      stats[f"{module}/{leaf}"] = params.pop(f"{module}/{leaf}")
  frozen = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  frozen["backbone_norm"] = "frozen_bn"
  return build_model(frozen), {"params": traverse_util.unflatten_dict(params, sep="/"),
                               "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}


def with_postprocess(forward, config, categories, size):
  """The forward followed by inference.panoptic_inference at the exported size (the config's eval
  thresholds, `categories`' thing classes baked in): adds 'panoptic' int32 [b, H, W] (0 void, else the
  query index + 1), 'segment_class', 'segment_score', 'segment_isthing' and 'query_segment' [b, Q]."""
  from maskformer_jax import inference
  is_thing = inference.is_thing_array(categories)

  def forward_postprocessed(images):
    out = forward(images)
    result = inference.panoptic_inference(
        out["pred_logits"], out["pred_masks"], is_thing=is_thing, out_size=tuple(int(v) for v in size),
        object_mask_threshold=config.eval.object_mask_threshold, overlap_threshold=config.eval.overlap_threshold)
    return {**out, **{name: result[key] for name, key in zip(PANOPTIC_OUTPUTS, PANOPTIC_KEYS)}}
  return forward_postprocessed


def input_spec(size, dtype=jnp.uint8):
  """The exported input: a symbolic batch `b` of fixed-size RGB images."""
  (b,) = jax.export.symbolic_shape("b")
  return jax.ShapeDtypeStruct((b, int(size[0]), int(size[1]), 3), dtype)


def _compare(reference, got) -> dict:
  return {k: float(np.max(np.abs(np.asarray(reference[k], np.float32) - np.asarray(got[k], np.float32))))
          for k in reference}


def verify(reference, run_exported, size, batches=PROBE_BATCHES, tolerance=TOLERANCE) -> dict:
  """The exported model vs the checkpoint's JAX forward on probe images at each batch size: max-abs per
  output."""
  reference_fn = jax.jit(reference)
  diffs, shapes = {}, {}
  for i, n in enumerate(batches):
    images = card_lib.probe_images(size, n, seed=i)
    reference = jax.device_get(reference_fn(images))
    got = run_exported(images)
    for k, d in _compare(reference, got).items():
      diffs[k] = max(diffs.get(k, 0.0), d)
    shapes = {k: ["b"] + list(np.shape(v)[1:]) for k, v in reference.items()}
  passed = all(np.isfinite(d) and d <= tolerance for d in diffs.values())
  return {"probe_batches": list(batches), "max_abs_diff": diffs, "tolerance": tolerance,
          "outputs": shapes, "passed": bool(passed), "probe_images": images, "probe_outputs": got}


def export_stablehlo(forward, size, out_dir, platforms=None, reference=None) -> dict:
  """OUT/model.stablehlo for `platforms` (default: this machine's backend), read back and verified here."""
  exported = jax.export.export(jax.jit(forward), platforms=platforms)(input_spec(size))
  path = os.path.join(out_dir, "model.stablehlo")
  data = exported.serialize()  # before opening: a failure leaves no empty file behind
  with open(path, "wb") as f:
    f.write(data)
  with open(path, "rb") as f:
    loaded = jax.export.deserialize(bytearray(f.read()))
  result = verify(reference or forward, lambda x: jax.device_get(loaded.call(x)), size)
  return {"file": "model.stablehlo", "platforms": list(exported.platforms), "verified_on": jax.default_backend(),
          **result}


def export_onnx(forward, size, out_dir, platforms=None, reference=None) -> dict:
  """OUT/model.onnx through jax2onnx (float32 input: ONNX Runtime's convolutions take floats), run with
  onnxruntime and verified against `reference` (the checkpoint's forward). jax2onnx converts flax's
  BatchNorm to an ONNX BatchNormalization whose NCHW output it forgets to transpose back before an NHWC
  residual add, a graph onnxruntime refuses; `export` therefore hands it the model with its BatchNorms
  folded (`frozen_norms`). A conversion or a graph that fails is an ExportError naming the cause."""
  try:
    import jax2onnx
    import onnxruntime
  except ImportError as e:
    raise ExportError(f"--format onnx needs jax2onnx and onnxruntime ({e}): pip install -c constraints.txt "
                      "-e '.[onnx]' (or use --format stablehlo).") from None
  h, w = int(size[0]), int(size[1])
  path = os.path.join(out_dir, "model.onnx")
  names = list(jax.eval_shape(forward, jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8)))
  as_tuple = lambda x: tuple(forward(x)[k] for k in names)  # noqa: E731
  try:
    jax2onnx.to_onnx(as_tuple, inputs=[("b", h, w, 3)], return_mode="file", output_path=path,
                     input_names=["images"], output_names=names)
  except Exception as e:  # noqa: BLE001 -- the converter's failures name the operation it cannot convert
    version = importlib.metadata.version("jax2onnx")
    raise ExportError(f"jax2onnx {version} cannot convert the model: {_first_line(e)}. The operation named "
                      "there has no working ONNX conversion in this jax2onnx; use --format stablehlo.") from None
  try:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  except Exception as e:  # noqa: BLE001 -- onnxruntime's load errors name the node it cannot accept
    version = importlib.metadata.version("jax2onnx")
    raise ExportError(f"jax2onnx {version} wrote {path}, which onnxruntime {onnxruntime.__version__} cannot "
                      f"load: {_first_line(e)}. That is a conversion error of this jax2onnx; use --format "
                      "stablehlo.") from None
  name = session.get_inputs()[0].name

  def run(images):
    return dict(zip(names, session.run(None, {name: np.asarray(images, np.float32)})))

  return {"file": "model.onnx", "input_dtype": "float32", "onnxruntime_version": onnxruntime.__version__,
          "jax2onnx_version": importlib.metadata.version("jax2onnx"), **verify(reference or forward, run, size)}


def _first_line(e) -> str:
  text = f"{type(e).__name__}: {e}"
  return text.splitlines()[0][:300]


def export_savedmodel(forward, size, out_dir, platforms=None, reference=None) -> dict:
  """OUT/savedmodel through orbax-export: a TensorFlow SavedModel whose 'serving_default' signature
  takes uint8 'images' [None, H, W, 3] and returns the forward's outputs by name. orbax-export converts
  with jax2tf's native serialisation (the function's StableHLO inside an XlaCallModule op, the batch
  polymorphic), so TF runs what XLA compiles here, not a re-implementation. The weights stay constants
  in that module, as in the other formats. Read back with tf.saved_model.load and verified."""
  try:
    import tensorflow as tf
    from orbax.export import ExportManager, JaxModule, ServingConfig
  except ImportError as e:
    raise ExportError(f"--format savedmodel needs TensorFlow and orbax-export ({e}): pip install -c "
                      "constraints.txt -e '.[tf]' (or use --format stablehlo).") from None
  h, w = int(size[0]), int(size[1])
  path = os.path.join(out_dir, "savedmodel")
  kwargs = {"native_serialization_platforms": list(platforms)} if platforms else {}
  module = JaxModule({}, lambda params, images: forward(images), trainable=False,
                     input_polymorphic_shape="(b, ...)", jax2tf_kwargs=kwargs)
  signature = [tf.TensorSpec((None, h, w, 3), tf.uint8, name="images")]
  try:
    with _logging_kept():
      ExportManager(module, [ServingConfig("serving_default", input_signature=signature)]).save(path)
  except Exception as e:  # noqa: BLE001 -- jax2tf and TF name the operation or shape they refuse
    raise ExportError(f"orbax-export {importlib.metadata.version('orbax-export')} (TensorFlow "
                      f"{tf.__version__}) cannot save the model: {_first_line(e)}; use --format "
                      "stablehlo.") from None
  return {"file": "savedmodel/saved_model.pb", "platforms": list(platforms or [jax.default_backend()]),
          "signature": "serving_default",
          "tensorflow_version": tf.__version__, "orbax_export_version": importlib.metadata.version("orbax-export"),
          "verified_on": jax.default_backend(), **verify(reference or forward, savedmodel_runner(path), size)}


@contextlib.contextmanager
def _logging_kept():
  """Undoes what saving a SavedModel does to the process's logging (TensorFlow 2.21 leaves the 'absl'
  logger at WARNING and a stderr handler on the root logger): absl INFO logs would go silent after it."""
  absl_logger, root = logging.getLogger("absl"), logging.getLogger()
  level, handlers = absl_logger.level, list(root.handlers)
  try:
    yield
  finally:
    absl_logger.setLevel(level)
    root.handlers[:] = handlers


def savedmodel_runner(path):
  """images -> outputs of the SavedModel directory `path`'s 'serving_default' signature."""
  import tensorflow as tf
  with _logging_kept():
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

  def run(images):
    return {k: v.numpy() for k, v in serve(images=tf.constant(np.asarray(images, np.uint8))).items()}
  return run


def _categories(config, path, ckpt_dir):
  """The categories for --postprocess: --categories FILE, else the checkpoint's card, else the dataset's."""
  from maskformer_jax import prediction
  try:
    categories, where = prediction.load_categories(config, paths.absolute(path) if path else "", ckpt_dir)
  except (OSError, ValueError, KeyError) as e:
    raise ExportError(f"--postprocess needs the categories: {e}. Give --categories FILE (a COCO panoptic "
                      "annotation file or a list of {id, name, isthing}).") from None
  if len(categories) != config.model.num_classes:
    raise ExportError(f"{len(categories)} categories (from {where}) but the model has "
                      f"config.model.num_classes={config.model.num_classes}.")
  return categories


def write_card(out_dir, config, variables, record, images, outputs, categories=None) -> None:
  """OUT/card.json, CARD.md and probes.npz (maskformer_jax.card, kind 'export'): the source weights'
  digests, the verification record, and the exported model's outputs on the last probe batch (at the
  exported size, which card.probe_inputs' fixed canvas need not be), for a serving runtime to check
  itself against. The categories are those the export was made with (or the source card's)."""
  c = card_lib.base_card(config, "export")
  if categories:
    c["inference"]["categories"] = categories
  c["weights"] = card_lib.weights_digest(variables)
  c["export"] = record
  c["probes"] = {"file": card_lib.PROBES_FILE, "shape": list(images.shape),
                 "outputs": card_lib.fingerprint(outputs)}
  card_lib.write(out_dir, c, images)


EXPORTERS = {"stablehlo": export_stablehlo, "onnx": export_onnx, "savedmodel": export_savedmodel}


def export(ckpt_dir, fmt, out_dir, size=None, which="latest", platforms=None, postprocess=False,
           categories="") -> dict:
  """Exports a checkpoint in `fmt` to `out_dir`, verifies it and writes OUT/export.json; the record."""
  if fmt not in EXPORTERS:
    raise ExportError(f"--format {fmt!r} is not one of {list(FORMATS)}.")
  config, model, variables, step = load(ckpt_dir, which)
  size = tuple(size or config.data.eval_size)
  if len(size) != 2 or min(size) <= 0:
    raise ExportError(f"--size {size} must be two positive numbers H W.")
  out_dir = paths.absolute(str(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  reference = forward_fn(model, variables)
  forward = forward_fn(*frozen_norms(config, variables)) if fmt == "onnx" else reference
  used = None
  if postprocess:
    used = _categories(config, categories, ckpt_dir)
    reference = with_postprocess(reference, config, used, size)
    forward = with_postprocess(forward, config, used, size)
  result = EXPORTERS[fmt](forward, size, out_dir, platforms, reference=reference)
  images, outputs = result.pop("probe_images"), result.pop("probe_outputs")
  record = {"format": fmt, "checkpoint": paths.absolute(str(ckpt_dir)), "step": step,
            "sha256": card_lib.sha256(os.path.join(out_dir, result["file"])),
            "inputs": [{"name": "images", "shape": ["b", size[0], size[1], 3], "dtype": result.pop("input_dtype", "uint8")}],
            "postprocess": bool(postprocess), "params": "constants", "jax_version": jax.__version__, **result}
  with open(os.path.join(out_dir, "export.json"), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  write_card(out_dir, config, variables, record, images, outputs,
             categories=used or card_lib.categories(checkpoint.home(ckpt_dir)))
  if not record["passed"]:
    raise ExportError(f"the exported model does not match the JAX model: max-abs {record['max_abs_diff']} > "
                      f"{record['tolerance']} (see {out_dir}/export.json).")
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maskformer_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="training workdir, a step directory in it, or a "
                      "converted checkpoint")
  parser.add_argument("--step", default="latest", help="with a workdir: 'latest', 'best' or a step number")
  parser.add_argument("--format", default="stablehlo", choices=FORMATS)
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="the exported image size "
                      "(default: the config's data.eval_size)")
  parser.add_argument("--platforms", help="stablehlo, savedmodel: comma-separated platforms to lower for, e.g. "
                      "cpu,cuda,tpu (default: this machine's; the check runs here)")
  parser.add_argument("--postprocess", action="store_true", help="include the panoptic post-processing "
                      "(inference.panoptic_inference at the exported size)")
  parser.add_argument("--categories", default="", help="with --postprocess: JSON file with the categories "
                      "(default: those of config.data)")
  args = parser.parse_args(argv)
  platforms = tuple(args.platforms.split(",")) if args.platforms else None
  try:
    record = export(args.checkpoint, args.format, args.out, args.size, args.step, platforms,
                    args.postprocess, args.categories)
  except ExportError as e:
    print(f"export failed: {e}", file=sys.stderr)
    return 1
  print(f"wrote {record['file']} to {paths.absolute(args.out)}: max-abs vs JAX {record['max_abs_diff']} "
        f"(<= {record['tolerance']}), passed")
  return 0


if __name__ == "__main__":
  sys.exit(main())
