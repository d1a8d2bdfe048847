"""QArray pytree behaviour and sub-byte packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

PACKABLE = ["int2", "int3", "int4", "int5", "int8", "uint1", "uint2", "uint4", "uint6",
            "binary", "ternary", "nf4", "dynamic8", "fp8_e4m3", "fp8_e5m2", "fp6_e2m3",
            "fp6_e3m2", "fp4_e2m1"]


@pytest.mark.parametrize("name", PACKABLE)
def test_pack_unpack_round_trip_and_size(name):
  fmt = jq.get_format(name)
  w = jax.random.normal(jax.random.key(0), (16, 48))
  codes = jq.quantize(w, jq.QuantSpec(name, channel_axes=(1,))).codes
  words = jq.pack_codes(codes, fmt.bits)
  assert words.dtype == jnp.uint8 and words.shape == (16, 48 * fmt.bits // 8)
  back = jq.unpack_codes(words, fmt.bits, codes.dtype)
  assert back.dtype == codes.dtype
  bits = lambda c: np.asarray(jax.lax.bitcast_convert_type(c, jnp.uint8)
                              if jnp.dtype(c.dtype).itemsize == 1 and
                              jnp.issubdtype(c.dtype, jnp.floating) and fmt.bits == 8
                              else c.astype(jnp.float32))
  np.testing.assert_array_equal(bits(back), bits(codes))


def test_int4_layout_is_low_nibble_first():
  codes = jnp.array([1, -2, 7, -8], jnp.int4)
  words = np.asarray(jq.pack_codes(codes, 4))
  np.testing.assert_array_equal(words, [0x1 | (0xE << 4), 0x7 | (0x8 << 4)])


def test_2bit_and_6bit_layouts():
  codes = jnp.array([0, 1, 2, 3], jnp.uint2)
  np.testing.assert_array_equal(jq.pack_codes(codes, 2), [0b11100100])
  six = jnp.array([0b000001, 0b100000, 0b111111, 0b010101], jnp.uint8)
  stream = 0b000001 | 0b100000 << 6 | 0b111111 << 12 | 0b010101 << 18
  np.testing.assert_array_equal(jq.pack_codes(six, 6),
                                [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16])


def test_pack_along_another_axis():
  codes = jax.random.randint(jax.random.key(1), (8, 6), -8, 8).astype(jnp.int4)
  words = jq.pack_codes(codes, 4, axis=0)
  assert words.shape == (4, 6)
  np.testing.assert_array_equal(jq.unpack_codes(words, 4, jnp.int4, axis=0), codes)


def test_pack_rejects_bad_lengths_and_bits():
  with pytest.raises(ValueError, match="not a multiple of 2"):
    jq.pack_codes(jnp.zeros((3,), jnp.int4), 4)
  with pytest.raises(ValueError, match="bits=9"):
    jq.pack_codes(jnp.zeros((8,), jnp.int8), 9)


def test_qarray_is_a_pytree_with_static_spec():
  q = jq.quantize(jnp.ones((32, 8)), jq.QuantSpec("int4", channel_axes=(1,)))
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2  # codes and scale; None children are empty subtrees
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.spec == q.spec and rebuilt.dtype == q.dtype
  assert q.shape == (32, 8) and q.format.name == "int4" and q.ndim == 2
  assert "int4" in repr(q)
