"""Side by side with the PyTorch MaskFormer (Hugging Face modules, wired as the original) in one process.

  python -m maskformer_jax.bench.vs_pytorch speed --decoder fpn --batch 2 --size 512 512 --rounds 5
  python -m maskformer_jax.bench.vs_pytorch speed --decoder m2f --batch 2 --size 512 512 --rounds 5
  python -m maskformer_jax.bench.vs_pytorch trajectory --steps 50

`speed`: the train step (forward, the loss with deep supervision, backward, full-model clipping, AdamW)
and inference (the forward pass as evaluation runs it: the last layer's class and mask predictions, no
auxiliary heads) of the same configuration (R50 with the FPN or the "+6 Enc" pixel decoder, or the R50
Mask2Former against HF's Mask2FormerForUniversalSegmentation and its loss) on the same inputs, ours and PyTorch alternated round by round; medians, ratios, our XLA compile time and
FLOPs (XLA cost analysis). `--memory` adds each side's peak resident memory, measured in a child process
of its own that builds and trains only that side (one process cannot separate two frameworks'
allocations); each figure includes its framework's runtime.

`trajectory`: the same initial weights (ours converted from the torch model), the same batches, dropout
off: N AdamW steps of each, with the original's optimiser rules decided independently on each side (ours:
regexes over parameter paths, maskformer_jax/optim.py; torch: detectron2's build_optimizer rules by module
type and name), the warm-up and step schedule, clipping at 0.01. Prints the loss of both at every step and
their largest relative difference; this checks the whole training stack (matching, losses, gradients,
clipping, weight-decay exclusions, schedule) against an implementation we did not write.

The torch reference is HF's MaskFormer: its ResNet (batch norm frozen, as detectron2's FrozenBN), pixel
decoder, DETR decoder, heads, matcher and loss. Two original details HF lacks are added from HF modules:
the auxiliary outputs through the decoder's shared LayerNorm, and the "+6 Enc" encoder (HF DETR encoder
layers on the projected res5, sine positions), as docs/reference.md section 6 describes.
"""
import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from maskformer_jax import sharding
from maskformer_jax import train_step as ts
from maskformer_jax.bench.train_step import make_batch, xla_flops
from maskformer_jax.config import base_config
from maskformer_jax.convert import merge_variables
from maskformer_jax.convert import hf_mask2former
from maskformer_jax.convert.hf import HF_IGNORED, abstract_variables, convert_state_dict, hf_key
from maskformer_jax.models import PIXEL_MEAN, PIXEL_STD, build_model

# --decoder: MaskFormer's two pixel decoders, or Mask2Former ("m2f": its deformable pixel decoder and
# masked-attention decoder, against HF's Mask2FormerForUniversalSegmentation and its own loss).
DECODERS = {"fpn": "base", "enc6": "transformer_encoder", "m2f": "base"}


def model_config(decoder="fpn", *, depth=50, width=64, num_classes=133, queries=100, hidden=256, heads=8,
                 ffn=2048, dec_layers=None, conv_dim=256, mask_dim=256, enc_layers=6, enc_ffn=1024):
  """Our config.model for a ResNet MaskFormer or ("m2f") Mask2Former, the COCO R50 shapes by default
  (6 decoder layers, or Mask2Former's 9), dropout off."""
  m2f = decoder == "m2f"
  return dict(arch="mask2former" if m2f else "maskformer", backbone="resnet", resnet_depth=depth,
              resnet_width=width, backbone_norm="frozen_bn", pixel_decoder=DECODERS[decoder], conv_dim=conv_dim,
              mask_dim=mask_dim, pixel_encoder_layers=enc_layers, pixel_dim_feedforward=enc_ffn,
              num_queries=queries, hidden_dim=hidden, num_heads=heads, dim_feedforward=ffn,
              dec_layers=dec_layers or (9 if m2f else 6), dropout=0.0, enforce_input_proj=False,
              num_classes=num_classes, dtype="float32")


def train_config(cfg, *, batch, size, max_instances, total_steps=1000, warmup_steps=10, warmup_factor=1.0,
                 decay_steps=()):
  """Our full config around `cfg` (the COCO recipe's optimiser, and the loss of cfg's architecture as
  HF's defaults have it: Mask2Former's on 12544 points), on one device."""
  c = base_config()
  c.model.update(cfg)
  if cfg["arch"] == "mask2former":
    l = c.loss
    l.mask_loss, l.class_weight, l.mask_weight, l.dice_weight = "bce", 2.0, 5.0, 5.0
    l.cost_class, l.cost_mask, l.cost_dice = 2.0, 5.0, 5.0
    l.point_sampling, l.num_points, l.matcher_num_points = True, 12544, 12544
  c.batch_size, c.total_steps = batch, total_steps
  c.data.image_size, c.data.max_instances = tuple(size), max_instances
  o = c.optim
  o.warmup_steps, o.warmup_factor, o.decay_steps = warmup_steps, warmup_factor, tuple(decay_steps)
  c.mesh.data = 1
  return c


def hf_model(cfg, seed=0):
  """A randomly initialised HF MaskFormerForInstanceSegmentation with the shapes of our ResNet `cfg`
  (dropout off)."""
  import torch
  from transformers import DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig
  from maskformer_jax.models.backbone import RESNET_STAGES, stage_channels
  torch.manual_seed(seed)
  blocks, bottleneck = RESNET_STAGES[cfg["resnet_depth"]]
  return MaskFormerForInstanceSegmentation(MaskFormerConfig(
      backbone_config=ResNetConfig(embedding_size=cfg["resnet_width"],
                                   hidden_sizes=list(stage_channels(cfg["resnet_depth"], cfg["resnet_width"])),
                                   depths=list(blocks), layer_type="bottleneck" if bottleneck else "basic",
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
      decoder_config=DetrConfig(d_model=cfg["hidden_dim"], decoder_layers=cfg["dec_layers"],
                                decoder_ffn_dim=cfg["dim_feedforward"], decoder_attention_heads=cfg["num_heads"],
                                num_queries=cfg["num_queries"], dropout=0.0, attention_dropout=0.0,
                                activation_dropout=0.0, encoder_layers=1),
      num_labels=cfg["num_classes"], fpn_feature_size=cfg["conv_dim"], mask_feature_size=cfg["mask_dim"]))


class TorchReference:
  """The original's forward and loss from the modules of an HF MaskFormer `hf` (see the module
  docstring); with `enc_layers` > 0 the "+6 Enc" pixel decoder is added (new, randomly initialised
  modules). `.model` is `hf`, which then holds every trained parameter."""

  def __init__(self, hf, enc_layers=0):
    import torch
    from transformers import DetrConfig
    from transformers.models.detr.modeling_detr import DetrEncoderLayer
    from transformers.models.maskformer.modeling_maskformer import (MaskFormerPixelDecoder,
                                                                    MaskFormerSinePositionEmbedding,
                                                                    MaskFormerTransformerModule)
    self.model, c = hf, hf.config
    conv = c.fpn_feature_size
    self.encoder_layers = None
    if enc_layers:
      # The FPN then reads the encoder output (conv_dim channels) at res5, and so does the decoder (as
      # ours, no input projection when conv_dim equals hidden_dim).
      chans = hf.model.pixel_level_module.encoder.channels
      dec = MaskFormerPixelDecoder(in_features=conv, feature_size=conv, mask_feature_size=c.mask_feature_size,
                                   lateral_widths=chans[:-1])
      dec.input_projection = torch.nn.Conv2d(chans[-1], conv, kernel_size=1)
      detr = DetrConfig(d_model=conv, encoder_attention_heads=c.decoder_config.decoder_attention_heads,
                        encoder_ffn_dim=c.decoder_config.decoder_ffn_dim, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0)
      dec.encoder_layers = self.encoder_layers = torch.nn.ModuleList(
          [DetrEncoderLayer(detr) for _ in range(enc_layers)])
      hf.model.pixel_level_module.decoder = dec
      hf.model.transformer_module = MaskFormerTransformerModule(in_features=conv, config=c)
    self.pos = MaskFormerSinePositionEmbedding(num_position_features=conv // 2, normalize=True)
    self.weights = {"loss_cross_entropy": c.cross_entropy_weight, "loss_mask": c.mask_weight,
                    "loss_dice": c.dice_weight}
    self.train(False)

  @classmethod
  def from_config(cls, cfg, seed=0):
    """The reference for our model config `cfg` (ResNet backbone), randomly initialised."""
    enc = cfg["pixel_encoder_layers"] if cfg["pixel_decoder"] == "transformer_encoder" else 0
    return cls(hf_model(cfg, seed), enc)

  def train(self, mode=True):
    """Train mode with frozen batch norm (statistics and affine fixed, as detectron2's FrozenBN)."""
    import torch
    self.model.train(mode)
    for m in self.model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    return self

  def forward(self, x, aux=True):
    """x: normalised NCHW float32 -> (logits, masks, [(aux logits, aux masks), ...] or [] without aux)."""
    import torch
    hf = self.model
    plm = hf.model.pixel_level_module
    feats = list(plm.encoder(x).feature_maps)
    memory = feats[-1]
    if self.encoder_layers is not None:
      res5 = plm.decoder.input_projection(memory)
      b, c, h, w = res5.shape
      pos = self.pos(res5.shape, res5.device, res5.dtype).flatten(2).transpose(1, 2)
      t = res5.flatten(2).transpose(1, 2)
      for layer in self.encoder_layers:
        t = layer(t, attention_mask=None, spatial_position_embeddings=pos)
      memory = feats[-1] = t.transpose(1, 2).reshape(b, c, h, w)
    pix = plm.decoder(feats).last_hidden_state
    out = hf.model.transformer_module(memory, output_hidden_states=True)
    norm = hf.model.transformer_module.decoder.layernorm

    def heads(q):
      return hf.class_predictor(q), torch.einsum("bqc,bchw->bqhw", hf.mask_embedder(q), pix)

    logits, masks = heads(out.last_hidden_state)
    return logits, masks, [heads(norm(h)) for h in out.hidden_states[1:-1]] if aux else []

  def loss(self, x, mask_labels, class_labels):
    logits, masks, aux = self.forward(x)
    aux = [{"masks_queries_logits": m, "class_queries_logits": lg} for lg, m in aux]
    terms = self.model.criterion(masks, logits, mask_labels, class_labels, auxiliary_predictions=aux)
    return sum(self.weights[k.rstrip("_0123456789")] * v for k, v in terms.items())

  def parameters(self):
    return [p for p in self.model.parameters() if p.requires_grad]

  def state_dict(self):
    return self.model.state_dict()


class Mask2FormerReference(TorchReference):
  """HF's Mask2FormerForUniversalSegmentation as it is (model, matcher, point-sampled loss with its
  default weights), behind TorchReference's interface."""

  def __init__(self, hf):
    self.model = hf
    self.train(False)

  @classmethod
  def from_config(cls, cfg, seed=0):
    """A randomly initialised HF Mask2Former with the shapes of our ResNet `cfg` (dropout off)."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from maskformer_jax.models.backbone import RESNET_STAGES, stage_channels
    torch.manual_seed(seed)
    blocks, bottleneck = RESNET_STAGES[cfg["resnet_depth"]]
    backbone = ResNetConfig(embedding_size=cfg["resnet_width"],
                            hidden_sizes=list(stage_channels(cfg["resnet_depth"], cfg["resnet_width"])),
                            depths=list(blocks), layer_type="bottleneck" if bottleneck else "basic",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    return cls(Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=backbone, feature_size=cfg["conv_dim"], mask_feature_size=cfg["mask_dim"],
        hidden_dim=cfg["hidden_dim"], encoder_layers=cfg["pixel_encoder_layers"],
        encoder_feedforward_dim=cfg["pixel_dim_feedforward"], decoder_layers=cfg["dec_layers"] + 1,
        num_attention_heads=cfg["num_heads"], dim_feedforward=cfg["dim_feedforward"],
        num_queries=cfg["num_queries"], num_labels=cfg["num_classes"], dropout=0.0)))

  def forward(self, x, aux=True):
    out = self.model(pixel_values=x, output_auxiliary_logits=aux)
    aux_out = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits or []]
    return out.class_queries_logits, out.masks_queries_logits, aux_out

  def loss(self, x, mask_labels, class_labels):
    return self.model(pixel_values=x, mask_labels=mask_labels, class_labels=class_labels).loss


def reference(cfg, seed=0):
  """The torch reference for our model config `cfg`: Mask2FormerReference or TorchReference."""
  cls = Mask2FormerReference if cfg["arch"] == "mask2former" else TorchReference
  return cls.from_config(cfg, seed)


def torch_optimizer(ref, optim_config):
  """AdamW with detectron2's build_optimizer rules, decided on the torch modules themselves: no weight
  decay on norm layers (BatchNorm, GroupNorm, LayerNorm) and embeddings, the backbone multiplier on
  every parameter under the backbone; the step schedule with linear warm-up as a LambdaLR."""
  import torch
  o = optim_config
  norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
  groups = []
  for module_name, module in ref.model.named_modules():
    for name, p in module.named_parameters(recurse=False):
      if not p.requires_grad:
        continue
      no_decay = isinstance(module, norms) or isinstance(module, torch.nn.Embedding)
      backbone = module_name.startswith("model.pixel_level_module.encoder.")
      groups.append({"params": [p], "weight_decay": 0.0 if no_decay else float(o.weight_decay),
                     "lr": float(o.base_lr) * (float(o.backbone_multiplier) if backbone else 1.0)})
  opt = torch.optim.AdamW(groups, lr=float(o.base_lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps))

  def factor(t):  # detectron2 WarmupMultiStepLR, "linear" warm-up
    warm = 1.0
    if t < o.warmup_steps:
      alpha = t / o.warmup_steps
      warm = o.warmup_factor * (1 - alpha) + alpha
    return warm * o.decay_factor ** sum(t >= s for s in o.decay_steps)

  return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def torch_inputs(batch):
  """Our batch -> (normalised NCHW pixels, HF mask_labels, class_labels)."""
  import torch
  x = (batch["image"].astype(np.float32) - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
  x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  mask_labels, class_labels = [], []
  for seg, labels, valid in zip(batch["segments"], batch["labels"], batch["valid"]):
    slots = np.flatnonzero(valid)
    mask_labels.append(torch.from_numpy((seg[None] == slots[:, None, None]).astype(np.float32)))
    class_labels.append(torch.from_numpy(labels[slots].astype(np.int64)))
  return x, mask_labels, class_labels


def torch_train_step(ref, opt, sched, inputs, clip):
  import torch
  opt.zero_grad(set_to_none=True)
  loss = ref.loss(*inputs)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
  opt.step()
  sched.step()
  return float(loss.detach())


def ours_from_torch(config, ref):
  """Our model, mesh, train state (weights converted from `ref`) and jitted train step."""
  model = build_model(config.model)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  if config.model.arch == "mask2former":
    variables = hf_mask2former.convert_mask2former(ref.state_dict(), model)
  else:
    variables = convert_state_dict(ref.state_dict(), abstract_variables(model), hf_key, ignore=HF_IGNORED,
                                   source="torch reference")
  state = ts.init_state(config, model, mesh, jax.random.key(config.seed))
  state = merge_variables(state, variables, what="torch reference")
  return model, mesh, state, ts.make_train_step(config, model, mesh)


def trajectory(cfg, *, steps=50, batch=2, size=(64, 64), max_instances=8, seed=0, log=print):
  """Losses of ours and of torch over `steps` AdamW steps from the same weights on the same batches.

  The schedule warms up over 10 steps from 0.1 and decays x0.1 at 2/3 of the run, so every part of it
  is exercised. Returns {'ours': [...], 'torch': [...], 'max_rel': ...}.
  """
  import torch
  torch.manual_seed(seed)
  config = train_config(cfg, batch=batch, size=size, max_instances=max_instances, total_steps=steps,
                        warmup_steps=10, warmup_factor=0.1, decay_steps=(2 * steps // 3,))
  ref = reference(cfg, seed).train()
  opt, sched = torch_optimizer(ref, config.optim)
  model, mesh, state, step = ours_from_torch(config, ref)
  rng = np.random.default_rng(seed)
  ours, theirs = [], []
  for t in range(steps):
    b = make_batch(rng, batch, *size, max_instances, cfg["num_classes"], segments_per_image=max_instances // 2 + 1)
    state, metrics = step(state, ts.shard_batch(b, mesh))
    ours.append(float(metrics["loss"][0]))
    theirs.append(torch_train_step(ref, opt, sched, torch_inputs(b), float(config.optim.clip_norm)))
    log(f"step {t:3d}  ours {ours[-1]:.6f}  torch {theirs[-1]:.6f}  rel {abs(ours[-1] - theirs[-1]) / abs(theirs[-1]):.1e}")
  rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
  return {"ours": ours, "torch": theirs, "rel": rel, "max_rel": max(rel)}


def _timed(fn, pause=1.0):
  """One call's seconds, started on idle cores: both runtimes keep their worker threads spinning for a
  while after a call (XLA's pool, torch's OpenMP), which would slow whichever side runs next."""
  time.sleep(pause)
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def speed(cfg, *, batch, size, rounds, max_instances=100, segments=20, log=print):
  """Train step and inference forward of ours and torch for our model config `cfg`, alternated; medians
  (s), our compile times and the train step's XLA FLOPs."""
  import torch
  config = train_config(cfg, batch=batch, size=size, max_instances=max_instances)
  ref = reference(cfg).train()
  opt, sched = torch_optimizer(ref, config.optim)
  model, mesh, state, step = ours_from_torch(config, ref)
  b = make_batch(np.random.default_rng(0), batch, *size, max_instances, cfg["num_classes"], segments)
  inputs, sharded = torch_inputs(b), ts.shard_batch(b, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, sharded).compile()
  compile_s = time.perf_counter() - t0
  flops = xla_flops(compiled)
  def fwd(variables, x):  # what the eval step computes (XLA drops the auxiliary heads)
    out = model.apply(variables, x, train=False)
    return out["pred_logits"], out["pred_masks"]

  fwd = jax.jit(fwd)
  images = jax.numpy.asarray((b["image"].astype(np.float32) - np.asarray(PIXEL_MEAN, np.float32))
                             / np.asarray(PIXEL_STD, np.float32))
  t0 = time.perf_counter()
  fwd_compiled = fwd.lower({"params": state["params"], "batch_stats": state["batch_stats"]}, images).compile()
  fwd_compile_s = time.perf_counter() - t0

  holder = {"state": state}

  def ours_train():
    holder["state"], m = compiled(holder["state"], sharded)
    jax.block_until_ready(m)

  def ours_infer():
    v = {"params": holder["state"]["params"], "batch_stats": holder["state"]["batch_stats"]}
    jax.block_until_ready(fwd_compiled(v, images))

  def torch_train():
    torch_train_step(ref, opt, sched, inputs, float(config.optim.clip_norm))

  def torch_infer():
    ref.train(False)
    with torch.no_grad():
      ref.forward(inputs[0], aux=False)
    ref.train(True)

  for fn in (ours_train, torch_train, ours_infer, torch_infer):  # warm-up
    fn()
  med = {k: [] for k in ("ours_train", "torch_train", "ours_infer", "torch_infer")}
  for r in range(rounds):
    for name, fn in (("ours_train", ours_train), ("torch_train", torch_train), ("ours_infer", ours_infer),
                     ("torch_infer", torch_infer)):
      med[name].append(_timed(fn))
    log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in med.items()))
  out = {k: statistics.median(v) for k, v in med.items()}
  out.update(compile_s=compile_s, fwd_compile_s=fwd_compile_s, train_flops=flops)
  return out


def _peak_rss_child(side, cfg, batch, size, steps):
  """Peak resident memory (GiB) of a child process that builds one side only and trains `steps` steps:
  its framework's runtime included (and, for ours, the XLA compilation), as a run would need."""
  code = (f"from maskformer_jax.bench.vs_pytorch import _peak_rss_run; "
          f"_peak_rss_run({side!r}, {dict(cfg)!r}, {batch}, {tuple(size)}, {steps})")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=3600)
  return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_run(side, cfg, batch, size, steps):
  config = train_config(cfg, batch=batch, size=size, max_instances=100)
  b = make_batch(np.random.default_rng(0), batch, *size, 100, cfg["num_classes"], 20)
  if side == "torch":
    ref = reference(cfg).train()
    opt, sched = torch_optimizer(ref, config.optim)
    inputs = torch_inputs(b)
    for _ in range(steps):
      torch_train_step(ref, opt, sched, inputs, 0.01)
  else:
    model = build_model(config.model)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    state = ts.init_state(config, model, mesh, jax.random.key(0))
    sharded = ts.shard_batch(b, mesh)
    compiled = ts.make_train_step(config, model, mesh).lower(state, sharded).compile()
    for _ in range(steps):
      state, m = compiled(state, sharded)
      jax.block_until_ready(m)
  print(_peak_rss_gib())


def _peak_rss_gib():
  """This process's peak resident memory: VmHWM of its own address space. (getrusage's ru_maxrss is
  kept across fork and exec on Linux, so a child started from a large parent reports the parent's.)"""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20  # kB -> GiB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # not Linux


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("mode", choices=["speed", "trajectory"])
  p.add_argument("--decoder", nargs="+", default=["fpn", "enc6"], choices=sorted(DECODERS))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, nargs=2, default=None, help="H W (speed: 512 512, trajectory: 64 64)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=50, help="trajectory: AdamW steps")
  p.add_argument("--memory", action="store_true", help="speed: also each side's peak memory (child processes)")
  args = p.parse_args(argv)
  import torch
  where = (f"{platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
           f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  if args.mode == "trajectory":
    cfg = model_config("enc6", depth=18, width=16, num_classes=5, queries=8, hidden=32, heads=4, ffn=64,
                       dec_layers=3, conv_dim=32, mask_dim=32, enc_layers=2)
    size = tuple(args.size or (64, 64))
    r = trajectory(cfg, steps=args.steps, batch=args.batch, size=size)
    print(f"\n{where}; R18-width-16 '+6 Enc'-style model (2 encoder, 3 decoder layers), batch {args.batch} at "
          f"{size[0]}x{size[1]}, {args.steps} AdamW steps")
    print(f"max relative loss difference {r['max_rel']:.2e}; first {r['rel'][0]:.1e}, last {r['rel'][-1]:.1e}")
    return
  args.size = tuple(args.size or (512, 512))
  print(f"| decoder | ours train s | torch train s | ours/torch | ours infer s | torch infer s | ours/torch "
        f"| our compile s (train / infer) | train GFLOP (XLA) |{' peak GiB ours / torch |' if args.memory else ''}")
  print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.memory else ""))
  for decoder in args.decoder:
    cfg = model_config(decoder)
    r = speed(cfg, batch=args.batch, size=args.size, rounds=args.rounds, log=lambda s: print(s, file=sys.stderr))
    mem = ""
    if args.memory:
      mem = " {:.2f} / {:.2f} |".format(*(_peak_rss_child(s, cfg, args.batch, args.size, 2)
                                          for s in ("ours", "torch")))
    print(f"| {decoder} | {r['ours_train']:.2f} | {r['torch_train']:.2f} | {r['ours_train'] / r['torch_train']:.2f} "
          f"| {r['ours_infer']:.2f} | {r['torch_infer']:.2f} | {r['ours_infer'] / r['torch_infer']:.2f} "
          f"| {r['compile_s']:.0f} / {r['fwd_compile_s']:.0f} | {r['train_flops'] / 1e9:.0f} |{mem}", flush=True)
  print(f"\n{where}; batch {args.batch} at {args.size[0]}x{args.size[1]}, 133 classes, 100 queries, 20 segments "
        f"per image, medians of {args.rounds} alternated rounds")


if __name__ == "__main__":
  main()
