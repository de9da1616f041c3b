"""Input pipeline: dataset sources, training/eval recipes and the Grain loader.

  pipeline.make_source(config, split)  -> CocoPanopticSource | Ade20kSource | TfdsCocoPanopticSource
  pipeline.make_loader(config, split, train=..., seed=...) -> grain.DataLoader of per-host batches
  python -m maskformer_jax.data.synthetic --out DIR   (a synthetic dataset in the COCO panoptic layout)
  python -m maskformer_jax.data.check --config ...    (validate a dataset)

The batch contract is in docs/interfaces.md. Submodules are imported on use, so importing the package
stays cheap (no TFDS, no transformers).
"""
