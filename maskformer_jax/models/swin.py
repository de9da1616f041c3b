"""Swin Transformer backbone as MaskFormer's detectron2 code uses it, NHWC (docs/reference.md section 11).

What makes it MaskFormer's Swin rather than the classification one:
- Each stage's features are its last block's output BEFORE patch merging, through a per-stage LayerNorm
  (`norm0..norm3`); there is no final norm and no head.
- Any input whose sides are multiples of 32: a block pads its (normalised) tokens with zeros at the
  bottom/right to a multiple of the window AFTER `norm1`, and builds the shift mask (-100 between
  regions) on that padded size. Odd blocks always shift by window // 2, even when a stage is no larger
  than the window (plain HF Swin and timm clamp the window and drop the shift there).
- Patch merging concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], then norm,
  then a bias-free reduction.
- q is scaled by head_dim ** -0.5 before q.k (HF scales the product; a last-bit difference).

Variables follow the official release names (`patch_embed/{proj,norm}`, `layers_{s}/blocks_{b}/{norm1,
attn/{qkv, proj, relative_position_bias_table}, norm2, mlp/{fc1, fc2}}`, `layers_{s}/downsample/
{norm, reduction}`, `norm{s}`), so converters are renames plus transposes. Windows are batched with static
shapes: [B, windows, tokens, C], the shift mask a trace-time constant.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models.conv import Conv

# The published variants (docs/reference.md section 1): embed dim, depths, heads, window.
SWIN_VARIANTS = {
    "swin_t": dict(swin_embed_dim=96, swin_depths=(2, 2, 6, 2), swin_num_heads=(3, 6, 12, 24),
                   swin_window_size=7),
    "swin_s": dict(swin_embed_dim=96, swin_depths=(2, 2, 18, 2), swin_num_heads=(3, 6, 12, 24),
                   swin_window_size=7),
    "swin_b": dict(swin_embed_dim=128, swin_depths=(2, 2, 18, 2), swin_num_heads=(4, 8, 16, 32),
                   swin_window_size=12),
    "swin_l": dict(swin_embed_dim=192, swin_depths=(2, 2, 18, 2), swin_num_heads=(6, 12, 24, 48),
                   swin_window_size=12),
}
LN_EPS = 1e-5  # torch nn.LayerNorm's default, used by every norm of the original
_dense_init = nn.initializers.truncated_normal(0.02)  # the original's trunc_normal_(std=.02), biases 0


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the (2w-1)^2-row bias table for each (query, key) pair in a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[windows, w*w, w*w] additive mask (0 or -100) of a cyclically shifted (height, width) map: tokens
  of different regions (rolled in from the other side) must not attend to each other."""
  def regions(n):
    r = np.zeros(n, np.int64)
    r[n - window:] += 1
    r[n - shift:] += 1
    return r
  ids = regions(height)[:, None] * 3 + regions(width)[None, :]
  ids = ids.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
  ids = ids.reshape(-1, window * window)
  return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


def to_windows(x, window):
  """[B, H, W, C] -> [B, H/w * W/w, w*w, C] (row-major over windows, then within a window)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def from_windows(x, window, h, w):
  b, _, _, c = x.shape
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class DropPath(nn.Module):
  """Stochastic depth: zero a whole residual branch per example with probability `rate` (training)."""
  rate: float

  @nn.compact
  def __call__(self, x, train):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class WindowAttention(nn.Module):
  """Multi-head self-attention inside each window, with a learned relative position bias."""
  dim: int
  num_heads: int
  window: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    b, nw, n, c = x.shape
    head = c // self.num_heads
    qkv = _dense(3 * c, self.dtype, "qkv")(x).reshape(b, nw, n, 3, self.num_heads, head)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [B, nW, N, heads, hd]
    q = q * jnp.asarray(head ** -0.5, q.dtype)
    table = self.param("relative_position_bias_table", _dense_init,
                       ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, self.num_heads)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32) + bias.transpose(2, 0, 1)
    if mask is not None:
      logits = logits + mask[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, c)
    return _dense(c, self.dtype, "proj")(out)


class SwinBlock(nn.Module):
  """Pre-norm block: (shifted) window attention, then the MLP, each a residual with stochastic depth."""
  dim: int
  num_heads: int
  window: int
  shift: int
  drop_path: float
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    _, h, w, c = x.shape
    ws, shift = self.window, self.shift
    y = _layer_norm(self.dtype, "norm1")(x)
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))  # after the norm: padding stays zero
    mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = jnp.asarray(shift_mask(hp, wp, ws, shift))
    y = WindowAttention(c, self.num_heads, ws, self.dtype, name="attn")(to_windows(y, ws), mask)
    y = from_windows(y, ws, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + DropPath(self.drop_path)(y[:, :h, :w], train)
    y = _layer_norm(self.dtype, "norm2")(x)
    y = _Mlp(int(c * self.mlp_ratio), c, self.dtype, name="mlp")(y)
    return x + DropPath(self.drop_path)(y, train)


class _Mlp(nn.Module):
  hidden: int
  out: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)  # torch nn.GELU (erf)
    return _dense(self.out, self.dtype, "fc2")(x)


class PatchMerging(nn.Module):
  """2x2 neighbourhoods -> channels (the original's order), LayerNorm, bias-free 4C -> 2C reduction."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = _layer_norm(self.dtype, "norm")(x)
    return _dense(2 * c, self.dtype, "reduction", use_bias=False)(x)


class _Stage(nn.Module):
  dim: int
  depth: int
  num_heads: int
  window: int
  drop_paths: tuple
  mlp_ratio: float
  downsample: bool
  dtype: Any
  remat: bool = False

  @nn.compact
  def __call__(self, x, train):
    block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock  # `train` is static
    for i in range(self.depth):
      x = block(self.dim, self.num_heads, self.window, 0 if i % 2 == 0 else self.window // 2,
                    self.drop_paths[i], self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x, train)
    merged = PatchMerging(self.dtype, name="downsample")(x) if self.downsample else None
    return x, merged


class _PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> embed_dim (a strided conv), then LayerNorm (patch_norm on)."""
  embed_dim: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="proj")(x)
    return _layer_norm(self.dtype, "norm")(x)


class SwinTransformer(nn.Module):
  """Returns {'res2': stride 4, ..., 'res5': stride 32} (NHWC, compute dtype), channels embed_dim * 2^s."""
  embed_dim: int = 96
  depths: tuple = (2, 2, 6, 2)
  num_heads: tuple = (3, 6, 12, 24)
  window: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.3
  patch_size: int = 4
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[1] % 32 or x.shape[2] % 32:  # patch 4, then three 2x2 merges (the ResNet takes any size)
      raise ValueError(f"a Swin backbone needs image height and width that are multiples of 32; got "
                       f"{x.shape[1]}x{x.shape[2]}: pad the images (bottom/right) to the next multiple of "
                       f"32, as the data pipeline does.")
    x = _PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name="patch_embed")(x.astype(self.dtype))
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()  # grows with depth
    out, start = {}, 0
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      last = s == len(self.depths) - 1
      features, merged = _Stage(self.embed_dim * 2 ** s, depth, heads, self.window,
                                tuple(rates[start:start + depth]), self.mlp_ratio, not last, self.dtype,
                                self.remat, name=f"layers_{s}")(x, train)
      start += depth
      out[f"res{s + 2}"] = _layer_norm(self.dtype, f"norm{s}")(features)
      x = merged
    return out


def swin(cfg, dtype, name):
  """config.model.backbone = 'swin': reads swin_embed_dim, swin_depths, swin_num_heads,
  swin_window_size, drop_path_rate and remat."""
  return SwinTransformer(int(cfg.swin_embed_dim), tuple(cfg.swin_depths), tuple(cfg.swin_num_heads),
                         int(cfg.swin_window_size), 4.0, float(cfg.drop_path_rate), 4, dtype,
                         bool(cfg.remat), name=name)
