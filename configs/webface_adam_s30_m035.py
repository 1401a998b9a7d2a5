# Run:      python -m adam_face.main --config=configs/webface_adam_s30_m035.py --workdir=/tmp/webface_adam_s30_m035
# Data:     casia_webface plus lfw/cfp_fp/agedb_30 prepared as in README.md ("Datasets").
# Runtime:  see benchmarks/README.md ("Expected runtimes"), derived from bench_train_step.
# Reproduces: the ADAM tables' row "WebFace, ADAM (ADM s=30, m=0.35 with auto-margin)", reported as
#           acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 / 1e-3 on LFW, CFP-FP and AgeDB-30, plus HETD. The published
#           figures are not in this repository, and this config has not yet been run to completion.
# Auto-margin: see adam_face/margins.py (AutoMargin) for its definition (the ADAM tables name it without defining it);
# m starts at the value above and is steered to keep acc_margin near loss.auto_margin.target.
"""WebFace, ADAM (ADM s=30, m=0.35 with auto-margin)."""

from configs import recipes


def get_config():
  return recipes.webface("adm", s=30, m=0.35, auto_margin=True)
