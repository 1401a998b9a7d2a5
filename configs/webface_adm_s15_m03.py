# Run:      python -m adam_face.main --config=configs/webface_adm_s15_m03.py --workdir=/tmp/webface_adm_s15_m03
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: the ADAM tables' row "WebFace, ADM s=15 m=0.3", reported as
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP and AgeDB-30, plus HETD. The published
#           figures are not in this repository, and this config has not yet been run to completion.
"""WebFace, ADM s=15 m=0.3."""

from configs import recipes


def get_config():
  return recipes.webface("adm", s=15, m=0.3)
