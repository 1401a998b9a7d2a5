# Run:      python -m adam_face.main --config=configs/webface_magface.py --workdir=/tmp/webface_magface
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: no row of the ADAM tables (a method the field now compares against); it reports
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP, AgeDB-30 and HETD on the same
#           CASIA-WebFace recipe as the table rows. Not yet run to completion.
# MagFace's margin comes from the feature norm (loss.l_m .. loss.u_m); loss.m is unused.
"""CASIA-WebFace, MagFace (s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35; Meng et al., CVPR 2021)."""

from configs import recipes


def get_config():
  return recipes.webface("magface", s=64)
