"""The two training recipes behind the seed-table configs; each table row only changes the loss.

Sources of every choice:
  * CASIA-WebFace (10,572 identities, ~0.49 M aligned 112x112 images in insightface's
    faces_webface_112x112): ResNet-50 "LResNet50E-IR", batch 512, SGD momentum 0.9, weight decay
    5e-4, lr 0.1 divided by 10 at 20k and 28k iterations, 32k iterations in all: the CASIA
    schedule of the ArcFace paper (Deng et al., CVPR 2019, section 4.1).
  * VGGFace2 (8,631 training identities, ~3.1 M images): insightface arcface_torch's base recipe
    (SGD lr 0.1, momentum 0.9, weight decay 5e-4, 20 epochs, polynomial decay of power 2, no
    warm-up) with ResNet-50 and batch 512.
  * Verification on LFW, CFP-FP and AgeDB-30 (insightface .bin files) plus the pooled HETD.
"""

import ml_collections

from configs import default

_VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")


def _with_loss(config, kind, s, m, auto_margin):
  config.loss.kind = kind
  config.loss.s = float(s)
  if kind == "sphereface":
    del config.loss["m"]
    config.loss.m = int(m)  # SphereFace's multiplicative margin is an integer.
  else:
    config.loss.m = float(m)
  config.loss.auto_margin.enabled = auto_margin
  return config


def _iresnet50_b512(dataset: str, eval_every_steps: int) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset.name = dataset
  config.verification.sets = _VERIFICATION_SETS
  config.verification.eval_every_steps = eval_every_steps
  config.model.name = "iresnet50"
  config.global_batch_size = 512
  return config


def webface(kind: str, s: float, m, auto_margin: bool = False) -> ml_collections.ConfigDict:
  config = _iresnet50_b512("casia_webface", eval_every_steps=4_000)
  config.num_train_steps = 32_000
  config.optimizer.schedule = "step"
  config.optimizer.step_boundaries = (20_000, 28_000)
  return _with_loss(config, kind, s, m, auto_margin)


def vggface2(kind: str, s: float, m, auto_margin: bool = False) -> ml_collections.ConfigDict:
  config = _iresnet50_b512("vggface2", eval_every_steps=10_000)
  config.num_epochs = 20
  config.optimizer.schedule = "polynomial"
  return _with_loss(config, kind, s, m, auto_margin)
