# Run:      python -m adam_face.main --config=configs/default.py --workdir=/tmp/default
# Runtime:  not a recipe to run as it is: every adam_face config starts from this one, which
#           documents each field (iresnet50 / ArcFace on the embedded synthetic_faces data); it
#           reproduces no published row.
"""Base configuration: the documented defaults of every field."""

import ml_collections

from adam_face import margins


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, data order, augmentation, dropout and Partial FC sampling.

  # ---- training data (read through a TFDS builder in datasets/)
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "synthetic_faces"  # TFDS builder[/config]: casia_webface, vggface2, ...
  config.dataset.data_dir = ""  # TFDS data folder; "": $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.dataset.manual_dir = (
      ""  # Source files; "": <data_dir>/downloads/manual (README: Datasets).
  )
  config.dataset.split = "train"
  config.dataset.image_size = 112  # Images are resized (or 5-point aligned) to this square size.
  config.dataset.shuffle_buffer = 10_000
  config.dataset.augment = ml_collections.ConfigDict()
  config.dataset.augment.flip = True  # Random horizontal flip, as every face recipe does.
  config.dataset.augment.brightness = 0.0  # Max random brightness shift, in [0, 1] of the range.
  config.dataset.augment.contrast = 0.0  # Random contrast factor in [1 - c, 1 + c].
  config.dataset.augment.saturation = 0.0  # Random saturation factor in [1 - s, 1 + s].
  config.dataset.augment.crop = 0.0  # Random square crop of side in [1 - c, 1], resized back.
  config.dataset.builder_kwargs = ml_collections.ConfigDict()  # e.g. synthetic_faces sizes.
  config.dataset.weight = 1.0  # Share of every batch, relative to extra_datasets' weights.

  # ---- dataset fusion: more training sets whose identity lists overlap and cannot be merged.
  # Each entry is a dict of `dataset` fields (unset ones take this file's defaults, image_size is
  # `dataset.image_size`) and gets its own class-sharded head; a sample meets the margin loss only
  # against its own dataset's head, and auto-margin runs per head. Every batch holds
  # global_batch_size * weight / sum(weights) images of each dataset, e.g.
  #   config.extra_datasets = ({"name": "casia_webface", "weight": 1.0},)
  # An epoch (num_epochs) is as many images as all training datasets hold together.
  config.extra_datasets = ()

  # ---- pair verification, run every `eval_every_steps` and at the end
  config.verification = ml_collections.ConfigDict()
  # Built-in names (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw, vgg2_fp, synthetic, orl) or paths:
  # "/data/dev.bin", or "/data/pairs_dev.txt@/data/dev_images"; a path's set is named after its file.
  config.verification.sets = ("synthetic",)
  config.verification.data_dir = ""  # As dataset.data_dir.
  config.verification.manual_dir = ""  # Where the .bin files lie; as dataset.manual_dir.
  config.verification.flip = "sum"  # Flip test: none | sum | concat.
  config.verification.batch_size = 256
  config.verification.eval_every_steps = 2_000
  # IJB-B / IJB-C (sets "ijbb", "ijbc"), scored by `python -m adam_face.evaluate` only: a run over
  # IJB-C's 469,375 faces is an evaluation of its own, not a training-time check (adam_face/ijb.py).
  config.verification.ijb = ml_collections.ConfigDict()
  config.verification.ijb.root = ""  # Holds IJBB/ and IJBC/ (insightface's IJB release layout).
  config.verification.ijb.cache_dir = ""  # The aligned faces' cache; "": the root.
  config.verification.ijb.detector_score = True  # Weigh faces by detector score (insightface D1).
  config.verification.ijb.norm_score = True  # Weigh faces by embedding norm (insightface N1).

  # ---- backbone (adam_face/models)
  config.model = ml_collections.ConfigDict()
  config.model.name = "iresnet50"  # tiny, iresnet18/34/50/100/200, mobilefacenet.
  config.model.embedding_dim = 512
  config.model.dropout_rate = 0.0  # Dropout before the embedding layer (arcface_torch: 0).

  # ---- margin-softmax loss (adam_face/margins.py): `kind` and only that kind's fields, at its
  # paper's defaults; margins.loss_config(kind, **fields) builds one, and an unknown field is a
  # one-line error naming the valid ones. Kinds: normface, cosface, arcface, sphereface, combined,
  # adm, subcenter_arcface, curricularface, adaface, magface, elasticface_arc, elasticface_cos.
  # arcface, cosface and adm also take `auto_margin` (margins.AutoMargin), off by default here.
  config.loss = margins.loss_config("arcface", s=64.0, m=0.5)

  # ---- classifier head (adam_face/classifier.py), sharded by class over all devices
  config.head = ml_collections.ConfigDict()
  # Partial FC: fraction of centres used per step, in (0, 1]; only those rows of W and of their
  # optimiser state are read and updated in a step (benchmarks/README.md, "Partial FC").
  config.head.sample_rate = 1.0

  # ---- optimisation
  config.global_batch_size = 512  # Summed over all devices and hosts.
  config.num_epochs = 20  # Used when num_train_steps is -1.
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.compute_dtype = "float32"  # float32 | bfloat16 (params, BN statistics, loss stay float32).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd (with momentum) | adamw.
  config.optimizer.learning_rate = 0.1  # Peak learning rate for global_batch_size.
  config.optimizer.momentum = 0.9  # SGD momentum (adamw: b1).
  config.optimizer.weight_decay = 5e-4  # Applied to every parameter, as insightface does.
  config.optimizer.grad_clip_norm = 5.0  # Global-norm clipping; 0 disables it.
  config.optimizer.schedule = "polynomial"  # polynomial | cosine | step | constant.
  config.optimizer.warmup_steps = 0  # Linear warm-up from 0 to the peak.
  # arcface_torch's PolynomialLRWarmup (recognition/arcface_torch/lr_scheduler.py) decays with
  # power 1 (its default, which train_v2.py keeps); its older PolyScheduler used power 2.
  config.optimizer.polynomial_power = 1.0
  config.optimizer.step_boundaries = ()  # Steps at which the `step` schedule divides lr by 10.
  # Fine-tuning (with init_from): the backbone's updates scaled by this factor, and none at all
  # for its first steps, while a new head learns from a pretrained backbone's embeddings (BatchNorm
  # statistics keep adapting to the new data meanwhile).
  config.optimizer.backbone_lr_scale = 1.0
  config.optimizer.freeze_backbone_steps = 0

  # ---- fine-tuning: a model path (a model directory, e.g. from `python -m adam_face.convert`, or
  # a training workdir: its latest checkpoint) whose backbone and BatchNorm statistics start a
  # fresh run; the head is new, sized by this run's datasets. Ignored when the workdir already
  # has a checkpoint (the run resumes instead).
  config.init_from = ""

  # ---- bookkeeping
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3  # At least 2, so a corrupt latest one has one to fall back to.
  # A step whose loss, gradient or updated state is not finite never updates the state (it is
  # skipped and counted); "stop" ends the run once `nonfinite_patience` consecutive steps were
  # skipped, "skip" trains on. One bad batch is survivable; a diverged run is not.
  config.nonfinite_policy = "stop"
  config.nonfinite_patience = 3
  return config
