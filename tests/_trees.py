"""Pytree assertions shared by the tests."""

import jax
import numpy as np


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  """Same structure and dtypes; leaves exactly equal, or close within tolerances."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  ):
    name = jax.tree_util.keystr(path)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, name
    if rtol == 0.0 and atol == 0.0:
      np.testing.assert_array_equal(x, y, err_msg=name)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
