"""Panoptic (or instance) predictions for image files, in the COCO formats, with an overlay per image.

What `python -m maskformer_jax.predict` runs. Writes, per image, OUT/panoptic/<stem>.png (segment id =
R + 256 G + 256^2 B) and OUT/overlays/<stem>.png (the image with coloured segments and outlines), and
OUT/predictions.json holding every image's `segments_info` with the dataset's original category ids
(the COCO panoptic results format, `annotations` list). Images go through the evaluation resize
(config.data.eval_min_size / eval_max_size) onto the evaluation's canvas (pipeline.eval_canvas: the
image's own test size rounded up to data.eval_size_divisibility, or data.eval_size), batched by canvas,
and the result is returned at the original resolution.

Task "instance" (the default for a model trained on COCO instances, data.dataset "coco_instance"):
OUT/instances.json holds the COCO results list (image_id, category_id with the dataset's ids, RLE
segmentation, score; what COCOeval and `tools.instance_eval --pred` read), the overlays show detections
scoring >= 0.5, and predictions.json lists per image its file and detection count.
"""
import itertools
import json
import os

from absl import logging
import jax
import numpy as np
from PIL import Image

from maskformer_jax import card
from maskformer_jax import checkpoint
from maskformer_jax import inference
from maskformer_jax import train_step as train_step_lib
from maskformer_jax import visualize
from maskformer_jax.data import pipeline
from maskformer_jax.data import transforms
from maskformer_jax.data.coco_panoptic import (BadInputPolicy, as_bad_input, decode_rgb, header_size,
                                               read_bytes)
from maskformer_jax.evaluation import id2rgb
from maskformer_jax.evaluation import instance
from maskformer_jax.evaluation import mask_ap


def load_categories(config, path="", checkpoint_dir=None) -> tuple[list[dict], str]:
  """(categories as {id, name, isthing, contiguous_id, color?}, where they came from): the JSON file
  `path` (a COCO panoptic annotation file or a list), else the model card of `checkpoint_dir` (what
  the model was trained or converted with), else the configured dataset (synthetic data is generated
  for it: the only way to learn the categories of a checkpoint without a card)."""
  if path:
    with open(path) as f:
      cats = json.load(f)
    cats = cats["categories"] if isinstance(cats, dict) else cats
    cats = sorted(cats, key=lambda c: c["id"])
    return [{**c, "contiguous_id": i} for i, c in enumerate(cats)], path
  if checkpoint_dir is not None:
    home = checkpoint.home(checkpoint_dir)
    cats = card.categories(home)
    if cats:
      return cats, f"the model card in {home}"
  from maskformer_jax.data import synthetic
  config = synthetic.resolve_data_root(config)
  return pipeline.make_source(config, config.data.val_split).categories, f"the dataset at {config.data.root!r}"


def prepare(path, config, max_instances, num_classes):
  """One image file -> a batch-contract example through the evaluation resize.

  Decoded like the dataset sources' images (OpenCV, PIL's verdict on a bad file), so an empty, truncated
  or unreadable file raises BadInputError naming it.
  """
  image = decode_rgb(read_bytes(path), path)
  ex = {"image": image, "segments": np.full(image.shape[:2], -1, np.int32),
        "seg_labels": np.zeros((0,), np.int32), "image_id": 0}
  canvas = pipeline.eval_canvas(config.data, image.shape[:2])
  out, _ = transforms.eval_example(ex, canvas=canvas, min_size=config.data.eval_min_size,
                                   max_size=config.data.eval_max_size, max_instances=max_instances,
                                   num_classes=num_classes)
  return out, image


TASKS = ("panoptic", "instance")


def default_task(config) -> str:
  """What a model predicts by default: instances when it was trained on instance annotations."""
  return "instance" if config.data.dataset == "coco_instance" else "panoptic"


def predict(config, state, model, mesh, image_paths, out_dir, categories, task=None):
  """Runs the model on `paths` in batches of config.eval.batch_size; returns the predictions JSON.

  A bad image file follows config.data.bad_input: 'raise' raises BadInputError naming the file and the
  problem; 'skip' logs it, predicts the others and lists it in result['skipped'] ({file, error}).
  """
  task = task or default_task(config)
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not one of {TASKS}")
  policy = BadInputPolicy(config.data.bad_input)
  eval_step = train_step_lib.make_eval_step(config, model, mesh)
  if task == "panoptic":
    os.makedirs(os.path.join(out_dir, "panoptic"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
  detections = []
  k, m, bs = config.model.num_classes, config.data.max_instances, config.eval.batch_size
  annotations, skipped = {}, []
  order = list(range(len(image_paths)))
  if config.data.eval_buckets:  # images of one canvas together (sizes from the headers): whole batches
    canvases = [pipeline.eval_canvas(config.data, header_size(p)) for p in image_paths]
    order.sort(key=lambda i: canvases[i])

  def prepared():  # (position, path, example, image) of each readable file, grouped by canvas
    for i in order:
      p = image_paths[i]
      try:
        yield (i, p, *prepare(p, config, m, k))
      except Exception as e:  # not BaseException: an interrupt stops the run
        err = as_bad_input(e, [p])
        policy(err, 0)  # raises under 'raise'; logs and counts under 'skip'
        skipped.append({"file": p, "error": str(err)})

  def same_canvas_batches(items):  # up to bs consecutive examples of one canvas
    for _, group in itertools.groupby(items, key=lambda item: item[2]["image"].shape):
      while chunk := list(itertools.islice(group, bs)):
        yield chunk

  for chunk in same_canvas_batches(prepared()):
    positions, chunk, examples, images = zip(*chunk)
    examples = list(examples) + [examples[-1]] * (bs - len(chunk))  # fill the static batch
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch["image_id"] = np.where(np.arange(bs) < len(chunk), 0, -1).astype(np.int32)
    outputs = jax.device_get(eval_step(state, train_step_lib.shard_batch(batch, mesh)))
    results = inference.postprocess_to_original(
        outputs, batch, categories=categories, task=task, padded_size=batch["image"].shape[1:3],
        object_mask_threshold=config.eval.object_mask_threshold,
        overlap_threshold=config.eval.overlap_threshold)
    for position, path, image, result in zip(positions, chunk, images, results):
      stem = os.path.splitext(os.path.basename(path))[0]
      image_id = int(stem) if stem.isdigit() else stem  # COCO files: the id
      if task == "instance":
        found = mask_ap.detections(image_id, result["masks"], result["scores"], result["category_id"])
        detections += found
        Image.fromarray(visualize.overlay(image, *instance.as_id_map(result, image.shape[:2]),
                                          categories)).save(os.path.join(out_dir, "overlays", stem + ".png"))
        annotations[position] = {"image_id": image_id, "image_file": os.path.basename(path),
                                 "detections": len(found)}
        continue
      id_map, segments_info = result
      Image.fromarray(id2rgb(id_map)).save(os.path.join(out_dir, "panoptic", stem + ".png"))
      Image.fromarray(visualize.overlay(image, id_map, segments_info, categories)).save(
          os.path.join(out_dir, "overlays", stem + ".png"))
      annotations[position] = {"image_id": image_id,
                               "file_name": stem + ".png", "image_file": os.path.basename(path),
                               "segments_info": [{k2: s[k2] for k2 in ("id", "category_id", "isthing",
                                                                       "score", "area")}
                                                 for s in segments_info]}
  annotations = [annotations[i] for i in sorted(annotations)]  # in the order of image_paths
  skipped.sort(key=lambda s: image_paths.index(s["file"]))
  if skipped:
    logging.warning("%d of %d images skipped as bad input (data.bad_input=skip): %s", len(skipped),
                    len(image_paths), ", ".join(s["file"] for s in skipped))
  result = {"annotations": annotations,
            "categories": [{k2: c[k2] for k2 in ("id", "name", "isthing") if k2 in c} for c in categories],
            "skipped": skipped, "task": task}
  if task == "instance":
    with open(os.path.join(out_dir, "instances.json"), "w") as f:
      json.dump(detections, f)
  with open(os.path.join(out_dir, "predictions.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result
