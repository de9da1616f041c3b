"""A small synthetic dataset in exactly the COCO 2017 layout: panoptic, and instances beside it.

Written so the demo and the tests go through the same COCO loader as real data, and small enough to
train a MaskFormer on a CPU in minutes while not being trivial: three thing classes (circle, square,
triangle; each with its own colour plus per-instance and per-pixel noise), two textured stuff classes
(sky band on top, ground below, a wavy horizon), several instances per image (often several of one
class), occlusions (later shapes cover earlier ones) and, rarely, a crowd segment. Segment ids are
random 24-bit values so that decoding R + 256*G + 256^2*B is exercised past 255.

annotations/instances_{split}.json holds the same images' things as COCO instance annotations: each
shape's whole outline as a polygon (so occluded instances overlap the ones in front, as COCO's masks
do), a crowd one as an uncompressed RLE of its visible pixels, area and bbox from pycocotools.

  python -m maskformer_jax.data.synthetic --out /tmp/synth --num-train 1000 --num-val 100 --size 128 128

`generate` is idempotent: a marker file with the parameters is written last, so a complete dataset with
the same parameters is reused and a half-written one is regenerated.
"""
import argparse
import io
import json
import os
import shutil

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

# Original (non-contiguous) ids on purpose: the loader must map them to contiguous 0..K-1.
CATEGORIES = (
    {"id": 1, "name": "circle", "isthing": 1, "color": (200, 40, 40)},
    {"id": 2, "name": "square", "isthing": 1, "color": (230, 200, 40)},
    {"id": 3, "name": "triangle", "isthing": 1, "color": (150, 50, 190)},
    {"id": 10, "name": "sky", "isthing": 0, "color": (135, 190, 235)},
    {"id": 20, "name": "ground", "isthing": 0, "color": (110, 85, 50)},
)
MARKER = "SYNTHETIC_COMPLETE.json"
_VERSION = 3  # bump when the drawing changes so cached datasets are regenerated


def _rgb_from_id(ids):
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _draw_shape(kind, h, w, cy, cx, r, angle):
  """Boolean mask of one shape; r is the half-size in pixels."""
  import cv2
  canvas = np.zeros((h, w), np.uint8)
  if kind == "circle":
    cv2.circle(canvas, (int(cx), int(cy)), int(r), 1, -1)
  elif kind == "square":
    cv2.rectangle(canvas, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), 1, -1)
  else:  # triangle, any orientation
    a = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    pts = np.stack([cx + 1.2 * r * np.cos(a), cy + 1.2 * r * np.sin(a)], -1).round().astype(np.int32)
    cv2.fillPoly(canvas, [pts], 1)
  return canvas.astype(bool)


def _outline(kind, cy, cx, r, angle):
  """The shape `_draw_shape` paints, as one COCO polygon [x0, y0, x1, y1, ...] (pixel-edge coordinates)."""
  if kind == "circle":
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    pts = np.stack([cx + 0.5 + (r + 0.5) * np.cos(t), cy + 0.5 + (r + 0.5) * np.sin(t)], -1)
  elif kind == "square":
    x0, y0, x1, y1 = int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1
    pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
  else:
    a = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    pts = np.stack([cx + 0.5 + 1.2 * r * np.cos(a), cy + 0.5 + 1.2 * r * np.sin(a)], -1)
  return [round(float(v), 2) for v in pts.reshape(-1)]


def render(rng, h, w):
  """One example: (image uint8 [h,w,3], id map int32 [h,w], segments_info list)."""
  return render_with_outlines(rng, h, w)[:3]


def render_with_outlines(rng, h, w):
  """`render`'s example and each thing's whole outline as a COCO polygon: (..., {segment id: polygon})."""
  cats = {c["name"]: c for c in CATEGORIES}
  ids = rng.permutation(1 << 12)[:16] * 4096 + rng.integers(1, 4096, 16)  # distinct, 24-bit
  idmap = np.zeros((h, w), np.int64)
  image = np.zeros((h, w, 3), np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  segs = []  # (id, category dict, iscrowd)

  # Stuff: a sky band above a wavy horizon, textured ground below (sometimes ground only).
  has_sky = rng.random() > 0.15
  horizon = h * rng.uniform(0.3, 0.6) if has_sky else -1.0
  wave = horizon + h * 0.06 * np.sin(xx / w * 2 * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.3))
  sky = (yy < wave) & has_sky
  sky_col = np.array(cats["sky"]["color"], np.float32) + rng.normal(0, 10, 3)
  image[sky] = (sky_col * (0.8 + 0.3 * yy[..., None] / h))[sky]  # vertical gradient
  ground_col = np.array(cats["ground"]["color"], np.float32) + rng.normal(0, 10, 3)
  stripes = 18 * np.sin(yy / rng.uniform(2, 5) + 0.3 * np.sin(xx / 7))[..., None]  # texture
  image[~sky] = (ground_col + stripes)[~sky]
  if has_sky:
    idmap[sky] = ids[0]
    segs.append((ids[0], cats["sky"], 0))
  idmap[~sky] = ids[1]
  segs.append((ids[1], cats["ground"], 0))

  # Things: 2-6 instances (<= 8 segments in all); with p=0.5 all share a class; painted in order
  # (occlusions).
  n = rng.integers(2, 7)
  kinds = rng.choice(["circle", "square", "triangle"], size=n)
  if rng.random() < 0.5:
    kinds[1:] = kinds[0]
  scale = min(h, w)
  outlines = {}
  for i, kind in enumerate(kinds):
    r = rng.uniform(0.06, 0.16) * scale
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    angle = rng.uniform(0, 2 * np.pi)
    m = _draw_shape(kind, h, w, cy, cx, r, angle)
    outlines[int(ids[2 + i])] = _outline(kind, cy, cx, r, angle)
    col = np.array(cats[kind]["color"], np.float32) + rng.normal(0, 15, 3)
    image[m] = col * (0.9 + 0.2 * rng.random())
    idmap[m] = ids[2 + i]
    segs.append((ids[2 + i], cats[kind], int(rng.random() < 0.03)))

  image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
  present, areas = np.unique(idmap, return_counts=True)
  area_of = dict(zip(present.tolist(), areas.tolist()))
  info = []
  for sid, cat, crowd in segs:
    area = area_of.get(int(sid), 0)
    if area < 6:  # fully occluded or a sliver: remove it from the map and the JSON alike
      if area:
        idmap[idmap == sid] = 0
      continue
    ys, xs = np.nonzero(idmap == sid)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    info.append({"id": int(sid), "category_id": cat["id"], "iscrowd": crowd, "area": int(area),
                 "bbox": bbox})
  return image, idmap.astype(np.int32), info, outlines


def instance_annotations(image_id, idmap, info, outlines, first_id):
  """COCO instance annotations of one synthetic image's things (ids from `first_id`): the outline of
  each thing still visible, a crowd thing as the uncompressed RLE of its visible pixels."""
  from pycocotools import mask as mask_util
  h, w = idmap.shape
  out = []
  for s in info:
    if s["id"] not in outlines:  # stuff
      continue
    if s["iscrowd"]:
      flat = (idmap == s["id"]).ravel(order="F")  # COCO runs are column-major, starting with 0s
      ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]) + 1, flat.size)
      counts = ([0] if flat[0] else []) + np.diff(np.concatenate([[0], ends])).tolist()
      seg = {"size": [h, w], "counts": counts}
      rle = mask_util.frPyObjects(seg, h, w)
    else:
      seg = [outlines[s["id"]]]
      rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    out.append({"id": first_id + len(out), "image_id": image_id, "category_id": s["category_id"],
                "iscrowd": s["iscrowd"], "segmentation": seg, "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)]})
  return out


def _params(num_train, num_val, image_size, seed):
  return {"version": _VERSION, "num_train": int(num_train), "num_val": int(num_val),
          "image_size": [int(s) for s in image_size], "seed": int(seed)}


def generate(out_dir, *, num_train=1000, num_val=100, image_size=(128, 128), seed=0):
  """Write (or reuse) the dataset under out_dir; returns out_dir.

  Several processes may ask for the same cached dataset at once (two demos, a sweep on one machine):
  a lock file beside out_dir lets one write it while the others wait and then reuse it."""
  import fcntl
  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
  with open(os.path.abspath(out_dir).rstrip(os.sep) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _generate(out_dir, num_train, num_val, image_size, seed)


def _generate(out_dir, num_train, num_val, image_size, seed):
  params = _params(num_train, num_val, image_size, seed)
  marker = os.path.join(out_dir, MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == params:
        return out_dir
  for sub in ("train2017", "val2017", "panoptic_train2017", "panoptic_val2017", "annotations"):
    shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
  if os.path.exists(marker):
    os.remove(marker)
  h, w = image_size
  categories = [{k: v for k, v in c.items() if k != "color"} | {"supercategory": c["name"]}
                for c in CATEGORIES]
  next_image_id = 1
  for split, n, split_seed in (("train2017", num_train, 0), ("val2017", num_val, 1)):
    rng = np.random.default_rng([seed, split_seed])
    os.makedirs(os.path.join(out_dir, split))
    os.makedirs(os.path.join(out_dir, f"panoptic_{split}"))
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations, instances = [], [], []
    for _ in range(n):
      image, idmap, info, outlines = render_with_outlines(rng, h, w)
      image_id = next_image_id
      next_image_id += 1
      stem = f"{image_id:012d}"
      Image.fromarray(image).save(os.path.join(out_dir, split, stem + ".jpg"), quality=90)
      buf = io.BytesIO()
      Image.fromarray(_rgb_from_id(idmap)).save(buf, format="PNG", compress_level=1)
      with open(os.path.join(out_dir, f"panoptic_{split}", stem + ".png"), "wb") as f:
        f.write(buf.getvalue())
      images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
      annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": info})
      instances += instance_annotations(image_id, idmap, info, outlines, len(instances) + 1)
    with open(os.path.join(out_dir, "annotations", f"panoptic_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    things = [{k: v for k, v in c.items() if k != "isthing"} for c in categories if c["isthing"]]
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": instances, "categories": things}, f)
  with open(marker, "w") as f:  # last: its presence means the dataset is complete
    json.dump(params, f)
  return out_dir


def resolve_data_root(config):
  """With config.data.root == "" and a COCO dataset (panoptic or instances): the synthetic dataset of
  config.data.synthetic, generated once (by process 0) under $MASKFORMER_DATA or
  ~/.cache/maskformer_jax and then reused. Returns the config, its data.root set."""
  d = config.data
  if d.root or d.dataset not in ("coco_panoptic", "coco_instance"):
    return config
  s = d.synthetic
  size = tuple(int(x) for x in (s.image_size or d.image_size))
  cache = os.environ.get("MASKFORMER_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "maskformer_jax")
  root = os.path.join(cache, f"synthetic_{s.num_train}_{s.num_val}_{size[0]}x{size[1]}_s{config.seed}")
  if jax.process_index() == 0:
    generate(root, num_train=int(s.num_train), num_val=int(s.num_val), image_size=size, seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic_data")
  with config.unlocked():
    d.root = root
  logging.info("config.data.root is empty: using the synthetic dataset at %s", root)
  return config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--num-train", type=int, default=1000)
  p.add_argument("--num-val", type=int, default=100)
  p.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  out = generate(a.out, num_train=a.num_train, num_val=a.num_val, image_size=tuple(a.size),
                 seed=a.seed)
  print(f"synthetic COCO dataset (panoptic and instances) at {out}")


if __name__ == "__main__":
  main()
