"""TFDS builders of adam_face. Importing this package registers them with TFDS:

  synthetic_faces    procedural identities, the built-in default (no download)
  image_folder       any <root>/<identity>/<image> tree; configs manual, orl, orl_s1_s30
  casia_webface      CASIA-WebFace; configs recordio (insightface release), folder (raw release)
  vggface2           VGGFace2; configs recordio, folder (aligned with its 5-point landmarks)
  face_verification  verification pairs; configs lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw,
                     vgg2_fp; path= any .bin or LFW pairs file

The package is named `datasets` as the issue asks, which shadows HuggingFace's `datasets`
inside this repository; TFDS imports that only lazily, for its HuggingFace builders, which are not
used here.
"""

from datasets import casia_webface
from datasets import face_verification
from datasets import image_folder
from datasets import synthetic_faces
from datasets import vggface2

__all__ = ["casia_webface", "face_verification", "image_folder", "synthetic_faces", "vggface2"]
