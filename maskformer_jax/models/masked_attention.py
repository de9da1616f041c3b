"""Mask2Former's masked-attention transformer decoder, with its class and mask heads.

Learned query features (`query_feat`) are refined by `num_layers` post-norm layers, each masked
cross-attention -> self-attention -> FFN (no dropout), visiting the pixel decoder's three maps
round-robin, lowest resolution first. The heads (shared `decoder_norm`, `class_embed`, the 3-layer
`mask_embed` MLP dotted with the stride-4 mask features) run on the queries before layer 0 and after
every layer; each mask prediction, resized bilinearly (align_corners=False) to the next layer's map,
decides where that layer's queries may look: sigmoid < 0.5 is masked, and a query whose whole row is
masked looks everywhere instead (docs/reference.md section 12).

Attention logits, softmax and the attention masks are float32 whatever the compute dtype: the mask is a
threshold at 0, so a bfloat16 rounding of a near-zero logit would flip it.
"""
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.conv import Conv
from maskformer_jax.models.maskformer import MLP
from maskformer_jax.models.msdeform import resize_bilinear
from maskformer_jax.models.transformer_decoder import FFN, LN_EPS, sine_position_embedding

NUM_LEVELS = 3  # res5, res4, res3
# The original's q/k/v live in one packed [3C, C] nn.MultiheadAttention weight initialised with
# xavier_uniform over (C + 3C) fans; for a separate [C, C] kernel that is xavier with scale 1/2.
_packed_xavier = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
_xavier = nn.initializers.xavier_uniform()
_torch_linear = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # nn.Linear's default
_c2_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # detectron2's c2_xavier_fill


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def attention_mask(mask_logits, size: tuple[int, int]):
  """Where the next layer's queries may NOT attend: [B, Q, h*w] bool from mask logits [B, Q, H, W].

  The logits are resized to `size` (torch's bilinear, align_corners=False, no antialias) and masked
  where sigmoid < 0.5; a row masked everywhere is unmasked entirely (it would otherwise softmax over
  nothing). No gradient flows through the mask.
  """
  b, q = mask_logits.shape[:2]
  x = resize_bilinear(jax.lax.stop_gradient(mask_logits).astype(jnp.float32).transpose(0, 2, 3, 1), size)
  masked = (jax.nn.sigmoid(x) < 0.5).transpose(0, 3, 1, 2).reshape(b, q, size[0] * size[1])
  return masked & ~jnp.all(masked, axis=-1, keepdims=True)


class MaskedAttention(nn.Module):
  """Multi-head attention (q/k/v/out projections) whose keys can be masked per query: mask [B, Q, K],
  True = not attended, shared by all heads. Every row must keep at least one key (attention_mask
  guarantees it)."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, mask=None):
    if self.dim % self.num_heads:
      raise ValueError(f"hidden size {self.dim} is not divisible by num_heads={self.num_heads}.")
    h, d = self.num_heads, self.dim // self.num_heads

    def proj(x, name, init=_packed_xavier):
      y = nn.Dense(self.dim, kernel_init=init, bias_init=nn.initializers.zeros, dtype=self.dtype,
                   param_dtype=jnp.float32, name=name)(x)
      return y.reshape(*y.shape[:-1], h, d) if name != "out_proj" else y

    q, k, v = proj(q, "q_proj"), proj(k, "k_proj"), proj(v, "v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    if mask is not None:
      logits = jnp.where(mask[:, None], jnp.finfo(jnp.float32).min, logits)
    weights = nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*q.shape[:-2], self.dim)
    return proj(out, "out_proj", _xavier)


class MaskedAttentionLayer(nn.Module):
  """Post-norm layer: masked cross-attention to one level, self-attention among queries, FFN."""
  dim: int
  num_heads: int
  dim_feedforward: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, memory_pos, mask):
    y = MaskedAttention(self.dim, self.num_heads, self.dtype, name="cross_attn")(
        tgt + query_pos, memory + memory_pos, memory, mask)
    tgt = _layer_norm(self.dtype, "cross_attn_norm")(tgt + y)
    qk = tgt + query_pos
    y = MaskedAttention(self.dim, self.num_heads, self.dtype, name="self_attn")(qk, qk, tgt)
    tgt = _layer_norm(self.dtype, "self_attn_norm")(tgt + y)
    y = FFN(self.dim, self.dim_feedforward, 0.0, self.dtype, name="ffn")(tgt)
    return _layer_norm(self.dtype, "ffn_norm")(tgt + y)


class MaskedAttentionDecoder(nn.Module):
  """`__call__(features, mask_features)` -> (class logits [L+1, B, Q, K+1], mask logits [L+1, B, Q, h, w]).

  features: the pixel decoder's three NHWC maps, lowest resolution first; mask_features [B, h, w,
  mask_dim] at stride 4. Entry 0 is the prediction before layer 0, entry i + 1 after layer i. Outputs
  are float32.

  Variables: `query_feat/embedding` (the queries' initial content), `query_embed/embedding` (their
  position), `level_embed/embedding` [3, C], `input_proj_{0,1,2}` (1x1 conv with bias, only when the
  maps' channels differ from hidden_dim or `enforce_input_proj`), `layer_{i}/{cross_attn, self_attn}/
  {q_proj, k_proj, v_proj, out_proj}`, `layer_{i}/{cross_attn_norm, self_attn_norm, ffn_norm}`,
  `layer_{i}/ffn/{fc1, fc2}`, `decoder_norm`, `class_embed`, `mask_embed/layer_{0,1,2}`.
  """
  num_queries: int = 100
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  num_layers: int = 9
  mask_dim: int = 256
  num_classes: int = 133
  enforce_input_proj: bool = False
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, features: Sequence, mask_features):
    if len(features) != NUM_LEVELS:
      raise ValueError(f"the masked-attention decoder reads {NUM_LEVELS} feature maps; got {len(features)}.")
    c = self.hidden_dim
    level_embed = nn.Embed(NUM_LEVELS, c, embedding_init=nn.initializers.normal(1.0), param_dtype=jnp.float32,
                           name="level_embed").embedding
    memory, pos, sizes = [], [], []
    for i, x in enumerate(features):
      b, h, w, ch = x.shape
      x = x.astype(self.dtype)
      if ch != c or self.enforce_input_proj:
        x = Conv(c, (1, 1), kernel_init=_c2_xavier, dtype=self.dtype, param_dtype=jnp.float32,
                 name=f"input_proj_{i}")(x)
      memory.append(x.reshape(b, h * w, c) + level_embed[i].astype(self.dtype))
      pos.append(jnp.asarray(sine_position_embedding(h, w, c // 2), self.dtype)[None])
      sizes.append((h, w))
    b = features[0].shape[0]

    def queries(name):
      e = nn.Embed(self.num_queries, c, embedding_init=nn.initializers.normal(1.0), param_dtype=jnp.float32,
                   name=name).embedding
      return jnp.broadcast_to(e.astype(self.dtype)[None], (b, self.num_queries, c))

    tgt, query_pos = queries("query_feat"), queries("query_embed")
    norm = _layer_norm(self.dtype, "decoder_norm")  # the heads below are shared by every prediction
    class_embed = nn.Dense(self.num_classes + 1, kernel_init=_torch_linear, dtype=self.dtype,
                           param_dtype=jnp.float32, name="class_embed")
    mask_embed = MLP(c, self.mask_dim, 3, self.dtype, name="mask_embed")
    mask_features = mask_features.astype(self.dtype)

    def predict(tgt):
      x = norm(tgt)
      masks = jnp.einsum("bqc,bhwc->bqhw", mask_embed(x), mask_features)
      return class_embed(x).astype(jnp.float32), masks.astype(jnp.float32)

    layer = nn.remat(MaskedAttentionLayer) if self.remat else MaskedAttentionLayer
    logits, masks = predict(tgt)
    all_logits, all_masks = [logits], [masks]
    for i in range(self.num_layers):
      level = i % NUM_LEVELS
      mask = attention_mask(masks, sizes[level])
      tgt = layer(c, self.num_heads, self.dim_feedforward, self.dtype, name=f"layer_{i}")(
          tgt, query_pos, memory[level], pos[level], mask)
      logits, masks = predict(tgt)
      all_logits.append(logits)
      all_masks.append(masks)
    return jnp.stack(all_logits), jnp.stack(all_masks)
