"""The demo config shrunk to seconds: shared by the end-to-end tests and the multi-host worker."""

from adam_face import config_lib
from configs import demo

TINY_DATA = {
    "num_identities": 16,
    "images_per_identity": 4,
    "num_heldout_identities": 4,
    "heldout_images_per_identity": 3,
    "image_size": 32,
}


def tiny_demo_config(**overrides):
  config = demo.get_config()
  config.dataset.builder_kwargs = dict(TINY_DATA)
  config.dataset.image_size = 32
  config.dataset.shuffle_buffer = 64
  config.global_batch_size = 16
  config.num_train_steps = 8
  config.checkpoint_every_steps = 3
  config.log_every_steps = 4
  config.verification.batch_size = 16
  config.verification.eval_every_steps = 4
  config.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    config_lib.set_field(config, key, value)
  return config
