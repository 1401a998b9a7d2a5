# Run:      python -m adam_face.main --config=configs/vggface2_arcface_s30_m03.py --workdir=/tmp/vggface2_arcface_s30_m03
# Data:     vggface2 plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: the ADAM tables' row "VGGFace2, ArcFace s=30 m=0.3", reported as
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP and AgeDB-30, plus HETD. The published
#           figures are not in this repository, and this config has not yet been run to completion.
"""VGGFace2, ArcFace s=30 m=0.3."""

from configs import recipes


def get_config():
  return recipes.vggface2("arcface", s=30, m=0.3)
