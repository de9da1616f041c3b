"""Mask2Former's deformable-attention pixel decoder against Hugging Face's PyTorch one.

The references are HF's pure-PyTorch `multi_scale_deformable_attention` (grid_sample), its deformable
attention layer and its `Mask2FormerPixelDecoder`, randomly initialised at small sizes, in float64
where gradients are compared (our side runs in float32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
from transformers.models.mask2former import modeling_mask2former as hf_m2f

from maskformer_jax.bench import msdeform as bench
from maskformer_jax.convert.hf import convert_state_dict
from maskformer_jax.convert.hf_mask2former import (convert_pixel_decoder, pixel_decoder_from_hf_config,
                                                   pixel_decoder_key)
from maskformer_jax.models.msdeform import (MSDeformAttention, MSDeformPixelDecoder, ms_deform_attn,
                                            reference_points, resize_bilinear)

SHAPES = ((5, 7), (3, 4), (2, 2), (1, 3))  # several levels, non-square, one of height 1
LEVELS = ("res2", "res3", "res4", "res5")


def _err(ours, theirs, tol, what):
  """Max abs error; within `tol` absolute, or relative to the reference's largest entry when that is > 1."""
  ours = np.asarray(ours, np.float64)
  theirs = theirs.detach().double().numpy() if hasattr(theirs, "detach") else np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  err, scale = float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs)))
  print(f"{what}: max abs error {err:.2e} (largest |reference| {scale:.2f})")  # shown by pytest -rP
  assert err <= tol * max(1.0, scale), f"{what}: {err:.2e} > {tol:.0e} x max(1, {scale:.2f})"
  return err


def _sampling_inputs(seed=0, b=2, q=6, heads=3, d=4, points=4, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((b, s, heads, d)).astype(np.float32)
  # locations outside [0, 1] read zero padding; keep away from exact pixel centres (kinks)
  loc = rng.uniform(-0.3, 1.3, (b, q, heads, len(shapes), points, 2)).astype(np.float32)
  attn = rng.random((b, q, heads, len(shapes), points)).astype(np.float32)
  return value, loc, attn


@pytest.mark.parametrize("method", ["gather", "matmul"])
def test_sampling_matches_hf_values_and_gradients(method):
  value, loc, attn = _sampling_inputs()
  tv, tl, ta = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (value, loc, attn))
  ref = hf_m2f.multi_scale_deformable_attention(tv, list(SHAPES), tl, ta)
  cot = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
  ref.backward(torch.tensor(cot, dtype=torch.float64))
  out, vjp = jax.vjp(jax.jit(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a, method)), value, loc, attn)
  _err(out, ref, 1e-5, f"{method} output")
  assert (np.abs(loc) > 1).any() and (loc < 0).any()  # zero padding is exercised
  for g, t, name in zip(vjp(jnp.asarray(cot)), (tv, tl, ta), ("value", "locations", "weights")):
    _err(g, t.grad, 1e-5, f"{method} d/d{name}")


def test_methods_agree_under_vmap_and_in_bfloat16():
  value, loc, attn = _sampling_inputs(seed=2, b=1)
  stack = lambda x: np.stack([x, x[::-1] * 0.5])  # noqa: E731  an extra leading axis to vmap over
  outs = {m: jax.vmap(lambda v, l, a, m=m: ms_deform_attn(v, SHAPES, l, a, m))(stack(value), stack(loc), stack(attn))
          for m in ("gather", "matmul")}
  _err(outs["gather"], outs["matmul"], 1e-5, "gather vs matmul under vmap")
  plain = jax.jit(lambda v, l, a: ms_deform_attn(v, SHAPES, l, a))
  _err(outs["gather"][0], plain(value, loc, attn), 1e-6, "vmap vs plain")
  half = plain(jnp.asarray(value, jnp.bfloat16), loc, attn)
  assert half.dtype == jnp.bfloat16
  _err(half.astype(jnp.float32), outs["gather"][0], 0.1, "bfloat16 value")
  with pytest.raises(ValueError, match="method"):
    ms_deform_attn(value, SHAPES, loc, attn, "conv")
  with pytest.raises(ValueError, match="spatial_shapes"):
    ms_deform_attn(value, SHAPES[:-1], loc, attn)


def test_reference_points_match_hf():
  shapes = ((3, 5), (2, 3), (1, 1))
  ratios = np.array([[[1.0, 1.0], [0.8, 0.6], [1.0, 0.5]], [[0.5, 0.75], [1.0, 1.0], [0.9, 0.7]]], np.float32)
  ref = hf_m2f.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(list(shapes), torch.tensor(ratios), "cpu")
  _err(reference_points(shapes, jnp.asarray(ratios)), ref, 1e-6, "reference points (valid ratios)")
  ones = hf_m2f.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(list(shapes), torch.ones(1, 3, 2), "cpu")
  _err(reference_points(shapes), ones, 1e-6, "reference points")


def test_resize_bilinear_matches_torch():
  x = np.random.default_rng(3).standard_normal((1, 3, 5, 2)).astype(np.float32)
  for size in ((6, 10), (7, 9), (3, 5), (1, 1)):
    ref = torch.nn.functional.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                                          align_corners=False).permute(0, 2, 3, 1)
    _err(resize_bilinear(jnp.asarray(x), size), ref, 1e-6, f"bilinear resize to {size}")


def _randomise(module, seed=0):
  """Every parameter random (HF leaves level_embed uninitialised), all of them nonzero: weights with
  std 1/sqrt(fan_in) (so activations, offsets in pixels and attention logits stay O(1) through the
  layers), biases and level embeddings 0.1 and 1, norm scales around 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name == "level_embed":
        p.copy_(noise)
      elif p.ndim > 1:
        p.copy_(noise / p[0].numel() ** 0.5)
      elif name.endswith("norm.weight") or name.endswith(".1.weight"):  # LayerNorm, GroupNorm
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return module


@pytest.mark.parametrize("method", ["gather", "matmul"])
def test_attention_layer_matches_hf(method):
  dim, heads, shapes = 32, 4, ((4, 3), (3, 5), (2, 2))
  hf = _randomise(hf_m2f.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(dim, heads, 3, 4)).double()
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(4)
  x, pos = (rng.standard_normal((2, s, dim)).astype(np.float32) for _ in range(2))
  ratios = np.array([[[1.0, 0.75], [0.8, 1.0], [1.0, 1.0]]] * 2, np.float32)
  ref_pts = np.asarray(reference_points(shapes, jnp.asarray(ratios)))
  tx, tpos = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, pos))
  out, _ = hf(hidden_states=tx, encoder_hidden_states=tx, position_embeddings=tpos,
              reference_points=torch.tensor(ref_pts, dtype=torch.float64), spatial_shapes_list=list(shapes))
  cot = rng.standard_normal(out.shape).astype(np.float32)
  out.backward(torch.tensor(cot, dtype=torch.float64))
  state = {f"encoder.layers.0.self_attn.{k}": v for k, v in hf.state_dict().items()}
  params = convert_state_dict(state, {"params": jax.eval_shape(
      lambda: MSDeformAttention(dim, heads, 3, 4).init(jax.random.key(0), x, x, ref_pts, shapes))["params"]},
      lambda p: pixel_decoder_key(("encoder_layer_0", "self_attn", *p), ""))["params"]
  layer = MSDeformAttention(dim, heads, 3, 4, method)

  def f(params, x, pos):
    return layer.apply({"params": params}, x + pos, x, ref_pts, shapes)

  ours, vjp = jax.vjp(jax.jit(f), params, jnp.asarray(x), jnp.asarray(pos))
  _err(ours, out, 1e-5, f"{method} layer output")
  g_params, g_x, g_pos = vjp(jnp.asarray(cot))
  _err(g_x, tx.grad, 1e-5, f"{method} layer d/dx")
  _err(g_pos, tpos.grad, 1e-5, f"{method} layer d/dpos")
  torch_grads = {n: p.grad for n, p in hf.named_parameters()}
  for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
    _err(g_params[name]["kernel"], torch_grads[f"{name}.weight"].T, 1e-5, f"{method} layer d/d{name}")
    _err(g_params[name]["bias"], torch_grads[f"{name}.bias"], 1e-5, f"{method} layer d/d{name} bias")


def _hf_pixel_decoder(seed, channels, **cfg):
  config = Mask2FormerConfig(**cfg)
  torch.manual_seed(seed)
  hf = _randomise(hf_m2f.Mask2FormerPixelDecoder(config, feature_channels=list(channels)), seed).eval()
  return config, hf


def _compare_pixel_decoder(config, hf, channels, sizes, method="gather", tol=1e-4, tag=""):
  rng = np.random.default_rng(5)
  feats = {lv: rng.standard_normal((2, h, w, c)).astype(np.float32) for lv, (h, w), c in zip(LEVELS, sizes, channels)}
  with torch.no_grad():
    ref = hf([torch.tensor(feats[lv]).permute(0, 3, 1, 2) for lv in LEVELS])
  module = pixel_decoder_from_hf_config(config, method=method)
  params = convert_pixel_decoder(hf.state_dict(), module, dict(zip(LEVELS, channels)), prefix="")
  mask, multi = jax.jit(module.apply)({"params": params}, feats)
  _err(mask, ref.mask_features.permute(0, 2, 3, 1), tol, f"{tag} mask_features")
  assert len(multi) == len(ref.multi_scale_features) == 3
  for i, (a, b) in enumerate(zip(multi, ref.multi_scale_features)):
    _err(a, b.permute(0, 2, 3, 1), tol, f"{tag} multi_scale_features[{i}]")


@pytest.mark.parametrize("method", ["gather", "matmul"])
def test_pixel_decoder_matches_hf_small(method):
  channels = (16, 24, 40, 56)
  config, hf = _hf_pixel_decoder(0, channels, feature_size=64, mask_feature_size=48, encoder_layers=2,
                                 num_attention_heads=8, encoder_feedforward_dim=96)
  # a 100x76 image: odd sizes, so the res3 -> res2 upsampling is not an exact 2x
  _compare_pixel_decoder(config, hf, channels, ((25, 19), (13, 10), (7, 5), (4, 3)), method, tag=f"2 layers {method}")


def test_pixel_decoder_matches_hf_default_sizes():
  channels = (64, 128, 256, 512)  # a small ResNet's; the decoder itself at HF's defaults (256, 6 layers)
  config, hf = _hf_pixel_decoder(1, channels)
  assert (config.feature_size, config.encoder_layers, config.encoder_feedforward_dim) == (256, 6, 1024)
  _compare_pixel_decoder(config, hf, channels, ((16, 12), (8, 6), (4, 3), (2, 2)), tag="defaults")


def test_full_model_state_dict_converts_and_matches():
  """A whole (tiny, ResNet) Mask2FormerForUniversalSegmentation with HF's own init: its state dict's
  pixel decoder keys convert, the rest is ignored, and on its backbone's features we match its pixel
  level module. Also: our init of the sampling offsets' bias is HF's (the same fixed grid)."""
  backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 24, 40, 56], depths=[1, 1, 1, 1],
                          layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"])
  config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                             encoder_layers=1, decoder_layers=1, num_queries=3, encoder_feedforward_dim=32,
                             dim_feedforward=32, num_attention_heads=4, num_labels=2)
  torch.manual_seed(0)
  hf = Mask2FormerForUniversalSegmentation(config).eval()
  state, channels = hf.state_dict(), dict(zip(LEVELS, backbone.hidden_sizes))
  module = pixel_decoder_from_hf_config(config)
  params = convert_pixel_decoder(state, module, channels)
  x = torch.randn(1, 3, 72, 40)
  with torch.no_grad():
    ref = hf.model.pixel_level_module(x)
    feats = hf.model.pixel_level_module.encoder(x).feature_maps
  mask, multi = jax.jit(module.apply)({"params": params}, {lv: f.permute(0, 2, 3, 1).numpy()
                                                          for lv, f in zip(LEVELS, feats)})
  _err(mask, ref.decoder_last_hidden_state.permute(0, 2, 3, 1), 1e-4, "full model mask_features")
  for i, (a, b) in enumerate(zip(multi, ref.decoder_hidden_states)):
    _err(a, b.permute(0, 2, 3, 1), 1e-4, f"full model multi_scale_features[{i}]")
  ours = jax.jit(module.init)(jax.random.key(0), {lv: f.permute(0, 2, 3, 1).numpy() for lv, f in zip(LEVELS, feats)})
  _err(ours["params"]["encoder_layer_0"]["self_attn"]["sampling_offsets"]["bias"],
       params["encoder_layer_0"]["self_attn"]["sampling_offsets"]["bias"], 1e-6, "sampling offsets bias init")

  prefix = "model.pixel_level_module.decoder."
  bad = dict(state)
  del bad[prefix + "encoder.layers.0.fc1.weight"]
  bad[prefix + "encoder.layers.0.extra.weight"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"(?s)missing.*encoder\.layers\.0\.fc1\.weight.*unexpected.*extra"):
    convert_pixel_decoder(bad, module, channels)
  with pytest.raises(ValueError, match=r"(?s)mis-shaped.*input_projections\.0\.0\.weight"):
    convert_pixel_decoder(state, module, {**channels, "res5": 8})


def test_jit_bfloat16_finite():
  channels = (8, 16, 24, 32)
  module = MSDeformPixelDecoder(conv_dim=32, mask_dim=16, encoder_layers=1, num_heads=4, dim_feedforward=32,
                                dtype=jnp.bfloat16, remat=True)
  rng = np.random.default_rng(6)
  feats = {lv: jnp.asarray(rng.standard_normal((1, 32 // 2 ** i, 24 // 2 ** i, c)), jnp.float32)
           for i, (lv, c) in enumerate(zip(LEVELS, channels))}
  variables = jax.jit(module.init)(jax.random.key(0), feats)

  def loss(variables):  # one compilation for the outputs and the gradients (remat'd encoder layer)
    out = module.apply(variables, feats)
    return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(out)), out

  grads, (mask, multi) = jax.jit(jax.grad(loss, has_aux=True))(variables)
  assert mask.dtype == jnp.bfloat16 and mask.shape == (1, 32, 24, 16)
  assert [m.shape for m in multi] == [(1, 4, 3, 32), (1, 8, 6, 32), (1, 16, 12, 32)]
  assert all(bool(jnp.isfinite(x).all()) for x in [mask, *multi, *jax.tree.leaves(grads)])
  assert float(jnp.abs(grads["params"]["encoder_layer_0"]["self_attn"]["sampling_offsets"]["kernel"]).max()) > 0


def test_bench_smoke(capsys):
  rows = bench.main(["--size", "64", "--dim", "16", "--heads", "2", "--points", "2", "--repeats", "1"])
  assert len(rows) == 4 and all(r["diff"] < 1e-5 for r in rows)
  assert "| matmul | fwd+bwd |" in capsys.readouterr().out
