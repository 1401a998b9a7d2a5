# Run:      python -m adam_face.main --config=configs/webface_elasticface_arc.py --workdir=/tmp/webface_elasticface_arc
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: no row of the ADAM tables (a method the field now compares against); it reports
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP, AgeDB-30 and HETD on the same
#           CASIA-WebFace recipe as the table rows. Not yet run to completion.
"""CASIA-WebFace, ElasticFace-Arc (s=64, m=0.5, sigma=0.05; Boutros et al., CVPRW 2022)."""

from configs import recipes


def get_config():
  return recipes.webface("elasticface_arc", s=64, m=0.5)
