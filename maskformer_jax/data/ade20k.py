"""ADE20K-150 semantic segmentation (SceneParsing `ADEChallengeData2016` layout) for Grain.

  {root}/images/{training,validation}/ADE_*.jpg · {root}/annotations/{training,validation}/ADE_*.png
PNG values are 0 (ignore) and 1..150; class c becomes contiguous c - 1. Every class present is one
target (segment index = class id; the pipeline compacts the classes present in the crop into slots),
ignore pixels are -1. All 150 categories are marked stuff (isthing 0): the task is semantic.
"""
import io
import re

import numpy as np
from etils import epath
from PIL import Image

from maskformer_jax.data.coco_panoptic import (BadInputError, BadInputPolicy, as_bad_input,
                                               check_not_empty, decode_rgb, describe, header_sizes,
                                               read_bytes)

CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag")
assert len(CLASSES) == 150


def decode_labels(data, path):
  """A single-channel label PNG -> uint8 [h, w]; an empty, RGB or unreadable file is bad input."""
  check_not_empty(data, path)
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode not in ("L", "P"):
        raise ValueError(f"label PNG has mode {img.mode}, expected single-channel L or P")
      return np.asarray(img)
  except Exception as e:  # whatever PIL's version raises for this file, it is this file's problem
    raise BadInputError("unreadable_image", path, describe(e)) from None


class Ade20kSource:

  def __init__(self, root, split, *, bad_input="skip", ignore_label=255, require_segments=False):
    if not str(root):
      raise ValueError("data.root is empty: point it at ADEChallengeData2016/")
    self.root, self.split = epath.Path(root), split
    self.policy = BadInputPolicy(bad_input)
    self.ignore_label, self.require_segments = ignore_label, require_segments
    image_dir = self.root / "images" / split
    if not image_dir.exists():
      raise FileNotFoundError(f"{image_dir} not found (expected ADEChallengeData2016/images/{split})")
    names = [p.name for p in image_dir.iterdir()  # one listing (a gs:// listing is slow)
             if p.name.lower().endswith((".jpg", ".jpeg", ".png"))]
    self._exts = {n.rsplit(".", 1)[0]: n for n in names}
    self._stems = sorted(self._exts)
    nums = [re.findall(r"\d+", s) for s in self._stems]
    ids = [int(n[-1]) if n else i + 1 for i, n in enumerate(nums)]
    if len(set(ids)) != len(ids):  # file numbers not unique: fall back to positions
      ids = list(range(1, len(ids) + 1))
    self.image_ids = np.array(ids, np.int64)
    self._index = {i: k for k, i in enumerate(ids)}
    self.categories = [{"id": i + 1, "name": n, "isthing": 0, "contiguous_id": i}
                       for i, n in enumerate(CLASSES)]
    self.is_thing = np.zeros(len(CLASSES), bool)
    self._sizes = None  # image_sizes(), on first use

  def __len__(self):
    return len(self._stems)

  def __repr__(self):
    return f"Ade20kSource({self.root}, {self.split}, {len(self)} images)"

  @property
  def num_classes(self):
    return len(CLASSES)

  def image_path(self, index):
    return self.root / "images" / self.split / self._exts[self._stems[index]]

  def image_sizes(self):
    """(h, w) of every image, int32 [N, 2], read once from the file headers ((0, 0) if unreadable):
    evaluation buckets images by size before decoding them."""
    if self._sizes is None:
      self._sizes = header_sizes([self.image_path(i) for i in range(len(self))], repr(self))
    return self._sizes

  def label_path(self, index):
    return self.root / "annotations" / self.split / (self._stems[index] + ".png")

  def files(self, index):
    """The files one example is read from, to name in an error."""
    return [self.image_path(index), self.label_path(index)]

  def _labels(self, index):
    """Contiguous labels int32 [h, w], -1 for ignore; values above 150 are bad input."""
    path = self.label_path(index)
    raw = decode_labels(read_bytes(path), path)
    if raw.max(initial=0) > len(CLASSES):
      raise BadInputError("unknown_category", path,
                          f"label values {np.unique(raw[raw > len(CLASSES)])[:5].tolist()} > 150")
    return raw.astype(np.int32) - 1

  def _decode(self, index):
    image = decode_rgb(read_bytes(self.image_path(index)), self.image_path(index))
    labels = self._labels(index)
    if labels.shape != image.shape[:2]:
      raise BadInputError("size_mismatch", self.label_path(index),
                          f"PNG {labels.shape} vs image {image.shape[:2]}")
    if self.require_segments and not (labels >= 0).any():
      raise BadInputError("no_segments", self.label_path(index), "every pixel is ignore (0)")
    return {"image": image, "segments": labels, "seg_labels": np.arange(len(CLASSES), dtype=np.int32),
            "image_id": int(self.image_ids[index])}

  def __getitem__(self, index):
    index = int(index)
    image_id = self.image_ids[index]
    try:
      return self._decode(index)
    except Exception as e:  # not BaseException: an interrupt stops the run
      return self.policy(as_bad_input(e, self.files(index)), image_id)

  def ground_truth(self, image_id):
    """Semantic label map int32 [h0, w0]: contiguous 0..149, ignore_label (255) for ignore."""
    index = self._index[int(image_id)]
    try:
      labels = self._labels(index)
    except Exception as e:
      raise as_bad_input(e, [self.label_path(index)])
    return np.where(labels < 0, self.ignore_label, labels).astype(np.int32)


def from_config(d, split, *, bad_input, require_segments=False):
  """The source of `split` from config.data (data/pipeline.py's DATASETS entry)."""
  return Ade20kSource(d.root, split, bad_input=bad_input, ignore_label=d.ignore_label,
                      require_segments=require_segments)
