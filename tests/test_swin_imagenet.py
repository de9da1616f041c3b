"""ImageNet initialisation of the Swin backbone from official Swin release files (convert/swin_imagenet.py).

The reference is Hugging Face's plain Swin (`SwinBackbone`, random weights, nothing downloaded), an
implementation independent of ours and of HF's MaskFormerSwin. Its weights are written here in the
official release's naming (`HF_TO_OFFICIAL`, with q/k/v packed into qkv and the buffers, final norm
and classifier head the official files carry), saved as `{"model": state_dict}` and loaded with
`load_swin_imagenet`. timm's Swin, the first choice, cannot be imported beside the CPU torch that the
tests pin: PyPI's torchvision (which timm imports) is built against CUDA torch.
"""
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SwinBackbone, SwinConfig

from maskformer_jax import config as config_lib
from maskformer_jax.convert.swin_imagenet import load_swin_imagenet, resize_bias_table
from maskformer_jax.models import build_model
from maskformer_jax.models.swin import SwinTransformer

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("res2", "res3", "res4", "res5")
# HF SwinBackbone names -> the official release's (q/k/v are packed into attn.qkv separately).
HF_TO_OFFICIAL = [
    (r"^swin\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^swin\.embeddings\.norm\.", "patch_embed.norm."),
    (r"^swin\.encoder\.layers\.", "layers."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.relative_position_bias\.", ".attn."),
    (r"^swin\.layernorm\.", "norm."),
]


def make_hf(embed=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=7, seed=0):
  """A random HF Swin (every weight random: HF zeroes the position tables) whose per-stage output norms
  are the identity, as ours are at init (the ImageNet file has none)."""
  torch.manual_seed(seed)
  hf = SwinBackbone(SwinConfig(embed_dim=embed, depths=list(depths), num_heads=list(heads), window_size=window,
                               drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.startswith("hidden_states_norms."):
        p.fill_(1.0 if name.endswith("weight") else 0.0)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape))
      else:
        p.copy_((1.0 if name.endswith("table") else 0.05) * torch.randn(p.shape))
  return hf


def official_state_dict(hf) -> dict:
  """`hf`'s weights as an official Swin release file holds them, with its relative_position_index and
  attn_mask buffers, final norm and a 10-class head (the parts the loader drops)."""
  theirs, sd = hf.state_dict(), {}
  for key, value in theirs.items():
    if key.startswith("hidden_states_norms.") or re.search(r"\.attention\.[kv]_proj\.", key):
      continue
    if ".attention.q_proj." in key:
      value = torch.cat([theirs[key.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")])
      key = key.replace(".attention.q_proj.", ".attn.qkv.")
    for pattern, new in HF_TO_OFFICIAL:
      key = re.sub(pattern, new, key)
    sd[key] = value.clone()
  window = hf.config.window_size
  for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
    block = key[:-len("relative_position_bias_table")]
    sd[block + "relative_position_index"] = torch.zeros(window ** 2, window ** 2, dtype=torch.long)
    if int(key.split(".")[3]) % 2:  # shifted blocks carry their shift mask
      sd[block[:-len("attn.")] + "attn_mask"] = torch.zeros(4, window ** 2, window ** 2)
  sd["head.weight"], sd["head.bias"] = torch.randn(10, sd["norm.weight"].shape[0]), torch.randn(10)
  return sd


def swin_variables(embed=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=7):
  """Shapes of a bare Swin's variables under the `backbone` scope, as in a MaskFormer's."""
  shapes = jax.eval_shape(SwinTransformer(embed, depths, heads, window).init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  return {"params": {"backbone": shapes["params"]}}


def torch_resize(table: np.ndarray, window: int) -> np.ndarray:
  """The official Swin loader's resize: F.interpolate bicubic of the [1, heads, S, S] view."""
  side, new = int(round(table.shape[0] ** 0.5)), 2 * window - 1
  grid = torch.from_numpy(table).permute(1, 0).reshape(1, table.shape[1], side, side)
  out = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
  return out.reshape(table.shape[1], new * new).permute(1, 0).numpy()


@pytest.mark.slow
def test_official_file_gives_the_reference_stage_features(tmp_path, caplog):
  """An official-format file into a whole MaskFormer: the backbone's four stage features equal HF Swin's
  to 1e-4; the output norms (not in the file) and everything outside the backbone are unchanged."""
  hf = make_hf()
  torch.save({"model": official_state_dict(hf)}, tmp_path / "swin.pth")
  module = build_model(dict(backbone="swin", swin_embed_dim=16, swin_depths=(2, 2, 2, 2),
                            swin_num_heads=(1, 2, 2, 4), swin_window_size=7, drop_path_rate=0.0, conv_dim=32,
                            mask_dim=32, hidden_dim=32, num_heads=4, dim_feedforward=32, dec_layers=1,
                            num_queries=3, num_classes=2))
  variables = jax.device_get(jax.jit(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))())
  caplog.set_level(logging.INFO)
  loaded = load_swin_imagenet(tmp_path / "swin.pth", variables)
  assert "norm0, norm1, norm2, norm3 not in the file, kept at init" in caplog.text
  assert re.search(r"dropped 4 attn_mask, 2 head\.\*, 2 norm\.\*, 8 relative_position_index", caplog.text)
  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))  # noqa: E731
  for name in variables["params"]:
    if name != "backbone":
      assert same(loaded["params"][name], variables["params"][name]), name
  backbone = loaded["params"]["backbone"]
  for s in range(4):
    assert same(backbone[f"norm{s}"], variables["params"]["backbone"][f"norm{s}"])
  assert not np.array_equal(backbone["patch_embed"]["proj"]["kernel"],
                            variables["params"]["backbone"]["patch_embed"]["proj"]["kernel"])
  # Both Swins clamp nothing here: every stage (112x168 ... 14x21) is larger than the window, as timm's
  # and plain HF Swin's clamp (window = stage, no shift) would otherwise differ from MaskFormer's Swin.
  x = np.random.default_rng(0).standard_normal((1, 448, 672, 3)).astype(np.float32)
  ours = jax.jit(SwinTransformer(16, (2, 2, 2, 2), (1, 2, 2, 4), 7, drop_path_rate=0.0).apply)(
      {"params": backbone}, x)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).feature_maps
  for level, r in zip(STAGES, ref):
    r = r.permute(0, 2, 3, 1).numpy()
    assert ours[level].shape == r.shape
    assert np.abs(np.asarray(ours[level]) - r).max() <= 1e-4, level


@pytest.mark.parametrize("old,new", [(7, 12), (12, 7), (7, 7), (3, 24)])
def test_bias_table_resize_matches_torch_bicubic(old, new):
  """Our numpy bicubic (Keys, a = -0.75, edges clamped) is torch's: equal to its float64 resize to
  float32 rounding, and to its float32 resize (float32 sums of 16 terms) within 1e-5 on N(0, 1) values."""
  table = np.random.default_rng(old * new).standard_normal(((2 * old - 1) ** 2, 3))
  ours = resize_bias_table(table.astype(np.float32), new)
  assert ours.shape == ((2 * new - 1) ** 2, 3) and ours.dtype == np.float32
  assert np.abs(ours - torch_resize(table, new)).max() <= 1e-6
  assert np.abs(ours - torch_resize(table.astype(np.float32), new)).max() <= 1e-5


def test_window_7_file_into_window_12_model_resizes_the_tables(caplog):
  hf = make_hf(embed=8, depths=(2, 2, 2, 2), heads=(1, 1, 2, 2), window=7)
  sd = official_state_dict(hf)
  caplog.set_level(logging.INFO)
  loaded = load_swin_imagenet(sd, swin_variables(8, (2, 2, 2, 2), (1, 1, 2, 2), 12))["params"]["backbone"]
  assert "8 relative_position_bias_table(s) resized bicubically from window 7 to 12" in caplog.text
  for s in range(4):
    for b in range(2):
      table = loaded[f"layers_{s}"][f"blocks_{b}"]["attn"]["relative_position_bias_table"]
      theirs = sd[f"layers.{s}.blocks.{b}.attn.relative_position_bias_table"].numpy()
      assert table.shape == (23 * 23, theirs.shape[1])
      assert np.abs(table - torch_resize(theirs, 12)).max() <= 1e-5
  np.testing.assert_array_equal(loaded["layers_1"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                                sd["layers.1.blocks.0.mlp.fc1.weight"].numpy().T)


def test_plain_and_timm_layouts_load_like_the_official_file(tmp_path):
  """A plain state dict, and timm's layout (downsample at the start of the next stage, head.fc, no
  buffers), give the same arrays as the official file."""
  sd = official_state_dict(make_hf())
  torch.save({"model": sd}, tmp_path / "official.pth")
  timm = {re.sub(r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
                 k.replace("head.", "head.fc.")): v
          for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
  assert "layers.3.downsample.reduction.weight" in timm
  torch.save(timm, tmp_path / "timm.pth")
  variables = swin_variables()
  ref = load_swin_imagenet(tmp_path / "official.pth", variables)
  for other in (sd, tmp_path / "timm.pth"):
    out = load_swin_imagenet(other, variables)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                     out["params"]["backbone"], ref["params"]["backbone"]))


def test_files_that_do_not_fit_are_named(tmp_path):
  variables = swin_variables()
  sd = official_state_dict(make_hf())
  bad = dict(sd)
  bad.pop("layers.2.blocks.1.mlp.fc2.bias")
  bad["layers.4.blocks.0.norm1.weight"] = torch.zeros(16)
  bad["patch_embed.proj.weight"] = torch.zeros(16, 3, 7, 7)
  bad["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 3)  # heads differ
  with pytest.raises(ValueError) as e:
    load_swin_imagenet(bad, variables)
  msg = str(e.value)
  for key in ("layers.2.blocks.1.mlp.fc2.bias", "layers.4.blocks.0.norm1.weight", "patch_embed.proj.weight",
              "layers.0.blocks.0.attn.relative_position_bias_table"):
    assert key in msg
  assert re.search(r"1 missing .*1 unexpected .*2 mis-shaped", msg, re.S)
  with pytest.raises(ValueError, match="unexpected"):  # a deeper file into a shallower model
    load_swin_imagenet(official_state_dict(make_hf(depths=(2, 2, 4, 2))), variables)
  torch.save({"model": {"backbone.patch_embed.proj.weight": torch.zeros(1)}}, tmp_path / "d2.pth")
  with pytest.raises(ValueError, match=r"d2\.pth is not a Swin ImageNet checkpoint"):
    load_swin_imagenet(tmp_path / "d2.pth", variables)
  with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
    load_swin_imagenet(tmp_path / "nope.pth", variables)
  resnet = jax.eval_shape(build_model(dict(resnet_depth=18, resnet_width=8)).init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="torchvision_resnet"):
    load_swin_imagenet(sd, resnet)


def test_config_init_swin_imagenet_is_validated(tmp_path):
  (tmp_path / "swin.pth").write_bytes(b"")
  swin = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t,runlocal")
  resnet = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:runlocal")
  swin.init.swin_imagenet = str(tmp_path / "swin.pth")
  config_lib.validate(swin, num_devices=4, num_processes=1)
  swin.init.swin_imagenet = str(tmp_path / "missing.pth")
  with pytest.raises(ValueError, match=r"config\.init\.swin_imagenet=.*missing\.pth' does not exist"):
    config_lib.validate(swin, num_devices=4, num_processes=1)
  resnet.init.swin_imagenet = str(tmp_path / "swin.pth")
  with pytest.raises(ValueError, match=r"not config\.model\.backbone='resnet': use config\.init\.torchvision_"):
    config_lib.validate(resnet, num_devices=4, num_processes=1)
  swin.init.swin_imagenet, swin.init.torchvision_resnet = "", str(tmp_path / "swin.pth")
  with pytest.raises(ValueError, match=r"use config\.init\.swin_imagenet"):
    config_lib.validate(swin, num_devices=4, num_processes=1)


def test_train_state_starts_from_the_file_through_config_init(tmp_path):
  """config.init.swin_imagenet -> load_pretrained: the backbone from the file (output norms kept),
  everything else as initialised."""
  from maskformer_jax import sharding
  from maskformer_jax import train_step as ts
  from maskformer_jax.convert import load_pretrained
  c = config_lib.load_config(f"{ROOT}/configs/coco_panoptic.py:backbone=swin_t,runlocal")
  c.mesh.data = 1
  m = c.model
  sd = official_state_dict(make_hf(m.swin_embed_dim, m.swin_depths, m.swin_num_heads, m.swin_window_size))
  torch.save({"model": sd}, tmp_path / "swin.pth")
  c.init.swin_imagenet = str(tmp_path / "swin.pth")
  model = build_model(c.model)
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  state = ts.init_state(c, model, mesh, jax.random.key(0))
  before = jax.device_get(state["params"])
  after = jax.device_get(load_pretrained(c, state)["params"])
  bb = after["backbone"]
  np.testing.assert_array_equal(bb["patch_embed"]["proj"]["kernel"],
                                sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bb["layers_1"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                sd["layers.1.blocks.1.attn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(bb["norm3"]["scale"], before["backbone"]["norm3"]["scale"])
  for top in ("pixel_decoder", "transformer_decoder", "class_embed"):
    jax.tree.map(np.testing.assert_array_equal, after[top], before[top])
