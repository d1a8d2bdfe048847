"""Save and restore pytrees of arrays and `QArray`s with orbax, without a target.

Layout of a checkpoint directory::

  path/
    jaxquant.json   metadata: format version, jaxquant version, the tree structure
                    (containers and keys), each leaf's kind, dtype and shape, and
                    each QArray's QuantSpec and original dtype. Written last.
    arrays/         an orbax checkpoint (`StandardCheckpointer`) of the array data,
                    one entry per array leaf (``leaf_3``) or QArray
                    (``leaf_4/{codes,scale,zero_point,tensor_scale}``).

The structure lives in ``jaxquant.json``, so `restore` rebuilds dicts, lists,
tuples, NamedTuples (optax states: re-imported by module and name, fields checked),
python values and QArrays (spec and original dtype included) without a target. Array data goes through orbax, so sharded and multi-host saves work the
orbax way: every process calls `save`; only process 0 writes the metadata.

Dtypes. tensorstore, under orbax, has no uint4 or uint2 and no 6-bit floats, so:

* QArray codes are flattened, zero-padded to a whole group and packed with
  `jaxquant.pack_codes` at ``spec.format.bits`` bits per code into uint8 words
  (an int4 weight takes half a byte per value on disk).
* Other arrays of a dtype that is not a plain numpy dtype (bfloat16, float8_*,
  float8_e8m0fnu, int4, ...) are stored as their bit patterns in the unsigned
  dtype of the same width (uint8 for sub-byte dtypes); the metadata keeps the
  true dtype. `restore` undoes both bit for bit.

Restored arrays are jax arrays; numpy leaves come back as jax arrays too, and
mappings (FrozenDict, OrderedDict) as dicts. Array leaves take the sharding orbax
recorded at save time; packed codes are unpacked with XLA's default layout
(codes sharded over Explicit mesh axes are replicated before packing).

NNX. An ``nnx.State`` (``nnx.state(model)``) is saved as its pure dict
(``nnx.to_pure_dict``), so `restore` returns nested dicts. Apply them with::

  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jq.checkpoint.restore(path))
  nnx.update(model, state)  # or jq.dequantize_tree(state): float weights

(``nnx.replace_by_pure_dict`` accepts the restored QArrays as variable values).

Version policy. ``FORMAT_VERSION`` is bumped whenever the layout or the meaning of
the metadata changes in a way an older reader could misread. `restore` reads only
checkpoints of exactly this version and otherwise raises ValueError naming both
versions, rather than guessing. New optional metadata fields, which readers
ignore, do not bump it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxquant.qarray import QArray
from jaxquant.qarray import from_bit_patterns
from jaxquant.qarray import pack_codes
from jaxquant.qarray import to_bit_patterns
from jaxquant.qarray import unpack_codes
from jaxquant.quantize import QuantSpec

FORMAT_VERSION = 1
METADATA_FILE = "jaxquant.json"
ARRAYS_DIR = "arrays"

# Dtypes tensorstore stores as they are; all others are stored as bit patterns.
_NATIVE_DTYPES = frozenset([
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "float16", "float32", "float64", "complex64", "complex128"])
_UNSIGNED = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}
_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
_PYTHON_VALUES = (bool, int, float, str, type(None))


# ----------------------------------------------------------------------------
# Arrays <-> what orbax stores.


def _bits(dtype: np.dtype) -> int:
  if jnp.issubdtype(dtype, jnp.floating):
    return ml_dtypes.finfo(dtype).bits
  return jnp.iinfo(dtype).bits


def _encode_array(x, key: list[str], where: str) -> tuple[Any, dict]:
  """An array -> (array of a dtype orbax stores, its metadata entry).

  Args:
    x: [*shape] array of any numeric dtype (jax or numpy).
    key: its path in the orbax tree.
    where: its path in the user's tree, for error messages.
  Returns:
    ``x`` itself for native dtypes, else ``uint{8,16,...}[*shape]`` bit patterns;
    and ``{"key", "dtype", "shape"[, "stored_dtype"]}``.
  """
  dtype = np.dtype(x.dtype)
  entry = {"key": key, "dtype": dtype.name, "shape": list(x.shape)}
  if dtype.name in _NATIVE_DTYPES:
    return x, entry
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"cannot checkpoint the {dtype.name} array at {where}; expected "
                    "a numeric or bool dtype")
  x, bits = jnp.asarray(x), _bits(dtype)
  if bits >= 8:
    stored = jax.lax.bitcast_convert_type(x, _UNSIGNED[bits])
  else:
    stored = to_bit_patterns(x, bits).astype(jnp.uint8)
  entry["stored_dtype"] = np.dtype(stored.dtype).name
  return stored, entry


def _decode_array(stored, entry: dict) -> jax.Array:
  """Inverse of `_encode_array`: stored data and its entry -> jax array."""
  dtype = np.dtype(entry["dtype"])
  _check_stored(stored, entry, entry.get("stored_dtype", dtype.name), entry["shape"])
  stored = jnp.asarray(stored)
  if "stored_dtype" not in entry:
    return stored
  bits = _bits(dtype)
  if bits >= 8:
    return jax.lax.bitcast_convert_type(stored, dtype)
  return from_bit_patterns(stored.astype(jnp.uint32), bits, dtype)


def _check_stored(stored, entry: dict, dtype_name: str, shape) -> None:
  if np.dtype(stored.dtype).name != dtype_name or list(stored.shape) != list(shape):
    raise ValueError(f"checkpoint array {'/'.join(entry['key'])} is "
                     f"{np.dtype(stored.dtype).name}{list(stored.shape)}; the metadata "
                     f"expects {dtype_name}{list(shape)}")


def _packed_size(size: int, bits: int) -> int:
  group = 8 // math.gcd(bits, 8)
  return -(-size // group) * group


def _flattenable(x: jax.Array) -> jax.Array:
  """`x`, replicated if sharded over Explicit mesh axes (they reject flattening)."""
  sharding = getattr(x, "sharding", None)
  if (isinstance(sharding, NamedSharding) and any(sharding.spec)
      and jax.sharding.AxisType.Explicit in sharding.mesh.axis_types):
    return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec()))
  return x


@functools.partial(jax.jit, static_argnames="bits")
def _pack_flat(codes: jax.Array, bits: int) -> jax.Array:
  """[*shape] codes -> uint8[packed_size * bits // 8], zero-padded to a whole group."""
  patterns = to_bit_patterns(codes.reshape(-1), bits)
  patterns = jnp.pad(patterns, (0, _packed_size(patterns.size, bits) - patterns.size))
  return pack_codes(patterns, bits)


@functools.partial(jax.jit, static_argnames=("bits", "dtype", "shape"))
def _unpack_flat(words: jax.Array, bits: int, dtype: np.dtype,
                 shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `_pack_flat`: uint8 words -> [*shape] codes of `dtype`."""
  return unpack_codes(words, bits, dtype)[: math.prod(shape)].reshape(shape)


# ----------------------------------------------------------------------------
# Pytrees <-> JSON description plus a flat dict of arrays.


def _is_nnx_state(node) -> bool:
  if "flax.nnx" not in sys.modules:  # no nnx.State can exist without it
    return False
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return isinstance(node, nnx.State)


def _encode(node, where: str, arrays: dict) -> dict:
  """Describes `node` as JSON; array data goes into `arrays` under new keys."""
  if _is_nnx_state(node):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    node = nnx.to_pure_dict(node)
  if isinstance(node, QArray):
    return _encode_qarray(node, where, arrays)
  if isinstance(node, _ARRAY_TYPES):
    key = f"leaf_{len(arrays)}"
    arrays[key], entry = _encode_array(node, [key], where)
    return {"kind": "array", **entry}
  if isinstance(node, _PYTHON_VALUES):
    return {"kind": "value", "value": node}
  if isinstance(node, Mapping):
    items = []
    for k, v in node.items():
      if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"cannot checkpoint the key {k!r} ({type(k).__name__}) of "
                        f"the dict at {where}; expected str or int keys")
      items.append([k, _encode(v, f"{where}/{k}", arrays)])
    return {"kind": "dict", "items": items}
  if type(node) in (list, tuple):
    items = [_encode(v, f"{where}/{i}", arrays) for i, v in enumerate(node)]
    return {"kind": type(node).__name__, "items": items}
  if _is_namedtuple(node):
    items = [_encode(v, f"{where}/{name}", arrays) for name, v in zip(node._fields, node)]
    cls = type(node)
    return {"kind": "namedtuple", "type": f"{cls.__module__}:{cls.__qualname__}",
            "fields": list(node._fields), "items": items}
  raise TypeError(f"cannot checkpoint the {type(node).__name__} at {where}; expected "
                  "dicts, lists, tuples, NamedTuples, arrays, QArrays, nnx.State, or "
                  "python bool/int/float/str/None")


def _is_namedtuple(node) -> bool:
  return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _namedtuple_class(type_name: str, fields: list[str]):
  """The NamedTuple class `module:qualname` (e.g. optax's states), checked."""
  module_name, _, qualname = type_name.partition(":")
  try:
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
      cls = getattr(cls, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"the checkpoint holds a {type_name}, which cannot be imported "
                     f"here: {e}") from e
  if not (isinstance(cls, type) and issubclass(cls, tuple)
          and list(getattr(cls, "_fields", ())) == fields):
    raise ValueError(f"{type_name} here is not the NamedTuple with fields {fields} "
                     "that the checkpoint was written with")
  return cls


def _encode_qarray(q: QArray, where: str, arrays: dict) -> dict:
  key = f"leaf_{len(arrays)}"
  bits = q.format.bits
  children = {"codes": _pack_flat(_flattenable(q.codes), bits)}
  description = {
      "kind": "qarray",
      "dtype": np.dtype(q.dtype).name,
      "spec": {f.name: getattr(q.spec, f.name) for f in dataclasses.fields(q.spec)},
      "codes": {"key": [key, "codes"], "dtype": np.dtype(q.codes.dtype).name,
                "shape": list(q.codes.shape), "packed_bits": bits},
  }
  description["spec"]["format"] = q.format.name
  for name in ("scale", "zero_point", "tensor_scale"):
    value = getattr(q, name)
    if value is None:
      description[name] = None
    else:
      children[name], description[name] = _encode_array(value, [key, name],
                                                         f"{where}.{name}")
  arrays[key] = children
  return description


def _decode(description: dict, arrays: Mapping) -> Any:
  """Inverse of `_encode`: JSON description and restored arrays -> pytree."""
  kind = description["kind"]
  if kind == "value":
    return description["value"]
  if kind == "dict":
    return {k: _decode(v, arrays) for k, v in description["items"]}
  if kind in ("list", "tuple"):
    items = [_decode(v, arrays) for v in description["items"]]
    return items if kind == "list" else tuple(items)
  if kind == "namedtuple":
    cls = _namedtuple_class(description["type"], description["fields"])
    return cls(*[_decode(v, arrays) for v in description["items"]])
  if kind == "array":
    return _decode_array(_lookup(arrays, description["key"]), description)
  if kind == "qarray":
    return _decode_qarray(description, arrays)
  raise ValueError(f"unknown leaf kind {kind!r} in the checkpoint metadata")


def _decode_qarray(description: dict, arrays: Mapping) -> QArray:
  codes_entry = description["codes"]
  words = _lookup(arrays, codes_entry["key"])
  bits, shape = codes_entry["packed_bits"], tuple(codes_entry["shape"])
  _check_stored(words, codes_entry, "uint8",
                [_packed_size(math.prod(shape), bits) * bits // 8])
  codes = _unpack_flat(jnp.asarray(words), bits, np.dtype(codes_entry["dtype"]), shape)
  children = {name: None if entry is None else
              _decode_array(_lookup(arrays, entry["key"]), entry)
              for name, entry in description.items()
              if name in ("scale", "zero_point", "tensor_scale")}
  try:
    spec = QuantSpec(**description["spec"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"the checkpoint's QuantSpec {description['spec']} cannot be "
                     f"rebuilt: {e}") from e
  return QArray(codes, **children, spec=spec, dtype=np.dtype(description["dtype"]))


def _lookup(arrays: Mapping, key: list[str]):
  for name in key:
    arrays = arrays[name]
  return arrays


# ----------------------------------------------------------------------------
# Public API.


def _resolve(path) -> epath.Path:
  """Absolute path (orbax needs one); remote paths such as gs:// are kept as given."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.expanduser().resolve()


def _check_writable(path: epath.Path, overwrite: bool) -> None:
  if not path.exists():
    return
  if not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  is_checkpoint = path.is_dir() and (
      (path / METADATA_FILE).exists() or not any(path.iterdir()))
  if not is_checkpoint:
    raise FileExistsError(f"{path} exists and is not a jaxquant checkpoint (no "
                          f"{METADATA_FILE}) nor an empty directory; refusing to "
                          "overwrite it")


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Saves `tree` to the directory `path`: arrays through orbax, structure as JSON.

  Every process calls `save` with its shards (orbax's multi-host protocol); only
  process 0 writes ``jaxquant.json``, last, so a checkpoint with metadata is whole.

  Args:
    path: the checkpoint directory (created; parents too).
    tree: a pytree of dicts (str or int keys), lists, tuples, arrays of any
      dtype, QArrays, nnx.State, and python bool/int/float/str/None.
    overwrite: replace an existing checkpoint (or empty directory) at `path`.
  Raises:
    FileExistsError: `path` exists and `overwrite` is False, or it exists and is
      not a jaxquant checkpoint.
    TypeError: a node or dict key of a type that cannot be checkpointed; the
      message names its path in `tree`.

  Example:
    >>> qparams = jq.quantize_tree(params, rules)
    >>> jq.checkpoint.save("/tmp/ckpt", qparams)
    >>> jq.checkpoint.restore("/tmp/ckpt")  # same structure, specs and dtypes
  """
  import jaxquant  # pylint: disable=g-import-not-at-top  (jaxquant imports us)
  path = _resolve(path)
  _check_writable(path, overwrite)
  arrays = {}
  description = _encode(tree, "<root>", arrays)
  metadata = {"format_version": FORMAT_VERSION, "jaxquant_version": jaxquant.__version__,
              "num_arrays": len(arrays), "tree": description}
  primary = jax.process_index() == 0
  if arrays:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path / ARRAYS_DIR, arrays, force=overwrite)
      checkpointer.wait_until_finished()
  elif primary and (path / ARRAYS_DIR).exists():
    (path / ARRAYS_DIR).rmtree()  # stale arrays of the checkpoint being replaced
  if primary:
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps(metadata, indent=1))
    temporary.replace(path / METADATA_FILE)


def restore(path: str | os.PathLike) -> Any:
  """Restores the tree saved by `save` at `path`, without a target.

  Args:
    path: a checkpoint directory written by `save`.
  Returns:
    The saved structure, with jax arrays in their saved dtypes and QArrays with
    their codes, scales, zero points, tensor scales, spec and dtype.
  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a jaxquant checkpoint, or it was written with
      another checkpoint format version.
  """
  path = _resolve(path)
  if not path.exists():
    raise FileNotFoundError(f"cannot restore from {path}: no such directory")
  metadata_path = path / METADATA_FILE
  if not metadata_path.is_file():
    raise ValueError(f"{path} is not a jaxquant checkpoint: it has no {METADATA_FILE}")
  try:
    metadata = json.loads(metadata_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{metadata_path} is not valid JSON: {e}") from e
  metadata = metadata if isinstance(metadata, dict) else {}
  found = metadata.get("format_version")
  if found != FORMAT_VERSION:
    writer = metadata.get("jaxquant_version", "unknown")
    raise ValueError(f"{path} was written by an incompatible version of jaxquant "
                     f"({writer}): checkpoint format version expected "
                     f"{FORMAT_VERSION}, found {found}")
  arrays = {}
  if metadata["num_arrays"]:
    with ocp.StandardCheckpointer() as checkpointer:
      arrays = checkpointer.restore(path / ARRAYS_DIR)
  return _decode(metadata["tree"], arrays)
