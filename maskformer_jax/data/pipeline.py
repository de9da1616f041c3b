"""Sources -> recipe -> per-host batches in the batch contract (docs/interfaces.md), with Grain.

  loader = make_loader(config, "train2017", train=True, seed=0)
  it = iter(loader)
  batch = next(it)             # dict of numpy arrays, leading axis config.batch_size // process_count
  state = it.get_state()       # bytes; iter(loader) + it.set_state(state) continues identically

Train: shuffled per epoch (IndexSampler, seeded), sharded per host without overlap (drop remainder),
bad examples dropped (count + log) or raised, per-example augmentation RNG from (seed, global index)
(grain's RecordMetadata rng). With worker processes each worker batches its own share of the records,
so the batch composition depends on config.data.num_workers (restore with the same count); the
examples themselves do not. Eval: every example of the split exactly once
in order, each host a contiguous equal share, filled to whole batches with padding examples
(image_id -1, valid all False); an example skipped as bad input also becomes a padding example.
"""
import logging
import math

from absl import flags
import grain
import numpy as np

from maskformer_jax import registry
from maskformer_jax.data import transforms

log = logging.getLogger("maskformer_jax.data")
READ_THREADS = 4  # per process; decoding releases the GIL, and remote (gs://) reads wait on I/O


# config.data.dataset -> "module:function" building its source (imported only when chosen: the TFDS source
# pulls in TensorFlow Datasets). Each function takes (config.data, split, *, bad_input, require_segments).
DATASETS = {
    "coco_panoptic": "maskformer_jax.data.coco_panoptic:from_config",
    "ade20k": "maskformer_jax.data.ade20k:from_config",
    "tfds_coco_panoptic": "maskformer_jax.data.tfds:from_config",
}


def make_source(config, split, *, require_segments=False, bad_input=None, check_classes=True):
  """The random-access source named by config.data.dataset, checked against config.model.num_classes.

  `bad_input` overrides config.data.bad_input (data.check reads with 'raise'); `check_classes=False`
  leaves the class count to the caller (data.check reports it instead of raising).
  """
  d = config.data
  from_config = registry.get(DATASETS, d.dataset, "data.dataset")
  src = from_config(d, split, bad_input=bad_input or d.bad_input, require_segments=require_segments)
  if check_classes:
    check_num_classes(config, src.categories, f"{d.dataset} ({src!r})")
  return src


def check_num_classes(config, categories, what):
  """The model's K must equal the dataset's class count: a mismatch would train silently wrong."""
  k = config.model.num_classes
  if len(categories) != k:
    raise ValueError(f"config.model.num_classes = {k} but {what} has {len(categories)} categories: "
                     f"set --config.model.num_classes={len(categories)}.")


class _Padded:
  """A source extended to `length` with padding markers, so eval batches are whole and static."""

  def __init__(self, source, n, length):
    self.source, self.n, self.length = source, n, length

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.source[index] if index < self.n else {"image_id": -1, "skip": "padding"}


class _NotSkipped(grain.transforms.Filter):

  def filter(self, element):
    return "skip" not in element


class _Overflow:
  """Counts, per process, the segments dropped because an image had more than max_instances."""

  def __init__(self, max_instances):
    self.max_instances, self.images, self.segments = max_instances, 0, 0

  def __call__(self, out, overflow):
    if overflow:
      self.images += 1
      self.segments += overflow
      log.warning("image %d has %d segments more than max_instances=%d: kept the largest "
                  "(overflowing images so far in this process: %d, segments dropped: %d)",
                  int(out["image_id"]), overflow, self.max_instances, self.images, self.segments)
    return out


class TrainMap(grain.transforms.RandomMap):

  def __init__(self, recipe, canvas, max_instances, num_classes):
    self.kw = dict(recipe=recipe, canvas=tuple(canvas), max_instances=max_instances,
                   num_classes=num_classes)
    self.overflow = _Overflow(max_instances)

  def random_map(self, element, rng):
    return self.overflow(*transforms.train_example(element, rng, **self.kw))


class EvalMap(grain.transforms.Map):

  def __init__(self, canvas, min_size, max_size, max_instances, num_classes):
    self.kw = dict(canvas=tuple(canvas), min_size=min_size, max_size=max_size,
                   max_instances=max_instances, num_classes=num_classes)
    self.overflow = _Overflow(max_instances)

  def map(self, element):
    if "skip" in element:
      return transforms.padding_example(self.kw["canvas"], self.kw["max_instances"],
                                        self.kw["num_classes"])
    return self.overflow(*transforms.eval_example(element, **self.kw))


def _shards(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax  # here: grain's worker processes import this module and never need JAX
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def per_host_batch(global_batch, shard_count):
  if global_batch % shard_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {shard_count} hosts")
  return global_batch // shard_count


def make_loader(config, split, *, train, seed, shard_index=None, shard_count=None, num_epochs=None,
                source=None, worker_count=None, max_examples=-1):
  """A grain.DataLoader of per-host batches in the batch contract.

  Iterate it with `it = iter(loader)`; `it.get_state()` / `it.set_state(state)` checkpoint the position
  mid-epoch (or save it with grain's orbax handler, `grain.checkpoint.CheckpointHandler`). `source` reuses
  a source already built by `make_source`; `worker_count` overrides config.data.num_workers; eval only:
  `max_examples` >= 0 reads the first that many examples of the split.
  """
  d = config.data
  shard_index, shard_count = _shards(shard_index, shard_count)
  source = source if source is not None else make_source(config, split, require_segments=train)
  workers = d.num_workers if worker_count is None else worker_count
  k, m = config.model.num_classes, d.max_instances
  if train:
    bs = per_host_batch(config.batch_size, shard_count)
    if len(source) // shard_count < bs:
      raise ValueError(f"{len(source)} examples cannot fill a batch of {bs} on {shard_count} hosts")
    shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=True,
                                          num_epochs=num_epochs, seed=int(seed))
    ops = [_NotSkipped(), TrainMap(d.recipe, d.image_size, m, k),
           grain.transforms.Batch(bs, drop_remainder=True)]
  else:
    bs = per_host_batch(config.eval.batch_size, shard_count)
    n = len(source) if max_examples < 0 else min(len(source), max_examples)
    total = max(1, math.ceil(n / (bs * shard_count))) * bs * shard_count
    source = _Padded(source, n, total)
    shard = grain.sharding.ShardOptions(shard_index, shard_count)
    sampler = grain.samplers.IndexSampler(total, shard_options=shard, shuffle=False, num_epochs=1,
                                          seed=int(seed))
    ops = [EvalMap(d.eval_size, d.eval_min_size, d.eval_max_size, m, k),
           grain.transforms.Batch(bs, drop_remainder=False)]
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; not every caller is
      flags.FLAGS.mark_as_parsed()   # an absl app (tests, notebooks): use the flags' defaults
  # Reading threads decode ahead of the transforms; a small window bounds memory at large canvases.
  read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=max(8, 2 * bs))
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=workers, worker_buffer_size=d.worker_buffer_size,
                          shard_options=shard, read_options=read)
