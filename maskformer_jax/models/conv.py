"""`Conv`: flax's nn.Conv (same parameters and names) whose 1x1 convolutions run as matmuls.

A 1x1 convolution with no padding is a matmul over channels (of every `stride`-th pixel); XLA:CPU runs it
as a convolution 1.4-5x slower than the same dot (a 256->64 1x1 conv on 2x128x128: 32 ms vs 6.5 ms),
and a ResNet-50 MaskFormer has ~40 of them (docs/benchmarks.md, "Where the time goes"). On GPU and TPU
the two are the same work. Every other convolution goes to `lax.conv_general_dilated` unchanged.
"""
from typing import Any

import flax.linen as nn
import jax


def _all_ones(x):
  return x is None or all(int(v) == 1 for v in x)


def conv_or_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated`'s signature; NHWC x HWIO 1x1 without padding -> strided slice + dot."""
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  unpadded = padding in ("VALID", "SAME") or all(tuple(p) == (0, 0) for p in padding)
  if (lhs.ndim == 4 and rhs.shape[:2] == (1, 1) and unpadded and feature_group_count == 1
      and _all_ones(lhs_dilation) and _all_ones(rhs_dilation)
      and (dimension_numbers is None or dimension_numbers == nhwc)):
    sh, sw = window_strides  # 1x1 with no padding: 'SAME' pads nothing either
    x = lhs[:, ::sh, ::sw] if (sh, sw) != (1, 1) else lhs
    return jax.lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision=precision)


class Conv(nn.Conv):
  conv_general_dilated: Any = conv_or_matmul
