"""Sources -> recipe -> per-host batches in the batch contract (docs/interfaces.md), with Grain.

  loader = make_loader(config, "train2017", train=True, seed=0)
  it = iter(loader)
  batch = next(it)             # dict of numpy arrays, leading axis config.batch_size // process_count
  state = it.get_state()       # bytes; iter(loader) + it.set_state(state) continues identically

Train: shuffled per epoch (IndexSampler, seeded), sharded per host without overlap (drop remainder),
bad examples dropped (count + log) or raised, per-example augmentation RNG from (seed, global index)
(grain's RecordMetadata rng). With worker processes each worker batches its own share of the records,
so the batch composition depends on config.data.num_workers (restore with the same count); the
examples themselves do not. Eval: every example of the split exactly once, following an eval plan
(`eval_plan`: which static canvas each image runs on, grouped by canvas); per canvas each host gets a
contiguous equal share filled to whole batches with padding examples (image_id -1, valid all False), so
every host runs the same canvases in the same order; an example skipped as bad input also becomes a
padding example. Eval batches are stacked in the main process from the loader's examples in order.
"""
import itertools
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
    "coco_instance": "maskformer_jax.data.coco_instance:from_config",
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


def eval_canvas(d, size):
  """The static canvas (H, W) an image of original `size` (h, w) is evaluated on, from config.data.

  With data.eval_buckets its test resize (shortest edge eval_min_size, longest <= eval_max_size) with
  the sides rounded up to data.eval_size_divisibility (0: exactly that size), as the original pads one
  image at a time; else the one canvas data.eval_size. An unknown size (0) counts as square."""
  if not d.eval_buckets:
    return tuple(int(s) for s in d.eval_size)
  h, w = (max(1, int(s)) for s in size)
  div = int(d.eval_size_divisibility)
  resized = transforms.shortest_edge_size(h, w, d.eval_min_size, d.eval_max_size)
  return tuple(-(-s // div) * div if div else s for s in resized)


_LOGGED_PLANS = set()


def eval_plan(config, source, max_examples=-1):
  """[(canvas (H, W), source indices)] for the first `max_examples` (-1: all) examples of `source`.

  Groups the images by `eval_canvas` from their recorded sizes (`source.image_sizes()`, read before
  anything is decoded), canvases in sorted order, so every host builds the same plan. The eval step
  compiles once per canvas. In single-canvas mode (data.eval_buckets False) one entry on
  data.eval_size; every image whose test resize does not fit it (it will be shrunk) is counted and
  reported in one warning."""
  d = config.data
  n = len(source) if max_examples < 0 else min(len(source), max_examples)
  if not d.eval_buckets:
    canvas = tuple(int(s) for s in d.eval_size)
    sizes = source.image_sizes()[:n]
    resized = [transforms.shortest_edge_size(max(h, 1), max(w, 1), d.eval_min_size, d.eval_max_size)
               for h, w in sizes]
    shrunk = [i for i, (h, w) in enumerate(resized) if h > canvas[0] or w > canvas[1]]
    if shrunk:
      i = shrunk[0]
      which = f"image id {int(source.image_ids[i])}" if hasattr(source, "image_ids") else f"example {i}"
      log.warning("%d of %d images of %r do not fit data.eval_size=%s at their test size and are "
                  "evaluated shrunk (e.g. %s: %dx%d, test size %dx%d), unlike the original: set "
                  "data.eval_buckets=True or a larger data.eval_size", len(shrunk), n, source, canvas,
                  which, *sizes[i], *resized[i])
    return [(canvas, np.arange(n))]
  groups = {}
  for i, size in enumerate(source.image_sizes()[:n]):
    groups.setdefault(eval_canvas(d, size), []).append(i)
  plan = [(c, np.array(groups[c], np.int64)) for c in sorted(groups)]
  plan = plan or [(tuple(int(s) for s in d.eval_size), np.zeros(0, np.int64))]  # an empty split
  key = (repr(source), n, tuple((c, len(i)) for c, i in plan))
  if key not in _LOGGED_PLANS:
    _LOGGED_PLANS.add(key)
    by_count = sorted(plan, key=lambda e: -len(e[1]))
    log.info("evaluating %d images of %r on %d canvases (data.eval_size_divisibility=%d; the eval step "
             "compiles once per canvas): %s%s", n, source, len(plan), d.eval_size_divisibility,
             ", ".join(f"{c[0]}x{c[1]}: {len(i)}" for c, i in by_count[:20]),
             f", ... ({len(plan) - 20} more)" if len(plan) > 20 else "")
  return plan


class _Planned:
  """The eval examples of a plan as one record list: per canvas its images, filled with padding markers
  to whole batches on every host; host h's contiguous share holds its part of every canvas in plan
  order, so all hosts run the same canvases in the same order. Each record carries its canvas."""

  def __init__(self, source, plan, per_host, hosts):
    self.source = source
    shares = [[] for _ in range(hosts)]
    for canvas, indices in plan:
      total = max(1, math.ceil(len(indices) / (per_host * hosts))) * per_host * hosts
      padded = list(indices) + [-1] * (total - len(indices))
      for h in range(hosts):
        part = padded[h * total // hosts:(h + 1) * total // hosts]
        shares[h] += [(int(i), tuple(int(c) for c in canvas)) for i in part]
    entries = [e for share in shares for e in share]
    self.indices = np.array([i for i, _ in entries], np.int64)
    self.canvases = np.array([c for _, c in entries], np.int32).reshape(-1, 2)

  def __len__(self):
    return len(self.indices)

  def __repr__(self):
    return f"_Planned({self.source!r}, {len(self)} records)"

  def __getitem__(self, index):
    i = int(self.indices[index])
    ex = self.source[i] if i >= 0 else {"image_id": -1, "skip": "padding"}
    return {**ex, "canvas": tuple(int(c) for c in self.canvases[index])}


class _EvalBatches:
  """A loader's eval examples stacked into batches of `size` consecutive ones (a plan makes each batch
  one canvas). Stacked here, not by grain's Batch: with worker processes each worker would batch every
  worker_count-th example, mixing canvases and leaving partial batches."""

  def __init__(self, loader, size):
    self.loader, self.size = loader, size

  def __iter__(self):
    it = iter(self.loader)
    while chunk := list(itertools.islice(it, self.size)):
      yield {k: np.stack([e[k] for e in chunk]) for k in chunk[0]}


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
  """A planned record (example + its canvas) -> the eval example on that canvas.

  With `warn_shrunk` (bucketed evaluation, where every image should fit its canvas) an image shrunk
  to fit is logged with a running count: its recorded size differed from the decoded file."""

  def __init__(self, min_size, max_size, max_instances, num_classes, warn_shrunk=False, layers=0):
    self.kw = dict(min_size=min_size, max_size=max_size, max_instances=max_instances,
                   num_classes=num_classes)
    self.layers = layers  # the source's segment layers (padding examples must match its shapes)
    self.overflow = _Overflow(max_instances)
    self.warn_shrunk, self.shrunk = warn_shrunk, 0

  def map(self, element):
    canvas = element["canvas"]
    if "skip" in element:
      return transforms.padding_example(canvas, self.kw["max_instances"], self.kw["num_classes"],
                                        self.layers)
    out, overflow = transforms.eval_example(element, canvas=canvas, **self.kw)
    want = transforms.shortest_edge_size(*element["image"].shape[:2], self.kw["min_size"],
                                         self.kw["max_size"])
    if self.warn_shrunk and tuple(out["image_size"]) != want:
      self.shrunk += 1
      log.warning("image %d (%dx%d) was evaluated shrunk to %s on canvas %s instead of its test size "
                  "%s: its recorded size differs from the file (python -m maskformer_jax.data.check "
                  "lists such files; shrunk images so far in this process: %d)", int(out["image_id"]),
                  *element["image"].shape[:2], tuple(out["image_size"]), canvas, want, self.shrunk)
    return self.overflow(out, overflow)


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
                source=None, worker_count=None, max_examples=-1, plan=None):
  """Per-host batches in the batch contract: train, a grain.DataLoader; eval, an iterable of batches.

  Iterate it with `it = iter(loader)`; train: `it.get_state()` / `it.set_state(state)` checkpoint the
  position mid-epoch (or save it with grain's orbax handler, `grain.checkpoint.CheckpointHandler`).
  `source` reuses a source already built by `make_source`; `worker_count` overrides
  config.data.num_workers; eval only: `plan` ([(canvas, source indices)], `eval_plan`; default: the
  first `max_examples` (-1: all) examples of the split on data.eval_size).
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
    warn_shrunk = plan is not None and bool(d.eval_buckets)  # eval_plan reported single-canvas shrinks
    if plan is None:
      n = len(source) if max_examples < 0 else min(len(source), max_examples)
      plan = [(tuple(d.eval_size), np.arange(n))]
    layers = getattr(source, "segment_layers", 0)
    source = _Planned(source, plan, bs, shard_count)
    shard = grain.sharding.ShardOptions(shard_index, shard_count)
    sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=False, num_epochs=1,
                                          seed=int(seed))
    ops = [EvalMap(d.eval_min_size, d.eval_max_size, m, k, warn_shrunk=warn_shrunk, layers=layers)]
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; not every caller is
      flags.FLAGS.mark_as_parsed()   # an absl app (tests, notebooks): use the flags' defaults
  # Reading threads decode ahead of the transforms; a small window bounds memory at large canvases.
  read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=max(8, 2 * bs))
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=workers, worker_buffer_size=d.worker_buffer_size,
                            shard_options=shard, read_options=read)
  return loader if train else _EvalBatches(loader, bs)
