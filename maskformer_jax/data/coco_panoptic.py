"""COCO panoptic (2017 layout) as a random-access source for Grain, and the bad-input policy.

Layout under one root (local or `gs://`, read through `etils.epath`):
  {split}/*.jpg · panoptic_{split}/*.png · annotations/panoptic_{split}.json, split like "train2017".

`source[i]` decodes one example into the compact form every transform works on:
  image uint8 [h, w, 3] RGB (grayscale, CMYK, RGBA converted) · segments int32 [h, w], per pixel the index
  of its segment in `seg_labels`, -1 for void and crowd · seg_labels int32 [n] contiguous class ids ·
  image_id int. Segment ids are decoded as R + 256 G + 256^2 B in int32 (never a uint8 wrap) and matched
  to the JSON with one `searchsorted` over the pixels, no per-pixel Python.
A bad example (missing or unreadable file, PNG ids absent from the JSON, unknown category, no segment)
raises `BadInputError` naming the file and the problem when the policy is "raise"; with "skip" it is
counted, logged and returned as `{"image_id": ..., "skip": kind}` for the pipeline to drop.
"""
import collections
import io
import json
import logging

import cv2
import numpy as np
from etils import epath
from PIL import Image

log = logging.getLogger("maskformer_jax.data")


class BadInputError(ValueError):
  """An example that cannot be used; the message names the file and the problem."""

  def __init__(self, kind, path, message):
    super().__init__(f"{path}: {kind}: {message}")
    self.kind, self.path = kind, str(path)


class BadInputPolicy:
  """'raise' or 'skip' (count and log each skip; `counts` is per process)."""

  def __init__(self, mode):
    if mode not in ("skip", "raise"):
      raise ValueError(f"data.bad_input must be 'skip' or 'raise', got {mode!r}")
    self.mode = mode
    self.counts = collections.Counter()

  def __call__(self, err, image_id):
    if self.mode == "raise":
      raise err
    self.counts[err.kind] += 1
    log.warning("skipping bad input %s (skips so far in this process: %s)", err,
                dict(self.counts))
    return {"image_id": int(image_id), "skip": err.kind}


def _decode_pil(data, path):
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # a truncated file fails here (PIL raises unless LOAD_TRUNCATED_IMAGES)
      if img.mode != "RGB":  # L, P, CMYK, RGBA, I;16 ...
        img = img.convert("RGB")
      return np.asarray(img)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadInputError("unreadable_image", path, f"{type(e).__name__}: {e}") from None


_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}


def decode_rgb(data, path):
  """Encoded image bytes -> uint8 [h, w, 3] RGB; raises BadInputError if unreadable or truncated.

  OpenCV decodes (5x faster than PIL here; grayscale, CMYK, palette and RGBA converted); PIL, strict
  about truncation, takes what OpenCV rejects or would decode leniently (a JPEG without its end marker,
  16-bit images), so the verdict on a bad file is PIL's.
  """
  jpeg_cut = data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] != b"\xff\xd9"
  arr = None if jpeg_cut else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if arr is None or arr.dtype != np.uint8 or (arr.ndim == 3 and arr.shape[2] not in _TO_RGB):
    return _decode_pil(data, path)
  return cv2.cvtColor(arr, _TO_RGB[1 if arr.ndim == 2 else arr.shape[2]])


def read_bytes(path):
  try:
    return epath.Path(path).read_bytes()
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    raise BadInputError("missing_file", path, f"{type(e).__name__}: {e}") from None


def rgb_to_id(rgb):
  """Panoptic PNG [h, w, 3] uint8 -> int32 segment ids R + 256 G + 256^2 B."""
  rgb = rgb.astype(np.int32)
  return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def id_to_rgb(ids):
  ids = np.asarray(ids, np.int64)
  return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)


def index_segments(idmap, seg_ids, path):
  """Per-pixel position of each pixel's id in `seg_ids` (any order); -1 for void (id 0).

  Raises BadInputError when the map holds an id that is not in `seg_ids`.
  """
  seg_ids = np.asarray(seg_ids, np.int64)
  order = np.argsort(seg_ids, kind="stable")
  sorted_ids = seg_ids[order]
  if not len(sorted_ids):
    sorted_ids, order = np.zeros(1, np.int64), np.full(1, -1)  # everything must be void
  pos = np.minimum(np.searchsorted(sorted_ids, idmap), len(sorted_ids) - 1)
  found = sorted_ids[pos] == idmap
  void = idmap == 0
  if not np.all(found | void):
    extra = np.unique(idmap[~(found | void)])
    raise BadInputError("png_ids_not_in_json", path,
                        f"{len(extra)} segment ids in the PNG are absent from the JSON: "
                        f"{extra[:5].tolist()}")
  lut = np.append(order, -1).astype(np.int32)  # position n (void) -> -1
  return lut[np.where(found & ~void, pos, len(sorted_ids))]


class CocoPanopticSource:
  """Random access over one split; `categories` maps original ids to contiguous 0..K-1."""

  def __init__(self, root, split, *, bad_input="skip", require_segments=False):
    if not str(root):
      raise ValueError("data.root is empty: point it at a COCO panoptic root (or run "
                       "`python -m maskformer_jax.data.synthetic --out DIR` and use DIR)")
    self.root, self.split = epath.Path(root), split
    self.policy = BadInputPolicy(bad_input)
    self.require_segments = require_segments
    ann_path = self.root / "annotations" / f"panoptic_{split}.json"
    if not ann_path.exists():
      raise FileNotFoundError(f"{ann_path} not found (expected the COCO 2017 panoptic layout: "
                              f"{{root}}/{split}/, panoptic_{split}/, annotations/panoptic_{split}.json)")
    d = json.loads(ann_path.read_text())
    cats = sorted(d["categories"], key=lambda c: c["id"])
    self.categories = [{"id": int(c["id"]), "name": c["name"], "isthing": int(c.get("isthing", 0)),
                        "contiguous_id": i} for i, c in enumerate(cats)]
    self.is_thing = np.array([c["isthing"] for c in self.categories], bool)
    self._cat_ids = np.array([c["id"] for c in self.categories], np.int64)  # sorted
    images = {im["id"]: im for im in d["images"]}
    anns = {a["image_id"]: a for a in d["annotations"]}
    # Every listed image; one without an annotation row is a bad example (it has no panoptic PNG).
    self.image_ids = np.array([im["id"] for im in d["images"]], np.int64)
    self._index = {int(i): k for k, i in enumerate(self.image_ids)}
    self._image_files = [images[i]["file_name"] for i in self.image_ids.tolist()]
    self._png_files = [anns[i]["file_name"] if i in anns else "" for i in self.image_ids.tolist()]
    self._sizes = np.array([(images[i].get("height", 0), images[i].get("width", 0))
                            for i in self.image_ids.tolist()], np.int32).reshape(-1, 2)
    # Segment tables as flat arrays + offsets: cheap to pickle into every worker process.
    segs = [anns[i]["segments_info"] if i in anns else [] for i in self.image_ids.tolist()]
    self._offsets = np.cumsum([0] + [len(s) for s in segs])
    flat = [s for ss in segs for s in ss]
    self._seg_ids = np.array([s["id"] for s in flat], np.int64)
    self._seg_cats = np.array([s["category_id"] for s in flat], np.int64)
    self._seg_crowd = np.array([s.get("iscrowd", 0) for s in flat], bool)
    self._seg_area = np.array([s.get("area", 0) for s in flat], np.int64)

  def __len__(self):
    return len(self.image_ids)

  def __repr__(self):
    return f"CocoPanopticSource({self.root}, {self.split}, {len(self)} images)"

  @property
  def num_classes(self):
    return len(self.categories)

  def image_path(self, index):
    return self.root / self.split / self._image_files[index]

  def png_path(self, index):
    return self.root / f"panoptic_{self.split}" / self._png_files[index]

  def _table(self, index):
    """(segment ids, contiguous category, iscrowd, area) for one image; unknown categories raise."""
    s = slice(self._offsets[index], self._offsets[index + 1])
    ids, cats, crowd, area = self._seg_ids[s], self._seg_cats[s], self._seg_crowd[s], self._seg_area[s]
    contig = np.searchsorted(self._cat_ids, cats)
    known = (contig < len(self._cat_ids)) & (self._cat_ids[np.minimum(contig, len(self._cat_ids) - 1)]
                                            == cats)
    if not known.all():
      raise BadInputError("unknown_category", self.png_path(index),
                          f"category ids {np.unique(cats[~known]).tolist()} are not in the JSON "
                          "categories")
    return ids, contig.astype(np.int32), crowd, area

  def _decode(self, index):
    if not self._png_files[index]:
      raise BadInputError("missing_annotation", self.image_path(index),
                          "no entry in the annotations list")
    ids, labels, crowd, _ = self._table(index)
    image = decode_rgb(read_bytes(self.image_path(index)), self.image_path(index))
    png_path = self.png_path(index)
    idmap = rgb_to_id(decode_rgb(read_bytes(png_path), png_path))
    if idmap.shape != image.shape[:2]:
      raise BadInputError("size_mismatch", png_path,
                          f"PNG {idmap.shape} vs image {image.shape[:2]}")
    pos = index_segments(idmap, ids, png_path)
    # Crowd segments are not targets: their pixels are ignored (-1) like void.
    keep = ~crowd
    remap = np.append(np.where(keep, np.cumsum(keep) - 1, -1), -1).astype(np.int32)
    segments = remap[pos]  # pos == -1 picks the appended -1
    if self.require_segments and not (segments >= 0).any():
      raise BadInputError("no_segments", png_path, "no non-crowd segment in the image")
    return {"image": image, "segments": segments, "seg_labels": labels[keep],
            "image_id": int(self.image_ids[index])}

  def __getitem__(self, index):
    index = int(index)
    try:
      return self._decode(index)
    except BadInputError as e:
      return self.policy(e, self.image_ids[index])

  def ground_truth(self, image_id):
    """(panoptic id map int32 [h0, w0], segments_info with contiguous category ids) for evaluation."""
    index = self._index[int(image_id)]
    ids, labels, crowd, area = self._table(index)
    idmap = rgb_to_id(decode_rgb(read_bytes(self.png_path(index)), self.png_path(index)))
    info = [{"id": int(i), "category_id": int(c), "iscrowd": int(k), "isthing": bool(self.is_thing[c]),
             "area": int(a)} for i, c, k, a in zip(ids, labels, crowd, area)]
    return idmap, info
