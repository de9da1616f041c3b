"""Command line: panoptic or instance predictions for image files (the library: maskformer_jax/prediction.py).

  python -m maskformer_jax.predict --checkpoint runs/demo --images 'photos/*.jpg' --out predictions/

--checkpoint is a training workdir (newest checkpoint; --step picks another, or 'best'), a step directory
inside it, or a converted checkpoint directory (python -m maskformer_jax.convert). The checkpoint alone
suffices: the config comes from its config.json (or --config), the categories from its model card (or
--categories; without either, from the configured dataset). Writes OUT/panoptic/*.png,
OUT/overlays/*.png and OUT/predictions.json (COCO panoptic results format); with --task=instance (the
default for a model trained on COCO instances) OUT/instances.json (COCO instance results) instead of
OUT/panoptic.
"""
import glob

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from maskformer_jax import checkpoint
from maskformer_jax import paths
from maskformer_jax import prediction
from maskformer_jax import sharding
from maskformer_jax import startup
from maskformer_jax.data import pipeline
from maskformer_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the checkpoint was trained with "
                                          "(default: the checkpoint's config.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, a step directory in it, or a "
                                  "converted checkpoint.")
_STEP = flags.DEFINE_string("step", "latest", "With a workdir: 'latest', 'best' or a step number.")
_IMAGES = flags.DEFINE_string("images", None, "Glob pattern of input images (quote it).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_CATEGORIES = flags.DEFINE_string("categories", "", "JSON file with the categories (a COCO panoptic "
                                  "annotation file or a list of {id, name, isthing}); default: the "
                                  "checkpoint's model card, else config.data's.")
_TASK = flags.DEFINE_enum("task", "", ["", *prediction.TASKS], "What to predict; default: instance for a "
                          "model trained on COCO instances (data.dataset coco_instance), else panoptic.")


def main(argv):
  del argv
  ckpt = paths.absolute(_CHECKPOINT.value)
  config = startup.start(_CONFIG.value or startup.checkpoint_config(ckpt), distributed=False)  # one device
  out_dir, categories_file = paths.absolute(_OUT.value), paths.absolute(_CATEGORIES.value)
  image_paths = sorted(glob.glob(paths.absolute(_IMAGES.value)))
  if not image_paths:
    raise SystemExit(f"No image matches --images={_IMAGES.value!r}.")
  categories, where = prediction.load_categories(config, categories_file, ckpt)
  logging.info("Categories from %s", where)
  pipeline.check_num_classes(config, categories, where)
  with config.unlocked():
    config.mesh.data, config.mesh.model = 1, 1  # one device: batches are small and sizes vary
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  model = build_model(config.model)
  state, step = checkpoint.load_state(config, model, mesh, ckpt, _STEP.value)
  logging.info("Predicting with %s (step %s)", _CHECKPOINT.value, step)
  result = prediction.predict(config, state, model, mesh, image_paths, out_dir, categories,
                              task=_TASK.value or None)
  skipped = f" ({len(result['skipped'])} skipped as bad input)" if result["skipped"] else ""
  main_output = "instances.json" if result["task"] == "instance" else "panoptic"
  print(f"{len(result['annotations'])} images{skipped} -> {out_dir}/{main_output}, {out_dir}/overlays, "
        f"{out_dir}/predictions.json")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "images", "out"])
  app.run(main)
