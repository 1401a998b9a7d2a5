# Run:      ./run.sh   (= python -m adam_face.main --config=configs/demo.py --workdir=runs/demo)
# Runtime:  a minute or a few on a 2-core CPU: 1 min 27 s on the development machine (AMD EPYC),
#           building synthetic_faces included, nothing else running (2026-12-01).
# Result:   verification on held-out synthetic identities (never seen in training); that run
#           ended at 95.06 / 96.79 / 87.98 / 77.02 / 53.81 (acc / TAR@FAR=1e-1 / 1e-2 / 3e-3 /
#           1e-3, benchmarks/README.md, "The demo").
"""The embedded default: ADAM (ADM + auto-margin) on synthetic_faces with the tiny backbone."""

from adam_face import margins
from configs import default


def get_config(loss_kind: str = "adm"):
  """The demo; `--config=configs/demo.py:<kind>` trains it with another margin kind instead, at
  that kind's paper defaults (adam_face/margins.py)."""
  config = default.get_config()
  config.dataset.name = "synthetic_faces"  # 300 identities x 20 images, built locally in ~1 min.
  config.dataset.shuffle_buffer = 6_000  # The whole training split.
  config.dataset.image_size = 64  # 112x112 data, trained at 64x64 to fit a laptop CPU in minutes.
  config.verification.sets = ("synthetic",)  # Pairs of 30 held-out identities, 10 folds.
  config.verification.batch_size = 64
  config.verification.eval_every_steps = 200
  config.model.name = "tiny"
  config.model.embedding_dim = 128
  if loss_kind == "adm":  # ADAM: ADM with the auto-margin.
    config.loss = margins.loss_config(
        "adm",
        s=32.0,
        m=0.3,
        auto_margin={
            "enabled": True,
            "target": 0.5,
            "rate": 2e-3,
            "momentum": 0.95,
            "m_min": 0.1,
            "m_max": 0.5,
        },
    )
  else:
    config.loss = margins.loss_config(loss_kind)
  config.global_batch_size = 64
  config.num_train_steps = 600
  config.optimizer.learning_rate = 0.1
  config.optimizer.warmup_steps = 40
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
