"""Tests of jaxquant.recipes and the shipped recipes in configs/."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import demo
from jaxquant import recipes

SHIPPED = ("int8", "int4-g128", "nf4", "fp8_e4m3", "mxfp4", "nvfp4")
CONFIGS = pathlib.Path(__file__).parent.parent / "configs"

# recipe -> (format, {layer: scale shape}, scale dtype) on the demo kernels
# Dense_0 [64, 512], Dense_1 [512, 256], Dense_2 [256, 10].
EXPECTED = {
    "int8": ("int8", {0: (1, 512), 1: (1, 256), 2: (1, 10)}, np.float32),
    # Dense_0 is per-channel: 128 does not divide its 64 inputs.
    "int4-g128": ("int4", {0: (1, 512), 1: (4, 256), 2: (2, 10)}, np.float32),
    "nf4": ("nf4", {0: (1, 512), 1: (8, 256), 2: (4, 10)}, np.float32),
    "fp8_e4m3": ("fp8_e4m3", {0: (1, 512), 1: (1, 256), 2: (1, 10)}, np.float32),
    "mxfp4": ("fp4_e2m1", {0: (2, 512), 1: (16, 256), 2: (8, 10)},
              ml_dtypes.float8_e8m0fnu),
    "nvfp4": ("fp4_e2m1", {0: (4, 512), 1: (32, 256), 2: (16, 10)},
              ml_dtypes.float8_e4m3fn),
}


@pytest.fixture(scope="module")
def demo_params():
  return demo.init_params(0)


def test_list_recipes_has_the_shipped_ones():
  names = recipes.list_recipes()
  assert set(SHIPPED) <= set(names)
  assert recipes.DEFAULT_RECIPE == "int8" and names == sorted(names)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_quantizes_demo_params(name, demo_params):
  recipe = recipes.load_recipe(name)
  assert recipe.name == name and recipe.description
  hash(recipe)  # frozen and hashable, like every config object
  qparams = jax.jit(lambda p: jq.quantize_tree(p, recipe.rules))(demo_params)

  fmt, scale_shapes, scale_dtype = EXPECTED[name]
  for layer, scale_shape in scale_shapes.items():
    kernel = qparams["params"][f"Dense_{layer}"]["kernel"]
    assert isinstance(kernel, jq.QArray)
    assert kernel.format.name == fmt
    assert kernel.scale.shape == scale_shape
    assert kernel.scale.dtype == scale_dtype
    bias = qparams["params"][f"Dense_{layer}"]["bias"]
    assert not isinstance(bias, jq.QArray) and bias.dtype == jnp.float32
  assert (qparams["params"]["Dense_2"]["kernel"].tensor_scale is not None) == (
      name == "nvfp4")

  report = jq.tree_report(demo_params, qparams)
  assert report.compression > 3.5
  assert min(r.sqnr_db for r in report.leaves if r.sqnr_db is not None) > 10


def test_shipped_recipe_files_are_what_the_package_reads():
  for name in SHIPPED:
    assert recipes.load_recipe(CONFIGS / f"{name}.toml") == recipes.load_recipe(name)


class _OtherModel(nn.Module):
  """A Linen model with other names, nesting and a Conv, to show recipes are generic."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(128, (3, 3), name="stem")(x)
    x = x.reshape(x.shape[0], -1)[:, :256]
    for i in range(2):
      x = nn.LayerNorm(name=f"norm_{i}")(x)
      x = nn.Dense(256, name=f"block_{i}_mlp")(x)
    return nn.Dense(128, use_bias=False, name="head")(x)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_per_channel_recipes_apply_to_other_linen_models(name):
  params = _OtherModel().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3), jnp.float32))
  qparams = jq.quantize_tree(params, recipes.load_recipe(name).rules)["params"]
  assert qparams["stem"]["kernel"].scale.shape == (1, 1, 1, 128)  # Conv [h, w, in, out]
  assert qparams["head"]["kernel"].scale.shape == (1, 128)
  assert qparams["block_1_mlp"]["kernel"].format.name == name
  assert not isinstance(qparams["norm_0"]["scale"], jq.QArray)  # no rule: left float


@pytest.mark.parametrize("name", ["int4-g128", "nf4", "mxfp4", "nvfp4"])
def test_block_recipes_apply_to_dense_kernels_of_other_models(name):
  params = {"encoder": {"layers_0": {"attn_out": {"kernel": jnp.ones((256, 128)),
                                                  "bias": jnp.zeros(128)}}},
            "decoder": {"kernel": jnp.ones((512, 64))}}
  rules = recipes.load_recipe(name).rules
  qparams = jax.jit(lambda p: jq.quantize_tree(p, rules))(params)
  assert isinstance(qparams["encoder"]["layers_0"]["attn_out"]["kernel"], jq.QArray)
  assert isinstance(qparams["decoder"]["kernel"], jq.QArray)
  assert not isinstance(qparams["encoder"]["layers_0"]["attn_out"]["bias"], jq.QArray)


def test_load_recipe_from_path_and_str(tmp_path):
  path = tmp_path / "mine.toml"
  path.write_text('name = "mine"\n'
                  '[[rules]]\npattern = ".*kernel"\nformat = "int4"\n'
                  'channel_axes = [1]\nblock_sizes = { 0 = 32 }\nsymmetric = false\n'
                  'calibration = "mse:8"\nscale_dtype = "bfloat16"\n'
                  '[[rules]]\npattern = ".*"\nkeep = true\n'
                  '[[rules]]\npattern = "x"\npreset = "mxfp8"\naxis = 1\nndim = 3\n')
  for source in (path, str(path)):
    recipe = recipes.load_recipe(source)
    assert recipe.name == "mine" and recipe.description == ""
    spec = recipe.rules[0].spec
    assert spec == jq.QuantSpec("int4", channel_axes=(1,), block_sizes={0: 32},
                                symmetric=False, calibration="mse:8",
                                scale_dtype=jnp.bfloat16)
    assert recipe.rules[1].spec is None
    assert recipe.rules[2].spec == jq.get_preset("mxfp8", axis=1, ndim=3)
  text = str(recipe)
  assert "Recipe mine" in text and "keep float" in text and "block_sizes={0: 32}" in text


def test_unknown_recipe_name_lists_the_shipped_ones():
  with pytest.raises(ValueError, match="'int3' is not known; known recipes: .*int8"):
    recipes.load_recipe("int3")
  with pytest.raises(ValueError, match="does not exist"):
    recipes.load_recipe("no/such/recipe.toml")


_RULE = '[[rules]]\npattern = ".*kernel"\n'


@pytest.mark.parametrize("text, message", [
    ('nme = "x"\n' + _RULE + 'keep = true', "unknown top-level key 'nme'"),
    (_RULE + 'keep = true', "name = None; expected a string"),
    ('name = "x"\n', "expected at least one \\[\\[rules\\]\\] table"),
    ('name = "x"\nrules = 3', "expected at least one"),
    ('name = "x"\n[[rules]]\nformat = "int8"', "rule 1: missing pattern"),
    ('name = "x"\n' + _RULE + 'fromat = "int8"',
     r"rule 1 \(pattern '.\*kernel'\): unknown key 'fromat'"),
    ('name = "x"\n' + _RULE + 'keep = true\n' + _RULE + 'format = "int9"',
     "rule 2 .*format='int9' is not a known format"),
    ('name = "x"\n' + _RULE + 'keep = false', "keep = false; expected keep = true"),
    ('name = "x"\n' + _RULE + 'keep = true\nformat = "int8"',
     "keep = true cannot be combined with format"),
    ('name = "x"\n' + _RULE, "expected keep = true, format = ... or preset = ..."),
    ('name = "x"\n' + _RULE + 'preset = "mxfp3"', 'preset = "mxfp3" is not known'),
    ('name = "x"\n' + _RULE + 'preset = "mxfp4"\nformat = "int8"',
     "preset cannot be combined with format"),
    ('name = "x"\n' + _RULE + 'preset = "nvfp4"\naxis = 2', "axis=2 is out of range"),
    ('name = "x"\n' + _RULE + 'format = "int8"\naxis = 0',
     "axis is only allowed with preset"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nchannel_axes = "1"',
     'channel_axes = "1"; expected a list of integer axes'),
    ('name = "x"\n' + _RULE + 'format = "int8"\nchannel_axes = [true]',
     "expected a list of integer axes"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nblock_sizes = { in = 4 }',
     "block_sizes has the key 'in'; expected an integer axis"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nblock_sizes = { 0 = 0 }',
     "has block 0 for axis 0; expected a positive integer"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nblock_sizes = [128]',
     "block_sizes = \\[128\\]; expected a table"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nscale_dtype = "float8"',
     'scale_dtype = "float8"; expected one of "float32"'),
    ('name = "x"\n' + _RULE + 'format = "int8"\nsymmetric = "no"',
     'symmetric = "no"; expected true or false'),
    ('name = "x"\n' + _RULE + 'format = "int8"\ncalibration = "median"',
     "calibration='median' is not understood"),
    ('name = "x"\n' + _RULE + 'format = "fp8_e4m3"\nsymmetric = false',
     "symmetric=False needs an integer format"),
    ('name = "x"\n' + _RULE + 'format = "int8"\nchannel_axes = [0]\n'
     'block_sizes = { 0 = 2 }', None),  # valid until applied: axis checks need a shape
    ('name = "x"\n[[rules]]\npattern = "("\nkeep = true', "not a valid regex"),
    ('name = "x"\n[[rules]\n', "not valid TOML"),
])
def test_bad_recipe_files_name_the_problem(tmp_path, text, message):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  if message is None:
    recipes.load_recipe(path)
    return
  with pytest.raises(ValueError, match=message) as info:
    recipes.load_recipe(path)
  assert str(path) in str(info.value)


def test_block_size_that_does_not_divide_names_the_leaf(demo_params):
  rules = (jq.Rule(".*kernel", jq.QuantSpec("int4", channel_axes=(1,),
                                            block_sizes={0: 128})),)
  with pytest.raises(ValueError, match="params/Dense_0/kernel .* does not divide"):
    jq.quantize_tree(demo_params, rules)


def test_module_docstring_example_is_a_valid_recipe():
  import textwrap  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  example = recipes.__doc__.split("::\n\n", 1)[1].split("\n\nRecipes shipped")[0]
  recipe = recipes.parse_recipe(tomllib.loads(textwrap.dedent(example)), "docstring")
  assert [r.pattern for r in recipe.rules] == [".*bias", ".*/out_proj/kernel", ".*kernel"]
  assert recipe.rules[1].spec == jq.get_preset("nvfp4")
