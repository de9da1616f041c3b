"""Grain pipeline on the synthetic dataset: contract, determinism, checkpoint/restore, host shards."""
import json
import pathlib

import numpy as np
import pytest

from maskformer_jax.config import base_config
from maskformer_jax.data import pipeline, synthetic

NUM_TRAIN, NUM_VAL = 30, 11


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return pathlib.Path(synthetic.generate(tmp_path_factory.mktemp("synth"), num_train=NUM_TRAIN,
                                        num_val=NUM_VAL, image_size=(48, 64), seed=3))


def cfg(root, recipe="coco_detr"):
  c = base_config()
  c.data.root, c.data.recipe, c.model.num_classes = str(root), recipe, 5
  c.data.image_size, c.data.eval_size = (64, 64), (64, 96)
  c.data.eval_min_size, c.data.eval_max_size = 64, 96
  c.data.max_instances, c.data.num_workers = 8, 0
  c.batch_size, c.eval.batch_size = 4, 4
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("recipe", ["coco_detr", "lsj", "ade20k"])
def test_train_batches_follow_contract(root, recipe):
  c = cfg(root, recipe)
  (b,) = take(iter(pipeline.make_loader(c, "train2017", train=True, seed=0, shard_index=0,
                                        shard_count=1)), 1)
  want = {"image": (np.uint8, (4, 64, 64, 3)), "segments": (np.int32, (4, 64, 64)),
          "labels": (np.int32, (4, 8)), "valid": (np.bool_, (4, 8)),
          "image_size": (np.int32, (4, 2)), "orig_size": (np.int32, (4, 2)),
          "image_id": (np.int32, (4,))}
  assert {k: (v.dtype.type, v.shape) for k, v in b.items()} == want
  assert (b["orig_size"] == [48, 64]).all() and (b["image_id"] > 0).all()
  assert b["valid"].any(1).all() and (b["labels"][b["valid"]] < 5).all()
  assert (b["labels"][~b["valid"]] == 5).all()
  for i in range(4):  # padding mask: outside image_size nothing but -1 and zeros
    h, w = b["image_size"][i]
    assert (b["segments"][i, h:] == -1).all() and (b["segments"][i, :, w:] == -1).all()
    assert (b["image"][i, h:] == 0).all() and (b["image"][i, :, w:] == 0).all()


def test_targets_match_synthetic_json(root):
  """Eval at the original size: every slot is one JSON segment with its class; crowd ignored."""
  c = cfg(root)
  c.data.eval_size, c.data.eval_min_size, c.data.eval_max_size = (48, 64), 48, 64
  c.data.max_instances = 16  # no overflow here (up to 9 segments an image)
  src = pipeline.make_source(c, "val2017")
  contig = {cat["id"]: cat["contiguous_id"] for cat in src.categories}
  anns = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())["annotations"]
  anns = {a["image_id"]: a for a in anns}
  for b in pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0, shard_count=1,
                                source=src):
    for i, image_id in enumerate(b["image_id"].tolist()):
      if image_id < 0:
        continue
      idmap, _ = src.ground_truth(image_id)
      segs = [s for s in anns[image_id]["segments_info"] if not s["iscrowd"]]
      assert b["valid"][i].sum() == len(segs)
      for s in anns[image_id]["segments_info"]:
        m = idmap == s["id"]
        assert m.sum() == s["area"]
        slot = np.unique(b["segments"][i][m])
        assert len(slot) == 1
        if s["iscrowd"]:
          assert slot[0] == -1
        else:
          assert b["labels"][i, slot[0]] == contig[s["category_id"]]


def test_deterministic_under_seed(root):
  c = cfg(root, "lsj")
  run = lambda seed: take(iter(pipeline.make_loader(c, "train2017", train=True, seed=seed,
                                                    shard_index=0, shard_count=1)), 3)
  a, b, other = run(7), run(7), run(8)
  assert_same(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restore_mid_epoch_continues_identically(root, workers):
  c = cfg(root, "coco_detr")
  make = lambda: pipeline.make_loader(c, "train2017", train=True, seed=1, shard_index=0,
                                      shard_count=1, worker_count=workers)
  it = iter(make())
  take(it, 5)  # 7 batches an epoch: cross the epoch boundary after restoring
  state = it.get_state()
  want = take(it, 4)
  it2 = iter(make())
  it2.set_state(state)
  assert_same(take(it2, 4), want)
  if workers:  # workers batch their own records, but each example's augmentation is the same
    ref = iter(pipeline.make_loader(c, "train2017", train=True, seed=1, shard_index=0,
                                    shard_count=1, worker_count=0, num_epochs=2))
    by_id = {}
    for b in ref:
      for i, image_id in enumerate(b["image_id"].tolist()):
        by_id.setdefault(image_id, []).append(b["image"][i])
    for b in want:
      for i, image_id in enumerate(b["image_id"].tolist()):
        assert any(np.array_equal(b["image"][i], x) for x in by_id[image_id])


def test_train_shards_disjoint_and_cover(root):
  c = cfg(root)
  c.batch_size = 6  # 2 per host
  seen = []
  for shard in range(3):
    ids = [i for b in pipeline.make_loader(c, "train2017", train=True, seed=0, shard_index=shard,
                                           shard_count=3, num_epochs=1)
           for i in b["image_id"].tolist()]
    assert len(ids) == NUM_TRAIN // 3 // 2 * 2 and len(set(ids)) == len(ids)
    seen.append(set(ids))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert len(set.union(*seen)) == NUM_TRAIN  # 10 per host, batches of 2: nothing dropped


def test_eval_shards_cover_split_exactly_once(root):
  c = cfg(root)
  c.eval.batch_size = 4  # 2 per host: 11 images -> 12 slots, 1 padding example
  all_ids, shapes = [], set()
  for shard in range(2):
    for b in pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=shard,
                                  shard_count=2):
      shapes.add(b["image"].shape)
      pad = b["image_id"] < 0
      assert not b["valid"][pad].any() and (b["segments"][pad] == -1).all()
      all_ids += b["image_id"].tolist()
  assert shapes == {(2, 64, 96, 3)}
  real = [i for i in all_ids if i >= 0]
  assert sorted(real) == list(range(NUM_TRAIN + 1, NUM_TRAIN + NUM_VAL + 1)) and len(all_ids) == 12


def test_eval_max_examples_and_batch_divisibility(root):
  c = cfg(root)
  ids = [i for b in pipeline.make_loader(c, "val2017", train=False, seed=0, shard_index=0,
                                         shard_count=1, max_examples=5) for i in b["image_id"].tolist()]
  assert ids == list(range(NUM_TRAIN + 1, NUM_TRAIN + 6)) + [-1] * 3
  c.batch_size = 5
  with pytest.raises(ValueError, match="not divisible by 2 hosts"):
    pipeline.make_loader(c, "train2017", train=True, seed=0, shard_index=0, shard_count=2)


def test_synthetic_generate_is_cached_and_regenerates(tmp_path):
  out = synthetic.generate(tmp_path, num_train=3, num_val=2, image_size=(32, 40), seed=0)
  marker = tmp_path / synthetic.MARKER
  first = (tmp_path / "train2017" / "000000000001.jpg").read_bytes()
  mtime = marker.stat().st_mtime_ns
  assert synthetic.generate(tmp_path, num_train=3, num_val=2, image_size=(32, 40), seed=0) == out
  assert marker.stat().st_mtime_ns == mtime  # reused
  marker.unlink()  # a half-written dataset: regenerated, identically (seeded)
  synthetic.generate(tmp_path, num_train=3, num_val=2, image_size=(32, 40), seed=0)
  assert marker.exists() and (tmp_path / "train2017" / "000000000001.jpg").read_bytes() == first
  synthetic.generate(tmp_path, num_train=2, num_val=2, image_size=(32, 40), seed=0)  # new params
  assert len(list((tmp_path / "train2017").iterdir())) == 2


def test_synthetic_is_not_trivial(root):
  d = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
  assert {c["isthing"] for c in d["categories"]} == {0, 1}
  per_image = [s["segments_info"] for s in d["annotations"]]
  things = [[s["category_id"] for s in ss if s["category_id"] < 10] for ss in per_image]
  assert np.mean([len(t) for t in things]) >= 2.5
  assert any(len(t) != len(set(t)) for t in things)  # several instances of one class
  assert all(any(s["category_id"] >= 10 for s in ss) for ss in per_image)  # stuff everywhere
  assert max(s["id"] for ss in per_image for s in ss) > 65535  # ids past 16 bits
  # Occlusion: some thing's area is less than its full shape (its bbox is not filled as drawn).
  fill = [s["area"] / (s["bbox"][2] * s["bbox"][3]) for ss in per_image for s in ss
          if s["category_id"] == 2]
  assert min(fill) < 0.9


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_skipped_or_raised_through_workers(tmp_path, workers):
  """An empty JPEG and a truncated PNG: skipped in training (also in worker processes), and under
  'raise' the error that reaches the training loop names the file (it survives the trip back from a
  worker process)."""
  from maskformer_jax.data.coco_panoptic import BadInputError
  root = pathlib.Path(synthetic.generate(tmp_path, num_train=8, num_val=2, image_size=(32, 32), seed=0))
  (root / "train2017" / "000000000003.jpg").write_bytes(b"")
  png = root / "panoptic_train2017" / "000000000006.png"
  png.write_bytes(png.read_bytes()[:100])
  c = cfg(root)
  c.batch_size = 2
  load = lambda: [i for b in pipeline.make_loader(c, "train2017", train=True, seed=0, shard_index=0,
                                                  shard_count=1, num_epochs=1, worker_count=workers)
                  for i in b["image_id"].tolist()]
  ids = load()
  assert set(ids) <= {1, 2, 4, 5, 7, 8} and len(set(ids)) == len(ids)
  assert len(ids) == 6 if not workers else len(ids) >= 4  # workers batch their own share
  c.data.bad_input = "raise"
  with pytest.raises(BadInputError, match=r"000000000003\.jpg: empty_file|000000000006\.png: unread"):
    load()
