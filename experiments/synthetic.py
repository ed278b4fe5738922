"""Random images and labels of a dataset's shapes: runs that test machinery or time
steps without the dataset's files."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tp_jax import data


def dataset(
    name: str,
    n_train: int = 256,
    n_test: int = 128,
    seed: int = 0,
    image_shape: tuple[int, ...] | None = None,
) -> data.Dataset:
  """Standard-normal images and uniform labels of ``name``'s classes and image shape
  (or ``image_shape``)."""
  info = data.info(name)
  shape = tuple(image_shape or info.image_shape)
  k = jax.random.split(jax.random.key(seed), 4)
  return data.Dataset(
      jax.random.normal(k[0], (n_train, *shape)),
      jax.random.randint(k[1], (n_train,), 0, info.num_classes, jnp.int32),
      jax.random.normal(k[2], (n_test, *shape)),
      jax.random.randint(k[3], (n_test,), 0, info.num_classes, jnp.int32),
      info,
  )
