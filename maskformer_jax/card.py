"""Model cards: what a checkpoint is, where it came from and how to check it is still that model.

A card is `card.json` (+ a rendered `CARD.md` and the probe images `probes.npz`) beside the checkpoint:
a training workdir (written at the run's final save) or a converted checkpoint (written by
`python -m maskformer_jax.convert`). It holds the full config, the code (git commit, dirty tree) and
package versions, what inference needs (categories, eval resize, thresholds), the facts of the run or
conversion, and two fingerprints: sha256 digests of the weights (whole and per top-level module, so a
mismatch names the part) and the outputs on a few fixed probe images (shape, digest, values compared
within a tolerance, since another device or XLA version moves the last bits).

  python -m maskformer_jax.card show DIR
  python -m maskformer_jax.card verify DIR [--source FILE_OR_DIR]   # exit 0: verified
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

CARD_FILE = "card.json"
CARD_MD = "CARD.md"
PROBES_FILE = "probes.npz"
KINDS = ("training", "conversion", "export")
OUTPUTS = ("pred_logits", "pred_masks")
PACKAGES = ("maskformer_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "ml_collections", "grain", "etils", "scipy", "torch", "transformers")
N_VALUES = 8


# ------------------------------------------------------------------------------------------------
# Probes and fingerprints

def probe_size(config) -> tuple[int, int]:
  """A small square canvas (64 rounded up to data.eval_size_divisibility): cheap at any model size."""
  div = int(config.data.get("eval_size_divisibility", 32) or 32)
  side = -(-64 // div) * div
  return side, side


def probe_inputs(config, n=2) -> np.ndarray:
  """n fixed uint8 [n, H, W, 3] images at the config's probe size (`probe_images`), the same on every
  machine; stored with the card so verification reuses the exact inputs."""
  return probe_images(probe_size(config), n)


def probe_images(size, n, seed=20240) -> np.ndarray:
  """n seeded uint8 [n, H, W, 3] images (noise over smooth gradients, so activations vary) at `size`."""
  h, w = int(size[0]), int(size[1])
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  base = np.stack([yy, xx, 1 - (yy + xx) / 2], -1)[None] * 200
  noise = rng.integers(0, 56, size=(n, h, w, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def probe_outputs(model, variables, images) -> dict:
  """{'pred_logits', 'pred_masks'} as the eval step computes them (normalise, apply, train=False), at
  'highest' matmul precision so a GPU/TPU's bf16/tf32 default does not move them past the tolerance."""
  from maskformer_jax.models import normalize_image

  @jax.jit
  def forward(v, x):
    out = model.apply(v, normalize_image(x), train=False)
    return {k: out[k] for k in OUTPUTS}

  with jax.default_matmul_precision("highest"):
    out = forward(variables, jnp.asarray(images))
  return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def fingerprint(outputs: dict) -> dict:
  """Per output: shape, sha256 of its float32 bytes, the first values and mean/std (the tolerance
  check; the digest only says whether the bits are identical)."""
  out = {}
  for k in OUTPUTS:
    if k not in outputs:
      continue
    a = np.ascontiguousarray(np.asarray(outputs[k], np.float32))
    out[k] = {"shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
              "first": [float(x) for x in a.ravel()[:N_VALUES]], "mean": float(a.mean()),
              "std": float(a.std())}
  return out


def _leaves(tree, prefix=""):
  """(path, leaf) pairs in sorted-key order, paths '/'-joined."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k in sorted(tree, key=str):
      yield from _leaves(tree[k], f"{prefix}/{k}" if prefix else str(k))
  elif tree is not None:
    yield prefix, tree


def weights_digest(params_tree) -> dict:
  """sha256 over every array (path, shape and float32 bytes, in path order) as 'all', and one per
  top-level module ('params/backbone', 'batch_stats/backbone', ...) so a mismatch names the part."""
  total, parts, count = hashlib.sha256(), {}, 0
  for path, leaf in _leaves(params_tree):
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
    record = f"{path}:{a.shape}:".encode() + a.tobytes()
    part = "/".join(path.split("/")[:2])
    parts.setdefault(part, hashlib.sha256()).update(record)
    total.update(record)
    count += a.size
  return {"all": total.hexdigest(), "values": int(count),
          "modules": {k: h.hexdigest() for k, h in sorted(parts.items())}}


def variables_of(state) -> dict:
  """The inference variables of a train state (or a converted checkpoint's variables)."""
  return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}


# ------------------------------------------------------------------------------------------------
# The card

def _git(here):
  """(commit, dirty) of the checkout holding `here`, or (None, None) when it is not one."""
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    return commit, bool(status)
  except (OSError, subprocess.SubprocessError):
    return None, None


def _versions():
  out = {}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def config_dict(config) -> dict:
  """The config as JSON-safe plain data (tuples become lists)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str))


def config_from_card(card) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(card["config"])


def data_facts(config, split=None, source=None) -> dict:
  """Dataset name, root, split, image count and the annotation JSON's sha256 (when the source has one);
  categories with contiguous ids. Missing data (a conversion, a moved root) gives what is known."""
  d = config.data
  split = split or d.get("val_split", "")
  facts = {"dataset": d.get("dataset"), "root": str(d.get("root", "")), "split": split}
  try:
    if source is None:
      from maskformer_jax.data import pipeline
      source = pipeline.make_source(config, split)
  except Exception as e:  # noqa: BLE001 - a card without data facts is still a card
    facts["unavailable"] = f"{type(e).__name__}: {e}"
    return facts
  facts["images"] = len(source)
  ann = getattr(source, "ann_path", None)
  if ann is not None:
    facts["annotations"] = {"path": str(ann), "sha256": sha256(ann)}
  from maskformer_jax import visualize
  facts["categories"] = [
      {**{k: c[k] for k in ("id", "name", "isthing", "contiguous_id") if k in c},
       "color": list(visualize.category_color(c))}
      for c in source.categories]
  return facts


def sha256(path) -> str:
  """The sha256 of a file, local or gs://."""
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def base_card(config, kind: str, *, source=None, split=None) -> dict:
  """The parts every card has: config, code and packages, platform, and what inference needs
  (categories from `source`, else the dataset's `split`, default data.val_split, when it can be read)."""
  if kind not in KINDS:
    raise ValueError(f"card kind {kind!r}: use one of {KINDS}")
  commit, dirty = _git(os.path.dirname(os.path.abspath(__file__)))
  data = data_facts(config, split, source=source)
  d, e = config.data, config.eval
  return {
      "kind": kind, "card_version": 1,
      "model": {"arch": config.model.get("arch", "maskformer"), "num_classes": int(config.model.num_classes),
                "backbone": config.model.backbone,
                "num_queries": int(config.model.num_queries)},
      "config": config_dict(config),
      "code": {"git_commit": commit, "git_dirty": dirty},
      "packages": _versions(),
      "python": sys.version.split()[0], "platform": platform.platform(),
      "data": {k: v for k, v in data.items() if k != "categories"},
      "inference": {
          "categories": data.get("categories"),
          "eval_resize": {k: d.get(k) for k in ("eval_buckets", "eval_min_size", "eval_max_size",
                                                "eval_size_divisibility", "eval_size")},
          "thresholds": {k: e.get(k) for k in ("object_mask_threshold", "overlap_threshold")},
      },
  }


def add_fingerprint(card: dict, config, model, variables, n=2) -> tuple[dict, np.ndarray]:
  """The card with weights digests and probe fingerprints; returns (card, probe images)."""
  images = probe_inputs(config, n)
  card["weights"] = weights_digest(variables)
  outputs = probe_outputs(model, variables, images)
  card["probes"] = {"file": PROBES_FILE, "shape": list(images.shape), "outputs": fingerprint(outputs)}
  bad = sorted(k for k, v in outputs.items() if not np.all(np.isfinite(np.asarray(v))))
  if bad:  # said in the card (and by verify), not hidden in a NaN digest
    card["probes"]["not_finite"] = bad
    logging.warning("The model's %s on the probe images are not finite (NaN/inf): the card records it.",
                    ", ".join(bad))
  return card, images


def write(directory, card: dict, probes: np.ndarray | None = None) -> None:
  """card.json and CARD.md (and probes.npz when given) into `directory` (local or gs://)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
  (directory / CARD_MD).write_text(render(card))
  if probes is not None:
    with (directory / PROBES_FILE).open("wb") as f:
      np.savez(f, images=probes)


def read(directory) -> dict:
  path = epath.Path(directory) / CARD_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {directory} has no model card (a training run writes "
                            "one at its final save, python -m maskformer_jax.convert with its output).")
  return json.loads(path.read_text())


def categories(directory) -> list[dict] | None:
  """The categories of the card in `directory`: what the model was trained with, so predict and export
  need neither the dataset nor --categories. None without a card, or when its categories lack the dataset
  ids and thing/stuff flags that post-processing needs (a conversion from HF's config knows names only)."""
  try:
    cats = (read(directory).get("inference") or {}).get("categories")
  except FileNotFoundError:
    return None
  if not cats or not all({"id", "isthing", "contiguous_id"} <= set(c) for c in cats):
    return None
  return [dict(c) for c in cats]


def render(card: dict) -> str:
  """CARD.md: the card for people."""
  c, m = card.get("config", {}), card.get("model", {})
  what = {"training": "trained with maskformer_jax", "conversion": "converted from other weights",
          "export": "exported for serving"}.get(card.get("kind"), card.get("kind"))
  name = {"mask2former": "Mask2Former"}.get(m.get("arch"), "MaskFormer")
  lines = [f"# {name} ({m.get('backbone')}, {m.get('num_classes')} classes, "
           f"{m.get('num_queries')} queries)", "", f"A checkpoint {what}.", ""]
  data = card.get("data", {})
  lines += ["## Data", ""] + [f"- {k}: {v}" for k, v in data.items()]
  cats = (card.get("inference") or {}).get("categories") or []
  if cats:
    lines.append(f"- categories: {len(cats)} ({', '.join(str(x.get('name')) for x in cats[:10])}"
                 f"{', ...' if len(cats) > 10 else ''})")
  if card.get("training"):
    lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in card["training"].items()]
  if card.get("metrics"):
    lines += ["", "## Metrics", ""]
    for name, row in card["metrics"].items():
      lines.append(f"- {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items()))
  inf = card.get("inference") or {}
  lines += ["", "## Inference settings", "", f"- eval resize: {inf.get('eval_resize')}",
            f"- thresholds: {inf.get('thresholds')}"]
  if card.get("provenance"):
    lines += ["", "## Provenance", ""] + [f"- {k}: {v}" for k, v in card["provenance"].items()]
  if card.get("export"):
    e = card["export"]
    lines += ["", "## Export", "", f"- {e.get('format')}: {e.get('file')} (sha256 {e.get('sha256')}) from "
              f"{e.get('checkpoint')} step {e.get('step')}",
              f"- inputs {e.get('inputs')}; outputs {e.get('outputs')}; postprocess {e.get('postprocess')}",
              f"- checked on {e.get('verified_on')} against the JAX model at batches {e.get('probe_batches')}: "
              f"max-abs {e.get('max_abs_diff')} (tolerance {e.get('tolerance')}), passed {e.get('passed')}"]
  lines += ["", "## Fingerprint", ""]
  w = card.get("weights") or {}
  lines.append(f"- weights sha256: {w.get('all')} ({w.get('values', 0):,} values)")
  for k, fp in ((card.get("probes") or {}).get("outputs") or {}).items():
    lines.append(f"- {k} on {card['probes'].get('shape')} probes: shape {fp['shape']}, sha256 "
                 f"{fp['sha256'][:16]}..., mean {fp['mean']:.6g}, std {fp['std']:.6g}")
  code = card.get("code", {})
  lines += ["", "## Code", "", f"- git commit: {code.get('git_commit')} (dirty: {code.get('git_dirty')})",
            f"- python {card.get('python')} on {card.get('platform')}",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in (card.get("packages") or {}).items()),
            f"- seed: {c.get('seed')}",
            "", "Check it: `python -m maskformer_jax.card verify DIR"
            f"{ {'conversion': ' [--source FILE]', 'export': ' [--source CHECKPOINT]'}.get(card.get('kind'), '')}`",
            ""]
  return "\n".join(lines)


def write_training_card(workdir, config, model, state, *, training: dict, metrics=None, source=None,
                        split=None, skipped_inputs=None) -> None:
  """The card of a training run's final state, into `workdir`. Collective (every process calls it:
  sharded weights are gathered to the host); process 0 runs the probes and writes. `skipped_inputs`:
  the training data's bad inputs skipped by every reading process (coco_panoptic.recorded_skips)."""
  from jax.experimental import multihost_utils
  variables = variables_of(state)
  if jax.process_count() > 1:
    variables = multihost_utils.process_allgather(variables, tiled=True)
  if jax.process_index() != 0:
    return
  variables = jax.device_get(variables)
  c = base_card(config, "training", source=source, split=split)
  if skipped_inputs is not None:
    c["data"]["skipped_inputs"] = skipped_inputs
  c["training"] = training
  c["metrics"] = metrics or {}
  c, probes = add_fingerprint(c, config, model, variables)
  write(workdir, c, probes)


# ------------------------------------------------------------------------------------------------
# Verification

def _close(a, b, tol) -> bool:
  return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def compare_outputs(stored: dict, outputs: dict, tol: float) -> list[str]:
  """Mismatches of recomputed probe outputs against the stored fingerprint: shape exactly; the first
  values, mean and std within `tol` (absolute, relative above magnitude 1)."""
  bad, now = [], fingerprint(outputs)
  for k, fp in stored.items():
    if k not in now:
      bad.append(f"probes.outputs.{k}: not produced by the model")
      continue
    if not np.all(np.isfinite(np.asarray(outputs[k], np.float32))):
      bad.append(f"probes.outputs.{k}: not finite (NaN/inf) on the probe images; the model is broken")
      continue
    if list(now[k]["shape"]) != list(fp["shape"]):
      bad.append(f"probes.outputs.{k}.shape: {now[k]['shape']} != stored {fp['shape']}")
      continue
    diff = max([abs(x - y) for x, y in zip(now[k]["first"], fp["first"])] or [0.0])
    if len(now[k]["first"]) != len(fp["first"]) or not all(
        _close(x, y, tol) for x, y in zip(now[k]["first"], fp["first"])):
      bad.append(f"probes.outputs.{k}.first: max |diff| {diff:.3g} > tol {tol:g}")
    for stat in ("mean", "std"):
      if not _close(now[k][stat], fp[stat], tol):
        bad.append(f"probes.outputs.{k}.{stat}: {now[k][stat]:.8g} != stored {fp[stat]:.8g} "
                   f"(tol {tol:g})")
  return bad


def _source_files(source) -> dict:
  source = os.path.abspath(os.fspath(source))
  files = ([os.path.join(source, n) for n in sorted(os.listdir(source))] if os.path.isdir(source)
           else [source])
  return {os.path.basename(f): sha256(f) for f in files if os.path.isfile(f)}


def verify_source(card: dict, source) -> list[str]:
  """The given source file(s) against the card's provenance.files (name -> sha256)."""
  if not os.path.exists(source):
    return [f"source: {source} does not exist"]
  recorded = ((card.get("provenance") or {}).get("files")) or {}
  if not recorded:
    return [f"source: the card records no source files (kind {card.get('kind')!r}) to check {source} against"]
  bad = []
  for name, digest in _source_files(source).items():
    if name not in recorded:
      bad.append(f"source: {name} is not among the card's source files {sorted(recorded)}")
    elif recorded[name] != digest:
      bad.append(f"source: {name} sha256 {digest[:16]}... != the card's provenance.files[{name!r}] "
                 f"{recorded[name][:16]}...")
  return bad


def load_variables(directory, config, card=None):
  """(model, variables) of the checkpoint in `directory` on one local device, as evaluate loads it."""
  from maskformer_jax import checkpoint, convert, sharding
  from maskformer_jax.models import build_model
  model = build_model(config.model)
  path = epath.Path(directory)
  if not (path / "checkpoints").exists() and (path / convert.VARIABLES_FILE).exists():
    _, variables = convert.load_converted(str(path))  # what load_state merges, without a train state
    return model, variables_of(variables)
  mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices()[:1])
  step = (card or {}).get("training", {}).get("step")
  state, _ = checkpoint.load_state(config, model, mesh, str(directory),
                                   which=str(step) if step is not None else "latest")
  return model, variables_of(state)


def _run_export(fmt, path, images) -> dict:
  """An exported file's outputs on `images`: StableHLO through jax.export, ONNX through onnxruntime,
  a SavedModel (`path` its saved_model.pb) through TensorFlow."""
  if fmt == "stablehlo":
    return jax.device_get(jax.export.deserialize(bytearray(path.read_bytes())).call(images))
  if fmt == "savedmodel":
    from maskformer_jax import export
    return export.savedmodel_runner(path.parent)(images)
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  got = session.run(None, {session.get_inputs()[0].name: np.asarray(images, np.float32)})
  return dict(zip([o.name for o in session.get_outputs()], got))


def verify_export(directory, card: dict, *, source=None, tol=1e-4) -> list[str]:
  """An export's card: the exported file's sha256 (the weights are baked into it), its outputs on the
  stored probes (StableHLO through jax.export, ONNX through onnxruntime, a SavedModel through
  TensorFlow), and with `source` (the
  checkpoint it came from) the source weights' digest."""
  record, bad = card.get("export") or {}, []
  path = epath.Path(directory) / str(record.get("file"))
  if not path.exists():
    return [f"export.file: {path} is missing"]
  if record.get("sha256") and sha256(path) != record["sha256"]:
    bad.append(f"export.sha256: {path.name} sha256 {sha256(path)[:16]}... != the card's "
               f"{record['sha256'][:16]}...")
  if record.get("format") in ("stablehlo", "onnx", "savedmodel"):
    with (epath.Path(directory) / PROBES_FILE).open("rb") as f:
      images = np.load(f)["images"]
    try:
      outputs = _run_export(record["format"], path, images)
    except Exception as e:  # noqa: BLE001 -- a damaged file is a finding, not a crash
      bad.append(f"export.file: {path.name} does not load or run here: {type(e).__name__}: {str(e)[:200]}")
    else:
      bad += compare_outputs((card.get("probes") or {}).get("outputs") or {}, outputs, tol)
  if source is not None:
    from maskformer_jax import export
    try:
      _, _, variables, _ = export.load(source)
    except export.ExportError as e:
      return bad + [f"source: {e}"]
    now = weights_digest(variables_of(variables))["all"]
    if now != (card.get("weights") or {}).get("all"):
      bad.append(f"source: the weights of {source} (sha256 {now[:16]}...) are not the ones exported "
                 f"({str((card.get('weights') or {}).get('all'))[:16]}...)")
  return bad


def verify(directory, *, source=None, tol=1e-4) -> list[str]:
  """Mismatches between the checkpoint (or export) in `directory` and its card (empty: verified)."""
  card = read(directory)
  if card.get("kind") == "export":
    return verify_export(directory, card, source=source, tol=tol)
  bad = []
  config = config_from_card(card)
  model, variables = load_variables(directory, config, card)
  stored_w, now_w = card.get("weights") or {}, weights_digest(variables)
  if stored_w.get("all") != now_w["all"]:
    parts = sorted(k for k in set(stored_w.get("modules", {})) | set(now_w["modules"])
                   if stored_w.get("modules", {}).get(k) != now_w["modules"].get(k))
    bad.append(f"weights: sha256 {now_w['all'][:16]}... != the card's {str(stored_w.get('all'))[:16]}... "
               f"(differing: {', '.join(parts) or 'order or count only'})")
  probes = card.get("probes") or {}
  probe_path = epath.Path(directory) / probes.get("file", PROBES_FILE)
  if probe_path.exists():
    with probe_path.open("rb") as f:
      images = np.load(f)["images"]
  else:
    images = probe_inputs(config, (probes.get("shape") or [2])[0])
    bad.append(f"probes: {probe_path} is missing; recomputed from the config")
  if list(images.shape) != list(probes.get("shape", images.shape)):
    bad.append(f"probes.shape: {probe_path} holds {list(images.shape)}, the card {probes.get('shape')}")
  bad += compare_outputs(probes.get("outputs") or {}, probe_outputs(model, variables, images), tol)
  if source is not None:
    bad += verify_source(card, source)
  return bad


# ------------------------------------------------------------------------------------------------
# Command line

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maskformer_jax.card", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  show = sub.add_parser("show", help="print CARD.md of a checkpoint directory")
  show.add_argument("directory")
  ver = sub.add_parser("verify", help="recompute the weights digests and probe outputs and compare")
  ver.add_argument("directory")
  ver.add_argument("--source", help="for a conversion: the source file or directory to check by sha256")
  ver.add_argument("--tol", type=float, default=1e-4, help="tolerance on the probe output values")
  args = parser.parse_args(argv)
  from maskformer_jax import paths
  directory = paths.absolute(args.directory)
  try:
    if args.command == "show":
      md = epath.Path(directory) / CARD_MD
      print(md.read_text() if md.exists() else render(read(directory)))
      return 0
    bad = verify(directory, source=paths.absolute(args.source) if args.source else None, tol=args.tol)
  except FileNotFoundError as e:
    print(e, file=sys.stderr)
    return 2
  if bad:
    print(f"NOT verified: {directory}", file=sys.stderr)
    for b in bad:
      print(f"  {b}", file=sys.stderr)
    return 1
  print(f"verified: {directory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
