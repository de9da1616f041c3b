"""Mask2Former's pixel decoder: multi-scale deformable attention over res5..res3, then an FPN to res2.

`ms_deform_attn` is the sampling core (Deformable DETR's MSDeformAttn without projections): every query
reads `num_points` bilinear samples per head and level, exactly as torch's `grid_sample(mode='bilinear',
padding_mode='zeros', align_corners=False)` would, and sums them with its attention weights. It is a
pure function of static shapes (no host code, no custom kernel), so jit, grad and vmap apply as usual.

`MSDeformPixelDecoder` returns what Hugging Face's `Mask2FormerPixelDecoder` returns (in NHWC):
`mask_features` at stride 4 and the encoder's three maps, lowest resolution first (res5, res4, res3),
which the masked-attention decoder visits round-robin (docs/reference.md section 12).

Variables (`convert/hf_mask2former.py` maps them onto HF's names): `input_proj_{0,1,2}` (1x1 conv with
bias + `gn`; 0 is res5, HF's order), `level_embed` [3, C], `encoder_layer_{i}` (`self_attn/
{sampling_offsets, attention_weights, value_proj, output_proj}`, `self_attn_norm`, `ffn/fc1`, `ffn/fc2`,
`ffn_norm`), `res2_lateral` and `res2_output` (conv + `gn`, as the MaskFormer FPN), `mask_features`.

Sampling locations and attention weights are computed in float32 whatever the compute dtype: a bfloat16
location on a 64-pixel map may be off by an eighth of a pixel (HF computes them in the model's dtype).
"""
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models.conv import Conv
from maskformer_jax.models.pixel_decoder import GN_EPS, GN_GROUPS, ConvGN
from maskformer_jax.models.transformer_decoder import FFN, LN_EPS, sine_position_embedding

METHODS = ("gather", "matmul")
_xavier = nn.initializers.xavier_uniform()
_c2_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # detectron2's c2_xavier_fill


def _check_shapes(value, spatial_shapes, sampling_locations, attention_weights):
  b, s, nh, _ = value.shape
  if sum(h * w for h, w in spatial_shapes) != s:
    raise ValueError(f"value has {s} positions but spatial_shapes {tuple(spatial_shapes)} sum to "
                     f"{sum(h * w for h, w in spatial_shapes)}.")
  lead = (b, sampling_locations.shape[1], nh, len(spatial_shapes))
  if sampling_locations.shape[:4] != lead or sampling_locations.shape[-1] != 2:
    raise ValueError(f"sampling_locations must be [B, Q, heads, levels, points, 2] = {lead + ('P', 2)}; "
                     f"got {sampling_locations.shape}.")
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"attention_weights {attention_weights.shape} must be sampling_locations' shape "
                     f"without the last axis, {sampling_locations.shape[:-1]}.")


def _pixel_coords(sampling_locations, spatial_shapes):
  """[0, 1] (x, y) -> pixel coordinates with pixel centres on integers (align_corners=False)."""
  size = np.array([[w, h] for h, w in spatial_shapes], np.float32)[:, None, :]  # [L, 1, 2]
  return sampling_locations.astype(jnp.float32) * size - 0.5


def _sample_gather(value, spatial_shapes, sampling_locations, attention_weights):
  """Four corners of every sample as indices into the flattened levels, read and summed one corner
  sample at a time.

  A single gather of all Q x levels x points x 4 rows materialises [B, Q, heads, 4LP, D] (264 MB a layer
  at 512x512, batch 2), kept for the backward pass and transposed for the weighted sum; the scan over
  the 4LP corner samples, rematerialised, keeps only the [B, Q, heads, D] sum and rereads rows in the
  backward pass: ~2x faster with the backward pass on CPU and ~14x less temporary memory
  (docs/benchmarks.md, "Deformable-attention sampling")."""
  b, s, nh, d = value.shape
  q, nl, npt = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
  pix = _pixel_coords(sampling_locations, spatial_shapes)  # [B, Q, nh, L, P, 2]
  corner = jnp.floor(pix)
  frac = pix - corner  # the only path a gradient w.r.t. the location takes
  corner = corner.astype(jnp.int32)
  dx, dy = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])  # corners (x0,y0) (x1,y0) (x0,y1) (x1,y1)
  x, y = corner[..., 0, None] + dx, corner[..., 1, None] + dy  # [B, Q, nh, L, P, 4]
  fx, fy = frac[..., 0, None], frac[..., 1, None]
  weight = jnp.where(dx, fx, 1 - fx) * jnp.where(dy, fy, 1 - fy)
  hs = np.array([h for h, _ in spatial_shapes])[:, None, None]  # [L, 1, 1] against [..., L, P, 4]
  ws = np.array([w for _, w in spatial_shapes])[:, None, None]
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]])[:, None, None]
  inside = (x >= 0) & (x < ws) & (y >= 0) & (y < hs)  # zero padding: outside corners weigh nothing
  index = starts + jnp.clip(y, 0, hs - 1) * ws + jnp.clip(x, 0, ws - 1)
  weight = jnp.where(inside, weight, 0.0) * attention_weights.astype(jnp.float32)[..., None]
  k = nl * npt * 4
  # Rows of one image and head, vmapped over heads and images: the gather then carries the batch as a
  # batching dimension, which the partitioner keeps sharded over 'data'. Indexing the batch with
  # arange(B) instead made the TPU compiler all-gather every layer's value map across the data axis
  # (tests/test_tpu_compile.py).
  rows_of = jax.vmap(jax.vmap(lambda v, i: v.at[i].get(mode="promise_in_bounds"), in_axes=(1, 1), out_axes=1))

  @jax.checkpoint
  def add_sample(total, sample):  # one corner sample of every (image, query, head): [B, Q, nh] each
    idx, wgt = sample
    rows = rows_of(value, idx)  # [B, Q, nh, D]
    return total + wgt[..., None] * rows.astype(jnp.float32), None

  out, _ = jax.lax.scan(add_sample, jnp.zeros((b, q, nh, d), jnp.float32),
                        (jnp.moveaxis(index.reshape(b, q, nh, k), 3, 0),
                         jnp.moveaxis(weight.reshape(b, q, nh, k), 3, 0)))
  return out.reshape(b, q, nh * d)


def _sample_matmul(value, spatial_shapes, sampling_locations, attention_weights):
  """Per level, a dense [Q, H*W] matrix of attention x bilinear weights times the value map.

  The bilinear weight of pixel i for coordinate c is the tent max(0, 1 - |c - i|); pixels outside the
  map simply have no column, which is the zero padding.
  """
  b, s, nh, d = value.shape
  q = sampling_locations.shape[1]
  pix = _pixel_coords(sampling_locations, spatial_shapes)
  attn = attention_weights.astype(jnp.float32)
  out, start = 0.0, 0
  for level, (h, w) in enumerate(spatial_shapes):
    ty = nn.relu(1 - jnp.abs(pix[:, :, :, level, :, 1, None] - np.arange(h, dtype=np.float32)))
    tx = nn.relu(1 - jnp.abs(pix[:, :, :, level, :, 0, None] - np.arange(w, dtype=np.float32)))
    a = jnp.einsum("bqnp,bqnpi,bqnpj->bnqij", attn[:, :, :, level], ty, tx).reshape(b, nh, q, h * w)
    out = out + jnp.einsum("bnqs,bsnd->bqnd", a, value[:, start:start + h * w],
                           preferred_element_type=jnp.float32)
    start += h * w
  return out.reshape(b, q, nh * d)


def ms_deform_attn(value, spatial_shapes: Sequence[tuple[int, int]], sampling_locations, attention_weights,
                   method: str = "gather"):
  """Attention-weighted bilinear samples of multi-scale values (HF's `multi_scale_deformable_attention`).

  value [B, S, heads, D] (the levels' H*W maps flattened row-major and concatenated in the order of
  `spatial_shapes`, a static sequence of (H, W)); sampling_locations [B, Q, heads, levels, points, 2]
  as (x, y) in [0, 1] of each level (outside samples read zeros); attention_weights [B, Q, heads,
  levels, points]. Returns [B, Q, heads * D] in value's dtype, accumulated in float32.

  method='gather' (the default) reads four corners per sample by gathers: memory and work grow with
  Q * levels * points, as in the CUDA kernel. 'matmul' builds each level's dense [Q, H*W] weight
  matrix and multiplies: no gather or scatter (which TPUs handle poorly), but quadratic in the map size
  (a 512x512 image: ~0.9 GB of weights per image), so only for small maps or gather-hostile hardware.
  On a 2-core CPU the gathers are much faster, with or without the backward pass
  (`python -m maskformer_jax.bench.msdeform`, docs/benchmarks.md).
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  if method == "gather":
    out = _sample_gather(value, spatial_shapes, sampling_locations, attention_weights)
  elif method == "matmul":
    out = _sample_matmul(value, spatial_shapes, sampling_locations, attention_weights)
  else:
    raise ValueError(f"method={method!r}; expected one of {METHODS}.")
  return out.astype(value.dtype)


def _offset_bias_init(num_heads, num_levels, num_points):
  """Deformable DETR's start: head k looks along angle 2*pi*k/heads, point p at p+1 pixels (L-inf)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(num_heads) * (2 * math.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = grid[:, None, None, :] * np.arange(1, num_points + 1)[None, None, :, None]
    grid = np.broadcast_to(grid, (num_heads, num_levels, num_points, 2))
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


def reference_points(spatial_shapes, valid_ratios=None):
  """Every position's pixel centre ((j+0.5)/W, (i+0.5)/H) on each level: [B or 1, S, levels, 2].

  With valid_ratios [B, levels, 2] ((w, h) fraction of each map that is not padding) the centres are
  taken relative to the valid part and then mapped into every level, as HF/Deformable DETR; None
  means no padding (all ones), which is what HF's Mask2Former always uses.
  """
  pts = []
  for h, w in spatial_shapes:
    y, x = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5,
                       indexing="ij")
    pts.append(np.stack([x.reshape(-1) / w, y.reshape(-1) / h], -1))
  ref = jnp.asarray(np.concatenate(pts))[None]  # [1, S, 2]
  if valid_ratios is None:
    return jnp.broadcast_to(ref[:, :, None], (1, ref.shape[1], len(spatial_shapes), 2))
  level = np.repeat(np.arange(len(spatial_shapes)), [h * w for h, w in spatial_shapes])
  ref = ref / valid_ratios[:, level]  # each position over its own level's valid ratio
  return ref[:, :, None] * valid_ratios[:, None]


class MSDeformAttention(nn.Module):
  """Multi-scale deformable attention: projections around `ms_deform_attn` (HF's layer of that name)."""
  dim: int = 256
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  method: str = "gather"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, value, reference_points, spatial_shapes):
    """query [B, Q, C] (position embedding added), value [B, S, C], reference_points [B, Q, levels, 2]."""
    if self.dim % self.num_heads:
      raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}.")
    if len(spatial_shapes) != self.num_levels:
      raise ValueError(f"{len(spatial_shapes)} spatial shapes for num_levels={self.num_levels}.")
    b, q, _ = query.shape
    nh, nl, npt = self.num_heads, self.num_levels, self.num_points
    zeros = nn.initializers.zeros
    v = nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, param_dtype=jnp.float32,
                 name="value_proj")(value)
    v = v.reshape(b, value.shape[1], nh, self.dim // nh)
    q32 = query.astype(jnp.float32)  # locations need sub-pixel accuracy: float32 whatever the dtype
    offsets = nn.Dense(nh * nl * npt * 2, kernel_init=zeros, bias_init=_offset_bias_init(nh, nl, npt),
                       dtype=jnp.float32, param_dtype=jnp.float32, name="sampling_offsets")(q32)
    logits = nn.Dense(nh * nl * npt, kernel_init=zeros, bias_init=zeros, dtype=jnp.float32,
                      param_dtype=jnp.float32, name="attention_weights")(q32)
    attn = nn.softmax(logits.reshape(b, q, nh, nl * npt), axis=-1).reshape(b, q, nh, nl, npt)
    # offsets are in pixels of each level: divide by its (W, H)
    size = np.array([[w, h] for h, w in spatial_shapes], np.float32)
    loc = (jnp.asarray(reference_points, jnp.float32)[:, :, None, :, None, :]
           + offsets.reshape(b, q, nh, nl, npt, 2) / size[:, None, :])
    out = ms_deform_attn(v, spatial_shapes, loc, attn, self.method)
    return nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, param_dtype=jnp.float32,
                    name="output_proj")(out)


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class MSDeformEncoderLayer(nn.Module):
  """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN (no dropout)."""
  dim: int = 256
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  dim_feedforward: int = 1024
  method: str = "gather"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, reference_points, spatial_shapes):
    y = MSDeformAttention(self.dim, self.num_heads, self.num_levels, self.num_points, self.method, self.dtype,
                          name="self_attn")(x + pos, x, reference_points, spatial_shapes)
    x = _layer_norm(self.dtype, "self_attn_norm")(x + y)
    y = FFN(self.dim, self.dim_feedforward, 0.0, self.dtype, name="ffn")(x)
    return _layer_norm(self.dtype, "ffn_norm")(x + y)


class InputProj(nn.Module):
  """1x1 conv (with bias) + GroupNorm(32): the encoder's input projection of one level."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.features, (1, 1), kernel_init=_xavier, dtype=self.dtype, param_dtype=jnp.float32,
             name="conv")(x)
    return nn.GroupNorm(GN_GROUPS, epsilon=GN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="gn")(x)


def _bilinear_matrix(out_len: int, in_len: int) -> np.ndarray:
  """[out, in] weights of torch's bilinear resize along one axis (align_corners=False, no antialias)."""
  src = np.maximum((np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), in_len - 1)
  i1 = np.minimum(i0 + 1, in_len - 1)
  frac = src - i0
  m = np.zeros((out_len, in_len), np.float64)
  np.add.at(m, (np.arange(out_len), i0), 1 - frac)
  np.add.at(m, (np.arange(out_len), i1), frac)
  return m.astype(np.float32)


def resize_bilinear(x, size):
  """torch `F.interpolate(x, size, mode='bilinear', align_corners=False)` for NHWC, static sizes."""
  my = jnp.asarray(_bilinear_matrix(size[0], x.shape[1]), x.dtype)
  mx = jnp.asarray(_bilinear_matrix(size[1], x.shape[2]), x.dtype)
  return jnp.einsum("oh,pw,bhwc->bopc", my, mx, x)


class MSDeformPixelDecoder(nn.Module):
  """Mask2Former's MSDeformAttnPixelDecoder; `__call__(feats)` with feats {'res2'..'res5'} NHWC.

  Returns (mask_features [B, H/4, W/4, mask_dim], (res5, res4, res3) encoder outputs, conv_dim each).
  The encoder reads the three coarsest levels; each finer level down to `common_stride` gets an FPN
  step (lateral 1x1 conv + bilinearly upsampled coarser map, then a 3x3 conv), as HF.
  """
  conv_dim: int = 256
  mask_dim: int = 256
  encoder_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  dim_feedforward: int = 1024
  common_stride: int = 4
  method: str = "gather"
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each encoder layer's activations in the backward pass

  @nn.compact
  def __call__(self, feats, train: bool = False):
    del train  # no dropout, no batch statistics
    levels = ("res5", "res4", "res3")  # encoder levels, HF's order (highest stride first)
    c = self.conv_dim
    srcs, pos, shapes = [], [], []
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (len(levels), c), jnp.float32)
    for i, name in enumerate(levels):
      x = InputProj(c, self.dtype, name=f"input_proj_{i}")(feats[name].astype(self.dtype))
      b, h, w, _ = x.shape
      srcs.append(x.reshape(b, h * w, c))
      shapes.append((h, w))
      pos.append(jnp.asarray(sine_position_embedding(h, w, c // 2)) + level_embed[i])
    shapes = tuple(shapes)
    x = jnp.concatenate(srcs, axis=1)
    pos = jnp.concatenate(pos)[None].astype(self.dtype)
    ref = reference_points(shapes)
    layer = nn.remat(MSDeformEncoderLayer, static_argnums=(4,)) if self.remat else MSDeformEncoderLayer
    for i in range(self.encoder_layers):
      x = layer(c, self.num_heads, len(levels), self.num_points, self.dim_feedforward, self.method, self.dtype,
                name=f"encoder_layer_{i}")(x, pos, ref, shapes)
    splits = np.cumsum([h * w for h, w in shapes[:-1]])
    outs = tuple(t.reshape(b, h, w, c) for t, (h, w) in zip(jnp.split(x, splits, axis=1), shapes))
    y = outs[-1]
    finest = int(math.log2(self.common_stride))
    for k in range(int(levels[-1][3:]) - 1, finest - 1, -1):  # res2 for common_stride 4
      lateral = ConvGN(c, 1, False, self.dtype, name=f"res{k}_lateral")(feats[f"res{k}"].astype(self.dtype))
      y = ConvGN(c, 3, True, self.dtype, name=f"res{k}_output")(lateral + resize_bilinear(y, lateral.shape[1:3]))
    mask_features = Conv(self.mask_dim, (1, 1), kernel_init=_c2_xavier, dtype=self.dtype,
                         param_dtype=jnp.float32, name="mask_features")(y)
    return mask_features, outs
