"""Panoptic predictions for image files, in the COCO panoptic format, with an overlay per image.

  python -m maskformer_jax.predict --config configs/demo.py --checkpoint runs/demo \
      --images 'photos/*.jpg' --out predictions/

--checkpoint is a training workdir (newest checkpoint; --step picks another, or 'best'), a step directory
inside it, or a converted checkpoint directory (python -m maskformer_jax.convert). Writes, per image,
OUT/panoptic/<stem>.png (segment id = R + 256 G + 256^2 B) and OUT/overlays/<stem>.png (the image with
coloured segments and outlines), and OUT/predictions.json holding every image's `segments_info` with the
dataset's original category ids (the COCO panoptic results format, `annotations` list).
Images go through the evaluation resize (config.data.eval_min_size / eval_max_size, padded to
config.data.eval_size) and the result is returned at the original resolution.
"""
import glob
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image

from maskformer_jax import evaluate as evaluate_lib
from maskformer_jax import paths
from maskformer_jax.evaluation import id2rgb

flags.DEFINE_string("checkpoint", None, "Training workdir, a step directory in it, or a converted checkpoint.")
flags.DEFINE_string("step", "latest", "With a workdir: 'latest', 'best' or a step number.")
flags.DEFINE_string("images", None, "Glob pattern of input images (quote it).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("categories", "", "JSON file with the categories (a COCO panoptic annotation file or a "
                    "list of {id, name, isthing}); default: those of config.data.")


def overlay(image, id_map, segments_info, categories, alpha=0.5):
  """The image blended with the coloured segments, segment outlines in white."""
  colours = evaluate_lib.colorize(id_map, segments_info, categories)
  out = image.astype(np.float32)
  seg = id_map > 0
  out[seg] = (1 - alpha) * out[seg] + alpha * colours[seg]
  edge = np.zeros_like(seg)
  edge[1:] |= id_map[1:] != id_map[:-1]
  edge[:, 1:] |= id_map[:, 1:] != id_map[:, :-1]
  out[edge] = 255
  return out.astype(np.uint8)


def load_categories(config, path=""):
  """Categories as {id, name, isthing, contiguous_id}, from a JSON file or the configured dataset."""
  if path:
    with open(path) as f:
      cats = json.load(f)
    cats = cats["categories"] if isinstance(cats, dict) else cats
    cats = sorted(cats, key=lambda c: c["id"])
    return [{**c, "contiguous_id": i} for i, c in enumerate(cats)]
  from maskformer_jax.data import pipeline
  return pipeline.make_source(config, config.data.val_split).categories


def prepare(path, config, max_instances, num_classes):
  """One image file -> a batch-contract example through the evaluation resize.

  Decoded like the dataset sources' images (OpenCV, PIL's verdict on a bad file), so an empty, truncated
  or unreadable file raises BadInputError naming it.
  """
  from maskformer_jax.data import transforms
  from maskformer_jax.data.coco_panoptic import decode_rgb, read_bytes
  image = decode_rgb(read_bytes(path), path)
  ex = {"image": image, "segments": np.full(image.shape[:2], -1, np.int32),
        "seg_labels": np.zeros((0,), np.int32), "image_id": 0}
  out, _ = transforms.eval_example(ex, canvas=config.data.eval_size, min_size=config.data.eval_min_size,
                                   max_size=config.data.eval_max_size, max_instances=max_instances,
                                   num_classes=num_classes)
  return out, image


def load_state(config, model, mesh, checkpoint_path, step="latest"):
  """The train state from a workdir / step directory, or the weights of a converted checkpoint."""
  from maskformer_jax import train as train_lib
  from maskformer_jax import train_step as train_step_lib
  path = os.path.abspath(checkpoint_path.rstrip("/"))
  name = os.path.basename(path)
  if name.isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    workdir, step = os.path.dirname(os.path.dirname(path)), name
  elif os.path.isdir(os.path.join(path, "checkpoints")):
    workdir = path
  else:  # a converted checkpoint
    with config.unlocked():
      config.init.checkpoint = path
    state = train_step_lib.init_state(config, model, mesh, jax.random.key(config.seed))
    return train_lib.load_pretrained(config, state, mesh)
  state, step = evaluate_lib.restore_checkpoint(config, model, mesh, workdir, step)
  logging.info("Predicting with the checkpoint at step %d of %s", step, workdir)
  return state


def predict(config, state, model, mesh, paths, out_dir, categories):
  """Runs the model on `paths` in batches of config.eval.batch_size; returns the predictions JSON.

  A bad image file follows config.data.bad_input: 'raise' raises BadInputError naming the file and the
  problem; 'skip' logs it, predicts the others and lists it in result['skipped'] ({file, error}).
  """
  import itertools
  from maskformer_jax import inference
  from maskformer_jax import train_step as train_step_lib
  from maskformer_jax.data.coco_panoptic import BadInputPolicy, as_bad_input
  policy = BadInputPolicy(config.data.bad_input)
  eval_step = train_step_lib.make_eval_step(config, model, mesh)
  os.makedirs(os.path.join(out_dir, "panoptic"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
  k, m, bs = config.model.num_classes, config.data.max_instances, config.eval.batch_size
  annotations, skipped = [], []

  def prepared():  # (path, example, image) of each readable file, in order
    for p in paths:
      try:
        yield (p, *prepare(p, config, m, k))
      except Exception as e:  # not BaseException: an interrupt stops the run
        err = as_bad_input(e, [p])
        policy(err, 0)  # raises under 'raise'; logs and counts under 'skip'
        skipped.append({"file": p, "error": str(err)})

  ready = prepared()
  while chunk := list(itertools.islice(ready, bs)):
    chunk, examples, images = zip(*chunk)
    examples = list(examples) + [examples[-1]] * (bs - len(chunk))  # fill the static batch
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch["image_id"] = np.where(np.arange(bs) < len(chunk), 0, -1).astype(np.int32)
    outputs = jax.device_get(eval_step(state, train_step_lib.shard_batch(batch, mesh)))
    results = inference.postprocess_to_original(
        outputs, batch, categories=categories, task="panoptic",
        object_mask_threshold=config.eval.object_mask_threshold,
        overlap_threshold=config.eval.overlap_threshold)
    for path, image, (id_map, segments_info) in zip(chunk, images, results):
      stem = os.path.splitext(os.path.basename(path))[0]
      Image.fromarray(id2rgb(id_map)).save(os.path.join(out_dir, "panoptic", stem + ".png"))
      Image.fromarray(overlay(image, id_map, segments_info, categories)).save(
          os.path.join(out_dir, "overlays", stem + ".png"))
      annotations.append({"image_id": int(stem) if stem.isdigit() else stem,  # COCO files: the id
                          "file_name": stem + ".png", "image_file": os.path.basename(path),
                          "segments_info": [{k2: s[k2] for k2 in ("id", "category_id", "isthing", "score",
                                                                  "area")} for s in segments_info]})
  if skipped:
    logging.warning("%d of %d images skipped as bad input (data.bad_input=skip): %s", len(skipped),
                    len(paths), ", ".join(s["file"] for s in skipped))
  result = {"annotations": annotations,
            "categories": [{k2: c[k2] for k2 in ("id", "name", "isthing") if k2 in c} for c in categories],
            "skipped": skipped}
  with open(os.path.join(out_dir, "predictions.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def main(argv):
  del argv
  from maskformer_jax import sharding
  from maskformer_jax import train as train_lib
  from maskformer_jax.models import build_model
  f = flags.FLAGS
  train_lib.quiet_library_logs()
  config = paths.absolute_config_paths(train_lib._CONFIG.value)
  out_dir, categories_file = paths.absolute(f.out), paths.absolute(f.categories)
  if config.eval.task != "panoptic":
    raise SystemExit(f"predict writes panoptic results; config.eval.task is {config.eval.task!r}.")
  image_paths = sorted(glob.glob(paths.absolute(f.images)))
  if not image_paths:
    raise SystemExit(f"No image matches --images={f.images!r}.")
  if not categories_file:
    config = train_lib.resolve_data_root(config)
  categories = load_categories(config, categories_file)
  train_lib.check_categories(config, categories)
  with config.unlocked():
    config.mesh.data, config.mesh.model = 1, 1  # one device: batches are small and sizes vary
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  model = build_model(config.model)
  state = load_state(config, model, mesh, paths.absolute(f.checkpoint), f.step)
  result = predict(config, state, model, mesh, image_paths, out_dir, categories)
  skipped = f" ({len(result['skipped'])} skipped as bad input)" if result["skipped"] else ""
  print(f"{len(result['annotations'])} images{skipped} -> {out_dir}/panoptic, {out_dir}/overlays, "
        f"{out_dir}/predictions.json")


if __name__ == "__main__":
  from maskformer_jax import train as _train  # noqa: F401 -- defines --config
  flags.mark_flags_as_required(["config", "checkpoint", "images", "out"])
  app.run(main)
