"""Weight import: parity with randomly initialised Hugging Face MaskFormers (no download), the "+6 Enc"
encoder against HF's DETR encoder layer, torchvision ResNet import, the CLI, and clear errors."""
import functools
import hashlib
import json
import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import (DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig,
                          SwinConfig)
from transformers.models.detr.modeling_detr import DetrEncoderLayer

from maskformer_jax.bench.vs_pytorch import TorchReference
from maskformer_jax.convert import from_hf, load_converted, load_torchvision_resnet
from maskformer_jax.convert.hf import HF_IGNORED, abstract_variables, convert_state_dict, hf_key
from maskformer_jax.models import build_model
from maskformer_jax.models.backbone import RESNET_STAGES, ResNet, stage_channels
from maskformer_jax.models.transformer_decoder import EncoderLayer

TOL = 1e-4  # max-abs-diff in float32 (the bar)


def randomize_norms_(model: torch.nn.Module, seed: int = 0):
  """HF initialises BN/GN/LN to near-identity; random affine and running stats make a swapped or
  dropped normalisation parameter visible in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return model


def make_hf(depth=50, width=8, hidden=32, heads=4, ffn=64, layers=2, queries=5, labels=3, conv_dim=32,
            mask_dim=32, seed=0, blocks=None, channels=None):
  """`depth` gives the block type and, unless `blocks` / `channels` say otherwise, the stages."""
  torch.manual_seed(seed)
  standard, bottleneck = RESNET_STAGES[depth]
  cfg = MaskFormerConfig(
      backbone_config=ResNetConfig(embedding_size=width,
                                   hidden_sizes=list(channels or stage_channels(depth, width)),
                                   depths=list(blocks or standard), layer_type="bottleneck" if bottleneck else "basic",
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
      decoder_config=DetrConfig(d_model=hidden, decoder_layers=layers, decoder_ffn_dim=ffn,
                                decoder_attention_heads=heads, num_queries=queries, encoder_layers=1),
      num_labels=labels, fpn_feature_size=conv_dim, mask_feature_size=mask_dim)
  return randomize_norms_(MaskFormerForInstanceSegmentation(cfg).eval(), seed)


def make_hf_swin(embed=32, depths=(2, 2, 2, 2), swin_heads=(2, 2, 4, 4), window=7, hidden=32, heads=4, ffn=64,
                 layers=2, queries=5, labels=3, conv_dim=32, mask_dim=32, seed=0):
  """An HF MaskFormer with a Swin backbone (HF turns the SwinConfig into its MaskFormerSwin, which
  keeps the original's padding and shifts); relative position tables randomised (HF zeroes them)."""
  torch.manual_seed(seed)
  cfg = MaskFormerConfig(
      backbone_config=SwinConfig(embed_dim=embed, depths=list(depths), num_heads=list(swin_heads),
                                 window_size=window, drop_path_rate=0.0,
                                 out_features=["stage1", "stage2", "stage3", "stage4"]),
      decoder_config=DetrConfig(d_model=hidden, decoder_layers=layers, decoder_ffn_dim=ffn,
                                decoder_attention_heads=heads, num_queries=queries, encoder_layers=1),
      num_labels=labels, fpn_feature_size=conv_dim, mask_feature_size=mask_dim)
  hf = MaskFormerForInstanceSegmentation(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(torch.randn(p.shape))
  return randomize_norms_(hf, seed)


def images(b, h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


def hf_forward(hf, x):
  with torch.no_grad():
    return hf(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), output_hidden_states=True)


def hf_aux_original(hf, out):
  """The original's aux outputs from HF's hidden states: HF's own shared LayerNorm, then its heads
  (HF itself would skip the norm: docs/reference.md section 6)."""
  norm = hf.model.transformer_module.decoder.layernorm
  pix = out.pixel_decoder_last_hidden_state
  aux = []
  with torch.no_grad():
    for h in out.transformer_decoder_hidden_states[1:-1]:  # [0] is the zero target fed to layer 0
      h = norm(h)
      aux.append((hf.class_predictor(h).numpy(),
                  torch.einsum("bqc,bchw->bqhw", hf.mask_embedder(h), pix).numpy()))
  return aux


def run(module, variables, x):
  """Jitted inference: compiling once beats op-by-op dispatch for these deep nets."""
  return jax.jit(functools.partial(module.apply, train=False))(variables, x)


def host_variables(module, seed=0):
  """Random variables of the model's structure, filled on the host (no init compilation)."""
  rng = np.random.default_rng(seed)
  shapes = abstract_variables(module)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


PARITY_CASES = {
    # name: (make_hf kwargs, (B, H, W))
    "r50-q5-k3-64x96": (dict(depth=50, width=8, hidden=32, heads=4, layers=2, queries=5, labels=3), (2, 64, 96)),
    "r101-q10-k7-d64-96x64": (dict(depth=101, width=8, hidden=64, heads=8, ffn=96, layers=3, queries=10,
                                   labels=7, conv_dim=64, mask_dim=48, seed=1), (1, 96, 64)),
    "r18-basic-q3-k1-32x64": (dict(depth=18, width=16, hidden=32, heads=2, layers=2, queries=3, labels=1,
                                   seed=2), (2, 32, 64)),
    # res5 has hidden_dim channels: no input projection in HF or ours.
    "r34-basic-noproj-q7-k20": (dict(depth=34, width=8, hidden=64, heads=4, layers=4, queries=7, labels=20,
                                     mask_dim=16, seed=3), (1, 64, 128)),
    # ResNets no standard depth names: other stage depths and widths (HF ResNetConfig can express them).
    "resnet-basic-d2121-c24-40-56-72": (dict(depth=18, width=12, blocks=(2, 1, 2, 1), channels=(24, 40, 56, 72),
                                             seed=6), (1, 64, 96)),
    "resnet-bottleneck-d1213-c32-48-96-160": (dict(depth=50, width=8, blocks=(1, 2, 1, 3),
                                                   channels=(32, 48, 96, 160), seed=7), (2, 64, 64)),
    # Swin: sides multiples of 32 but not of 32 x window, so every stage pads to its windows.
    "swin-w7-e32-96x160": (dict(embed=32, depths=(2, 2, 2, 2), swin_heads=(2, 2, 4, 4), window=7, seed=4),
                           (2, 96, 160)),
    "swin-w12-e24-d1212-64x224": (dict(embed=24, depths=(1, 2, 1, 2), swin_heads=(1, 2, 3, 4), window=12,
                                       hidden=64, heads=8, layers=3, queries=10, labels=7, seed=5),
                                  (1, 64, 224)),
}


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_hf_parity(name):
  kwargs, (b, h, w) = PARITY_CASES[name]
  hf = (make_hf_swin if name.startswith("swin") else make_hf)(**kwargs)
  module, variables = from_hf(hf)
  x = images(b, h, w, seed=len(name))
  out = run(module, variables, x)
  ref = hf_forward(hf, x)
  k, q = kwargs.get("labels", 3), kwargs.get("queries", 5)
  assert out["pred_logits"].shape == (b, q, k + 1) and out["pred_logits"].dtype == np.float32
  assert out["pred_masks"].shape == (b, q, h // 4, w // 4) and out["pred_masks"].dtype == np.float32
  assert maxdiff(out["pred_logits"], ref.class_queries_logits) <= TOL
  assert maxdiff(out["pred_masks"], ref.masks_queries_logits) <= TOL
  # Auxiliary outputs against HF in float64: the first layer's state (from a zero target) can have a
  # small variance, and its LayerNorm amplifies float32 rounding on either side (measured with
  # transformers 5.24's initialisation, r101 case: HF float32 8e-5 and ours 2.4e-4 from float64 on mask
  # logits up to 4.8), so the bar is TOL relative to the logits' scale, as in the full-size test below.
  with torch.no_grad():
    ref64 = hf.double()(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().double(),
                        output_hidden_states=True)
    aux = hf_aux_original(hf, ref64)
  hf.float()
  assert len(out["aux_outputs"]) == kwargs.get("layers", 2) - 1 == len(aux)
  for ours, (logits, masks) in zip(out["aux_outputs"], aux):
    for mine, truth in ((ours["pred_logits"], logits), (ours["pred_masks"], masks)):
      truth = np.asarray(truth)
      assert maxdiff(mine, truth) <= TOL * max(1.0, float(np.abs(truth).max()))
  # The outputs are not trivially equal across layers (the comparison above is informative).
  assert maxdiff(out["aux_outputs"][0]["pred_logits"], out["pred_logits"]) > 1e-3
  if name.startswith("r34"):
    assert "input_proj" not in variables["params"]["transformer_decoder"]
  else:
    assert "input_proj" in variables["params"]["transformer_decoder"]


def test_detr_encoder_layer_matches_hf():
  """The "+6 Enc" layer is DETR's post-norm encoder layer: compare against HF's DetrEncoderLayer."""
  torch.manual_seed(0)
  layer = randomize_norms_(DetrEncoderLayer(DetrConfig(d_model=32, encoder_attention_heads=4,
                                                       encoder_ffn_dim=48)).eval())
  x = torch.randn(2, 12, 32)
  pos = torch.randn(2, 12, 32)
  with torch.no_grad():
    ref = layer(x, attention_mask=None, spatial_position_embeddings=pos)
  ours = EncoderLayer(32, 4, 48, dropout=0.1)
  prefix = "model.pixel_level_module.decoder.encoder_layers.0."
  state = {prefix + k: v for k, v in layer.state_dict().items()}
  template = jax.eval_shape(lambda: ours.init(jax.random.key(0), x.numpy(), pos.numpy()))
  variables = convert_state_dict(state, template,
                                 lambda p: hf_key(("pixel_decoder", "encoder_layer_0", *p)))
  out = ours.apply(variables, x.numpy(), pos.numpy(), train=False)
  assert maxdiff(out, ref) <= 1e-5


def plus6enc_reference(hf, enc_layers):
  """A torch "+6 Enc" MaskFormer assembled from HF modules, wired as the original
  TransformerEncoderPixelDecoder (res5 -> 1x1 input projection -> DETR encoder layers with sine
  positions -> the decoder's memory and the FPN's res5 input): the benchmark's torch reference."""
  ref = TorchReference(hf, enc_layers)
  randomize_norms_(hf, seed=5)
  return ref


def torch_outputs(ref, x):
  with torch.no_grad():
    logits, masks, _ = ref.forward(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  return logits, masks


def test_plus6enc_pixel_decoder_matches_hf_assembled_reference():
  hf = make_hf(depth=50, width=8, hidden=32, heads=4, layers=2, queries=6, labels=4)
  ref_model = plus6enc_reference(hf, enc_layers=2)
  cfg = dict(resnet_depth=50, resnet_width=8, pixel_decoder="transformer_encoder", pixel_encoder_layers=2,
             conv_dim=32, mask_dim=32, num_queries=6, hidden_dim=32, num_heads=4, dim_feedforward=64,
             dec_layers=2, num_classes=4)
  module = build_model(cfg)
  variables = convert_state_dict(hf.state_dict(), abstract_variables(module), hf_key, ignore=HF_IGNORED)
  # The decoder reads the encoder output (conv_dim == hidden_dim): no input projection.
  assert "input_proj" not in variables["params"]["transformer_decoder"]
  x = images(2, 64, 64, seed=7)
  logits, masks = torch_outputs(ref_model, x)
  out = run(module, variables, x)
  assert maxdiff(out["pred_logits"], logits) <= TOL
  assert maxdiff(out["pred_masks"], masks) <= TOL


@pytest.mark.slow
def test_save_pretrained_dir_and_cli_roundtrip(tmp_path):
  hf = make_hf(depth=18, width=16, hidden=32, heads=4, queries=4, labels=2)
  hf.save_pretrained(tmp_path / "hf")
  module, variables = from_hf(tmp_path / "hf")
  x = images(1, 64, 64)
  ref = hf_forward(hf, x)
  out = run(module, variables, x)
  assert maxdiff(out["pred_masks"], ref.masks_queries_logits) <= TOL
  # Relative paths, as a user types them, resolved against the directory the command runs in.
  res = subprocess.run([sys.executable, "-m", "maskformer_jax.convert", "--hf", "hf", "--out", "ckpt"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  assert f"wrote {tmp_path / 'ckpt'}" in res.stdout
  cfg, loaded = load_converted(tmp_path / "ckpt")
  written = json.load(open(tmp_path / "ckpt" / "config.json"))
  assert written["model"] == cfg
  # Provenance: each file of the HF directory with its sha256, and the forward parity it passed.
  source = written["source"]
  assert source["format"] == "hf" and source["path"] == str(tmp_path / "hf")
  assert source["files"]["config.json"] == hashlib.sha256((tmp_path / "hf" / "config.json").read_bytes()).hexdigest()
  assert source["check"]["passed"] and max(source["check"]["max_abs"].values()) <= TOL
  assert (cfg["resnet_depth"], cfg["num_queries"], cfg["num_classes"]) == (18, 4, 2)
  out2 = run(build_model(cfg), loaded, x)
  assert maxdiff(out2["pred_logits"], ref.class_queries_logits) <= TOL
  assert set(loaded) == {"params", "batch_stats"}


def test_swin_conversion_saved_and_loaded(tmp_path):
  from maskformer_jax.convert import save_converted
  hf = make_hf_swin(embed=16, depths=(2, 1, 1, 2), swin_heads=(1, 2, 2, 4), window=7, queries=4, labels=2)
  module, variables = from_hf(hf)
  cfg = {k: getattr(module, k) for k in ("backbone", "swin_embed_dim", "swin_depths", "swin_num_heads",
                                         "swin_window_size")}
  assert cfg == {"backbone": "swin", "swin_embed_dim": 16, "swin_depths": (2, 1, 1, 2),
                 "swin_num_heads": (1, 2, 2, 4), "swin_window_size": 7}
  from maskformer_jax.convert.hf import model_config_from_hf
  save_converted(tmp_path / "ckpt", model_config_from_hf(hf.config), variables, source={"format": "test"})
  loaded_cfg, loaded = load_converted(tmp_path / "ckpt")
  x = images(1, 64, 96)
  out = run(build_model(loaded_cfg), loaded, x)  # JSON lists back to the model's tuples
  assert maxdiff(out["pred_masks"], hf_forward(hf, x).masks_queries_logits) <= TOL


def test_hf_swin_we_cannot_express_is_refused():
  hf = make_hf_swin(embed=16, depths=(1, 1, 1, 1), swin_heads=(1, 1, 1, 1))
  hf.config.backbone_config.use_absolute_embeddings = True
  with pytest.raises(ValueError, match="use_absolute_embeddings"):
    from_hf(hf)


def test_bad_state_dict_names_the_keys():
  hf = make_hf(depth=18, width=16, hidden=32, heads=4, queries=4, labels=2)
  module, _ = from_hf(hf)
  template = abstract_variables(module)
  sd = dict(hf.state_dict())
  del sd["class_predictor.bias"]
  sd["model.extra.weight"] = torch.zeros(3)
  sd["mask_embedder.1.0.weight"] = torch.zeros(5, 32)
  with pytest.raises(ValueError) as e:
    convert_state_dict(sd, template, hf_key, ignore=HF_IGNORED)
  msg = str(e.value)
  assert "1 missing key(s)" in msg and "class_predictor.bias" in msg
  assert "1 unexpected key(s)" in msg and "model.extra.weight" in msg
  assert "1 mis-shaped key(s)" in msg and "mask_embedder.1.0.weight" in msg


def test_hf_resnet_shapes_become_config_keys_and_what_we_cannot_express_is_refused():
  from maskformer_jax.convert.hf import model_config_from_hf
  cfg = model_config_from_hf(make_hf(depth=101, width=8).config)  # a standard one: named by its depth
  assert (cfg["resnet_depth"], cfg["resnet_blocks"], cfg["resnet_channels"]) == (101, (), ())
  cfg = model_config_from_hf(make_hf(depth=50, width=8, blocks=(1, 1, 1, 1), channels=(32, 64, 128, 512)).config)
  assert (cfg["resnet_depth"], cfg["resnet_blocks"], cfg["resnet_channels"]) == (50, (1, 1, 1, 1),
                                                                                 (32, 64, 128, 512))
  for field, value, match in (("hidden_sizes", [32, 64, 128, 514], "multiples of 4"),
                              ("depths", [3, 4, 6], "4 stages"),
                              ("downsample_in_bottleneck", True, "stride")):
    hf = make_hf(depth=50, width=8)
    setattr(hf.config.backbone_config, field, value)
    with pytest.raises(ValueError, match=match):
      from_hf(hf)


# --- torchvision ResNet import --------------------------------------------------------------------

class TorchBottleneck(torch.nn.Module):
  """torchvision's Bottleneck (stride in conv2, the 3x3), written out with torchvision's names."""

  def __init__(self, cin, mid, cout, stride, basic):
    super().__init__()
    n = torch.nn
    self.basic = basic
    if basic:
      self.conv1 = n.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = n.BatchNorm2d(cout)
      self.conv2 = n.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = n.BatchNorm2d(cout)
    else:
      self.conv1 = n.Conv2d(cin, mid, 1, bias=False)
      self.bn1 = n.BatchNorm2d(mid)
      self.conv2 = n.Conv2d(mid, mid, 3, stride, 1, bias=False)
      self.bn2 = n.BatchNorm2d(mid)
      self.conv3 = n.Conv2d(mid, cout, 1, bias=False)
      self.bn3 = n.BatchNorm2d(cout)
    self.downsample = (n.Sequential(n.Conv2d(cin, cout, 1, stride, bias=False), n.BatchNorm2d(cout))
                       if stride != 1 or cin != cout else None)

  def forward(self, x):
    r = torch.relu
    y = r(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if not self.basic:
      y = self.bn3(self.conv3(r(y)))
    return r(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet(torch.nn.Module):
  def __init__(self, depth, width):
    super().__init__()
    n = torch.nn
    blocks, bottleneck = RESNET_STAGES[depth]
    self.conv1 = n.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = n.BatchNorm2d(width)
    self.maxpool = n.MaxPool2d(3, 2, 1)
    cin = width
    for s, (nb, cout) in enumerate(zip(blocks, stage_channels(depth, width))):
      layers = []
      for i in range(nb):
        layers.append(TorchBottleneck(cin, cout // 4, cout, 2 if (i == 0 and s > 0) else 1, not bottleneck))
        cin = cout
      setattr(self, f"layer{s + 1}", n.Sequential(*layers))
    self.fc = n.Linear(cin, 10)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    out = []
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
      out.append(x)
    return out


@pytest.mark.parametrize("depth,norm", [(50, "frozen_bn"), (18, "bn")])
def test_torchvision_resnet_import(tmp_path, depth, norm):
  torch.manual_seed(depth)
  ref = randomize_norms_(TorchResNet(depth, 8).eval(), seed=depth)
  torch.save(ref.state_dict(), tmp_path / "r.pth")
  module = build_model(dict(resnet_depth=depth, resnet_width=8, backbone_norm=norm, conv_dim=32, mask_dim=32,
                            hidden_dim=32, num_heads=4, dim_feedforward=32, dec_layers=1, num_queries=3,
                            num_classes=2))
  x = images(2, 64, 96, seed=depth)
  variables = host_variables(module)
  loaded = load_torchvision_resnet(tmp_path / "r.pth", variables)
  # Only the backbone changed; everything else is the caller's.
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded["params"]["pixel_decoder"],
                                   variables["params"]["pixel_decoder"]))
  scale_col = "batch_stats" if norm == "frozen_bn" else "params"
  assert "scale" in loaded[scale_col]["backbone"]["stem"]["bn"]
  bvars = {col: tree["backbone"] for col, tree in loaded.items()}
  feats = run(ResNet(depth, 8, norm), bvars, x)
  with torch.no_grad():
    ref_feats = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  for level, r in zip(("res2", "res3", "res4", "res5"), ref_feats):
    r = r.permute(0, 2, 3, 1).numpy()
    assert feats[level].shape == r.shape
    assert maxdiff(feats[level], r) <= 1e-4 * max(1.0, float(np.abs(r).max()))


def test_torchvision_bad_keys_are_named():
  ref = TorchResNet(18, 8)
  sd = dict(ref.state_dict())
  sd.pop("layer2.0.downsample.0.weight")
  sd["layer5.0.conv1.weight"] = torch.zeros(1)
  sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
  module = build_model(dict(resnet_depth=18, resnet_width=8, conv_dim=32, mask_dim=32, hidden_dim=32,
                            num_heads=4, dec_layers=1, num_queries=2, num_classes=2))
  variables = abstract_variables(module)
  with pytest.raises(ValueError) as e:
    load_torchvision_resnet(sd, variables)
  msg = str(e.value)
  for key in ("layer2.0.downsample.0.weight", "layer5.0.conv1.weight", "conv1.weight"):
    assert key in msg
  assert re.search(r"1 missing .*1 unexpected .*1 mis-shaped", msg, re.S)
  with pytest.raises(ValueError, match="unexpected"):  # R50 weights into an R18 model
    load_torchvision_resnet(TorchResNet(50, 8).state_dict(), variables)


# --- full-size parameter count --------------------------------------------------------------------

def _count(variables) -> int:
  """Trainable-equivalent count: params plus BN scale/bias (HF counts those as parameters; running
  statistics are buffers in both)."""
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  flat = jax.tree_util.tree_flatten_with_path(variables.get("batch_stats", {}))[0]
  n += sum(x.size for p, x in flat if getattr(p[-1], "key", None) in ("scale", "bias"))
  return n


def test_r50_ade20k_parameter_count_matches_hf_and_paper():
  import pathlib
  from maskformer_jax.config import load_config
  mcfg = load_config(pathlib.Path(__file__).parent.parent / "configs" / "ade20k.py").model
  ours = _count(abstract_variables(build_model(mcfg)))
  hf = MaskFormerForInstanceSegmentation(MaskFormerConfig(
      backbone_config=ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                   layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"]),
      decoder_config=DetrConfig(num_queries=100), num_labels=150))
  theirs = sum(p.numel() for p in hf.parameters())
  assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
  assert ours == theirs  # same architecture: exact
  assert abs(ours - 41e6) / 41e6 < 0.02, ours  # docs/reference.md section 5: R50 ~41M
  # "+6 Enc" adds the 1x1 projection and 6 encoder layers (docs/reference.md section 5: ~45M).
  mcfg.pixel_decoder = "transformer_encoder"
  plus6 = _count(abstract_variables(build_model(mcfg)))
  assert math.isclose(plus6, 45e6, rel_tol=0.03), plus6


@pytest.mark.parametrize("variant", ["swin_t", "swin_l"])
def test_swin_coco_parameter_count_matches_hf(variant):
  """The published COCO Swin models (configs/coco_panoptic.py:backbone=...) against HF's MaskFormer with
  the same Swin: equal, less the final LayerNorm HF's Swin carries and MaskFormer never uses; Swin-T ~42M
  and Swin-L ~212M as published (docs/reference.md section 1)."""
  import pathlib
  from maskformer_jax.config import load_config
  from maskformer_jax.models.swin import SWIN_VARIANTS
  mcfg = load_config(pathlib.Path(__file__).parent.parent / "configs" / f"coco_panoptic.py:backbone={variant}").model
  ours = _count(abstract_variables(build_model(mcfg)))
  v = SWIN_VARIANTS[variant]
  with torch.device("meta"):  # shapes only: Swin-L's 212M parameters are never allocated
    hf = MaskFormerForInstanceSegmentation(MaskFormerConfig(
        backbone_config=SwinConfig(embed_dim=v["swin_embed_dim"], depths=list(v["swin_depths"]),
                                   num_heads=list(v["swin_num_heads"]), window_size=v["swin_window_size"],
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        decoder_config=DetrConfig(num_queries=100), num_labels=133))
  unused = sum(p.numel() for n, p in hf.named_parameters() if HF_IGNORED.search(n))
  theirs = sum(p.numel() for p in hf.parameters()) - unused
  assert unused == 2 * 8 * v["swin_embed_dim"]  # the one LayerNorm over the last stage's 8C channels
  # HF has no enforced input projection (docs/reference.md section 6): res5 has 8C != 256 channels, so
  # both models project anyway.
  assert ours == theirs, (ours, theirs)
  assert math.isclose(ours, {"swin_t": 42e6, "swin_l": 212e6}[variant], rel_tol=0.03), ours


@pytest.mark.slow
def test_full_size_r50_parity_against_float64_reference():
  """Full widths (ADE20K R50: 2048-channel res5, Q=100, K=150). With randomised BN the res5 activations
  reach ~3e3 and float32 rounding alone moves HF's own mask logits by ~1e-3 from a float64 run, so the
  fixed 1e-4 bar applies to the small configs above; here ours must be as close to HF-in-float64 as HF's
  float32 forward is (measured: ours 1.2e-3, HF 1.6e-3 at 128x160)."""
  hf = make_hf(depth=50, width=64, hidden=256, heads=8, ffn=2048, layers=6, queries=100, labels=150,
               conv_dim=256, mask_dim=256)
  module, variables = from_hf(hf)
  x = images(1, 64, 96, seed=11)
  out = run(module, variables, x)
  ref32 = hf_forward(hf, x)
  with torch.no_grad():
    ref64 = hf.double()(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().double())
  for ours_key, hf_key_ in (("pred_logits", "class_queries_logits"), ("pred_masks", "masks_queries_logits")):
    truth = getattr(ref64, hf_key_).numpy()
    ours_err = maxdiff(out[ours_key], truth)
    hf_err = maxdiff(getattr(ref32, hf_key_).numpy(), truth)
    assert ours_err <= 2 * hf_err + 1e-5, (ours_key, ours_err, hf_err)
    assert ours_err <= 1e-4 * max(1.0, float(np.abs(truth).max())), (ours_key, ours_err)
