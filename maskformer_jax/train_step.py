"""The jitted train and eval steps, partitioned over the ('data', 'model') mesh by NamedShardings.

One step: normalise the uint8 images on device -> model -> matching + set criterion per decoder layer
-> gradients (optionally accumulated over micro-batches) -> AdamW update, skipped when any gradient is
non-finite (counted, not applied) -> metrics as (sum, count) pairs. The state is a plain dict:
{'params', 'batch_stats', 'opt_state', 'step', 'rng', 'skipped'}; 'step' counts calls, 'skipped' the
updates that were dropped, so the optimizer's own count (the LR schedule's step) is step - skipped.

The batch is the global batch: under jit with NamedShardings a jnp.sum over it is already a sum over
every device and every process, so num_masks and the CE normaliser are global without explicit psums.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskformer_jax import criterion
from maskformer_jax import optim
from maskformer_jax import sharding
from maskformer_jax.models import normalize_image


def init_fn(config, model):
  """`rng -> state`: the initial train state (traced abstractly by state_shardings and tpu_compile)."""
  h, w = config.data.image_size

  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)
    params = variables["params"]
    return {
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": optim.make_optimizer(config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": state_rng,
        "skipped": jnp.zeros((), jnp.int32),
    }

  return init


def state_shardings(config, model, mesh):
  """NamedShardings of the train state (replicated, FSDP over 'data' and/or split over 'model')."""
  abstract = jax.eval_shape(init_fn(config, model), jax.random.key(0))
  return sharding.state_shardings(abstract, mesh, config.mesh)


def init_state(config, model, mesh, rng, shardings=None):
  """The initial train state, created directly in its sharded layout (never whole on one device).

  `shardings` (from state_shardings) saves tracing the model and optimizer init once more.
  """
  shardings = shardings or state_shardings(config, model, mesh)
  return jax.jit(init_fn(config, model), out_shardings=shardings)(rng)


def shard_batch(batch, mesh):
  """This process's numpy batch (leading axis = its share of the global batch) -> global arrays."""
  s = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def cpu_compiler_options(mesh=None):
  """XLA options for the train step on CPU: convolutions without YNNPACK (dots keep it).

  XLA:CPU hands convolutions to YNNPACK by default, whose kernel gradients run 2-4x slower than XLA's
  own convolutions (a 3x3 256->256 conv on 2x128x128: 2.3 s vs 0.58 s); the COCO R50 train step takes
  8.1 s instead of 11.4 s without them (docs/benchmarks.md, "Where the train step's time goes"). Its
  forward convolutions are faster, so inference and evaluation keep the default. None for a mesh of other
  devices (a CPU host compiling for a TPU slice), and on jaxlib series other than the one measured (the
  option is experimental; an unknown one fails).
  """
  from jaxlib import version
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  if platform != "cpu" or not version.__version__.startswith("0.10."):
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def hardware_rng(key):
  """`key` (threefry) -> an "rbg" key seeded from it, for the dropout masks.

  Its bits come from XLA's RngBitGenerator, one operation, where threefry writes ~100 bit operations per
  random number into the program: the main COCO recipe's TPU compile took 317 s with threefry dropout and
  217 s with this (docs/benchmarks.md, "Will it fit?"), and the TPU generates such bits in hardware. Keys
  are still split and folded by threefry, so the masks are a deterministic function of the state's rng and
  do not depend on how the batch is laid out over devices (tests/test_train_step.py).
  """
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def make_train_step(config, model, mesh, shardings=None):
  """The jitted `(state, batch) -> (state, metrics)`; `state` is donated.

  With grad_accum_steps = n the global batch is split into n micro-batches (each spread over every
  data shard) whose gradients are summed in a lax.scan; num_masks and the CE weight sum are taken over
  the full batch, so the result equals the one large-batch step (up to float summation order) when the
  model itself is per-example (frozen BN, which is the original; trainable BN sees micro-batch
  statistics, and dropout draws different masks). The batch's divisibility over the mesh and into
  micro-batches is checked by maskformer_jax.config.validate.
  """
  accum = int(config.grad_accum_steps)
  tx = optim.make_optimizer(config)
  lr_fn = optim.learning_rate(config)
  lc = config.loss
  bn = config.model.backbone_norm == "bn"
  num_queries = int(config.model.num_queries)
  state_sh = shardings or state_shardings(config, model, mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def loss_fn(params, batch_stats, batch, rng, num_masks, ce_norm):
    dropout_rng, loss_rng = jax.random.split(rng)
    dropout_rng = hardware_rng(dropout_rng)
    variables = {"params": params, "batch_stats": batch_stats}
    images = normalize_image(batch["image"], batch.get("image_size"))
    if bn:
      outputs, new_vars = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng},
                                      mutable=["batch_stats"])
      batch_stats = new_vars["batch_stats"]
    else:
      outputs = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng})
    loss, terms = criterion.set_criterion(outputs, batch, lc, num_masks=num_masks, rng=loss_rng,
                                          ce_norm=ce_norm)
    return loss, (terms, batch_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params, rng = state["params"], jax.random.fold_in(state["rng"], state["step"])
    batch = {k: batch[k] for k in ("image", "image_size", "segments", "labels", "valid") if k in batch}
    num_masks = criterion.num_masks(batch)
    ce_norm = criterion.class_weight_sum(batch, num_queries, lc.eos_coef)
    if accum == 1:
      (loss, (terms, batch_stats)), grads = grad_fn(params, state["batch_stats"], batch, rng,
                                                    num_masks, ce_norm)
    else:
      # [B, ...] -> [accum, B / accum, ...] taking every accum-th example, so that each micro-batch
      # keeps an equal share on every data shard.
      def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, "data")
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

      def body(carry, xs):
        grads, terms, batch_stats = carry
        micro, i = xs
        (_, (t, batch_stats)), g = grad_fn(params, batch_stats, micro, jax.random.fold_in(rng, i),
                                           num_masks, ce_norm)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, terms, t), batch_stats), None

      micro = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, params)
      abstract = jax.eval_shape(grad_fn, params, state["batch_stats"],
                                jax.tree.map(lambda x: x[0], micro), rng, num_masks, ce_norm)
      zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract[0][1][0])
      (grads, terms, batch_stats), _ = jax.lax.scan(
          body, (zeros, zero_terms, state["batch_stats"]), (micro, jnp.arange(accum)))
      loss = terms["loss"]

    # Any non-finite gradient makes the global norm non-finite (as does a norm whose square overflows,
    # a step AdamW could not apply either). One scalar behind a barrier: a per-leaf isfinite reduced
    # over ~300 leaves was fused into each of the ~900 selects below, 180k HLO ops and most of the
    # step's compile time on CPU (docs/benchmarks.md, issue #12).
    grad_norm = optax.tree.norm(grads)
    finite = jax.lax.optimization_barrier(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    skipped = (~finite).astype(jnp.int32)
    new_state = {
        "params": keep(new_params, params),
        "batch_stats": keep(batch_stats, state["batch_stats"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "skipped": state["skipped"] + skipped,
    }
    one = jnp.ones((), jnp.float32)
    metrics = {k: (v.astype(jnp.float32), one) for k, v in terms.items()}
    metrics["grad_norm"] = (grad_norm, one)
    metrics["learning_rate"] = (lr_fn(state["step"] - state["skipped"]).astype(jnp.float32), one)
    metrics["skipped"] = (skipped.astype(jnp.float32), one)
    metrics["num_masks"] = (jnp.sum(batch["valid"]).astype(jnp.float32), one)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=0, compiler_options=cpu_compiler_options(mesh))


def make_eval_step(config, model, mesh, shardings=None):
  """The jitted `(state, batch) -> {'pred_logits', 'pred_masks'}` (main layer), sharded over 'data'."""
  state_sh = shardings or state_shardings(config, model, mesh)
  batch_sh = sharding.batch_sharding(mesh)

  def step(state, batch):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    out = model.apply(variables, normalize_image(batch["image"], batch.get("image_size")), train=False)
    return {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=batch_sh)
