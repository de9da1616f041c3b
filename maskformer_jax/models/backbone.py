"""ResNet backbone in the detectron2 layout used by MaskFormer, NHWC.

detectron2's `ResNet` with `STRIDE_IN_1X1=False` (the stride sits in the 3x3 conv, as in torchvision,
whose ImageNet weights the original starts from) and `FREEZE_AT=0`; it returns res2..res5 at strides
4, 8, 16, 32. Depths 18/34 use basic blocks (tests only), 50/101 bottlenecks.

Normalisation (`norm`):
- "frozen_bn" (original): y = (x - mean) / sqrt(var + eps) * scale + bias, with all four in the
  non-trainable `batch_stats` collection, so the optimizer never sees them.
- "bn": trainable BatchNorm: `scale`/`bias` in `params`, `mean`/`var` in `batch_stats`, updated with
  torch's momentum 0.1 when `train=True` (apply with `mutable=['batch_stats']`).
Both use the same leaf names, so an ImageNet state dict maps onto either.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskformer_jax.models.conv import Conv

# (blocks per stage, bottleneck?) for each supported depth.
RESNET_STAGES = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
BN_EPS = 1e-5  # torch / detectron2 default
NORMS = ("frozen_bn", "bn")  # config.model.backbone_norm

# torchvision/detectron2 init for convs followed by BN: kaiming normal, fan_out.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def stage_channels(depth: int, width: int) -> tuple[int, ...]:
  """Output channels of res2..res5 (bottlenecks expand by 4)."""
  if depth not in RESNET_STAGES:
    raise ValueError(f"resnet_depth={depth} is not supported; use one of {sorted(RESNET_STAGES)}.")
  expansion = 4 if RESNET_STAGES[depth][1] else 1
  return tuple(width * expansion * 2**i for i in range(4))


class FrozenBatchNorm(nn.Module):
  """detectron2's FrozenBatchNorm2d: an affine map from fixed statistics, all in `batch_stats`."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.variable("batch_stats", "scale", lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable("batch_stats", "bias", lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)).value
    # Folded in float32 like detectron2, then applied in the compute dtype.
    mult = scale * jax.lax.rsqrt(var + BN_EPS)
    add = bias - mean * mult
    return x * mult.astype(self.dtype) + add.astype(self.dtype)


def _norm(kind: str, train: bool, dtype, name: str):
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "bn":
    # momentum 0.9 in flax == torch's momentum 0.1
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
                        param_dtype=jnp.float32, name=name)
  raise ValueError(f"model.backbone_norm={kind!r} is not one of {NORMS}.")


def _conv(features, kernel, stride, dtype, name):
  pad = kernel // 2  # explicit torch-style padding: "SAME" pads asymmetrically at stride 2
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class Block(nn.Module):
  """A basic or bottleneck residual block; a projection shortcut when the shape changes."""
  out_channels: int
  bottleneck_channels: int
  stride: int
  bottleneck: bool
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    if x.shape[-1] != self.out_channels or self.stride != 1:
      shortcut = _conv(self.out_channels, 1, self.stride, d, "shortcut")(x)
      shortcut = _norm(self.norm, train, d, "shortcut_bn")(shortcut)
    else:
      shortcut = x
    if self.bottleneck:
      y = _conv(self.bottleneck_channels, 1, 1, d, "conv1")(x)
      y = nn.relu(_norm(self.norm, train, d, "bn1")(y))
      y = _conv(self.bottleneck_channels, 3, self.stride, d, "conv2")(y)  # stride in the 3x3
      y = nn.relu(_norm(self.norm, train, d, "bn2")(y))
      y = _conv(self.out_channels, 1, 1, d, "conv3")(y)
      y = _norm(self.norm, train, d, "bn3")(y)
    else:
      y = _conv(self.out_channels, 3, self.stride, d, "conv1")(x)
      y = nn.relu(_norm(self.norm, train, d, "bn1")(y))
      y = _conv(self.out_channels, 3, 1, d, "conv2")(y)
      y = _norm(self.norm, train, d, "bn2")(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Returns {'res2': stride 4, ..., 'res5': stride 32} feature maps (NHWC, compute dtype).

  `depth` picks the block type (18/34 basic, 50/101 bottleneck) and the default blocks per stage and
  output channels; `blocks` / `channels` (4 entries each, () = the default) override them, for ResNets
  of other shapes (any HF `ResNetConfig` with the stride in the 3x3; a bottleneck is channels / 4 wide).
  Variable names: `stem/conv`, `stem/bn`, `res{2..5}_{i}/{conv1,bn1,conv2,bn2[,conv3,bn3]}`, and
  `res{s}_0/{shortcut,shortcut_bn}` where the block changes shape.
  """
  depth: int = 50
  width: int = 64
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32
  blocks: tuple = ()
  channels: tuple = ()
  remat: bool = False  # recompute each block's activations in the backward pass (config.model.remat)

  @nn.compact
  def __call__(self, x, train: bool = False):
    default_channels = stage_channels(self.depth, self.width)  # raises for an unsupported depth
    blocks, bottleneck = RESNET_STAGES[self.depth]
    blocks, channels = tuple(self.blocks) or blocks, tuple(self.channels) or default_channels
    x = x.astype(self.dtype)
    stem = _Stem(self.width, self.norm, self.dtype, name="stem")
    x = stem(x, train)
    out = {}
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block  # `train` is static
    for s, (n, c) in enumerate(zip(blocks, channels)):
      for i in range(n):
        stride = 2 if (i == 0 and s > 0) else 1
        x = block(c, c // 4 if bottleneck else c, stride, bottleneck, self.norm, self.dtype,
                  name=f"res{s + 2}_{i}")(x, train)
      out[f"res{s + 2}"] = x
    return out


class _Stem(nn.Module):
  """7x7/2 conv + BN + ReLU + 3x3/2 max-pool (padding 1, padded with -inf like torch)."""
  width: int
  norm: str
  dtype: Any

  @nn.compact
  def __call__(self, x, train):
    x = _conv(self.width, 7, 2, self.dtype, "conv")(x)
    x = nn.relu(_norm(self.norm, train, self.dtype, "bn")(x))
    # The -inf padding written out and a VALID pool: the same values, and a form every exporter takes
    # (jax2onnx's pool accepts only 'SAME'/'VALID' padding).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def resnet(cfg, dtype, name):
  """config.model.backbone = 'resnet': reads resnet_depth, resnet_width, resnet_blocks, resnet_channels
  backbone_norm and remat."""
  return ResNet(cfg.resnet_depth, cfg.resnet_width, cfg.backbone_norm, dtype, tuple(cfg.resnet_blocks),
                tuple(cfg.resnet_channels), bool(cfg.remat), name=name)


# config.model.backbone -> builder(model fields, compute dtype, scope name) -> a module mapping NHWC
# images to {'res2': stride 4, ..., 'res5': stride 32}. A new backbone: one file and one entry here.
BACKBONES = {"resnet": resnet, "swin": "maskformer_jax.models.swin:swin"}
