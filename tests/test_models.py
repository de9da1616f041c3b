"""The model's contract (docs/interfaces.md): outputs, variable collections and names, dropout, BN modes,
input checks, bfloat16, and the small pieces checked against torch/HF."""
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers.models.maskformer.modeling_maskformer import MaskFormerSinePositionEmbedding

from maskformer_jax import config as config_lib
from maskformer_jax.models import build_model, normalize_image
from maskformer_jax.models.backbone import FrozenBatchNorm
from maskformer_jax.models.pixel_decoder import upsample_nearest
from maskformer_jax.models.transformer_decoder import sine_position_embedding

# The regex documented in models/maskformer.py for the optimizer's "no weight decay on norms" rule.
NORM_RE = re.compile(r"(^|/)[^/]*(bn|gn|norm)[^/]*/(scale|bias)$")


def load_config(family, arg=""):
  path = pathlib.Path(__file__).parent.parent / "configs" / f"{family}.py"
  return config_lib.load_config(f"{path}:{arg}" if arg else path)


def tiny(**overrides):
  c = load_config("coco_panoptic", "runlocal").model
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def host_variables(model, shape=(1, 64, 64, 3), seed=0):
  """Variables of the right structure filled on the host (fan-in scaled normals, unit BN/GN/LN scales):
  compiling `model.init`'s ~150 random initialisers costs far more than the tests that use it."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name == "embedding":
      return rng.standard_normal(leaf.shape, np.float32)
    if name in ("scale", "var"):
      return (0.5 + rng.random(leaf.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _model(pixel_decoder, backbone_norm):
  """(model, host variables, jitted apply): one compilation per configuration and mode."""
  model = build_model(tiny(pixel_decoder=pixel_decoder, backbone_norm=backbone_norm))
  return model, host_variables(model), jax.jit(model.apply, static_argnames=("train", "mutable"))


def images(b=2, h=64, w=96, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3)), jnp.float32)


@pytest.mark.parametrize("pixel_decoder,norm", [("base", "bn"), ("transformer_encoder", "frozen_bn")])
def test_output_contract(pixel_decoder, norm):
  model, variables, apply = _model(pixel_decoder, norm)
  if norm == "bn":  # the real initialiser once (an rbg key compiles much faster than threefry)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.structure(variables) == jax.tree.structure(_model(pixel_decoder, norm)[1])
  c = tiny()
  out = apply(variables, images(), train=False)
  q, k, l = c.num_queries, c.num_classes, c.dec_layers
  assert set(out) == {"pred_logits", "pred_masks", "aux_outputs"}
  assert out["pred_logits"].shape == (2, q, k + 1) and out["pred_logits"].dtype == jnp.float32
  assert out["pred_masks"].shape == (2, q, 16, 24) and out["pred_masks"].dtype == jnp.float32
  assert len(out["aux_outputs"]) == l - 1
  for aux in out["aux_outputs"]:
    assert set(aux) == {"pred_logits", "pred_masks"}
    assert aux["pred_logits"].shape == out["pred_logits"].shape
    assert aux["pred_masks"].shape == out["pred_masks"].shape
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))
  assert ("encoder_layer_0" in variables["params"]["pixel_decoder"]) == (pixel_decoder == "transformer_encoder")


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_variable_collections_and_names(norm):
  model = build_model(tiny(pixel_decoder="transformer_encoder", backbone_norm=norm))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "pixel_decoder", "transformer_decoder", "class_embed",
                                      "mask_embed"}
  assert set(variables["batch_stats"]) == {"backbone"}
  params = {"/".join(p): v for p, v in flatten_dict(variables["params"]).items()}
  stats = {"/".join(p): v for p, v in flatten_dict(variables["batch_stats"]).items()}
  assert all(v.dtype == jnp.float32 for v in list(params.values()) + list(stats.values()))
  bn_params = [p for p in params if p.startswith("backbone/") and "bn" in p]
  if norm == "frozen_bn":  # frozen: scale, bias, mean, var all outside the trainable params
    assert not bn_params
    assert {p.rsplit("/", 1)[1] for p in stats} == {"scale", "bias", "mean", "var"}
  else:
    assert bn_params and {p.rsplit("/", 1)[1] for p in bn_params} == {"scale", "bias"}
    assert {p.rsplit("/", 1)[1] for p in stats} == {"mean", "var"}
  assert "transformer_decoder/query_embed/embedding" in params

  # Ground truth for "which leaves belong to a normalisation layer", from the module types.
  norm_paths = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm, FrozenBatchNorm)):
      norm_paths.add("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  truth = {p for p in params if p.rsplit("/", 1)[0] in norm_paths}
  assert truth == {p for p in params if NORM_RE.search(p)}
  assert any("/gn/" in p for p in truth) and any("_norm/" in p for p in truth)


def test_dropout_only_in_train_mode_and_frozen_bn_stays_frozen():
  model, variables, apply = _model("transformer_encoder", "frozen_bn")
  x = images()
  eval1 = apply(variables, x, train=False)
  eval2 = apply(variables, x, train=False)
  np.testing.assert_array_equal(eval1["pred_logits"], eval2["pred_logits"])
  tr1, upd = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(1)})
  tr2, _ = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)})
  assert np.abs(tr1["pred_logits"] - eval1["pred_logits"]).max() > 1e-4
  assert np.abs(tr1["pred_logits"] - tr2["pred_logits"]).max() > 1e-4
  # Frozen BN: nothing is updated even in train mode.
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), upd["batch_stats"],
                                   variables["batch_stats"]))
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)


def test_trainable_bn_updates_running_stats_in_train_mode():
  model, variables, apply = _model("base", "bn")
  x = images() * 3 + 1
  out, upd = apply(variables, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(0)})
  for path in (("stem", "bn"), ("res5_1", "bn2")):
    old = variables["batch_stats"]["backbone"][path[0]][path[1]]
    new = upd["batch_stats"]["backbone"][path[0]][path[1]]
    assert np.abs(new["mean"] - old["mean"]).max() > 1e-3 and np.abs(new["var"] - old["var"]).max() > 1e-3
  assert out["pred_masks"].shape == (2, 8, 16, 24)


def test_normalised_padding_is_the_pixel_mean():
  """normalize_image with the content size zeroes the padding after normalising (the original's
  ImageList pads normalised images with 0); the content is untouched."""
  from maskformer_jax.models import normalize_image
  img = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3)).astype(np.uint8)
  plain = np.asarray(normalize_image(img))
  out = np.asarray(normalize_image(img, np.array([[5, 7], [8, 12]])))
  np.testing.assert_array_equal(out[0, :5, :7], plain[0, :5, :7])
  assert not out[0, 5:].any() and not out[0, :, 7:].any()
  np.testing.assert_array_equal(out[1], plain[1])
  assert np.abs(np.asarray(normalize_image(np.zeros((1, 1, 1, 3))))).min() > 1.5  # black is not the mean


def test_any_image_size_with_a_resnet_and_bad_shapes_fail_clearly():
  """A ResNet MaskFormer runs at any size, as the original (stride-2 layers round up)."""
  model, variables, _ = _model("base", "bn")
  out = jax.eval_shape(lambda x: model.apply(variables, x), jnp.zeros((1, 50, 77, 3)))
  assert out["pred_masks"].shape[2:] == (13, 20)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((1, 3, 64, 64)))


@pytest.mark.parametrize("key,value,match", [
    ("resnet_depth", 152, "resnet_depth"), ("backbone_norm", "sync_bn", "backbone_norm"),
    ("pixel_decoder", "msdeform", "pixel_decoder"), ("dtype", "float16", "dtype"),
    ("conv_dim", 48, "conv_dim"), ("num_heads", 5, "hidden_dim"), ("backbone", "vit", "backbone"),
    ("swin_num_heads", (1, 1, 2), "swin_depths"), ("swin_num_heads", (1, 3, 2, 2), "swin_embed_dim"),
    ("swin_window_size", 0, "swin_window_size"), ("resnet_blocks", (2, 2, 2), "resnet_blocks"),
    ("resnet_channels", (32, 64, 128), "resnet_channels")])
def test_validate_rejects_bad_model_config(key, value, match):
  """Model mistakes are caught by config.validate, before anything is built or traced."""
  c = load_config("coco_panoptic", "backbone=swin_t,runlocal" if key.startswith("swin") else "runlocal")
  c.model[key] = value
  with pytest.raises(ValueError, match=f"config.model.{match}"):
    config_lib.validate(c, num_devices=8, num_processes=1)


def test_normalize_image():
  img = np.array([[[[123.675, 116.28, 103.53], [255, 0, 0]]]], np.float32)
  out = normalize_image(img.astype(np.uint8))
  assert out.dtype == jnp.float32 and out.shape == (1, 1, 2, 3)
  np.testing.assert_allclose(out[0, 0, 1], [(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375],
                             rtol=1e-6)
  np.testing.assert_allclose(normalize_image(img)[0, 0, 0], 0.0, atol=1e-6)


@pytest.mark.parametrize("h,w,feats", [(4, 6, 16), (7, 3, 64)])
def test_sine_position_embedding_matches_hf(h, w, feats):
  ref = MaskFormerSinePositionEmbedding(num_position_features=feats, normalize=True)(
      torch.Size([1, 2 * feats, h, w]), "cpu", torch.float32)
  ref = ref.flatten(2).transpose(1, 2)[0].numpy()
  np.testing.assert_allclose(sine_position_embedding(h, w, feats), ref, atol=1e-6)


@pytest.mark.parametrize("src,dst", [((4, 6), (8, 12)), ((3, 5), (7, 11)), ((5, 4), (8, 9))])
def test_upsample_nearest_matches_torch(src, dst):
  x = np.random.default_rng(0).standard_normal((1, *src, 2)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="nearest")
  np.testing.assert_array_equal(upsample_nearest(jnp.asarray(x), dst), ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.slow
def test_bfloat16_forward_is_finite_and_close_to_float32():
  """R50 (bottlenecks 3-4-6-3, reduced width 16) + "+6 Enc" in bfloat16 vs float32, same float32 params.

  Tolerance: bfloat16 keeps 8 mantissa bits (relative rounding ~4e-3); through ~60 layers the errors
  compound. Measured (2026-11, CPU): max-abs-diff 1.3% (class logits) and 3.9% (mask logits) of the
  largest |f32 output|, mean-abs-diff 0.2% / 0.7%, correlation > 0.999. We require max-abs-diff
  <= 0.1 x max|f32|, mean-abs-diff <= 0.02 x max|f32| and correlation >= 0.995 for both outputs.
  (Argmax agreement is not a useful criterion here: randomly initialised queries have near-tied
  logits, top-2 margins ~0.01.)
  """
  c = load_config("coco_panoptic").model
  c.resnet_width, c.conv_dim, c.mask_dim, c.hidden_dim, c.dim_feedforward = 16, 64, 64, 64, 128
  c.num_queries, c.pixel_encoder_layers = 20, 2
  f32 = build_model(c)
  c.dtype = "bfloat16"
  bf16 = build_model(c)
  x = images(2, 64, 96, seed=3)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))  # float32 params in bf16 mode
  variables = host_variables(bf16, x.shape)
  ref = jax.jit(f32.apply)(variables, x)
  out = jax.jit(bf16.apply)(variables, x)
  for key in ("pred_logits", "pred_masks"):
    a, b = np.asarray(out[key]), np.asarray(ref[key])
    assert out[key].dtype == jnp.float32 and np.isfinite(a).all()
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 0.1 * scale, (key, np.abs(a - b).max(), scale)
    assert np.abs(a - b).mean() <= 0.02 * scale, (key, np.abs(a - b).mean(), scale)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.995, key


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_remat_keeps_names_outputs_and_gradients(backbone):
  """config.model.remat recomputes activations in the backward pass: the same variables (so
  checkpoints and converters are unaffected), and the same outputs and gradients in train mode."""
  overrides = dict(pixel_decoder="transformer_encoder", backbone_norm="frozen_bn", dropout=0.0)
  if backbone == "swin":  # a tiny Swin: 2 blocks in the first stage, window 2 with a shift
    overrides.update(backbone="swin", swin_embed_dim=16, swin_depths=(2, 1, 1, 1),
                     swin_num_heads=(1, 1, 1, 1), swin_window_size=2, drop_path_rate=0.0)
  plain, remat = build_model(tiny(**overrides)), build_model(tiny(remat=True, **overrides))
  variables = host_variables(plain)
  assert (jax.tree.map(jnp.shape, jax.eval_shape(remat.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
          == jax.tree.map(jnp.shape, variables))
  x = images(h=64, w=64)

  def loss(params, model):
    out = model.apply({**variables, "params": params}, x, train=True)
    return jnp.sum(out["pred_masks"] ** 2) + sum(jnp.sum(a["pred_logits"]) for a in out["aux_outputs"])

  grad_plain = jax.jit(jax.grad(functools.partial(loss, model=plain)))(variables["params"])
  fn = jax.jit(jax.grad(functools.partial(loss, model=remat)))
  assert "remat" in str(jax.make_jaxpr(fn)(variables["params"]))  # the recomputation is really there
  grad_remat = fn(variables["params"])
  flat_p, flat_r = flatten_dict(grad_plain, sep="/"), flatten_dict(grad_remat, sep="/")
  assert flat_p.keys() == flat_r.keys()
  scale = max(float(np.abs(g).max()) for g in flat_p.values())
  for k in flat_p:  # per leaf, relative to its norm; gradients that are 0 in exact arithmetic (e.g. a key
    # bias under softmax) are float noise on both sides, held to the whole gradient's scale
    diff = float(np.linalg.norm(flat_r[k] - flat_p[k]))
    assert diff <= 1e-4 * float(np.linalg.norm(flat_p[k])) + 1e-6 * scale, (k, diff)


@pytest.mark.parametrize("kernel,stride,h,w", [(1, 1, 9, 7), (1, 2, 9, 7), (1, 2, 8, 8), (3, 2, 9, 7)])
def test_conv_runs_1x1_as_a_matmul_with_the_same_result(kernel, stride, h, w):
  """models/conv.Conv: nn.Conv's parameters, and its output to float rounding, with the 1x1 case
  computed as a (strided) matmul; other kernels go to the convolution."""
  from maskformer_jax.models.conv import Conv
  pad = kernel // 2
  kwargs = dict(features=5, kernel_size=(kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, h, w, 4)), jnp.float32)
  ours, ref = Conv(**kwargs), nn.Conv(**kwargs)
  v = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(ours.apply)(v, x))
  assert ("conv_general_dilated" in jaxpr) == (kernel != 1)
