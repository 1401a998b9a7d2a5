# Run:      python -m adam_face.main --config=configs/webface_sphereface.py --workdir=/tmp/webface_sphereface
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: the ADAM tables' row "WebFace, SphereFace m=4 (normalised, s=30)", reported as
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP and AgeDB-30, plus HETD. The published
#           figures are not in this repository, and this config has not yet been run to completion.
# SphereFace here is its feature-normalised form (s=30) without the original paper's
# lambda annealing towards softmax, which adam_face does not implement.
"""WebFace, SphereFace m=4 (normalised, s=30)."""

from configs import recipes


def get_config():
  return recipes.webface("sphereface", s=30, m=4)
