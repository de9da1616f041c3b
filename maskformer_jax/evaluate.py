"""Evaluate a checkpoint on the full validation split: PQ (SQ, RQ, things/stuff) or mIoU.

  python -m maskformer_jax.evaluate --config configs/demo.py --workdir runs/demo [--checkpoint best|STEP]

Every process evaluates its shard of the split at the original image resolution; the accumulators are
summed over the processes, so the number is the dataset-level metric (never a per-batch average).
`evaluate()` is what train.py calls during training.
"""
import json

from absl import app
from absl import flags
import jax
import numpy as np

from maskformer_jax import checkpoint
from maskformer_jax import metrics as metrics_lib
from maskformer_jax import paths
from maskformer_jax.evaluation import sum_across_hosts

# Colours of the synthetic classes and otherwise a fixed palette, by contiguous class.
_PALETTE = np.array([
    (220, 20, 60), (255, 200, 0), (140, 60, 220), (100, 170, 240), (120, 90, 50), (0, 160, 90),
    (255, 120, 0), (0, 80, 200), (230, 110, 180), (90, 200, 200), (170, 170, 30), (120, 120, 120),
], np.uint8)


def host_local(tree, mesh):
  """This process's rows of batch-sharded global arrays, as numpy (all rows on a single process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P
  return jax.device_get(multihost_utils.global_array_to_host_local_array(tree, mesh, P("data")))


def colorize(id_map, segments_info, categories):
  """Panoptic id map -> RGB: the class colour, things lightened/darkened per instance; void black."""
  contiguous = {c["id"]: c["contiguous_id"] for c in categories}
  out = np.zeros(id_map.shape + (3,), np.uint8)
  for i, s in enumerate(segments_info):
    base = _PALETTE[contiguous[s["category_id"]] % len(_PALETTE)].astype(np.float32)
    if s.get("isthing", True) and any(c["id"] == s["category_id"] and c["isthing"] for c in categories):
      base = np.clip(base * (0.6 + 0.8 * ((i * 0.37) % 1.0)), 0, 255)
    out[id_map == s["id"]] = base.astype(np.uint8)
  return out


def colorize_semantic(labels, ignore=255):
  out = _PALETTE[np.asarray(labels) % len(_PALETTE)]
  out[np.asarray(labels) == ignore] = 0
  return out


def original_image(batch, i):
  """The i-th input image cropped to its content and resized back to its original size."""
  from PIL import Image
  h, w = (int(v) for v in batch["image_size"][i])
  h0, w0 = (int(v) for v in batch["orig_size"][i])
  image = np.asarray(batch["image"][i][:h, :w])
  if (h, w) != (h0, w0):
    image = np.asarray(Image.fromarray(image).resize((w0, h0), Image.BILINEAR))
  return image


def _side_by_side(*images):
  h = max(i.shape[0] for i in images)
  pad = [np.pad(i, ((0, h - i.shape[0]), (0, 4), (0, 0))) for i in images]
  return np.concatenate(pad, axis=1)


def make_accumulator(config, categories):
  if config.eval.task == "semantic":
    from maskformer_jax.evaluation.miou import MIoUAccumulator
    return MIoUAccumulator(num_classes=len(categories), ignore_label=config.data.ignore_label)
  from maskformer_jax.evaluation.pq import PQAccumulator
  return PQAccumulator(categories)


def original_category_ids(segments_info, categories):
  """Ground truth from the sources names contiguous classes; predictions and PQ use the dataset's ids."""
  to_id = {c["contiguous_id"]: c["id"] for c in categories}
  return [{**s, "category_id": to_id[s["category_id"]]} for s in segments_info]


def semantic_labels(id_map, segments_info, ignore_label=255):
  """A panoptic ground truth (contiguous category ids) as a semantic label map; void -> ignore_label."""
  if not segments_info:
    return np.full(np.shape(id_map), ignore_label, np.int32)
  ids = np.array([s["id"] for s in segments_info], np.int64)
  classes = np.array([s["category_id"] for s in segments_info], np.int32)
  order = np.argsort(ids)
  ids, classes = ids[order], classes[order]
  pos = np.minimum(np.searchsorted(ids, id_map), len(ids) - 1)
  return np.where(ids[pos] == id_map, classes[pos], ignore_label).astype(np.int32)


def merge_over_processes(acc):
  """Sums the accumulator state over all processes (every process gets the total)."""
  if jax.process_count() == 1:
    return acc
  total = sum_across_hosts(acc.state())  # bit-exact: float64 / int64 states travel as bytes
  acc.reset()
  acc.merge(total)
  return acc


def evaluate(config, model, state, mesh, eval_step, *, num_images: int = 0, source=None):
  """Runs eval_step over the validation split; returns (metrics row, summary images or None)."""
  from maskformer_jax import inference
  from maskformer_jax import train_step as train_step_lib
  from maskformer_jax.data import pipeline
  del model
  split = config.data.val_split
  source = source or pipeline.make_source(config, split)
  categories = source.categories
  loader = pipeline.make_loader(config, split, train=False, seed=config.seed, source=source,
                                shard_index=jax.process_index(), shard_count=jax.process_count())
  acc = make_accumulator(config, categories)
  summaries, count = [], 0
  for batch in loader:
    outputs = eval_step(state, train_step_lib.shard_batch(batch, mesh))
    outputs = host_local({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}, mesh)
    results = inference.postprocess_to_original(
        outputs, batch, categories=categories, task=config.eval.task,
        object_mask_threshold=config.eval.object_mask_threshold,
        overlap_threshold=config.eval.overlap_threshold)
    for i, (image_id, result) in enumerate(zip(np.asarray(batch["image_id"]), results)):
      if result is None or image_id < 0:
        continue
      gt = source.ground_truth(int(image_id))
      if config.eval.task == "panoptic":
        gt = (gt[0], original_category_ids(gt[1], categories))
        acc.add(result[0], result[1], gt[0], gt[1])
      else:
        if isinstance(gt, tuple):  # a panoptic dataset evaluated semantically
          gt = semantic_labels(*gt, ignore_label=config.data.ignore_label)
        acc.add(result, gt)
      count += 1
      if len(summaries) < num_images and jax.process_index() == 0:
        if config.eval.task == "semantic":
          views = [colorize_semantic(gt), colorize_semantic(result)]
        elif config.eval.task == "panoptic":
          views = [colorize(*gt, categories), colorize(*result, categories)]
        else:
          views = []
        summaries.append(_side_by_side(original_image(batch, i), *views))
  acc = merge_over_processes(acc)
  row = metric_row(acc.result(), config.eval.task)
  row["num_images"] = int(sum_across_hosts(np.asarray([count], np.int64))[0])
  images = None
  if summaries:
    h = max(s.shape[0] for s in summaries)
    w = max(s.shape[1] for s in summaries)
    images = np.stack([np.pad(s, ((0, h - s.shape[0]), (0, w - s.shape[1]), (0, 0))) for s in summaries])
  return row, images


def best_metric(config) -> str:
  """The metric the best checkpoint is chosen by."""
  return "miou" if config.eval.task == "semantic" else "pq"


def restore_checkpoint(config, model, mesh, workdir, which="latest"):
  """(state, step) from a training workdir: which = 'latest', 'best' (by PQ / mIoU) or a step number."""
  from maskformer_jax import train_step as train_step_lib
  state = train_step_lib.init_state(config, model, mesh, jax.random.key(config.seed))
  manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints,
                                    best_metric=best_metric(config))
  step = None if which == "latest" else (checkpoint.best_step(manager) if which == "best" else int(which))
  state, step = checkpoint.restore(manager, state, step=step)
  if state is None:
    raise SystemExit(f"No checkpoint in {workdir}/checkpoints: train first (maskformer_jax.train).")
  return state, step


def metric_row(result: dict, task: str) -> dict:
  """The accumulator's result as a flat row in percent: pq/sq/rq (+ _th, _st) or miou (+ macc, ...)."""
  if task == "panoptic":
    row = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
      for k in ("pq", "sq", "rq"):
        row[k + suffix] = 100 * float(result[group][k])
    for cat, r in result.get("per_class", {}).items():
      row[f"pq_class{cat}"] = 100 * float(r["pq"])
    return row
  return {k: 100 * float(v) for k, v in result.items() if np.ndim(v) == 0}


def main(argv):
  del argv
  from maskformer_jax import sharding
  from maskformer_jax import train as train_lib
  from maskformer_jax import train_step as train_step_lib
  from maskformer_jax.models import build_model
  f = flags.FLAGS
  train_lib.quiet_library_logs()
  train_lib.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  config = paths.absolute_config_paths(train_lib._CONFIG.value)
  workdir = paths.absolute(f.workdir)
  train_lib.validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  config = train_lib.resolve_data_root(config)
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model)
  state, step = restore_checkpoint(config, model, mesh, workdir, f.checkpoint)
  eval_step = train_step_lib.make_eval_step(config, model, mesh)
  row, images = evaluate(config, model, state, mesh, eval_step, num_images=config.train.image_summaries)
  row["checkpoint_step"] = step
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(step, row, prefix="eval")
  if images is not None:
    writer.images(step, "eval/image_gt_prediction", images)
  writer.close()
  if jax.process_index() == 0:
    print(json.dumps({"step": step, **row}))


if __name__ == "__main__":
  from maskformer_jax import train as _train  # noqa: F401 -- defines --config, --workdir and the process flags
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by PQ / mIoU) or a step number.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
