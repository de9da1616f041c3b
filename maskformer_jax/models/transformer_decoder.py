"""The transformer pieces: sine position encoding, post-norm DETR layers, and the query decoder.

Follows the original `TransformerPredictor` (a DETR transformer with 0 encoder layers): learned queries
serve as the query position embedding, the target starts at zeros, memory gets a sine position
embedding, and one shared LayerNorm (`decoder_norm`) is applied to *every* layer's output that goes to
the heads (the un-normalised output feeds the next layer). Dropout follows torch's
`nn.MultiheadAttention`/DETR: on attention weights, after the FFN activation, and on each residual
branch; it is active only with `train=True` and `rngs={'dropout': key}`.

Attention softmax and LayerNorm statistics run in float32 whatever the compute dtype.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from maskformer_jax.models.conv import Conv

LN_EPS = 1e-5  # torch default (flax's is 1e-6)
_xavier = nn.initializers.xavier_uniform()  # DETR's _reset_parameters


def sine_position_embedding(height: int, width: int, num_pos_feats: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> np.ndarray:
  """DETR's PositionEmbeddingSine(normalize=True) for an unpadded map: [H*W, 2*num_pos_feats].

  Channels are (y sin/cos interleaved, then x). Computed in numpy: it depends only on static shapes.
  """
  eps = 1e-6
  y = np.arange(1, height + 1, dtype=np.float32) / (height + eps) * scale
  x = np.arange(1, width + 1, dtype=np.float32) / (width + eps) * scale
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)

  def enc(v):  # [n] -> [n, num_pos_feats]: sin on even, cos on odd channels, interleaved
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(v), -1)

  py = np.broadcast_to(enc(y)[:, None, :], (height, width, num_pos_feats))
  px = np.broadcast_to(enc(x)[None, :, :], (height, width, num_pos_feats))
  return np.concatenate([py, px], axis=-1).reshape(height * width, 2 * num_pos_feats).astype(np.float32)


def _dense(features, dtype, name, init=_xavier):
  return nn.Dense(features, kernel_init=init, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """Multi-head attention with separate q/k/v/out projections (as HF's DETR; torch packs q/k/v)."""
  dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, train: bool = False):
    if self.dim % self.num_heads:
      raise ValueError(f"hidden size {self.dim} is not divisible by num_heads={self.num_heads}.")
    h, d = self.num_heads, self.dim // self.num_heads
    zeros = nn.initializers.zeros
    q = nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, name="q_proj")(q)
    k = nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, name="k_proj")(k)
    v = nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, name="v_proj")(v)
    q = q.reshape(*q.shape[:-1], h, d)
    k = k.reshape(*k.shape[:-1], h, d)
    v = v.reshape(*v.shape[:-1], h, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    weights = nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*q.shape[:-2], self.dim)
    return nn.Dense(self.dim, kernel_init=_xavier, bias_init=zeros, dtype=self.dtype, name="out_proj")(out)


class FFN(nn.Module):
  """Linear-ReLU-dropout-Linear (DETR's linear1/linear2)."""
  dim: int
  hidden: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_dense(self.hidden, self.dtype, "fc1")(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return _dense(self.dim, self.dtype, "fc2")(y)


class EncoderLayer(nn.Module):
  """Post-norm DETR encoder layer (`forward_post`): position added to queries and keys only."""
  dim: int
  num_heads: int
  dim_feedforward: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, train: bool = False):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    qk = x + pos
    y = Attention(self.dim, self.num_heads, self.dropout, self.dtype, name="self_attn")(qk, qk, x, train)
    x = _layer_norm(self.dtype, "self_attn_norm")(x + drop(y))
    y = FFN(self.dim, self.dim_feedforward, self.dropout, self.dtype, name="ffn")(x, train)
    return _layer_norm(self.dtype, "ffn_norm")(x + drop(y))


class DecoderLayer(nn.Module):
  """Post-norm DETR decoder layer: self-attention, cross-attention to memory, FFN."""
  dim: int
  num_heads: int
  dim_feedforward: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, memory_pos, train: bool = False):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    qk = tgt + query_pos
    y = Attention(self.dim, self.num_heads, self.dropout, self.dtype, name="self_attn")(qk, qk, tgt, train)
    tgt = _layer_norm(self.dtype, "self_attn_norm")(tgt + drop(y))
    y = Attention(self.dim, self.num_heads, self.dropout, self.dtype, name="cross_attn")(
        tgt + query_pos, memory + memory_pos, memory, train)
    tgt = _layer_norm(self.dtype, "cross_attn_norm")(tgt + drop(y))
    y = FFN(self.dim, self.dim_feedforward, self.dropout, self.dtype, name="ffn")(tgt, train)
    return _layer_norm(self.dtype, "ffn_norm")(tgt + drop(y))


class TransformerDecoder(nn.Module):
  """Queries attending to an image feature map; returns [L, B, Q, hidden] normalised outputs.

  `input_proj` (1x1 conv) exists when the memory's channels differ from `hidden_dim` or when
  `enforce_input_proj`; the sine embedding uses hidden_dim // 2 features per axis (original N_steps).
  """
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  num_layers: int = 6
  dropout: float = 0.1
  enforce_input_proj: bool = False
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, features, train: bool = False):
    b, h, w, c = features.shape
    x = features.astype(self.dtype)
    if c != self.hidden_dim or self.enforce_input_proj:
      # detectron2's c2_xavier_fill: kaiming uniform with a=1, zero bias.
      x = Conv(self.hidden_dim, (1, 1), kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                  dtype=self.dtype, param_dtype=jnp.float32, name="input_proj")(x)
    memory = x.reshape(b, h * w, self.hidden_dim)
    pos = jnp.asarray(sine_position_embedding(h, w, self.hidden_dim // 2), self.dtype)[None]
    query_pos = nn.Embed(self.num_queries, self.hidden_dim, embedding_init=nn.initializers.normal(1.0),
                         param_dtype=jnp.float32, name="query_embed").embedding
    query_pos = jnp.broadcast_to(query_pos.astype(self.dtype)[None], (b, self.num_queries, self.hidden_dim))
    tgt = jnp.zeros_like(query_pos)
    norm = _layer_norm(self.dtype, "decoder_norm")  # shared by every intermediate output
    outs = []
    layer = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer  # `train` static
    for i in range(self.num_layers):
      tgt = layer(self.hidden_dim, self.num_heads, self.dim_feedforward, self.dropout, self.dtype,
                         name=f"layer_{i}")(tgt, query_pos, memory, pos, train)
      outs.append(norm(tgt))
    return jnp.stack(outs)
