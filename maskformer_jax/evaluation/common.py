"""Evaluators chosen by name in the config, and the loop they share.

`config.evals.<name>` = {type, every, split, max_examples, image_summaries} (maskformer_jax/config.py);
`type` is a key of EVALUATORS, each a module with `METRICS` (what its rows hold) and
`run(config, eval_config, state, mesh, eval_step, *, source=None) -> (row, images or None)`.

Every process evaluates its shard of the split at the original image resolution; the accumulators are
summed over the processes, so a row is the dataset-level metric, never a mean of per-batch numbers.
Images run on per-size canvases (data.eval_buckets, pipeline.eval_plan): each at its test size rounded
up to data.eval_size_divisibility, never shrunk, as the original evaluates one image at a time; the
eval step compiles once per canvas, and since no layer mixes images at inference a result does not
depend on the batch it ran in.
The host-side work (post-processing at the original size, the accumulator) runs on a worker thread, so
the device computes the next batch meanwhile; results are consumed in order, so the metric is the same
number as a sequential loop's.
"""
import queue
import threading

import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import numpy as np

from maskformer_jax import inference
from maskformer_jax import registry
from maskformer_jax import train_step as train_step_lib
from maskformer_jax import visualize
from maskformer_jax.data import pipeline
from maskformer_jax.evaluation import sum_across_hosts

# config.evals.<name>.type -> the evaluator module (imported when chosen).
EVALUATORS = {
    "instance": "maskformer_jax.evaluation.instance",
    "panoptic": "maskformer_jax.evaluation.panoptic",
    "semantic": "maskformer_jax.evaluation.semantic",
}


def metric_names(eval_type: str) -> tuple[str, ...]:
  return registry.get(EVALUATORS, eval_type, "evals.<name>.type").METRICS


def from_config(config) -> dict:
  """{name: run(state, mesh, eval_step, *, source=None) -> (row, images)} for every entry of config.evals."""
  def bind(name, ev):
    run = registry.get(EVALUATORS, ev.type, f"evals.{name}.type").run
    return lambda state, mesh, eval_step, *, source=None: run(config, ev, state, mesh, eval_step,
                                                              source=source)
  return {name: bind(name, ev) for name, ev in config.evals.items()}


def split(config, ev) -> str:
  return ev.split or config.data.val_split


def host_local(tree, mesh):
  """This process's rows of batch-sharded global arrays, as numpy (all rows on a single process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return jax.device_get(multihost_utils.global_array_to_host_local_array(tree, mesh, P("data")))


def run_loop(config, ev, state, mesh, eval_step, source, *, task, consume) -> int:
  """eval_step over the split; `consume(batch, i, image_id, result)` for each real example, in order.

  Returns the number of examples evaluated over all processes. `result` is what
  inference.postprocess_to_original gives for `task` at the image's original resolution.
  """
  plan = pipeline.eval_plan(config, source, int(ev.max_examples))
  loader = pipeline.make_loader(config, split(config, ev), train=False, seed=config.seed, source=source,
                                shard_index=jax.process_index(), shard_count=jax.process_count(),
                                plan=plan)
  work, failed, count = queue.Queue(maxsize=2), [], [0]

  def worker():
    while (item := work.get()) is not None:
      if failed:
        continue  # drain: the main thread stops feeding and re-raises
      outputs, batch = item
      try:
        results = inference.postprocess_to_original(
            host_local(outputs, mesh), batch, categories=source.categories, task=task,
            padded_size=batch["image"].shape[1:3],  # the canvas (4 x the mask size only on the 4-grid)
            object_mask_threshold=config.eval.object_mask_threshold,
            overlap_threshold=config.eval.overlap_threshold)
        for i, (image_id, result) in enumerate(zip(np.asarray(batch["image_id"]), results)):
          if result is not None and image_id >= 0:
            consume(batch, i, int(image_id), result)
            count[0] += 1
      except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
        failed.append(e)

  thread = threading.Thread(target=worker, name="eval-accumulate", daemon=True)
  thread.start()
  try:
    for batch in loader:
      if failed:
        break
      out = eval_step(state, train_step_lib.shard_batch(batch, mesh))  # dispatched, not waited on
      work.put(({"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}, batch))
  finally:
    work.put(None)
    thread.join()
  if failed:
    raise failed[0]
  return int(sum_across_hosts(np.asarray(count, np.int64))[0])


def merge_over_processes(acc):
  """Sums the accumulator state over all processes (every process gets the total)."""
  if jax.process_count() == 1:
    return acc
  total = sum_across_hosts(acc.state())  # bit-exact: float64 / int64 states travel as bytes
  acc.reset()
  acc.merge(total)
  return acc


class Summaries:
  """Up to `n` side-by-side pictures (input, ground truth, prediction), made on process 0 only."""

  def __init__(self, n):
    self.n, self.images = (int(n) if jax.process_index() == 0 else 0), []

  def add(self, make_views):
    if len(self.images) < self.n:
      self.images.append(visualize.side_by_side(*make_views()))

  def stacked(self):
    return visualize.stack(self.images)
