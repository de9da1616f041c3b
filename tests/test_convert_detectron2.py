"""The original's model-zoo files (detectron2 .pkl): state dicts in the original's naming are built from
randomly initialised HF models through the original-to-HF key mapping of HF's conversion scripts, written
here as data (inverted: HF -> original), independently of maskformer_jax/convert/detectron2.py. Converting
them must reproduce HF's outputs, for ResNet and Swin backbones, both pixel decoders, and both the old
and the new key layout."""
import hashlib
import json
import pathlib
import pickle
import re
import subprocess
import sys

import flax
import numpy as np
import pytest
from test_convert import (TOL, hf_forward, host_variables, images, make_hf, make_hf_swin, maxdiff,
                          plus6enc_reference, run, torch_outputs)

from maskformer_jax.config import load_config
from maskformer_jax.convert import (check_detectron2_roundtrip, from_detectron2, load_converted,
                                    model_config_from_hf, to_detectron2)
from maskformer_jax.convert.hf import HF_IGNORED, abstract_variables, convert_state_dict, hf_key, pack_qkv
from maskformer_jax.models import MODEL_KEYS, build_model

E, D, T = "model.pixel_level_module.encoder.", "model.pixel_level_module.decoder.", "model.transformer_module."
Q = "sem_seg_head.predictor."

# torch.nn.Transformer{Encoder,Decoder}Layer names (the original) for HF's DETR layer names; "#q" marks a
# third of the packed in_proj. The encoder's FFN norm is its norm2, the decoder's its norm3.
LAYER = [(r"(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)", r"\1.in_proj_\3#\2"),
         (r"(self_attn|encoder_attn)\.o_proj\.", r"\1.out_proj."),
         (r"^encoder_attn\.", "multihead_attn."),
         (r"self_attn_layer_norm\.", "norm1."), (r"encoder_attn_layer_norm\.", "norm2."),
         (r"mlp\.fc1\.", "linear1."), (r"mlp\.fc2\.", "linear2.")]
SWIN_BLOCK = [(r"layernorm_before\.", "norm1."), (r"layernorm_after\.", "norm2."),
              (r"attention\.self\.(query|key|value)\.(\w+)", lambda m: f"attn.qkv.{m[2]}#{m[1][0]}"),
              (r"attention\.self\.", "attn."), (r"attention\.output\.dense\.", "attn.proj."),
              (r"intermediate\.dense\.", "mlp.fc1."), (r"output\.dense\.", "mlp.fc2.")]


def _subs(rules, s):
  for pattern, repl in rules:
    s = re.sub(pattern, repl, s)
  return s


def original_rules(pixel_decoder_prefix):
  """(HF key regex, original key) pairs; the replacement may be a function of the match. None drops
  the key (HF's Swin has a final LayerNorm the original's MaskFormer Swin lacks)."""
  P = pixel_decoder_prefix
  return [
      (E + r"embedder\.embedder\.convolution\.weight", "backbone.stem.conv1.weight"),
      (E + r"embedder\.embedder\.normalization\.(\w+)", r"backbone.stem.conv1.norm.\1"),
      (E + r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight",
       lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight"),
      (E + r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(\w+)",
       lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}"),
      (E + r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.weight",
       lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.weight"),
      (E + r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
       lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}"),
      (E + r"model\.embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.patch_embed.proj.\1"),
      (E + r"model\.embeddings\.norm\.(\w+)", r"backbone.patch_embed.norm.\1"),
      (E + r"model\.encoder\.layers\.(\d)\.blocks\.(\d+)\.(.*)",
       lambda m: f"backbone.layers.{m[1]}.blocks.{m[2]}." + _subs(SWIN_BLOCK, m[3])),
      (E + r"model\.encoder\.layers\.(\d)\.downsample\.(.*)", r"backbone.layers.\1.downsample.\2"),
      (E + r"hidden_states_norms\.(\d)\.(\w+)", r"backbone.norm\1.\2"),
      (E + r"model\.layernorm\..*", None),
      (D + r"fpn\.stem\.0\.weight", P + "layer_4.weight"),
      (D + r"fpn\.stem\.1\.(\w+)", P + r"layer_4.norm.\1"),
      (D + r"fpn\.layers\.(\d)\.proj\.0\.weight", lambda m: f"{P}adapter_{3 - int(m[1])}.weight"),
      (D + r"fpn\.layers\.(\d)\.proj\.1\.(\w+)", lambda m: f"{P}adapter_{3 - int(m[1])}.norm.{m[2]}"),
      (D + r"fpn\.layers\.(\d)\.block\.0\.weight", lambda m: f"{P}layer_{3 - int(m[1])}.weight"),
      (D + r"fpn\.layers\.(\d)\.block\.1\.(\w+)", lambda m: f"{P}layer_{3 - int(m[1])}.norm.{m[2]}"),
      (D + r"mask_projection\.(\w+)", P + r"mask_features.\1"),
      (D + r"input_projection\.(\w+)", P + r"input_proj.\1"),
      (D + r"encoder_layers\.(\d+)\.(.*)", lambda m: f"{P}transformer.encoder.layers.{m[1]}."
       + _subs(LAYER + [(r"final_layer_norm\.", "norm2.")], m[2])),
      (T + r"queries_embedder\.weight", Q + "query_embed.weight"),
      (T + r"input_projection\.(\w+)", Q + r"input_proj.\1"),
      (T + r"decoder\.layernorm\.(\w+)", Q + r"transformer.decoder.norm.\1"),
      (T + r"decoder\.layers\.(\d+)\.(.*)", lambda m: f"{Q}transformer.decoder.layers.{m[1]}."
       + _subs(LAYER + [(r"final_layer_norm\.", "norm3.")], m[2])),
      (r"class_predictor\.(\w+)", Q + r"class_embed.\1"),
      (r"mask_embedder\.(\d)\.0\.(\w+)", Q + r"mask_embed.layers.\1.\2"),
      (r"criterion\.empty_weight", "criterion.empty_weight"),
  ]


def to_original(hf_state_dict, layout="old"):
  """An HF MaskFormer state dict in the original's naming: the released files' old layout (pixel decoder
  directly under sem_seg_head.) or the current one; q, k, v packed into in_proj / qkv."""
  rules = original_rules("sem_seg_head." if layout == "old" else "sem_seg_head.pixel_decoder.")
  out, parts = {}, {}
  for key, value in hf_state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    for pattern, repl in rules:
      m = re.fullmatch(pattern, key)
      if m:
        break
    else:
      raise AssertionError(f"no rule for HF key {key}")
    if repl is None:
      continue
    name = repl(m) if callable(repl) else m.expand(repl)
    value = value.detach().numpy().copy()
    if "#" in name:
      base, part = name.split("#")
      parts.setdefault(base, {})[part] = value
    else:
      out[name] = value
  for base, qkv in parts.items():
    out[base] = np.concatenate([qkv[n] for n in "qkv"], 0)
  return out


def write_pkl(path, model):
  with open(path, "wb") as f:
    pickle.dump({"model": model, "__author__": "test"}, f)
  return path


CASES = {
    # name: (make the HF model, input (B, H, W), layout)
    "r50-old": (lambda: make_hf(depth=50, width=8, queries=5, labels=3), (1, 64, 96), "old"),
    "r18-basic-new": (lambda: make_hf(depth=18, width=16, layers=3, queries=4, labels=6, seed=2), (2, 64, 64),
                      "new"),
    "swin-w7-old": (lambda: make_hf_swin(embed=16, depths=(2, 1, 1, 2), swin_heads=(1, 2, 2, 4), window=7,
                                         queries=4, labels=2, seed=4), (1, 96, 160), "old"),
    "swin-w12-new": (lambda: make_hf_swin(embed=24, depths=(1, 2, 1, 2), swin_heads=(1, 2, 3, 4), window=12,
                                          hidden=64, heads=8, layers=2, queries=6, labels=7, seed=5),
                     (1, 64, 224), "new"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_detectron2_file_reproduces_hf(tmp_path, name):
  make, (b, h, w), layout = CASES[name]
  hf = make()
  original = to_original(hf.state_dict(), layout)
  assert any(k.startswith("sem_seg_head.pixel_decoder.") for k in original) == (layout == "new")
  cfg = model_config_from_hf(hf.config)
  variables = from_detectron2(write_pkl(tmp_path / "model_final.pkl", original), cfg)
  # The same arrays as through the HF names ...
  module = build_model(cfg)
  via_hf = convert_state_dict(pack_qkv(hf.state_dict()), abstract_variables(module), hf_key, ignore=HF_IGNORED)
  flat, flat_hf = (flax.traverse_util.flatten_dict(v) for v in (variables, via_hf))
  assert flat.keys() == flat_hf.keys() and all(np.array_equal(flat[k], flat_hf[k]) for k in flat)
  # ... and HF's outputs.
  x = images(b, h, w, seed=3)
  ref, out = hf_forward(hf, x), run(module, variables, x)
  assert maxdiff(out["pred_logits"], ref.class_queries_logits) <= TOL
  assert maxdiff(out["pred_masks"], ref.masks_queries_logits) <= TOL
  check = check_detectron2_roundtrip(original, variables)
  # Every array but the criterion's class weights and Swin's index buffers is used.
  assert check["passed"] and check["arrays"] == sum(
      not k.endswith(("empty_weight", "relative_position_index")) for k in original)


@pytest.mark.parametrize("layout", ["old", "new"])
def test_plus6enc_file_maps_onto_our_encoder_layers(tmp_path, layout):
  """The "+6 Enc" names (pixel decoder input_proj and transformer.encoder.layers.N, post-norm) against
  the torch reference assembled from HF's DETR encoder layers."""
  hf = make_hf(depth=50, width=8, hidden=32, heads=4, layers=2, queries=6, labels=4)
  ref_model = plus6enc_reference(hf, enc_layers=2)
  original = to_original(ref_model.state_dict(), layout)
  enc = "sem_seg_head." + ("" if layout == "old" else "pixel_decoder.") + "transformer.encoder.layers.1."
  assert {enc + "self_attn.in_proj_weight", enc + "norm2.bias", enc + "linear1.weight"} <= set(original)
  cfg = dict(resnet_depth=50, resnet_width=8, pixel_decoder="transformer_encoder", pixel_encoder_layers=2,
             conv_dim=32, mask_dim=32, num_queries=6, hidden_dim=32, num_heads=4, dim_feedforward=64,
             dec_layers=2, num_classes=4)
  variables = from_detectron2(original, cfg)
  x = images(2, 64, 64, seed=7)
  logits, masks = torch_outputs(ref_model, x)
  out = run(build_model(cfg), variables, x)
  assert maxdiff(out["pred_logits"], logits) <= TOL
  assert maxdiff(out["pred_masks"], masks) <= TOL


def test_roundtrip_check_catches_a_mixed_up_conversion():
  cfg = dict(resnet_depth=18, resnet_width=8, conv_dim=32, mask_dim=16, num_queries=3, hidden_dim=16,
             num_heads=2, dim_feedforward=32, dec_layers=1, num_classes=2)
  variables = host_variables(build_model(cfg))
  original = to_detectron2(variables)
  assert check_detectron2_roundtrip(original, variables)["passed"]
  attn = variables["params"]["transformer_decoder"]["layer_0"]["self_attn"]
  attn["q_proj"], attn["k_proj"] = attn["k_proj"], attn["q_proj"]  # what a wrong in_proj split would do
  check = check_detectron2_roundtrip(original, variables)
  assert not check["passed"]
  assert check["mismatched"] == [f"{Q}transformer.decoder.layers.0.self_attn.in_proj_{p}[{n}]"
                                 for p in ("bias", "weight") for n in "kq"]


def test_bad_files_are_named(tmp_path):
  hf = make_hf(depth=18, width=8, layers=1, queries=3, labels=2)
  cfg = model_config_from_hf(hf.config)
  original = to_original(hf.state_dict())
  broken = dict(original)
  del broken["backbone.res3.0.conv2.norm.running_var"]
  broken[Q + "transformer.encoder.layers.0.linear1.weight"] = np.zeros((4, 4), np.float32)  # ENC_LAYERS > 0
  with pytest.raises(ValueError) as e:
    from_detectron2(broken, cfg)
  assert "backbone.res3.0.conv2.norm.running_var" in str(e.value) and "missing" in str(e.value)
  assert Q + "transformer.encoder.layers.0.linear1.weight" in str(e.value) and "unexpected" in str(e.value)
  with pytest.raises(ValueError, match=r"class_embed\.weight: \(32, 3\).*expected \(32, 6\)"):
    from_detectron2(original, {**cfg, "num_classes": 5})  # the wrong dataset's config
  with pytest.raises(ValueError, match="both the old and the new key layout"):
    from_detectron2({**original, "sem_seg_head.pixel_decoder.layer_4.weight": original["sem_seg_head.layer_4.weight"]},
                    cfg)
  with open(tmp_path / "other.pkl", "wb") as f:
    pickle.dump({"epoch": 3}, f)
  with pytest.raises(ValueError, match="other.pkl is not a detectron2 checkpoint"):
    from_detectron2(tmp_path / "other.pkl", cfg)
  with pytest.raises(FileNotFoundError, match="nope.pkl does not exist"):
    from_detectron2(tmp_path / "nope.pkl", cfg)


def test_cli_converts_with_a_config_and_records_provenance(tmp_path):
  """python -m maskformer_jax.convert --detectron2 FILE --config CONFIG --out DIR, relative paths as a user
  types them; the checkpoint names the file's sha256, the converter and the check it passed."""
  root = pathlib.Path(__file__).parent.parent
  spec = f"{root}/configs/coco_panoptic.py:runlocal"
  model = load_config(spec).model
  variables = host_variables(build_model({k: model[k] for k in MODEL_KEYS}), seed=4)
  variables = flax.traverse_util.unflatten_dict({  # positive variances, small kernels: finite outputs
      k: np.abs(v) + 0.5 if k[-1] == "var" else v * 0.1 if k[-1] == "kernel" else v
      for k, v in flax.traverse_util.flatten_dict(variables).items()})
  original = {(k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.")): v
              for k, v in to_detectron2(variables).items()}  # the released files' old layout
  write_pkl(tmp_path / "model_final_abc123.pkl", original)
  res = subprocess.run([sys.executable, "-m", "maskformer_jax.convert", "--detectron2", "model_final_abc123.pkl",
                        "--config", spec, "--out", "ckpt"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  cfg, loaded = load_converted(tmp_path / "ckpt")
  assert cfg["pixel_decoder"] == "transformer_encoder" and cfg["num_classes"] == 5
  flat, ref = (flax.traverse_util.flatten_dict(v) for v in (loaded, variables))
  assert flat.keys() == ref.keys() and all(np.array_equal(flat[k], ref[k]) for k in flat)
  source = json.load(open(tmp_path / "ckpt" / "config.json"))["source"]
  digest = hashlib.sha256((tmp_path / "model_final_abc123.pkl").read_bytes()).hexdigest()
  assert source["format"] == "detectron2" and source["files"] == {"model_final_abc123.pkl": digest}
  assert source["check"]["passed"] and source["check"]["arrays"] == len(original)
  assert source["converter"].startswith("maskformer_jax ")
  # Its model card records the same provenance and verifies against the file.
  from maskformer_jax import card
  c = card.read(tmp_path / "ckpt")
  assert c["kind"] == "conversion" and c["provenance"]["files"] == {"model_final_abc123.pkl": digest}
  assert "not_finite" not in c["probes"]
  assert card.verify(tmp_path / "ckpt", source=tmp_path / "model_final_abc123.pkl") == []
  # Without --config the command says what to give.
  res = subprocess.run([sys.executable, "-m", "maskformer_jax.convert", "--detectron2", "model_final_abc123.pkl",
                        "--out", "ckpt2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert res.returncode == 2 and "--detectron2 needs --config" in res.stderr
