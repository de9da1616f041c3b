"""Mask2Former, the published recipes (docs/reference.md section 12); the number each targets is the
published one.

  --config configs/mask2former.py                              COCO panoptic R50               PQ 51.9
  --config configs/mask2former.py:backbone=swin_l              COCO panoptic Swin-L (IN-22K)   PQ 57.8
  --config configs/mask2former.py:task=coco_instance           COCO instance R50               AP 43.7
  --config configs/mask2former.py:task=coco_instance,backbone=swin_l
                                                               COCO instance Swin-L (IN-22K)   AP 50.1
  --config configs/mask2former.py:task=ade20k                  ADE20K semantic R50             mIoU 47.2
  --config configs/mask2former.py:task=ade20k,backbone=swin_l  ADE20K semantic Swin-L (IN-22K) mIoU 56.1
  --config configs/mask2former.py:runlocal                     the same code paths at toy size (tests);
                                                               also e.g. :backbone=swin_t,runlocal
  (backbone= also r101, swin_t, swin_s, swin_b: the original's recipes for them, without a number here)

Every variant shares one recipe (unlike MaskFormer, Swin gets no optimiser of its own): AdamW at 1e-4,
weight decay 0.05 (none on norms, embeddings and Swin's position tables), backbone LR x0.1, full-model
clipping at 0.01, batch 16; the loss is class 2 + BCE 5 + dice 5 on 12544 importance-sampled points, with
matching costs on 12544 uniform points; 9 masked-attention layers (10 predictions, each supervised).
COCO: 50 epochs (368,750 steps, x0.1 at 327,778 and 355,092; Swin-L 100 epochs and 200 queries) with
large-scale jitter on a 1024 canvas, evaluated at 800 / 1333 for PQ and mask AP; the instance recipe is
the same on COCO's instance annotations (80 classes, overlapping masks: data.dataset "coco_instance",
targets in data.instance_layers layers), evaluated by mask AP against the instance file. ADE20K: 160k steps, poly,
the semantic recipe at 512 (640 and test size 640 / 2560 for Swin-B/L). The original trains with mixed
precision (AMP), so the compute dtype here is bfloat16 (parameters stay float32).
"""
from maskformer_jax.config import ade20k, family, finish

_COCO_STEPS = {50: (368_750, (327_778, 355_092)), 100: (737_500, (655_556, 710_184))}


def get_config(arg=None):
  c, a = family(arg, "configs/mask2former.py", task="coco_panoptic")
  tasks = ("ade20k", "coco_instance", "coco_panoptic")
  if a.task not in tasks:
    raise ValueError(f"configs/mask2former.py: task={a.task!r} is not one of {list(tasks)}.")
  m = c.model
  m.arch, m.dec_layers, m.dropout = "mask2former", 9, 0.0
  m.dtype = "bfloat16"
  if a.backbone == "swin_l" and a.task != "ade20k":
    m.num_queries = 200
  l = c.loss
  l.mask_loss, l.class_weight, l.mask_weight, l.dice_weight = "bce", 2.0, 5.0, 5.0
  l.cost_class, l.cost_mask, l.cost_dice = 2.0, 5.0, 5.0
  l.point_sampling, l.num_points, l.matcher_num_points = True, 12544, 12544
  o = c.optim
  o.base_lr, o.weight_decay, o.backbone_multiplier = 1e-4, 0.05, 0.1
  c.batch_size = 16
  if a.task in ("coco_panoptic", "coco_instance"):
    c.total_steps, o.decay_steps = _COCO_STEPS[100 if a.backbone == "swin_l" else 50]
    o.warmup_steps = 10
    c.data.recipe, c.data.image_size = "lsj", (1024, 1024)
    if a.task == "coco_instance":  # the instance annotations; mask AP only
      c.data.dataset, m.num_classes = "coco_instance", 80
      c.evals.val.type, c.train.best_metric = "instance", "val/ap"
    elif not a.runlocal:  # Mask2Former reports mask AP beside PQ (see configs/coco_panoptic.py)
      with c.evals.unlocked():
        c.evals.val_instance = dict(c.evals.val.to_dict(), type="instance", every=20000, image_summaries=0)
  else:
    ade20k(c, large=a.backbone in ("swin_b", "swin_l"))
    c.optim.decay_steps = ()
  c = finish(c, a)
  if a.runlocal:
    c.loss.num_points = c.loss.matcher_num_points = 256
  return c

