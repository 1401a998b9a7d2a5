"""Tests of python -m adam_face.convert: arcface_torch weights, or their ONNX graphs, into a model
directory.

arcface_torch's networks are benchmarks/torch_arcface.py's PyTorch restatements, with the module
names of its state dicts. Their weights are random; their BatchNorm statistics are measured on random
images in train mode, then jittered (so that every layer carries the image, rather than BN biases,
to the embedding, and no statistic is 0 or 1). Each side normalises the same uint8 images its own
way, as in use: arcface_torch (x / 255 - 0.5) / 0.5 in NCHW, adam_face pixels.normalize in
NHWC. The ONNX graphs are torch.onnx's exports of those networks (tests skip without onnx).
"""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the converter's tests need torch: pip install -r benchmarks/requirements.txt"
)
from torch import nn  # noqa: E402

from adam_face import convert, model_dir, pixels  # noqa: E402
from benchmarks import torch_arcface  # noqa: E402
from fixtures_data import REPO_ROOT  # noqa: E402

DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def torch_model(arch: str, num_features: int = 512) -> nn.Module:
  if arch == "mbf":
    return torch_arcface.MobileFaceNetMBF(num_features)
  return torch_arcface.IResNet(DEPTHS[arch], num_features)


def random_images(seed: int, count: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


def torch_input(images: np.ndarray):
  return torch.from_numpy(((images / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)).float()


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
  """Random weights, BN affine parameters and PReLU slopes; BN statistics of random images,
  jittered. A frozen scale (the iResNet's final BN) stays 1."""
  torch.manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  for m in model.modules():
    if isinstance(m, nn.PReLU):
      m.weight.uniform_(-0.1, 0.5)
  for m in norms:
    if m.weight.requires_grad:
      m.weight.uniform_(0.25, 2.0)
    m.bias.normal_(0.0, 0.2)
    m.momentum = None  # Cumulative: after one batch, that batch's statistics.
    m.reset_running_stats()
  model.train()
  model(torch_input(random_images(seed, 4)))
  model.eval()
  for m in norms:
    m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn_like(m.running_mean))
    m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2.0))


IMAGES = random_images(100, 2)


@pytest.fixture(scope="module")
def arcface_torch_weights(tmp_path_factory):
  """arch -> (a state dict file of random arcface_torch weights, its embeddings of IMAGES);
  each arch built once, on first use."""
  cache = {}

  def get(arch):
    if arch not in cache:
      model = torch_model(arch)
      randomize(model, seed=list(convert.ARCFACE_TORCH_ARCHS).index(arch))
      path = tmp_path_factory.mktemp(arch) / "backbone.pth"
      torch.save(model.state_dict(), path)
      with torch.no_grad():
        cache[arch] = (path, model(torch_input(IMAGES)).numpy())
    return cache[arch]

  return get


def cosine(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_same_embeddings(actual, expected):
  similarity = cosine(actual, expected)
  assert similarity.min() >= 0.99999, similarity
  # Also equal in scale: a missing input-scale fold (127.5 / 128, of a graph that reads MXNet's
  # (x - 127.5) / 128) left cosines above 0.99999 for r18 but errors of 0.6% of the largest value,
  # against ~4e-6 converted exactly.
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def convert_and_embed(flags: list[str], out: str):
  """Converts with the command line's `flags` (all but --out) into `out`; the model and its
  embeddings of IMAGES."""
  convert.main(flags + ["--out", out])
  model = model_dir.load(out)
  images = pixels.normalize(IMAGES.astype(np.float32))
  return model, np.asarray(jax.jit(lambda embed, x: embed(x))(model.embed_fn, images))


ARCHS = [
    "r18",
    "r34",
    "r50",
    pytest.param("r100", marks=pytest.mark.slow),
    pytest.param("r200", marks=pytest.mark.slow),
    "mbf",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_model_computes_the_arcface_torch_embeddings(
    arcface_torch_weights, arch, tmp_path
):
  weights, expected = arcface_torch_weights(arch)
  flags = ["--from", "arcface_torch", "--arch", arch, "--weights", str(weights)]
  model, actual = convert_and_embed(flags, str(tmp_path / "model"))
  assert model.model_config == {"name": convert.ARCFACE_TORCH_ARCHS[arch], "embedding_dim": 512}
  assert model.image_size == 112
  assert_same_embeddings(actual, expected)
  # The two images' embeddings differ by far more than the tolerance: the image, not only the BN
  # biases, reaches the embedding. (Noise images look alike to deep random networks: 0.899 for
  # r200, 0.23 to 0.78 for the others.)
  assert cosine(expected[0], expected[1]) < 0.99


def test_command_line_reads_a_data_parallel_checkpoint(arcface_torch_weights, tmp_path):
  # arcface_torch's checkpoint_gpu_*.pt layout: the backbone's state dict beside other state,
  # its keys prefixed by DistributedDataParallel's 'module.'.
  weights, _ = arcface_torch_weights("r18")
  state = torch.load(weights)
  checkpoint = tmp_path / "checkpoint_gpu_0.pt"
  torch.save(
      {"epoch": 3, "state_dict_backbone": {f"module.{k}": v for k, v in state.items()}}, checkpoint
  )
  out = tmp_path / "from_checkpoint"
  command = [sys.executable, "-m", "adam_face.convert", "--from", "arcface_torch", "--arch", "r18"]
  command += ["--weights", str(checkpoint), "--out", str(out)]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "iresnet18, 512-d" in result.stdout
  convert.main(
      ["--from", "arcface_torch", "--arch", "r18", "--weights", str(weights), "--out"]
      + [str(tmp_path / "from_state_dict")]
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      model_dir.load(str(out)).variables,
      model_dir.load(str(tmp_path / "from_state_dict")).variables,
  )


def command_error(capsys, flags: list[str]) -> str:
  """The converter's message on stderr for the command line's `flags`, checked to be one line."""
  with pytest.raises(SystemExit) as exit_info:
    convert.main(flags)
  assert exit_info.value.code == 1
  message = capsys.readouterr().err
  assert message.count("\n") == 1, message
  return message


def conversion_error(capsys, weights, arch, out) -> str:
  return command_error(
      capsys,
      ["--from", "arcface_torch", "--arch", arch, "--weights", str(weights), "--out", str(out)],
  )


@pytest.mark.parametrize(
    "arch, problem",
    [
        ("r34", "tensor 'layer1.2.bn1.weight' is missing"),  # r34's third unit of stage 1.
        ("mbf", "tensor 'layers.0.layers.0.weight' is missing"),
    ],
)
def test_weights_of_another_network_are_refused(
    arcface_torch_weights, tmp_path, capsys, arch, problem
):
  weights, _ = arcface_torch_weights("r18")
  message = conversion_error(capsys, weights, arch, tmp_path / "model")
  assert f"does not hold arcface_torch {arch} weights: {problem}" in message
  assert "check --arch" in message
  assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda state: state.pop("layer3.1.prelu.weight"), "'layer3.1.prelu.weight' is missing"),
        (
            lambda state: state.update({"head.weight": torch.zeros(3)}),
            "'head.weight' is unexpected",
        ),
        (
            lambda state: state.update({"fc.weight": torch.zeros(512, 100)}),
            "'fc.weight' has shape (512, 100), expected (512, 25088)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_a_wrong_tensor_is_named_in_one_line(
    arcface_torch_weights, tmp_path, capsys, edit, problem
):
  weights, _ = arcface_torch_weights("r18")
  state = torch.load(weights)
  edit(state)
  torch.save(state, tmp_path / "edited.pth")
  message = conversion_error(capsys, tmp_path / "edited.pth", "r18", tmp_path / "model")
  assert problem in message


def test_an_existing_model_is_not_overwritten(tmp_path, capsys):
  (tmp_path / model_dir.MODEL_JSON).write_text("{}")
  message = conversion_error(capsys, tmp_path / "absent.pth", "r18", tmp_path)
  assert "already holds a model" in message


@pytest.mark.parametrize("recorded", [False, True])
def test_a_model_made_for_the_old_input_scale_still_computes_its_source(
    arcface_torch_weights, tmp_path, monkeypatch, recorded
):
  """Until 2026-12-01 adam_face divided pixels by 128: its converter folded 128 / 127.5 into the
  first convolution, and model directories recorded no scale. Loaded now, such a model is fed
  the inputs it was made for and computes arcface_torch's embeddings as it did then."""
  weights, expected = arcface_torch_weights("r18")
  out = tmp_path / "model"
  with monkeypatch.context() as old:
    old.setattr(pixels, "PIXEL_SCALE", 128.0)  # The converter of that time.
    convert.main(
        ["--from", "arcface_torch", "--arch", "r18", "--weights", str(weights)]
        + ["--out", str(out)]
    )
  info = json.loads((out / model_dir.MODEL_JSON).read_text())
  assert info["pixel_scale"] == 128.0
  if not recorded:
    del info["pixel_scale"]
    (out / model_dir.MODEL_JSON).write_text(json.dumps(info))
  model = model_dir.load(str(out))
  assert model.pixel_scale == model_dir.LEGACY_PIXEL_SCALE == 128.0
  images = pixels.normalize(IMAGES.astype(np.float32))  # Today's scale: (x - 127.5) / 127.5.
  assert_same_embeddings(np.asarray(jax.jit(lambda f, x: f(x))(model.embed_fn, images)), expected)


def test_torch_and_onnx_are_imported_only_to_convert(monkeypatch, tmp_path):
  code = "import sys, adam_face.convert; print('torch' in sys.modules, 'onnx' in sys.modules)"
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.stdout.strip() == "False False", result.stderr
  monkeypatch.setitem(sys.modules, "torch", None)  # As if not installed: import raises.
  with pytest.raises(convert.ConversionError, match="pip install -r benchmarks/requirements.txt"):
    convert.load_state_dict(str(tmp_path / "backbone.pth"))
  monkeypatch.setitem(sys.modules, "onnx", None)
  with pytest.raises(convert.ConversionError, match="pip install -r requirements-export.txt"):
    convert.convert_onnx(str(tmp_path / "backbone.onnx"), None, str(tmp_path / "model"))


# --from onnx


def import_onnx():
  return pytest.importorskip(
      "onnx", reason="--from onnx's tests need onnx: pip install -r requirements-export.txt"
  )


def export_onnx(model: nn.Module, path, insightface: bool = True):
  """`model` exported to ONNX by torch's TorchScript exporter, in eval mode. `insightface`: as
  arcface_torch's torch2onnx.py exports (opset 11, constants folded, which folds each BN that
  follows a Conv into it); otherwise with the default opset, every BN a node, PRelu slopes
  unsqueezed by Unsqueeze nodes, and the initializers also listed as graph inputs."""
  model.eval()
  torch.onnx.export(
      model,
      torch_input(IMAGES[:1]),
      str(path),
      dynamo=False,  # torch2onnx.py's exporter (the dynamo one needs onnxscript).
      opset_version=11 if insightface else None,
      do_constant_folding=insightface,
      keep_initializers_as_inputs=not insightface,
      training=torch.onnx.TrainingMode.EVAL,
      input_names=["data"],
      dynamic_axes={"data": {0: "batch"}},
  )


@pytest.fixture(scope="module")
def onnx_graph(arcface_torch_weights, tmp_path_factory):
  """(arch, form) -> an ONNX file of the network of arcface_torch_weights(arch), in `form`:
  "folded" as torch2onnx.py exports it, "bn_kept" with every BN a node (export_onnx); each
  exported once, on first use."""
  import_onnx()
  cache = {}

  def get(arch, form="folded"):
    if (arch, form) not in cache:
      model = torch_model(arch)
      model.load_state_dict(torch.load(arcface_torch_weights(arch)[0]))
      path = tmp_path_factory.mktemp(f"{arch}_onnx") / f"{form}.onnx"
      export_onnx(model, path, insightface=form == "folded")
      cache[arch, form] = path
    return cache[arch, form]

  return get


def rewritten(onnx, path, out):
  """The folded graph at `path`, rewritten to compute the same function with the other forms the
  converter reads, saved at `out`: the raw pixels normalised in the graph, by Sub 127.5 and a
  per-channel Mul 1 / 128 (MXNet's; the first Conv's weight is scaled by 128 / 127.5 to keep the
  function), PRelu slopes [1, C, 1, 1], the fc as MatMul and Add, the final BN's epsilon 2e-5
  (its variance 1e-5 lower), and an Identity and a Dropout before the Flatten."""
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top

  model = onnx.load(str(path))
  graph = model.graph
  initializers = {t.name: t for t in graph.initializer}

  def edit(name, change):
    initializers[name].CopyFrom(
        numpy_helper.from_array(change(numpy_helper.to_array(initializers[name])), name)
    )

  def constant(name, value):
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  nodes = [
      helper.make_node("Sub", ["data", constant("mean", 127.5)], ["centred"], name="minus"),
      helper.make_node(
          "Mul",
          ["centred", constant("scale", np.full((1, 3, 1, 1), 1 / 128))],
          ["normalised"],
          name="times",
      ),
  ]
  last = len(graph.node) - 1
  for index, node in enumerate(graph.node):
    if index == 0:
      node.input[0] = "normalised"
      edit(node.input[1], lambda w: (w * np.float64(128 / 127.5)).astype(np.float32))
    if node.op_type == "PRelu":
      edit(node.input[1], lambda slope: slope.reshape(1, -1, 1, 1))
    if node.op_type == "Flatten":
      nodes.append(helper.make_node("Identity", [node.input[0]], ["same"], name="identity"))
      nodes.append(helper.make_node("Dropout", ["same"], ["kept"], name="dropout"))
      node.input[0] = "kept"
    if node.op_type == "Gemm":
      edit(node.input[1], lambda w: w.T.copy())
      nodes.append(helper.make_node("MatMul", node.input[:2], ["product"], name="fc_matmul"))
      nodes.append(helper.make_node("Add", ["product", node.input[2]], node.output, name="fc_add"))
      continue
    if index == last:  # The final BN.
      node.attribute.remove(next(a for a in node.attribute if a.name == "epsilon"))
      node.attribute.append(helper.make_attribute("epsilon", 2e-5))
      edit(node.input[4], lambda var: var - np.float32(1e-5))
    nodes.append(node)
  nodes = [copy.deepcopy(node) for node in nodes]  # Not views into the list cleared below.
  del graph.node[:]
  graph.node.extend(nodes)
  onnx.checker.check_model(model)
  onnx.save(model, str(out))
  return out


def onnx_flags(path, *flags):
  return ["--from", "onnx", "--weights", str(path), *flags]


def test_onnx_graph_converts_to_the_torch_embeddings(onnx_graph, arcface_torch_weights, tmp_path):
  onnx = import_onnx()
  weights, expected = arcface_torch_weights("r18")
  graphs = {form: onnx_graph("r18", form) for form in ("folded", "bn_kept")}
  graphs["rewritten"] = rewritten(onnx, graphs["folded"], tmp_path / "rewritten.onnx")
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    onnxruntime = None
  pixels = IMAGES.transpose(0, 3, 1, 2).astype(np.float32)
  for form, path in graphs.items():
    flags = onnx_flags(path, "--arch", "r18") if form == "folded" else onnx_flags(path)
    model, actual = convert_and_embed(flags, str(tmp_path / form))
    assert model.model_config == {"name": "iresnet18", "embedding_dim": 512}, form
    assert "onnx r18" in model.source
    assert_same_embeddings(actual, expected)
    if onnxruntime is not None and form == "rewritten":  # The rewrite kept the function.
      session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
      assert_same_embeddings(session.run(None, {"data": pixels})[0], expected)
  # With every BN a node, the graph holds the state dict's tensors: the same variables exactly.
  out = str(tmp_path / "from_torch")
  convert.main(
      ["--from", "arcface_torch", "--arch", "r18", "--weights", str(weights), "--out", out]
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      model_dir.load(str(tmp_path / "bn_kept")).variables,
      model_dir.load(out).variables,
  )


def test_onnx_arch_is_read_off_the_graph(onnx_graph, tmp_path, capsys):
  # r34's stages differ in depth (3, 4, 6, 3), unlike r18's: the order of the count is checked too.
  graph = onnx_graph("r34")
  convert.main(onnx_flags(graph, "--out", str(tmp_path / "r34")))
  assert model_dir.load(str(tmp_path / "r34")).model_config["name"] == "iresnet34"
  assert "iresnet34, 512-d" in capsys.readouterr().out
  for arch, problem in [
      ("r50", "but {} is an arcface_torch r34 graph (stage depths (3, 4, 6, 3))"),
      ("mbf", "--from onnx reads arcface_torch's iResNets (r18, r34, r50, r100, r200), not mbf"),
  ]:
    out = tmp_path / arch
    message = command_error(capsys, onnx_flags(graph, "--arch", arch, "--out", str(out)))
    assert problem.format(graph) in message
    assert not out.exists()


def test_a_graph_that_is_not_an_iresnet_is_refused(onnx_graph, tmp_path, capsys):
  onnx = import_onnx()
  mlp = tmp_path / "mlp.onnx"
  export_onnx(
      nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 8), nn.PReLU(), nn.Linear(8, 4)), mlp
  )
  relu = onnx.load(str(onnx_graph("r18")))
  prelu = [node for node in relu.graph.node if node.op_type == "PRelu"][3]
  prelu.op_type = "Relu"
  del prelu.input[1:]
  onnx.save(relu, str(tmp_path / "relu.onnx"))
  for path, problem in [
      (mlp, "Flatten node '/0/Flatten' is where the first Conv was expected"),
      (
          tmp_path / "relu.onnx",
          f"Relu node {prelu.name!r} is where residual unit 3's PRelu was expected",
      ),
  ]:
    message = command_error(capsys, onnx_flags(path, "--out", str(tmp_path / "model")))
    assert f"{path} is not an arcface_torch iResNet graph: {problem}." in message
    assert not (tmp_path / "model").exists()
