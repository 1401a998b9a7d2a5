"""The two training recipes behind the ADAM table-row configs; each row only changes the loss.

Sources of every choice:
  * CASIA-WebFace (10,572 identities, ~0.49 M aligned 112x112 images in insightface's
    faces_webface_112x112): ResNet-50 "LResNet50E-IR", batch 512, SGD momentum 0.9, weight decay
    5e-4, lr 0.1 divided by 10 at 20k and 28k iterations, 32k iterations in all: the CASIA
    schedule of the ArcFace paper (Deng et al., CVPR 2019, section 4.1), and its "E" embedding
    (BN-Dropout-FC-BN), whose dropout is 0.4 in insightface's MXNet code that trained it
    (recognition/symbol/symbol_utils.py, get_fc1, fc_type 'E'): CASIA-WebFace is small enough to
    overfit, and arcface_torch's 0 is tuned for the large sets.
  * VGGFace2 (8,631 training identities, ~3.1 M images): insightface arcface_torch's base recipe
    (SGD lr 0.1, momentum 0.9, weight decay 5e-4, 20 epochs, polynomial decay of power 1 as its
    PolynomialLRWarmup does, no warm-up, no dropout) with ResNet-50 and batch 512.
  * Verification on LFW, CFP-FP and AgeDB-30 (insightface .bin files) plus the pooled HETD.
"""

import ml_collections

from adam_face import margins
from configs import default

_VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30")
# The auto-margin of the ADAM rows (margins.AutoMargin). Chosen by tests/test_auto_margin.py's
# simulation, which stretches a real run's acc_margin curve (LFW people, tiny network) over each
# row's steps: the target 0.15 is reached at about 60 % of the CASIA-WebFace budget and 40 % of
# VGGFace2's, after which m rises by 0.03 to 0.09 and tracks acc_margin at the target; the rate
# moves m by at most 0.015 per 1,000 steps, slow next to the 100-step average. m never nears
# m_min. (The previous values, target 0.9 with the average starting there and steering from step
# 0, drove m to its floor in the same simulation.) Whether a full-size network's curve has this
# shape is the simulation's assumption, unchecked until a row is run.
AUTO_MARGIN = {"target": 0.15, "rate": 1e-4, "momentum": 0.99, "m_min": 0.1, "m_max": 0.8}


def _with_loss(config, kind, auto_margin, fields):
  """config.loss for the row: `kind` with the row's fields, the other fields at the paper's
  defaults (adam_face/margins.py); auto_margin=True switches on AUTO_MARGIN."""
  if auto_margin:
    fields["auto_margin"] = {"enabled": True, **AUTO_MARGIN}
  config.loss = margins.loss_config(kind, **fields)
  return config


def _iresnet50_b512(dataset: str, eval_every_steps: int) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset.name = dataset
  config.verification.sets = _VERIFICATION_SETS
  config.verification.eval_every_steps = eval_every_steps
  config.model.name = "iresnet50"
  config.global_batch_size = 512
  return config


def webface(kind: str, auto_margin: bool = False, **fields) -> ml_collections.ConfigDict:
  config = _iresnet50_b512("casia_webface", eval_every_steps=4_000)
  config.num_train_steps = 32_000
  config.optimizer.schedule = "step"
  config.optimizer.step_boundaries = (20_000, 28_000)
  config.model.dropout_rate = 0.4  # The ArcFace paper's CASIA setting (see above).
  return _with_loss(config, kind, auto_margin, fields)


def vggface2(kind: str, auto_margin: bool = False, **fields) -> ml_collections.ConfigDict:
  config = _iresnet50_b512("vggface2", eval_every_steps=10_000)
  config.num_epochs = 20
  config.optimizer.schedule = "polynomial"
  return _with_loss(config, kind, auto_margin, fields)
