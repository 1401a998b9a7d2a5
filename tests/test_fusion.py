"""Dataset fusion: several training datasets in every batch, each with its own class-sharded head."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from adam_face import batch_layout, checkpointing, classifier, config_lib, margins, train
from adam_face import model_dir, pixels, train_input, train_step
from configs import demo_fusion
from tiny_config import TINY_DATA, tiny_demo_config

D = 16


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory):
  """Six identities x four 24x24 PNG faces (flat grey levels differing per identity)."""
  root = tmp_path_factory.mktemp("tree")
  for identity in range(6):
    (root / f"p{identity}").mkdir()
    for image in range(4):
      pixels = np.full((24, 24), 30 * identity + image, np.uint8)
      Image.fromarray(pixels).save(root / f"p{identity}" / f"{image}.png")
  return root


def _fused_config(folder_tree, **overrides):
  config = tiny_demo_config(**overrides)
  config.extra_datasets = (
      {
          "name": "image_folder",
          "weight": 1.0,
          "shuffle_buffer": 24,
          "builder_kwargs": {"root": str(folder_tree)},
      },
  )
  return config


def test_fused_batches_split_back_into_each_datasets_own_stream(folder_tree, mesh8):
  config = _fused_config(folder_tree, global_batch_size=32)
  datasets = config_lib.training_datasets(config)
  sizes = config_lib.dataset_batch_sizes(config)
  assert sizes == (16, 16) and datasets[1].image_size == config.dataset.image_size
  fused = train_input.create_fused_train_iterator(datasets, batch_sizes=sizes, seed=3, start_step=2)
  alone = [
      train_input.create_train_iterator(
          dataset, global_batch_size=16, seed=train_input.dataset_seed(3, k), start_step=2
      )
      for k, dataset in enumerate(datasets)
  ]
  batch = next(fused)
  on_devices = jax.device_put(
      batch["label"], jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  )
  split = jax.jit(lambda x: batch_layout.split_by_dataset(x, sizes, mesh8.size))
  for part, stream in zip(split(on_devices), alone):
    np.testing.assert_array_equal(np.asarray(part), next(stream)["label"])
  # The split moves no data between devices.
  hlo = split.lower(on_devices).compile().as_text()
  assert not any(op in hlo for op in ("all-to-all", "collective-permute", "all-gather"))


def test_each_dataset_draws_its_own_stream():
  """The first dataset trains as it would alone; the others are not copies of that stream."""
  assert train_input.dataset_seed(3, 0) == 3
  assert len({train_input.dataset_seed(3, k) for k in range(4)}) == 4


def _heads_loss(mesh, centers, embeddings, labels, heads):
  return train_step.fused_margin_loss(
      centers,
      [{}] * len(heads),
      embeddings,
      labels,
      list(jax.random.split(jax.random.key(0), len(heads))),
      heads=heads,
      mesh=mesh,
  )


def test_one_person_under_two_labels_gets_no_conflicting_gradient(mesh8):
  """Person P is class 3 of dataset A and class 5 of dataset B, with both centres on P.

  Fused (a head per dataset), A's images of P never treat B's centre of P as a negative: that
  centre's gradient from A's rows is exactly zero, and the embedding gradients of P's two images
  agree. Merged into one label space (the check that this test can fail), A's image of P pushes
  B's centre of P away.
  """
  arcface = margins.ArcFace(s=64.0, m=0.5)
  two_heads = (train_step.Head("a", 8, 8, arcface), train_step.Head("b", 8, 8, arcface))
  rng = np.random.default_rng(0)
  person = rng.normal(size=D).astype(np.float32)
  person /= np.linalg.norm(person)
  heads = [rng.normal(size=(8, D)).astype(np.float32) for _ in range(2)]
  heads[0][3] = heads[1][5] = person
  # Device-major layout: each of the 8 devices holds one row of A, then one row of B.
  embeddings = rng.normal(size=(8, 2, D)).astype(np.float32)
  labels = rng.integers(0, 8, size=(8, 2)).astype(np.int32)
  labels[labels[:, 0] == 3, 0], labels[labels[:, 1] == 5, 1] = 0, 0
  embeddings[0, 0] = embeddings[0, 1] = person + 0.3 * rng.normal(size=D)  # P in A and B.
  labels[0] = (3, 5)
  embeddings, labels = embeddings.reshape(16, D), labels.reshape(16)
  batch = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  embeddings, labels = jax.device_put(embeddings, batch), jax.device_put(labels, batch)

  def a_rows_only(heads, emb):
    _, (dataset_losses, *_) = _heads_loss(mesh8, heads, emb, labels, two_heads)
    return dataset_losses[0], dataset_losses[1]

  centers = tuple({"centers": jax.device_put(h, classifier.centers_sharding(mesh8))} for h in heads)
  grad_a_heads, grad_a_emb = jax.jit(jax.grad(lambda h, e: a_rows_only(h, e)[0], argnums=(0, 1)))(
      centers, embeddings
  )
  grad_b_emb = jax.jit(jax.grad(lambda e: a_rows_only(centers, e)[1]))(embeddings)
  assert np.all(np.asarray(grad_a_heads[1]["centers"]) == 0.0), "A's rows never reach B's head"
  assert np.any(np.asarray(grad_a_heads[0]["centers"])[3] != 0.0)
  a_grad, b_grad = np.asarray(grad_a_emb)[0], np.asarray(grad_b_emb)[1]
  assert np.all(np.asarray(grad_a_emb)[1::2] == 0.0), "A's loss ignores B's rows"
  assert a_grad @ b_grad > 0, "P's two images are pulled the same way"

  # One merged label space: B's classes follow A's. Only P's image in A is left non-zero (a zero
  # embedding gives the centres no gradient), so the centre gradients below come from it alone.
  merged_labels = jax.device_put(jnp.where(jnp.arange(16) % 2 == 1, labels + 8, labels), batch)
  merged_heads = (
      {"centers": jax.device_put(np.concatenate(heads), classifier.centers_sharding(mesh8))},
  )

  def merged_loss(heads, emb):
    merged_head = train_step.Head("ab", 16, 16, arcface)
    return _heads_loss(mesh8, heads, emb, merged_labels, (merged_head,))[0]

  grad_heads = jax.jit(jax.grad(merged_loss))(merged_heads, embeddings.at[1:].set(0.0))
  # The centres are normalised, so gradients are tangential: the push is along P's image.
  push = np.asarray(grad_heads[0]["centers"])[8 + 5] @ np.asarray(embeddings)[0]
  assert push > 1e-3, "merged, A's image of P pushes B's centre of P away from it"


def test_fusion_config_errors_name_the_problem(folder_tree):
  config = _fused_config(folder_tree, global_batch_size=32)
  config.extra_datasets = ({"name": "image_folder", "wieght": 2.0},)
  with pytest.raises(ValueError, match=r"extra_datasets\[0\] 'wieght'.*weight"):
    config_lib.validate_config(config)
  config.extra_datasets = ({"name": "image_folder", "weight": 2.0},)
  with pytest.raises(ValueError, match=r"into \[10.67, 21.33\] images"):
    config_lib.validate_config(config)
  config.extra_datasets = ({"name": "image_folder", "weight": 3.0},)  # 8 + 24 images.
  config_lib.validate_config(config)
  config_lib.validate_for_mesh(config, 8, 1)
  with pytest.raises(
      ValueError, match=r"synthetic_faces's share of the batch.*=8 is not divisible"
  ):
    config_lib.validate_for_mesh(config, 16, 1)
  config.extra_datasets = ({"name": "synthetic_faces"},)
  with pytest.raises(ValueError, match="repeat a name"):
    config_lib.validate_config(config)
  config.extra_datasets = ({"name": "image_folder", "image_size": 64},)
  with pytest.raises(ValueError, match="drop the key"):
    config_lib.validate_config(config)
  config.extra_datasets = ({"name": "image_folder", "augment": {"crop": 1.0}},)
  with pytest.raises(ValueError, match=r"image_folder: augment.crop=1.0 must be in \[0, 1\)"):
    config_lib.validate_config(config)
  config.extra_datasets = ("image_folder",)
  with pytest.raises(ValueError, match="must be a dict with at least a 'name'"):
    config_lib.validate_config(config)


def _scalars(workdir):
  """{tag: [(step, value), ...]} from the run's TensorBoard event files."""
  scalars = {}
  for name in os.listdir(workdir):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
            scalars.setdefault(value.tag, []).append(
                (event.step, float(tf.make_ndarray(value.tensor)))
            )
  return scalars


@pytest.mark.e2e
@pytest.mark.slow
def test_synthetic_and_orl_train_together(orl_dir, tmp_path):
  """The fusion demo shrunk to seconds: two real heads learn side by side, each with its own
  auto-margin, and both verification sets are evaluated."""
  del orl_dir  # Only to skip where the ORL faces are absent.
  fusion = demo_fusion.get_config()
  config = tiny_demo_config(
      global_batch_size=32,
      num_train_steps=40,
      log_every_steps=10,
      checkpoint_every_steps=40,
      **{"verification.batch_size": 256, "verification.eval_every_steps": 40},
  )
  config.extra_datasets, config.verification.sets = fusion.extra_datasets, fusion.verification.sets
  workdir = str(tmp_path)
  results = train.train_and_evaluate(config, workdir)
  assert set(results["metrics"]) == {"synthetic", "orl"}

  scalars = _scalars(workdir)
  for name in ("synthetic_faces", "image_folder/orl_s1_s30"):
    for metric in ("loss", "acc", "acc_margin", "margin"):
      assert f"train/{name}/{metric}" in scalars, sorted(scalars)
  orl_loss = [v for _, v in sorted(scalars["train/image_folder/orl_s1_s30/loss"])]
  assert orl_loss[-1] < orl_loss[0], f"the ORL head learns: {orl_loss}"

  _, state = checkpointing.restore_arrays(workdir)
  synthetic_head, orl_head = state["params"]["head"]
  assert synthetic_head["centers"].shape == (TINY_DATA["num_identities"], 128)
  assert orl_head["centers"].shape == (32, 128)  # 30 identities padded to the 8 devices.
  ema = [float(m["acc_margin_ema"]) for m in state["margin_states"]]
  assert ema[0] != ema[1], "each head keeps its own auto-margin state"
  with open(os.path.join(workdir, "config.json")) as f:
    written = json.load(f)
  assert written["extra_datasets"][0]["name"] == "image_folder/orl_s1_s30"
  assert written["pixel_scale"] == pixels.PIXEL_SCALE  # What model_dir.load feeds its backbone.
  assert model_dir.load(workdir).pixel_scale == pixels.PIXEL_SCALE


def test_fused_step_with_partial_fc_and_running_statistics_per_head(mesh8):
  """CurricularFace (running statistic t per head) with Partial FC sampling on two heads: each
  head keeps its own t, and each head's unsampled centres stay exactly as they were."""
  config = tiny_demo_config(
      **{
          "loss": margins.loss_config("curricularface", m=0.5),
          "head.sample_rate": 0.25,
          "global_batch_size": 32,
          "optimizer.warmup_steps": 0,
      }
  )
  config.extra_datasets = ({"name": "image_folder", "weight": 1.0},)
  num_classes = (16, 512)  # Head 1 samples 16 of its 64 centres per shard and step.
  model = train.models.create_model("tiny", embedding_dim=config.model.embedding_dim)
  state, shardings = train_step.create_train_state(config, model, mesh8, num_classes, 10)
  rng = np.random.default_rng(0)
  # Device-major: each device holds 2 rows of dataset 0 (labels < 16), then 2 of dataset 1.
  labels = np.stack([rng.integers(0, 16, (8, 2)), rng.integers(0, 512, (8, 2))], axis=1)
  batch_sharding = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec("data"))
  batch = {
      "image": jax.device_put(rng.normal(size=(32, 32, 32, 3)).astype(np.float32), batch_sharding),
      "label": jax.device_put(labels.reshape(32).astype(np.int32), batch_sharding),
  }
  step = jax.jit(train_step.train_step, in_shardings=(shardings, batch_sharding))
  before = jax.device_get(state.params["head"])
  new_state, metrics = step(state, batch)
  after = jax.device_get(new_state.params["head"])
  t = [float(s["t"]) for s in jax.device_get(new_state.margin_states)]
  assert t[0] != t[1], "each head keeps its own CurricularFace statistic"
  for head, classes in enumerate(num_classes):
    changed = np.any(after[head]["centers"] != before[head]["centers"], axis=1)
    positives = np.unique(labels[:, head].ravel())
    assert changed[positives].all(), "every positive centre of the head is updated"
    sampled = classifier.num_sampled_per_shard(classes, 8, 16, 0.25)
    # Weight decay would move every centre; only the sampled ones may change.
    assert changed.sum() <= 8 * sampled
  assert classifier.num_sampled_per_shard(512, 8, 16, 0.25) == 16
  assert np.isfinite(metrics["loss"]) and "image_folder/acc_margin" in metrics


class _DenseBackbone(nn.Module):
  features: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Dense(self.features)(images.reshape((images.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train)(x)


def _dense_reference_step(state, batch):
  """The Partial FC step as adam_face took it before the sampled-row update: the dense [C, D]
  gradient (through the gather), the optimiser over every row, then each unsampled row and its
  optimiser state put back as they were (by mask here, independently of scatter_center_rows)."""
  rng, dropout_rng, sample_keys, margin_keys = train_step.step_keys(state)
  rows = train_step.head_rows(state, batch["label"], sample_keys)

  def loss_fn(params):
    embeddings, new_model_state = state.apply_fn(
        {"params": params["backbone"], "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
    )
    loss, (_, _, margin_states) = train_step.fused_margin_loss(
        classifier.gather_center_rows(params["head"], rows, state.mesh),
        state.margin_states,
        embeddings,
        batch["label"],
        margin_keys,
        heads=state.heads,
        mesh=state.mesh,
        rows=rows,
        compute_dtype=state.compute_dtype,
    )
    return loss, (margin_states, new_model_state["batch_stats"])

  (loss, (margin_states, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  new_state = state.apply_gradients(
      grads=grads, batch_stats=batch_stats, margin_states=margin_states, rng=rng
  )
  masks = []
  for head, head_rows in zip(state.heads, rows):
    per_shard = classifier.padded_num_classes(head.num_classes, 8) // 8
    mask = jnp.ones(per_shard * 8, bool)
    if head_rows is not None:
      shard = jnp.repeat(jnp.arange(8), head_rows.shape[0] // 8)
      mask = jnp.zeros_like(mask).at[shard * per_shard + head_rows].set(True)
    masks.append(mask)

  def keep_unsampled(path, new, old):
    names = [getattr(k, "key", None) for k in path]
    if "centers" not in names:
      return new
    mask = masks[path[names.index("centers") - 1].idx]
    return jnp.where(mask[:, None], new, old)

  params, opt_state = jax.tree_util.tree_map_with_path(
      keep_unsampled, (new_state.params, new_state.opt_state), (state.params, state.opt_state)
  )
  return new_state.replace(params=params, opt_state=opt_state), loss


def _two_head_state(mesh, optimizer):
  """A fused train state: head 0 uses all its 16 centres, head 1 samples 16 of 64 per shard."""
  config = tiny_demo_config(
      **{
          "loss": margins.loss_config("arcface", s=16.0, m=0.3),
          "head.sample_rate": 0.25,
          "global_batch_size": 32,
          "optimizer.name": optimizer,
          "optimizer.weight_decay": 5e-2,
          "optimizer.learning_rate": 0.1,
      }
  )
  config.extra_datasets = ({"name": "image_folder", "weight": 1.0},)
  state, shardings = train_step.create_train_state(
      config, _DenseBackbone(config.model.embedding_dim), mesh, (16, 509), 10
  )
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = jax.jit(train_step.train_step, in_shardings=(shardings, batch_sharding), donate_argnums=0)
  return state, step, batch_sharding


def _two_head_batch(rng, batch_sharding, scale=1.0):
  labels = np.stack([rng.integers(0, 16, (8, 2)), rng.integers(0, 509, (8, 2))], axis=1)
  return {
      "image": jax.device_put(
          (scale * rng.normal(size=(32, 32, 32, 3))).astype(np.float32), batch_sharding
      ),
      "label": jax.device_put(labels.reshape(32).astype(np.int32), batch_sharding),
  }


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sampled_row_update_equals_the_dense_update(mesh8, optimizer):
  """Three donated Partial FC steps of train_step (gradient and optimiser on the sampled rows
  alone, written back in place) against the dense reference: the same losses and the same
  parameters and optimiser state, every row of both heads, to 1e-6. The backbone is one Dense +
  BatchNorm layer: the head is under test, and it compiles in seconds."""
  state, step, batch_sharding = _two_head_state(mesh8, optimizer)
  reference = jax.device_get(state)
  reference_step = jax.jit(_dense_reference_step)
  rng = np.random.default_rng(1)
  for _ in range(3):
    batch = _two_head_batch(rng, batch_sharding)
    state, metrics = step(state, batch)
    reference, reference_loss = reference_step(reference, batch)
    np.testing.assert_allclose(metrics["loss"], reference_loss, rtol=1e-6)
  got = jax.device_get((state.params, state.opt_state, state.batch_stats, state.margin_states))
  want = (reference.params, reference.opt_state, reference.batch_stats, reference.margin_states)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


def test_a_non_finite_partial_fc_step_changes_no_centre(mesh8):
  """A batch of NaN images: the sampled blocks' write-back is skipped (their guard), so every
  floating-point parameter, optimiser value and batch statistic of both heads and the backbone
  is bit for bit what it was; the step and skipped_steps advance."""
  state, step, batch_sharding = _two_head_state(mesh8, "sgd")
  rng = np.random.default_rng(2)
  state, _ = step(state, _two_head_batch(rng, batch_sharding))  # Momentum is non-zero now.
  before = jax.device_get((state.params, state.opt_state, state.batch_stats))
  state, metrics = step(state, _two_head_batch(rng, batch_sharding, scale=np.nan))
  assert not bool(metrics["finite"]) and int(state.skipped_steps) == 1 and int(state.step) == 2
  after = jax.device_get((state.params, state.opt_state, state.batch_stats))
  floats = lambda tree: [x for x in jax.tree.leaves(tree) if x.dtype.kind == "f"]  # noqa: E731
  # (The optimiser's step counts advance anyway, as train_step says.)
  for a, b in zip(floats(after), floats(before), strict=True):
    np.testing.assert_array_equal(a, b)


def test_synthetic_pairs_come_from_the_trained_synthetic_build(folder_tree):
  """With synthetic_faces as a second dataset, its held-out pairs use that dataset's sizes."""
  config = tiny_demo_config()
  config.extra_datasets = ({"name": "synthetic_faces", "builder_kwargs": dict(TINY_DATA)},)
  config.dataset.name, config.dataset.builder_kwargs = "image_folder", {"root": str(folder_tree)}
  pairs = train.load_verification_sets(config, names=("synthetic",))["synthetic"]
  heldout = TINY_DATA["num_heldout_identities"] * math.comb(
      TINY_DATA["heldout_images_per_identity"], 2
  )
  assert pairs["is_same"].sum() == heldout and len(pairs["is_same"]) == 2 * heldout
