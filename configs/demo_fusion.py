# Run:      python -m adam_face.main --config=configs/demo_fusion.py --workdir=runs/demo_fusion
# Runtime:  a minute or a few on the 2-core development machine (1 min 21 s on an AMD EPYC,
#           2026-12-01; 2.5-5 min on an earlier Xeon before huge pages); needs the ORL faces at
#           ../shared/data/orl_faces (or $ADAM_FACE_ORL_DIR).
# Result:   verification tables on held-out synthetic identities and on ORL s31-s40 (unseen); the
#           latest run ended at synthetic 91.73 % and orl 84.67 % accuracy
#           (benchmarks/README.md, "The demo"); each dataset's loss / acc / acc_margin / margin is
#           in TensorBoard.
"""Dataset fusion on the embedded data: synthetic_faces and ORL s1-s30, one head each.

The demo (configs/demo.py) with the ORL training view added as a second dataset: every batch holds
32 synthetic and 32 ORL images, each set's rows meet only its own head's margin loss, and the
auto-margin runs per head.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.global_batch_size = 64
  config.dataset.weight = 1.0
  config.extra_datasets = (
      {"name": "image_folder/orl_s1_s30", "weight": 1.0, "shuffle_buffer": 300},
  )  # 30 identities x 10 images.
  config.verification.sets = ("synthetic", "orl")
  return config
