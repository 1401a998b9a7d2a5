"""benchmarks/profile_train_step.py's attribution of traced operations to the backbone's layers."""

import numpy as np

from benchmarks import profile_train_step

PATHS = {("stem_bn",), ("stage1_unit1",), ("stage1_unit1", "bn1"), ("stage1_unit1", "conv1")}


def test_module_paths_are_the_dicts_above_the_arrays():
  tree = {"stem_bn": {"scale": np.ones(2)}, "unit": {"bn": {"mean": np.zeros(2)}}}
  assert profile_train_step.module_paths(tree) == {("stem_bn",), ("unit",), ("unit", "bn")}


def test_operations_go_to_the_longest_module_path_of_their_pass():
  layer = lambda op_name: profile_train_step.layer_of(op_name, PATHS)
  assert layer("jit(train_step)/jvp(IResNet)/stage1_unit1/bn1/sub") == "fwd stage1_unit1/bn1"
  assert layer("jit(train_step)/transpose(jvp(IResNet))/stem_bn/reduce_sum") == "bwd stem_bn"
  assert (
      layer("jit(train_step)/transpose(jvp(IResNet))/stage1_unit1/conv1/while/body/dot_general")
      == "bwd stage1_unit1/conv1"
  )
  assert layer("jit(train_step)/jvp(IResNet)/stage1_unit1/add") == "fwd stage1_unit1"
  assert layer("jit(train_step)/jvp(IResNet)/head/fc/dot_general") == "fwd other"
  assert layer("jit(train_step)/mul") == "other"
