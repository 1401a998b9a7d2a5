# Run:      python -m adam_face.main --config=configs/webface_subcenter_arcface.py --workdir=/tmp/webface_subcenter_arcface
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: no row of the ADAM tables (a method the field now compares against); it reports
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP, AgeDB-30 and HETD on the same
#           CASIA-WebFace recipe as the table rows. Not yet run to completion.
"""CASIA-WebFace, Sub-center ArcFace (K=3, s=64, m=0.5; Deng et al., ECCV 2020)."""

from configs import recipes


def get_config():
  return recipes.webface("subcenter_arcface", s=64, m=0.5)
