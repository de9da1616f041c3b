"""TFDS `coco/2017_panoptic` (prepared, ArrayRecord) as an alternative random-access source.

Opened with `tfds.data_source(..., download=False)`. That call builds the dataset's code builder, whose
definition imports TensorFlow; without TensorFlow installed (the default here, see docs/reference.md section 8) the
prepared directory `{data_dir}/coco/2017_panoptic/{version}` is opened read-only with
`tfds.builder_from_directory` instead, which needs neither TensorFlow nor the builder code. Images are
read undecoded (`SkipDecoding`) and decoded like the files of the COCO source, so bad input is handled
the same way. TFDS labels are already contiguous (the 133 panoptic categories in id order: 80 things,
then 53 stuff); the original ids are restored from the COCO panoptic category list below.
"""
import logging

import numpy as np

from maskformer_jax.data.coco_panoptic import (BadInputError, BadInputPolicy, as_bad_input,
                                               decode_rgb, header_size, index_segments, rgb_to_id)

NAME = "coco/2017_panoptic"
SPLITS = {"train2017": "train", "val2017": "validation"}
THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
STUFF_IDS = [92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145,
             147, 148, 149, 151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181,
             184, 185, 186, 187, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200]
assert len(THING_IDS) == 80 and len(STUFF_IDS) == 53
log = logging.getLogger("maskformer_jax.data")


def _skip_decoders():
  import tensorflow_datasets as tfds
  return {"image": tfds.decode.SkipDecoding(), "panoptic_image": tfds.decode.SkipDecoding()}


def open_data_source(split, data_dir):
  """(random-access records, label names) for one split of the prepared dataset; never downloads."""
  import tensorflow_datasets as tfds
  try:
    src = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                           decoders=_skip_decoders())
    return src, _label_names(getattr(src, "dataset_info", None))
  except ModuleNotFoundError as e:  # no TensorFlow: the builder code cannot be built
    if "tensorflow" not in str(e):
      raise
  except NotImplementedError as e:  # with TensorFlow: nothing prepared there in a random-access format
    if data_dir is not None and not _prepared_versions(data_dir):
      raise FileNotFoundError(_not_prepared(data_dir)) from None
    raise FileNotFoundError(f"{NAME} under {data_dir or 'the TFDS default data_dir'} is not prepared in a "
                            f"random-access format: {str(e).splitlines()[0]} Prepare it with "
                            "file_format='array_record'.") from None
  if data_dir is None:
    raise FileNotFoundError("without TensorFlow, set data.root to the TFDS data_dir holding a "
                            f"prepared {NAME}")
  versions = _prepared_versions(data_dir)
  if not versions:
    raise FileNotFoundError(_not_prepared(data_dir))
  builder = tfds.builder_from_directory(versions[-1])
  return builder.as_data_source(split=split, decoders=_skip_decoders()), _label_names(builder.info)


def _not_prepared(data_dir):
  return f"no prepared {NAME} under {data_dir} (expected {data_dir}/{NAME}/<version>/dataset_info.json)"


def _prepared_versions(data_dir):
  """The prepared versions' directories of NAME under `data_dir`, oldest first."""
  from etils import epath
  return sorted((p for p in (epath.Path(data_dir) / NAME).glob("*") if (p / "dataset_info.json").exists()),
                key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))


def _label_names(info):
  try:
    return list(info.features["panoptic_objects"]["label"].names)
  except (AttributeError, KeyError, TypeError):
    return None


def _image_id(rec):
  """A record's image id for a skip marker; -1 when the record itself is unreadable."""
  try:
    return int(np.asarray(rec["image/id"]))
  except Exception:
    return -1


def _bytes(x):
  return x if isinstance(x, bytes) else bytes(np.asarray(x).item())


class TfdsCocoPanopticSource:
  """Same record format and `categories` / `ground_truth` as CocoPanopticSource."""

  def __init__(self, split, *, data_dir=None, bad_input="skip", require_segments=False,
               data_source=None):
    self.split = SPLITS.get(split, split)
    self.data_dir = data_dir
    self.policy = BadInputPolicy(bad_input)
    self.require_segments = require_segments
    if data_source is None:
      data_source, names = open_data_source(self.split, data_dir)
    else:
      names = None
    self._src = data_source
    names = names if names and len(names) == 133 else [f"class_{i}" for i in range(133)]
    self.categories = [{"id": cid, "name": names[i], "isthing": int(i < 80), "contiguous_id": i}
                       for i, cid in enumerate(THING_IDS + STUFF_IDS)]
    self.is_thing = np.arange(133) < 80
    self._index = None
    self._sizes = None  # image_sizes(), on first use

  def __len__(self):
    return len(self._src)

  def __repr__(self):
    return f"TfdsCocoPanopticSource({NAME}, {self.split}, {len(self)} images)"

  @property
  def num_classes(self):
    return len(self.categories)

  @staticmethod
  def _objects(rec):
    o = rec["panoptic_objects"]
    return (np.asarray(o["id"], np.int64).reshape(-1), np.asarray(o["label"], np.int64).reshape(-1),
            np.asarray(o["is_crowd"], bool).reshape(-1), np.asarray(o["area"], np.int64).reshape(-1))

  def _name(self, rec, index=None):
    """The record's image file name, or its position, to name in an error."""
    try:
      return f"{NAME}/{self.split}/{_bytes(rec['image/filename']).decode()}"
    except Exception:  # an unreadable or malformed record names its position
      return f"{NAME}/{self.split}[{'?' if index is None else index}]"

  def files(self, index):
    """What one example is read from, to name in an error: its record's position."""
    return [self._name(None, index)]

  def convert(self, rec, index=None):
    """One TFDS record -> the decoded-example format of the sources (raises BadInputError)."""
    name = self._name(rec, index)
    image = decode_rgb(_bytes(rec["image"]), name)
    idmap = rgb_to_id(decode_rgb(_bytes(rec["panoptic_image"]), name + ":panoptic_image"))
    if idmap.shape != image.shape[:2]:
      raise BadInputError("size_mismatch", name, f"PNG {idmap.shape} vs image {image.shape[:2]}")
    ids, labels, crowd, _ = self._objects(rec)
    if ((labels < 0) | (labels >= 133)).any():
      raise BadInputError("unknown_category", name, f"labels {labels.tolist()} outside 0..132")
    pos = index_segments(idmap, ids, name)
    keep = ~crowd
    remap = np.append(np.where(keep, np.cumsum(keep) - 1, -1), -1).astype(np.int32)
    segments = remap[pos]
    if self.require_segments and not (segments >= 0).any():
      raise BadInputError("no_segments", name, "no non-crowd segment in the image")
    return {"image": image, "segments": segments, "seg_labels": labels[keep].astype(np.int32),
            "image_id": int(np.asarray(rec["image/id"]))}

  def _decode(self, index):
    return self.convert(self._src[int(index)], int(index))

  def __getitem__(self, index):
    index, rec = int(index), None
    try:
      rec = self._src[index]  # a corrupt record fails here
      return self.convert(rec, index)
    except Exception as e:  # not BaseException: an interrupt stops the run
      return self.policy(as_bad_input(e, [self._name(rec, index)]), _image_id(rec))

  def image_sizes(self):
    """(h, w) of every record's image, int32 [N, 2], from the encoded image's header ((0, 0) if
    unreadable): one pass over the records, once, so that evaluation can bucket images by size."""
    if self._sizes is None:
      import time
      t, sizes = time.time(), []
      for i in range(len(self)):
        try:
          sizes.append(header_size(_bytes(self._src[i]["image"])))
        except Exception:  # an unreadable record: skipped as bad input when decoded
          sizes.append((0, 0))
      self._sizes = np.array(sizes, np.int32).reshape(-1, 2)
      log.info("read the sizes of %d images of %r from their headers in %.1f s", len(self), self,
               time.time() - t)
    return self._sizes

  def ground_truth(self, image_id):
    if self._index is None:  # one pass over the split, on first use
      self._index = {}
      for i in range(len(self)):
        try:
          self._index[int(np.asarray(self._src[i]["image/id"]))] = i
        except Exception:  # an unreadable record: skipped as an example, so never evaluated
          pass
    index, name = self._index[int(image_id)], f"{NAME}/{self.split}:{image_id}:panoptic_image"
    try:
      rec = self._src[index]
      idmap = rgb_to_id(decode_rgb(_bytes(rec["panoptic_image"]), name))
      ids, labels, crowd, area = self._objects(rec)
    except Exception as e:
      raise as_bad_input(e, [name])
    info = [{"id": int(i), "category_id": int(c), "iscrowd": int(k), "isthing": bool(c < 80),
             "area": int(a)} for i, c, k, a in zip(ids, labels, crowd, area)]
    return idmap, info


def from_config(d, split, *, bad_input, require_segments=False):
  """The source of `split` from config.data (data/pipeline.py's DATASETS entry)."""
  return TfdsCocoPanopticSource(split, data_dir=d.root or None, bad_input=bad_input,
                                require_segments=require_segments)
