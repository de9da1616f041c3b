"""MaskFormer in JAX/Flax."""
