"""COCO panoptic (2017 layout) as a random-access source for Grain, and the bad-input policy.

Layout under one root (local or `gs://`, read through `etils.epath`):
  {split}/*.jpg · panoptic_{split}/*.png · annotations/panoptic_{split}.json, split like "train2017".

`source[i]` decodes one example into the compact form every transform works on:
  image uint8 [h, w, 3] RGB (grayscale, CMYK, RGBA converted) · segments int32 [h, w], per pixel the index
  of its segment in `seg_labels`, -1 for void and crowd · seg_labels int32 [n] contiguous class ids ·
  image_id int. Segment ids are decoded as R + 256 G + 256^2 B in int32 (never a uint8 wrap) and matched
  to the JSON with one `searchsorted` over the pixels, no per-pixel Python.
A bad example (missing, empty or unreadable file, PNG ids absent from the JSON, unknown category, no
segment, a malformed annotation row, or any other exception while reading it: decoders and storage
raise their own, version-dependent types) raises `BadInputError` naming the file and the problem when
the policy is "raise"; with "skip" it is counted, logged and returned as `{"image_id": ..., "skip":
kind}` for the pipeline to drop. Only an annotation JSON that cannot be used at all (not JSON, no
images / annotations / categories lists, a malformed category) fails the whole dataset.
"""
import collections
import io
import json
import logging
import math
import os
import socket
import threading
import uuid

import cv2
import numpy as np
from etils import epath
from PIL import Image

log = logging.getLogger("maskformer_jax.data")


class BadInputError(ValueError):
  """An example that cannot be used; the message names the file and the problem."""

  def __init__(self, kind, path, message):
    super().__init__(f"{path}: {kind}: {message}")
    self.kind, self.path, self.message = kind, str(path), message

  def __reduce__(self):  # raised in a loader worker process, unpickled in the main one
    return type(self), (self.kind, self.path, self.message)


def as_bad_input(err, paths):
  """Any exception raised while reading one example -> a BadInputError naming the example's files.

  Decoders and storage raise their own types (cv2.error, zlib.error, remote-storage errors), and which
  one changes between versions; the policy must see each as this example's problem, not the run's.
  """
  if isinstance(err, BadInputError):
    return err
  paths = [str(p) for p in paths]
  also = f" (reading {' and '.join(paths)})" if len(paths) > 1 else ""
  bad = BadInputError("decode_error", paths[0], f"{describe(err)}{also}")
  bad.__cause__ = err
  return bad


def describe(err):
  """'type: message' on one line, the type with its module unless builtin (cv2.error, not error)."""
  t = type(err)
  name = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"
  return f"{name}: {' '.join(str(err).split())}"


BAD_INPUT_POLICIES = ("skip", "raise")  # config.data.bad_input


class BadInputPolicy:
  """'raise' or 'skip' (count and log each skip; `counts` is per process).

  Grain's worker processes read with their own unpickled copy, whose counts the main process never
  sees; `record_to(DIR)` makes every copy also keep its counts in a file of DIR (one per process and
  run, rewritten at each skip), which `recorded_skips(DIR)` adds up for the model card. A copy starts
  from zero: each process counts what it read itself."""

  MAX_IDS = 1000  # image ids kept per process file

  def __init__(self, mode):
    if mode not in BAD_INPUT_POLICIES:
      raise ValueError(f"data.bad_input={mode!r} is not one of {BAD_INPUT_POLICIES}.")
    self.mode = mode
    self.counts = collections.Counter()
    self.image_ids = set()
    self.directory = self.run = None
    self.lock = threading.Lock()  # grain's reading threads call the policy concurrently

  def record_to(self, directory):
    self.directory, self.run = str(directory), uuid.uuid4().hex[:12]

  def __getstate__(self):
    return {**self.__dict__, "counts": collections.Counter(), "image_ids": set(), "lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, lock=threading.Lock())

  def __call__(self, err, image_id):
    if self.mode == "raise":
      raise err
    with self.lock:
      self.counts[err.kind] += 1
      self.image_ids.add(int(image_id))
      counts = dict(self.counts)
      if self.directory:
        self._write(counts)
    log.warning("skipping bad input %s (skips so far in this process: %s)", err, counts)
    return {"image_id": int(image_id), "skip": err.kind}

  def _write(self, counts):
    try:
      d = epath.Path(self.directory)
      d.mkdir(parents=True, exist_ok=True)
      record = {"counts": counts, "image_ids": sorted(self.image_ids)[:self.MAX_IDS]}
      (d / f"{socket.gethostname()}-{os.getpid()}-{self.run}.json").write_text(json.dumps(record))
    except OSError as e:  # the skip itself is logged; a lost count must not stop training
      log.error("could not record the skip counts in %s: %s", self.directory, e)


def recorded_skips(directory) -> dict:
  """The skips every process recorded in `directory` (BadInputPolicy.record_to): {"total", "by_kind",
  "images" (distinct image ids), "image_ids" (the first 20)}; zeros when none was recorded. Reading
  ahead counts too: a skipped record the loader read but training did not reach is included."""
  d = epath.Path(directory)
  counts, ids = collections.Counter(), set()
  for f in sorted(d.glob("*.json")) if d.exists() else []:
    record = json.loads(f.read_text())
    counts.update(record["counts"])
    ids.update(record["image_ids"])
  return {"total": sum(counts.values()), "by_kind": dict(sorted(counts.items())), "images": len(ids),
          "image_ids": sorted(ids)[:20]}


def _decode_pil(data, path, opencv_error=""):
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # a truncated file fails here (PIL raises unless LOAD_TRUNCATED_IMAGES)
      if img.mode != "RGB":  # L, P, CMYK, RGBA, I;16 ...
        img = img.convert("RGB")
      return np.asarray(img)
  except Exception as e:  # whatever PIL's version raises for this file, it is this file's problem
    raise BadInputError("unreadable_image", path, f"{describe(e)}{opencv_error}") from None


_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}


def check_not_empty(data, path):
  """A zero-byte file is bad input before any decoder sees it (OpenCV 5 asserts on an empty buffer)."""
  if not len(data):
    raise BadInputError("empty_file", path, "the file is empty (0 bytes)")


def decode_rgb(data, path):
  """Encoded image bytes -> uint8 [h, w, 3] RGB; raises BadInputError if empty, unreadable or truncated.

  OpenCV decodes (5x faster than PIL here; grayscale, CMYK, palette and RGBA converted); PIL, strict
  about truncation, takes what OpenCV rejects, raises on (cv2.error in OpenCV 5, None before) or would
  decode leniently (a JPEG without its end marker, 16-bit images), so the verdict on a bad file is PIL's.
  """
  check_not_empty(data, path)
  jpeg_cut = data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] != b"\xff\xd9"
  opencv_error = ""
  if not jpeg_cut:
    try:
      arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
      if (arr is not None and arr.dtype == np.uint8
          and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in _TO_RGB))):
        return cv2.cvtColor(arr, _TO_RGB[1 if arr.ndim == 2 else arr.shape[2]])
    except Exception as e:  # cv2.error, or whatever another version raises
      opencv_error = f" (OpenCV: {describe(e)})"
  return _decode_pil(data, path, opencv_error)


def read_bytes(path):
  try:
    return epath.Path(path).read_bytes()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
    raise BadInputError("missing_file", path, describe(e)) from None
  except Exception as e:  # an I/O error of the storage (local or remote)
    raise BadInputError("unreadable_file", path, describe(e)) from None


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


def header_size(path_or_bytes):
  """(h, w) of an image from its header alone (PIL reads a few KB and decodes nothing); (0, 0) when it
  cannot be read (the example will be reported as bad input when decoded)."""
  try:
    f = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes)
         else epath.Path(path_or_bytes).open("rb"))
    with f, Image.open(f) as img:
      return img.size[1], img.size[0]
  except Exception:  # whatever PIL or the storage raises: unknown size
    return 0, 0


def header_sizes(paths, what):
  """header_size of every file, on a few threads (remote reads wait on I/O); logged with the time taken,
  so the cost of sizing a split for evaluation buckets is visible."""
  import concurrent.futures
  import time
  t = time.time()
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    sizes = np.array(list(pool.map(header_size, paths)), np.int32).reshape(-1, 2)
  log.info("read the sizes of %d images of %s from their headers in %.1f s", len(sizes), what,
           time.time() - t)
  return sizes


class _Malformed(Exception):
  """One annotation row that cannot be used; the message says which field is wrong."""


def _int(row, key, what, default=None, rounded=False):
  """row[key] as an int; an integral float is accepted (some exporters write 12.0), any finite float
  with `rounded` (areas)."""
  if not isinstance(row, dict):
    raise _Malformed(f"{what} is a {type(row).__name__}, not an object")
  if key not in row:
    if default is None:
      raise _Malformed(f"{what} lacks '{key}'")
    return default
  v = row[key]
  if isinstance(v, float) and math.isfinite(v) and (rounded or v.is_integer()):
    v = int(round(v))
  if not isinstance(v, int) or not -2**62 < v < 2**62:
    raise _Malformed(f"{what} has '{key}': {v!r}, not an integer")
  return int(v)


def _name(row, key, what):
  """row[key] as a non-empty string (a file name)."""
  if not isinstance(row, dict):
    raise _Malformed(f"{what} is a {type(row).__name__}, not an object")
  v = row.get(key)
  if not isinstance(v, str) or not v:
    raise _Malformed(f"{what} lacks '{key}'" if key not in row else f"{what} has '{key}': {v!r}")
  return v


def _segments(row, what):
  """(id, category_id, iscrowd, area) of each entry of an annotation row's segments_info."""
  info = row.get("segments_info")
  if not isinstance(info, list):
    raise _Malformed(f"{what} lacks 'segments_info'" if "segments_info" not in row
                     else f"{what} has 'segments_info' of type {type(info).__name__}, not a list")
  out = []
  for j, s in enumerate(info):
    w = f"{what}.segments_info[{j}]"
    out.append((_int(s, "id", w), _int(s, "category_id", w), _int(s, "iscrowd", w, default=0),
                _int(s, "area", w, default=0, rounded=True)))
  return out


def load_annotations(path, kind="COCO panoptic"):
  """The annotation JSON; one that is unusable as a whole is a ValueError naming the file."""
  try:
    d = json.loads(path.read_text())
  except ValueError as e:  # not JSON, not UTF-8
    raise ValueError(f"{path}: not a readable annotation JSON ({describe(e)})") from None
  bad = [k for k in ("images", "annotations", "categories")
         if not isinstance(d, dict) or not isinstance(d.get(k), list)]
  if bad:
    raise ValueError(f"{path}: the annotation JSON has no list {', '.join(map(repr, bad))} ({kind} "
                     "format: an object with lists 'images', 'annotations', 'categories')")
  return d


def parse_categories(cats, path):
  """Categories sorted by id with contiguous ids; a malformed entry fails the dataset (it sets K)."""
  out = []
  for k, c in enumerate(cats):
    try:
      cid = _int(c, "id", f"categories[{k}]")
      out.append({"id": cid, "name": str(c.get("name", cid)),
                  "isthing": _int(c, "isthing", f"categories[{k}]", default=0)})
    except _Malformed as e:
      raise ValueError(f"{path}: {e}") from None
  out.sort(key=lambda c: c["id"])
  return [dict(c, contiguous_id=i) for i, c in enumerate(out)]


def parse_rows(d):
  """Defensive parse of the images and annotations lists.

  Returns (images [(id, file_name, (h, w))], per-image (png file, segments), per-image problems
  {position: message}, problems of rows that belong to no image [message]). One bad row only makes
  its own image a bad example; it never stops the dataset from loading.
  """
  images, orphans = [], []
  problems = {}
  for k, im in enumerate(d["images"]):
    try:
      image_id = _int(im, "id", f"images[{k}]")
    except _Malformed as e:
      orphans.append(f"{e}: the entry is left out")
      continue
    try:
      file_name = _name(im, "file_name", f"images[{k}]")
    except _Malformed as e:
      file_name, problems[len(images)] = "", f"image id {image_id}: {e}"
    try:
      size = (_int(im, "height", "", default=0, rounded=True),
              _int(im, "width", "", default=0, rounded=True))
    except _Malformed:
      size = (0, 0)  # unknown: only data.check compares it with the file
    images.append((image_id, file_name, size))
  anns = {}
  for k, a in enumerate(d["annotations"]):
    try:
      anns[_int(a, "image_id", f"annotations[{k}]")] = (k, a)
    except _Malformed as e:
      orphans.append(f"{e}: it belongs to no image")
  rows = []
  for pos, (image_id, _, _) in enumerate(images):
    png, segs = "", []
    if image_id in anns:
      k, a = anns[image_id]
      try:
        png = _name(a, "file_name", f"annotations[{k}]")
        segs = _segments(a, f"annotations[{k}]")
      except _Malformed as e:  # reported as bad_annotation, before any missing_annotation
        problems.setdefault(pos, f"image id {image_id}: {e}")
    rows.append((png, segs))
  return images, rows, problems, orphans


class CocoPanopticSource:
  """Random access over one split; `categories` maps original ids to contiguous 0..K-1.

  `annotation_problems` lists (kind, path, message) for annotation rows that belong to no image (an
  images entry or annotation row without a usable id), which no example can report; data.check does.
  """

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
    self.ann_path = ann_path
    d = load_annotations(ann_path)
    self.categories = parse_categories(d["categories"], ann_path)
    self.is_thing = np.array([c["isthing"] for c in self.categories], bool)
    self._cat_ids = np.array([c["id"] for c in self.categories], np.int64)  # sorted
    images, rows, self._problems, orphans = parse_rows(d)
    self.annotation_problems = [("bad_annotation", str(ann_path), m) for m in orphans]
    for m in orphans:
      log.warning("%s: bad_annotation: %s", ann_path, m)
    # Every listed image; one without an annotation row is a bad example (it has no panoptic PNG).
    self.image_ids = np.array([i for i, _, _ in images], np.int64)
    self._index = {int(i): k for k, i in enumerate(self.image_ids)}
    self._image_files = [f for _, f, _ in images]
    self._png_files = [png for png, _ in rows]
    self._sizes = np.array([s for _, _, s in images], np.int32).reshape(-1, 2)
    self._header_sizes = None  # image_sizes(), on first use
    # Segment tables as flat arrays + offsets: cheap to pickle into every worker process.
    self._offsets = np.cumsum([0] + [len(segs) for _, segs in rows])
    flat = np.array([t for _, segs in rows for t in segs], np.int64).reshape(-1, 4)
    self._seg_ids, self._seg_cats = flat[:, 0], flat[:, 1]
    self._seg_crowd, self._seg_area = flat[:, 2].astype(bool), flat[:, 3]

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

  def files(self, index):
    """The files one example is read from, to name in an error."""
    return [self.image_path(index)] + ([self.png_path(index)] if self._png_files[index] else [])

  def image_sizes(self):
    """(h, w) of every original image, int32 [N, 2]: the JSON's height / width, a header read where the
    JSON has none, (0, 0) where unknown. Evaluation buckets images by size before decoding them."""
    if self._header_sizes is None:
      sizes = self._sizes.copy()
      missing = np.flatnonzero((sizes <= 0).any(1))
      if len(missing):
        sizes[missing] = header_sizes([self.image_path(i) for i in missing], repr(self))
      self._header_sizes = sizes
    return self._header_sizes

  def check_row(self, index):
    """Raises BadInputError if the image's annotation rows are malformed or missing."""
    if index in self._problems:
      raise BadInputError("bad_annotation", self.ann_path, self._problems[index])
    if not self._png_files[index]:
      raise BadInputError("missing_annotation", self.image_path(index),
                          "no entry in the annotations list")

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
    self.check_row(index)
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
    image_id = self.image_ids[index]
    try:
      return self._decode(index)
    except Exception as e:  # not BaseException: an interrupt stops the run
      return self.policy(as_bad_input(e, self.files(index)), image_id)

  def ground_truth(self, image_id):
    """(panoptic id map int32 [h0, w0], segments_info with contiguous category ids) for evaluation."""
    index = self._index[int(image_id)]
    try:
      self.check_row(index)
      ids, labels, crowd, area = self._table(index)
      idmap = rgb_to_id(decode_rgb(read_bytes(self.png_path(index)), self.png_path(index)))
    except Exception as e:
      raise as_bad_input(e, [self.png_path(index)])
    info = [{"id": int(i), "category_id": int(c), "iscrowd": int(k), "isthing": bool(self.is_thing[c]),
             "area": int(a)} for i, c, k, a in zip(ids, labels, crowd, area)]
    return idmap, info


def from_config(d, split, *, bad_input, require_segments=False):
  """The source of `split` from config.data (data/pipeline.py's DATASETS entry)."""
  return CocoPanopticSource(d.root, split, bad_input=bad_input, require_segments=require_segments)
