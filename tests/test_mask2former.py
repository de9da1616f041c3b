"""Mask2Former (masked-attention decoder + whole model) against Hugging Face's PyTorch one.

Randomly initialised `Mask2FormerForUniversalSegmentation`s at tiny sizes (ResNet and Swin backbones,
with and without the decoder's input projections) convert, and every prediction (before the first
layer and after each) matches HF's class and mask logits in float32. The attention-mask rule is
checked on crafted logits, the bfloat16 path under jit, and the converter's refusals by name.
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

from maskformer_jax import card
from maskformer_jax.convert import hf_mask2former as conv
from maskformer_jax.convert import load_converted
from maskformer_jax.models import build_model
from maskformer_jax.models.mask2former import Mask2Former
from maskformer_jax.models.masked_attention import MaskedAttention, attention_mask

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _err(ours, theirs, tol, what):
  """Max abs error; within `tol` absolute, or relative to the reference's largest entry when that is > 1."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  err, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
  print(f"{what}: max abs error {err:.2e} (largest |reference| {scale:.2f})")  # shown by pytest -rP
  assert err <= tol * max(1.0, scale), f"{what}: {err:.2e} > {tol:.0e} x max(1, {scale:.2f})"
  return err


def _randomise(model, seed):
  """Every parameter random and nonzero (HF zero-initialises sampling offsets and biases and gives BN
  scales std 0.02): weights std 1/sqrt(fan_in), biases 0.1, norm scales ~1, BN statistics ~(0, 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim > 1:
        p.copy_(noise / p[0].numel() ** 0.5)
      elif "norm" in name or name.endswith(".1.weight"):  # LayerNorm, BatchNorm, GroupNorm scales
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(1 + 0.2 * torch.rand(b.shape, generator=g))
  return model.eval()


def _resnet(layer_type="basic"):
  sizes = [16, 24, 40, 56] if layer_type == "basic" else [32, 48, 64, 96]
  return ResNetConfig(embedding_size=16, hidden_sizes=sizes, depths=[1, 1, 1, 1], layer_type=layer_type,
                      out_features=STAGES)


def _hf(backbone, seed=0, **kw):
  cfg = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=2, encoder_feedforward_dim=48,
             decoder_layers=5, num_queries=5, dim_feedforward=64, num_attention_heads=4, num_labels=3)
  torch.manual_seed(seed)
  return _randomise(Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone,
                                                                          **{**cfg, **kw})), seed)


def _compare_every_layer(hf, module, variables, size, batch=2, tol=1e-4, tag=""):
  """Ours vs HF on every prediction; returns our outputs (and asserts the output format)."""
  x = np.random.default_rng(1).standard_normal((batch, *size, 3)).astype(np.float32)
  theirs = conv.hf_predictions(hf, x)
  out = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  ours = [*out["aux_outputs"], out]
  assert len(ours) == len(theirs) == module.dec_layers + 1
  q, k = module.num_queries, module.num_classes
  for i, (o, (tc, tm)) in enumerate(zip(ours, theirs)):
    assert o["pred_logits"].dtype == o["pred_masks"].dtype == jnp.float32
    assert o["pred_logits"].shape == (batch, q, k + 1)
    assert o["pred_masks"].shape == (batch, q, -(-size[0] // 4), -(-size[1] // 4))
    _err(o["pred_logits"], tc, tol, f"{tag} prediction {i} class logits")
    _err(o["pred_masks"], tm, tol, f"{tag} prediction {i} mask logits")
  return out


@pytest.mark.parametrize("case", ["projected", "unprojected"])
def test_resnet_models_match_hf_every_layer(case, tmp_path):
  """'projected': hidden 48 != feature_size 32 (three input projections), 4 layers, 4 heads, basic
  blocks, converted from a save_pretrained directory by the convert command. 'unprojected': hidden == feature_size, 6 layers
  (the level cycle twice), 2 heads, 7 queries, bottleneck blocks, enforce_input_projection off."""
  if case == "projected":
    hf = _hf(_resnet(), 0, hidden_dim=48, num_labels=4)
    hf.save_pretrained(tmp_path / "hf")
    # The convert command tells a Mask2Former directory by its config, checks parity, writes a card
    # that verifies; the checkpoint rebuilds the model from its config.json alone.
    res = subprocess.run([sys.executable, "-m", "maskformer_jax.convert", "--hf", "hf", "--out", "ckpt"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg, variables = load_converted(tmp_path / "ckpt")
    assert cfg["arch"] == "mask2former" and cfg["dec_layers"] == 4
    module = build_model(cfg)
    assert json.load(open(tmp_path / "ckpt" / "config.json"))["source"]["check"]["passed"]
    assert (tmp_path / "ckpt" / "CARD.md").read_text().startswith("# Mask2Former (resnet, 4 classes, 5 queries)")
    assert card.verify(tmp_path / "ckpt", source=tmp_path / "hf") == []
    assert {f"input_proj_{i}" for i in range(3)} <= set(variables["params"]["transformer_decoder"])
  else:
    hf = _hf(_resnet("bottleneck"), 1, decoder_layers=7, num_queries=7, num_attention_heads=2)
    module, variables = conv.from_hf(hf)
    assert not any(k.startswith("input_proj") for k in variables["params"]["transformer_decoder"])
  assert isinstance(module, Mask2Former)
  assert module.dec_layers == hf.config.decoder_layers - 1
  _compare_every_layer(hf, module, variables, (64, 96), tag=case)


def test_swin_model_matches_hf_every_layer():
  """A tiny plain-HF-Swin backbone (window 2, so every stage pads and shifts; 96x128: res5 is 3x4),
  enforce_input_projection on; the attention masks of this probe include rows masked everywhere,
  so the unmasking rule is exercised against HF's. check_hf_parity reports every prediction."""
  swin = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[2, 2, 2, 2], window_size=2, out_features=STAGES)
  hf = _hf(swin, 2, decoder_layers=5, num_queries=6, num_attention_heads=2, encoder_layers=1,
           enforce_input_projection=True, num_labels=2)
  with torch.no_grad():  # mask features with a large constant part: some queries' masks negative everywhere
    proj = hf.model.pixel_level_module.decoder.mask_projection
    proj.bias.copy_(-0.6 * torch.randn(proj.bias.shape, generator=torch.Generator().manual_seed(0)))
  module, variables = conv.from_hf(hf)
  assert module.backbone == "swin" and module.swin_window_size == 2 and module.enforce_input_proj
  report = conv.check_hf_parity(hf, module, variables, size=(96, 128), tol=1e-4)
  for name, diffs in report["per_prediction"].items():
    print(f"swin {name}: max abs error per prediction", " ".join(f"{d:.2e}" for d in diffs))
  assert report["passed"] and len(report["per_prediction"]["pred_masks"]) == 5, report
  probe = np.random.default_rng(0).standard_normal((1, 96, 128, 3)).astype(np.float32)  # check_hf_parity's
  rows = {"all masked": 0, "partly masked": 0}
  for i, (_, masks) in enumerate(conv.hf_predictions(hf, probe)[:-1]):  # prediction i masks layer i
    size = [(3, 4), (6, 8), (12, 16)][i % 3]
    masked = torch.nn.functional.interpolate(torch.tensor(masks), size=size, mode="bilinear",
                                             align_corners=False).flatten(2).numpy() < 0
    rows["all masked"] += int(masked.all(-1).sum())
    rows["partly masked"] += int((masked.any(-1) & ~masked.all(-1)).sum())
  print("attention-mask rows over the layers:", rows)
  assert rows["all masked"] > 0 and rows["partly masked"] > 0, rows


def test_attention_mask_rule():
  """Crafted logits: query 0 negative everywhere (all masked -> unmasked), query 1 positive everywhere
  (nothing masked), query 2 negative on the left half only; resized bilinearly to the next level."""
  logits = np.zeros((1, 3, 8, 8), np.float32)
  logits[0, 0], logits[0, 1] = -3.0, 2.0
  logits[0, 2, :, :4], logits[0, 2, :, 4:] = -1.0, 1.0
  mask = np.asarray(attention_mask(jnp.asarray(logits), (4, 4))).reshape(3, 4, 4)
  assert not mask[0].any() and not mask[1].any()
  assert mask[2, :, :2].all() and not mask[2, :, 2:].any()
  # sigmoid < 0.5 of torch's bilinear resize (align_corners=False), on random logits, per key
  rnd = np.random.default_rng(0).standard_normal((2, 4, 6, 10)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.tensor(rnd), size=(3, 5), mode="bilinear", align_corners=False)
  ref = (ref.sigmoid() < 0.5).flatten(2).numpy()
  ref = ref & ~ref.all(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(attention_mask(jnp.asarray(rnd), (3, 5))), ref)
  # masked keys get no weight: changing them leaves the output unchanged
  layer = MaskedAttention(8, 2)
  rng = np.random.default_rng(1)
  q, kv = rng.standard_normal((1, 3, 8)).astype(np.float32), rng.standard_normal((1, 16, 8)).astype(np.float32)
  m = jnp.asarray(mask.reshape(1, 3, 16))
  params = layer.init(jax.random.key(0), q, kv, kv, m)
  out = layer.apply(params, q, kv, kv, m)
  kv2 = np.where(mask[2].reshape(16, 1), 100.0, kv)  # only keys masked for query 2 change
  out2 = layer.apply(params, q, kv2, kv2, m)
  _err(out2[:, 2], out[:, 2], 1e-6, "query 2 ignores its masked keys")
  assert float(jnp.abs(out2[:, :2] - out[:, :2]).max()) > 1e-3  # the others see them
  assert bool(jnp.isfinite(out).all())


def test_jit_bfloat16_forward():
  """The converted model rebuilt in bfloat16 with remat (the same variables fit), jitted: finite float32
  outputs in MaskFormer's format, one aux entry per layer as the criterion's deep supervision expects,
  near the float32 model's class logits."""
  hf = _hf(_resnet(), 4, decoder_layers=4, num_queries=4, encoder_layers=1)
  module, variables = conv.from_hf(hf)
  cfg = {**conv.model_config_from_hf(hf.config), "dtype": "bfloat16", "remat": True, "unknown_key": 1}
  half = build_model(cfg)
  assert half.dtype == jnp.bfloat16 and half.remat
  images = np.random.default_rng(2).standard_normal((2, 64, 96, 3)).astype(np.float32)
  out = jax.jit(lambda v, x: half.apply(v, x))(variables, images)
  assert len(out["aux_outputs"]) == 3
  assert out["pred_masks"].shape == (2, 4, 16, 24) and out["pred_logits"].shape == (2, 4, 4)
  leaves = [x for o in [out, *out["aux_outputs"]] for x in (o["pred_logits"], o["pred_masks"])]
  assert all(x.dtype == jnp.float32 and bool(jnp.isfinite(x).all()) for x in leaves)
  first = conv.hf_predictions(hf, images)[0][0]  # before layer 0: no attention mask to flip yet
  _err(out["aux_outputs"][0]["pred_logits"], first, 0.1, "bfloat16 class logits before layer 0")


def test_conversion_errors_name_the_keys():
  hf = _hf(_resnet(), 3, decoder_layers=3, num_queries=2, encoder_layers=1)
  state = hf.state_dict()
  module = build_model(conv.model_config_from_hf(hf.config))
  conv.convert_mask2former(state, module)  # converts as is
  bad = dict(state)
  del bad["model.transformer_module.decoder.layers.1.fc1.weight"]
  del bad["model.transformer_module.decoder.layers.0.cross_attn.in_proj_bias"]
  bad["model.transformer_module.decoder.layers.0.extra.weight"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"(?s)4 missing.*layers\.0\.cross_attn\.k_proj\.bias.*q_proj\.bias.*v_proj\.bias"
                                       r".*layers\.1\.fc1\.weight.*1 unexpected.*layers\.0\.extra\.weight"):
    conv.convert_mask2former(bad, module)
  with pytest.raises(ValueError, match=r"(?s)mis-shaped.*queries_features\.weight"):
    conv.convert_mask2former(state, build_model({**conv.model_config_from_hf(hf.config), "num_queries": 3}))
  for change, match in ((dict(pre_norm=True), "pre_norm"), (dict(decoder_layers=1), "decoder_layers"),
                        (dict(activation_function="gelu"), "activation")):
    with pytest.raises(ValueError, match=match):
      conv.model_config_from_hf(Mask2FormerConfig(backbone_config=_resnet(), **change))
  with pytest.raises(ValueError, match="out_features"):
    conv.model_config_from_hf(Mask2FormerConfig(backbone_config=ResNetConfig(out_features=STAGES[1:])))
