"""Semantic segmentation mIoU as detectron2's SemSegEvaluator (which the original MaskFormer reports).

A (K+1) x (K+1) confusion matrix (rows: prediction, columns: ground truth, the last of each the ignore
bucket) is accumulated with one bincount per image. detectron2's definition, kept here:
- ground-truth pixels equal to `ignore_label` are left out (a prediction there counts nowhere);
- a class counts in mIoU only if it occurs in the ground truth (`pos_gt > 0`); a class that is only
  predicted (a pure false-positive class) is left out of the mean, unlike torchmetrics' JaccardIndex,
  which averages it in as IoU 0. Its false positives still lower the IoU of the true classes they cover;
- per-class IoU is NaN for classes left out; pixel accuracy = sum TP / number of non-ignored pixels.
The state is the int64 confusion matrix, to be summed across hosts.
"""
import numpy as np


class MIoUAccumulator:
  """Dataset-level mIoU, mean class accuracy, frequency-weighted IoU and pixel accuracy."""

  def __init__(self, num_classes: int, ignore_label: int = 255):
    self.num_classes = int(num_classes)
    self.ignore_label = ignore_label
    self.conf = np.zeros((self.num_classes + 1, self.num_classes + 1), np.int64)

  def add(self, pred, gt) -> None:
    """One image (or a batch): pred, gt int maps of the same shape with classes 0..K-1."""
    pred = np.asarray(pred, np.int64).reshape(-1)
    gt = np.asarray(gt, np.int64).reshape(-1)
    if pred.shape != gt.shape:
      raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ")
    k = self.num_classes
    gt = np.where(gt == self.ignore_label, k, gt)
    if ((gt < 0) | (gt > k)).any() or ((pred < 0) | (pred >= k)).any():
      raise ValueError("class ids out of range")
    self.conf += np.bincount((k + 1) * pred + gt, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

  def state(self) -> np.ndarray:
    return self.conf.copy()

  def merge(self, state) -> None:
    """Add other confusion matrices; leading axes (hosts) are summed."""
    self.conf += np.asarray(state, np.int64).reshape(-1, *self.conf.shape).sum(0)

  def reset(self) -> None:
    self.conf[:] = 0

  def result(self) -> dict:
    """{'miou', 'per_class_iou' (NaN where left out), 'macc', 'fwiou', 'pixel_acc'}, fractions."""
    conf = self.conf[:-1, :-1].astype(np.float64)
    tp = np.diag(conf)
    pos_gt, pos_pred = conf.sum(0), conf.sum(1)
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou = np.full(self.num_classes, np.nan)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    acc = np.full(self.num_classes, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    total = pos_gt.sum()
    return dict(miou=float(iou[iou_valid].mean()) if iou_valid.any() else 0.0,
                per_class_iou=iou,
                macc=float(acc[acc_valid].mean()) if acc_valid.any() else 0.0,
                fwiou=float((iou[iou_valid] * pos_gt[iou_valid]).sum() / total) if total else 0.0,
                pixel_acc=float(tp.sum() / total) if total else 0.0)
