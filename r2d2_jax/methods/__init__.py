"""Registry of methods by name (`config.method`)."""

from r2d2_jax.errors import unknown_name
from r2d2_jax.methods import mpl, r2d2, semimeta, supervised, uda
from r2d2_jax.methods.base import Context, Method

METHODS: dict[str, Method] = {
    m.name: m for m in (supervised.METHOD, r2d2.METHOD, r2d2.FINETUNE,
                       mpl.METHOD, mpl.FINETUNE, uda.METHOD, semimeta.METHOD)
}


def get_method(name: str) -> Method:
  """Returns the method registered as `name`, or an error listing the valid names."""
  if name not in METHODS:
    raise unknown_name("method", name, METHODS)
  return METHODS[name]
