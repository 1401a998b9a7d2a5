"""Face-recognition backbones, created by name.

`create_model(name, ...)` returns a flax.linen Module mapping normalised float32 images
[B, H, W, 3] to float32 embeddings [B, embedding_dim] (not L2-normalised; the margin head
normalises). Variables: {'params', 'batch_stats'}; call with train=True,
mutable=['batch_stats'] and rngs={'dropout': key} to train.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from adam_face.models.iresnet import IResNet
from adam_face.models.mobilefacenet import MBF_BOTTLENECKS, MobileFaceNet, depthwise_implementation

_FACTORIES = {
    # Stage depths of insightface's iresnet18/34/50/100/200.
    "iresnet18": functools.partial(IResNet, stage_depths=(2, 2, 2, 2)),
    "iresnet34": functools.partial(IResNet, stage_depths=(3, 4, 6, 3)),
    "iresnet50": functools.partial(IResNet, stage_depths=(3, 4, 14, 3)),
    "iresnet100": functools.partial(IResNet, stage_depths=(3, 13, 30, 3)),
    "iresnet200": functools.partial(IResNet, stage_depths=(6, 26, 60, 6)),
    "mobilefacenet": MobileFaceNet,
    # insightface arcface_torch's "mbf", the network of w600k_mbf (python -m adam_face.convert).
    "mobilefacenet_mbf": functools.partial(
        MobileFaceNet, stem_width=128, stem_groups=64, bottlenecks=MBF_BOTTLENECKS
    ),
    # A small iResNet for tests and the CPU demo: the same layout with one unit a stage and an
    # eighth of the widths. Widths 16/32/64/128 trained at only ~35-40 images/s (fwd+bwd, 112x112)
    # on 2 CPU cores, most of it in the full-resolution first stage; halving them gave ~2.5x.
    "tiny": functools.partial(IResNet, stage_depths=(1, 1, 1, 1), stage_widths=(8, 16, 32, 64)),
}

MODEL_NAMES = tuple(sorted(_FACTORIES))


def _module_class(factory):
  return factory.func if isinstance(factory, functools.partial) else factory


def create_model(
    name: str, *, embedding_dim: int = 512, dtype=jnp.float32, dropout_rate: float = 0.0, **kwargs
):
  """Returns the backbone `name` (one of MODEL_NAMES) as an unbound flax.linen Module.

  Args:
    name: a name from MODEL_NAMES.
    embedding_dim: size of the output embedding.
    dtype: compute dtype (jnp.float32, or jnp.bfloat16 for mixed precision); parameters,
      BatchNorm statistics and the output embedding are float32 either way.
    dropout_rate: dropout before the embedding projection, in [0, 1).
    **kwargs: further attributes of the model class, e.g. stage_widths or stage_depths of an
      iResNet.
  """
  if name not in _FACTORIES:
    raise ValueError(f"Unknown model name {name!r}; valid names are: {', '.join(MODEL_NAMES)}.")
  if not isinstance(embedding_dim, int) or embedding_dim < 1:
    raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.bfloat16, got {dtype!r}.")
  module_class = _module_class(_FACTORIES[name])
  accepted = {field.name for field in dataclasses.fields(module_class)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise TypeError(
        f"Model {name!r} does not take {unknown}; it takes: {', '.join(sorted(accepted))}."
    )
  return _FACTORIES[name](
      embedding_dim=embedding_dim, dtype=dtype, dropout_rate=dropout_rate, **kwargs
  )


def count_macs(model, image_shape=(1, 112, 112, 3)) -> int:
  """Multiply-accumulates of one eval-mode forward pass of `model` on images of `image_shape`.

  Counted from the traced program without compiling or allocating: every convolution and
  matrix product over its full kernel window, padding included. That is the convention of
  ptflops/thop, under which insightface quotes 6.3 G for iresnet50 and Chen et al. 221 M for
  MobileFaceNet. Elementwise work (BatchNorm, PReLU, residual adds) is not counted. XLA's cost
  analysis differs: it skips kernel taps that fall on padding, so its FLOPs are below 2x this
  count where feature maps are small.

  Depthwise convolutions are traced as convolutions whatever the backend would run them with:
  their shifted multiply-add form (MobileFaceNet's on the CPU) does the same multiply-adds, but as
  elementwise work that this count could not tell from BatchNorm's.
  """
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  with depthwise_implementation("conv"):
    closed = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
  return _jaxpr_macs(closed.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("scan", "while"):
      raise ValueError(f"count_macs cannot count loops ({name}); unroll the model's layers.")
    if name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      kernel_out_axis = eqn.params["dimension_numbers"].rhs_spec[0]
      # Per output element: the kernel window times the input channels of one group.
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // kernel[kernel_out_axis]
    elif name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)
    for value in eqn.params.values():  # Nested programs: jit, custom_jvp/vjp, cond branches.
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _jaxpr_macs(sub)
  return total
