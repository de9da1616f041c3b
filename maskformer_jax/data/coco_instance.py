"""COCO instance segmentation (2017 layout) as a random-access source: Mask2Former's COCO instance recipe.

Layout under one root (local or `gs://`, read through `etils.epath`):
  {split}/*.jpg · annotations/instances_{split}.json, split like "train2017".

Instances overlap (a person in front of a bench: both masks hold the shared pixels), which one index a
pixel cannot say. `source[i]` therefore gives segments int32 [h, w, L]: each instance's pixels go in the
first of L layers still free there, so a pixel belongs to up to L instances (data.instance_layers); slot
m's target is the OR over the layers (criterion.target_masks). A pixel under more than L instances is
left out of the later ones, counted and logged (docs/interfaces.md). The rest is the panoptic source's contract: seg_labels int32 [n] contiguous class
ids (every category is a thing), image_id.

As detectron2 reads COCO for Mask2Former: crowd annotations are not training targets (their pixels are
plain background) but stay in the evaluation ground truth (COCOeval ignores detections on them);
polygons with fewer than 3 points or an odd coordinate count are dropped, and an annotation left with no
polygon is dropped, counted and logged. Masks are rasterised by pycocotools (polygons and RLE, compressed
or not), as COCOeval rasterises the ground truth. The polygons are kept as float64 arrays (exactly the
JSON's values) with offsets, cheap to pickle into every loader worker.

Bad input follows the panoptic source (coco_panoptic.BadInputPolicy): a missing or unreadable image, an
image whose size differs from its JSON entry, an unknown category or a malformed annotation makes that
image a bad example, raised or counted and skipped.
"""
import logging
import threading

import numpy as np
from etils import epath
from pycocotools import mask as mask_util

from maskformer_jax.data.coco_panoptic import (BadInputError, BadInputPolicy, _int, _Malformed, _name,
                                               as_bad_input, decode_rgb, load_annotations, read_bytes)

log = logging.getLogger("maskformer_jax.data")


def _polygons(seg, what):
  """The valid polygons of a segmentation list (>= 3 points, an even count of finite numbers)."""
  out = []
  for j, p in enumerate(seg):
    if not isinstance(p, list) or not all(isinstance(v, (int, float)) for v in p):
      raise _Malformed(f"{what}.segmentation[{j}] is not a list of numbers")
    if len(p) >= 6 and len(p) % 2 == 0 and np.all(np.isfinite(p)):
      out.append(np.asarray(p, np.float64))
  return out


def _rle(seg, size, what):
  """A segmentation RLE (compressed or not) as a compressed RLE at the image size."""
  if not (isinstance(seg.get("size"), list) and "counts" in seg):
    raise _Malformed(f"{what}.segmentation is neither a polygon list nor an RLE {{size, counts}}")
  if [int(s) for s in seg["size"]] != list(size):
    raise _Malformed(f"{what}.segmentation has size {seg['size']}, the image is {list(size)}")
  rle = mask_util.frPyObjects(seg, *size) if isinstance(seg["counts"], list) else dict(seg)
  if isinstance(rle["counts"], str):
    rle["counts"] = rle["counts"].encode("ascii")
  return rle


class CocoInstanceSource:
  """Random access over one split of COCO instances; `categories` maps original ids to 0..K-1."""

  def __init__(self, root, split, *, bad_input="skip", require_segments=False, layers=4):
    if not str(root):
      raise ValueError("data.root is empty: point it at a COCO root with annotations/instances_{split}.json "
                       "(or run `python -m maskformer_jax.data.synthetic --out DIR` and use DIR)")
    if int(layers) < 1:
      raise ValueError(f"data.instance_layers={layers} must be >= 1 (instances a pixel may belong to).")
    self.root, self.split, self.segment_layers = epath.Path(root), split, int(layers)
    self.policy = BadInputPolicy(bad_input)
    self.require_segments = require_segments
    ann_path = self.root / "annotations" / f"instances_{split}.json"
    if not ann_path.exists():
      raise FileNotFoundError(f"{ann_path} not found (expected the COCO 2017 layout: {{root}}/{split}/ and "
                              f"annotations/instances_{split}.json)")
    self.ann_path = ann_path
    d = load_annotations(ann_path, "COCO instances")
    self.categories = _categories(d["categories"], ann_path)
    self.is_thing = np.ones(len(self.categories), bool)
    cat_index = {c["id"]: c["contiguous_id"] for c in self.categories}
    self._parse(d, cat_index)
    self.lock, self.dropped_pixels, self.overlap_images = threading.Lock(), 0, 0

  def _parse(self, d, cat_index):
    """Images and per-image annotation tables; one bad row makes only its own image a bad example."""
    self._problems, self.annotation_problems = {}, []
    ids, files, sizes = [], [], []
    for k, im in enumerate(d["images"]):
      try:
        image_id, file_name = _int(im, "id", f"images[{k}]"), _name(im, "file_name", f"images[{k}]")
        size = (_int(im, "height", f"images[{k}]"), _int(im, "width", f"images[{k}]"))
      except _Malformed as e:  # without its id, name and size the image cannot be read or scored
        self.annotation_problems.append(("bad_annotation", str(self.ann_path), f"{e}: the entry is left out"))
        continue
      ids.append(image_id)
      files.append(file_name)
      sizes.append(size)
    self.image_ids = np.array(ids, np.int64)
    self._index = {int(i): k for k, i in enumerate(ids)}
    self._image_files, self._sizes = files, np.array(sizes, np.int32).reshape(-1, 2)
    per_image = [[] for _ in ids]
    self.invalid_polygons = 0
    for k, a in enumerate(d["annotations"]):
      what = f"annotations[{k}]"
      try:
        pos = self._index.get(_int(a, "image_id", what))
      except _Malformed as e:
        self.annotation_problems.append(("bad_annotation", str(self.ann_path), f"{e}: it belongs to no image"))
        continue
      if pos is None:
        self.annotation_problems.append(("bad_annotation", str(self.ann_path),
                                         f"{what}: image_id {a['image_id']} is not in 'images'"))
        continue
      try:
        row = self._row(a, what, tuple(self._sizes[pos]), cat_index)
      except _Malformed as e:
        self._problems.setdefault(pos, f"image id {ids[pos]}: {e}")
        continue
      if row is None:
        self.invalid_polygons += 1
      else:
        per_image[pos].append(row)
    for kind, path, m in self.annotation_problems:
      log.warning("%s: %s: %s", path, kind, m)
    if self.invalid_polygons:
      log.warning("%s: %d annotations have no valid polygon (>= 3 points) and are left out, as detectron2 "
                  "does", self.ann_path, self.invalid_polygons)
    # Flat tables + offsets (cheap to pickle): per annotation its class, crowd flag, area, bbox, and
    # either a range of polygons (coordinates in one float64 array) or an RLE.
    rows = [r for rs in per_image for r in rs]
    self._offsets = np.cumsum([0] + [len(rs) for rs in per_image])
    self._cat = np.array([r[0] for r in rows], np.int32)
    self._crowd = np.array([r[1] for r in rows], bool)
    self._area = np.array([r[2] for r in rows], np.float64)
    self._bbox = np.array([r[3] for r in rows], np.float64).reshape(-1, 4)
    polys = [p for r in rows for p in (r[4] if isinstance(r[4], list) else [])]
    self._poly_start = np.cumsum([0] + [len(r[4]) if isinstance(r[4], list) else 0 for r in rows])
    self._coord_start = np.cumsum([0] + [len(p) for p in polys])
    self._coords = np.concatenate(polys) if polys else np.zeros(0, np.float64)
    self._rles = {i: r[4] for i, r in enumerate(rows) if not isinstance(r[4], list)}

  @staticmethod
  def _row(a, what, size, cat_index):
    """(contiguous class, iscrowd, area, bbox, polygons or RLE) of one annotation; None: no valid polygon."""
    cid = _int(a, "category_id", what)
    if cid not in cat_index:
      raise _Malformed(f"{what} has category_id {cid}, which is not in 'categories'")
    crowd = _int(a, "iscrowd", what, default=0)
    area = a.get("area", 0.0)
    bbox = a.get("bbox", [0, 0, 0, 0])
    if not isinstance(area, (int, float)) or not (isinstance(bbox, list) and len(bbox) == 4):
      raise _Malformed(f"{what} has a malformed 'area' or 'bbox'")
    seg = a.get("segmentation")
    if isinstance(seg, list):
      polys = _polygons(seg, what)
      return (cat_index[cid], crowd, float(area), [float(v) for v in bbox], polys) if polys else None
    if isinstance(seg, dict):
      return cat_index[cid], crowd, float(area), [float(v) for v in bbox], _rle(seg, size, what)
    raise _Malformed(f"{what} lacks 'segmentation'" if seg is None else
                     f"{what} has 'segmentation' of type {type(seg).__name__}")

  def __len__(self):
    return len(self.image_ids)

  def __repr__(self):
    return f"CocoInstanceSource({self.root}, {self.split}, {len(self)} images)"

  def __getstate__(self):
    return {**self.__dict__, "lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, lock=threading.Lock())

  @property
  def num_classes(self):
    return len(self.categories)

  def image_path(self, index):
    return self.root / self.split / self._image_files[index]

  def files(self, index):
    return [self.image_path(index)]

  def image_sizes(self):
    """(h, w) of every image, int32 [N, 2], from the JSON (which must give them: the polygons are
    rasterised at that size)."""
    return self._sizes

  def _rle_of(self, j, size):
    """Annotation j's mask as one compressed RLE at `size`."""
    if j in self._rles:
      return self._rles[j]
    polys = [self._coords[self._coord_start[p]:self._coord_start[p + 1]]
             for p in range(self._poly_start[j], self._poly_start[j + 1])]
    return mask_util.merge(mask_util.frPyObjects(polys, *size))

  def _annotations(self, index):
    if index in self._problems:
      raise BadInputError("bad_annotation", self.ann_path, self._problems[index])
    return range(self._offsets[index], self._offsets[index + 1])

  def _decode(self, index):
    rows = self._annotations(index)
    image = decode_rgb(read_bytes(self.image_path(index)), self.image_path(index))
    size = tuple(int(s) for s in self._sizes[index])
    if image.shape[:2] != size:
      raise BadInputError("size_mismatch", self.image_path(index),
                          f"the image is {image.shape[:2]}, its JSON entry says {size} (the masks' size)")
    segments = np.full((*size, self.segment_layers), -1, np.int32)
    labels, dropped = [], 0
    for j in rows:
      if self._crowd[j]:
        continue  # not a target (detectron2 drops crowd annotations for training)
      todo = mask_util.decode(self._rle_of(j, size)).astype(bool)
      n = len(labels)
      for layer in range(self.segment_layers):
        free = todo & (segments[..., layer] < 0)
        segments[..., layer][free] = n
        todo &= ~free
        if not todo.any():
          break
      dropped += int(todo.sum())
      labels.append(self._cat[j])
    if dropped:
      with self.lock:
        self.dropped_pixels += dropped
        self.overlap_images += 1
        totals = self.overlap_images, self.dropped_pixels
      log.warning("image %d: %d pixels lie under more than data.instance_layers=%d instances and are left "
                  "out of the later ones (so far in this process: %d images, %d pixels)",
                  int(self.image_ids[index]), dropped, self.segment_layers, *totals)
    if self.require_segments and not (segments >= 0).any():
      raise BadInputError("no_segments", self.image_path(index), "no non-crowd instance with a pixel")
    return {"image": image, "segments": segments, "seg_labels": np.array(labels, np.int32),
            "image_id": int(self.image_ids[index])}

  def __getitem__(self, index):
    index = int(index)
    try:
      return self._decode(index)
    except Exception as e:  # not BaseException: an interrupt stops the run
      return self.policy(as_bad_input(e, self.files(index)), self.image_ids[index])

  def instance_annotations(self, image_id):
    """((h, w), COCO instance annotations of the image with the dataset's category ids, crowd included,
    segmentation as compressed RLE, area and bbox as in the JSON) for COCOeval."""
    index = self._index[int(image_id)]
    size = tuple(int(s) for s in self._sizes[index])
    try:
      rows = self._annotations(index)
    except Exception as e:
      raise as_bad_input(e, [self.ann_path])
    out = []
    for j in rows:
      rle = self._rle_of(j, size)
      out.append({"image_id": int(image_id), "category_id": int(self.categories[self._cat[j]]["id"]),
                  "iscrowd": int(self._crowd[j]), "area": float(self._area[j]),
                  "bbox": self._bbox[j].tolist(),
                  "segmentation": {"size": [int(s) for s in rle["size"]],
                                   "counts": rle["counts"].decode("ascii")}})
    return size, out


def _categories(cats, path):
  """Categories sorted by id, contiguous ids, all things (an instance file has no stuff)."""
  out = []
  for k, c in enumerate(cats):
    try:
      cid = _int(c, "id", f"categories[{k}]")
    except _Malformed as e:
      raise ValueError(f"{path}: {e}") from None
    out.append({"id": cid, "name": str(c.get("name", cid)), "isthing": 1})
  out.sort(key=lambda c: c["id"])
  return [dict(c, contiguous_id=i) for i, c in enumerate(out)]


def from_config(d, split, *, bad_input, require_segments=False):
  """The source of `split` from config.data (data/pipeline.py's DATASETS entry)."""
  return CocoInstanceSource(d.root, split, bad_input=bad_input, require_segments=require_segments,
                            layers=d.instance_layers)

