"""Every config validates against the schema and opens with the command that runs it."""

import importlib.util

import pytest

from adam_face import config_lib
from fixtures_data import REPO_ROOT

CONFIGS = sorted(
    p for p in (REPO_ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "recipes")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_documents_its_command(path):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_lib.validate_config(module.get_config())
  header = path.read_text().splitlines()[:6]
  assert header[0].startswith("# Run:") and f"configs/{path.stem}.py" in header[0]
  assert any(line.startswith("# Runtime:") for line in header)


def test_each_results_table_row_has_a_config():
  # The rows named on the configs' "# Reproduces:" lines: three scales of ArcFace on WebFace and
  # on VGGFace2 and of ADM on WebFace, the auto-margin runs, CosFace and SphereFace.
  names = {p.stem for p in CONFIGS}
  for scale in (64, 30, 15):
    assert f"webface_arcface_s{scale}_m05" in names
    assert f"vggface2_arcface_s{scale}_m03" in names
    assert f"webface_adm_s{scale}_m03" in names
  assert {
      "vggface2_adm",
      "webface_adam_s30_m035",
      "webface_cosface",
      "webface_sphereface",
      "demo",
  } <= names
