"""Registry of methods by name (`config.method`).

Every module of this package is imported here, and each registers its methods
(`base.register`): adding a method is adding a file.
"""

import importlib
import pkgutil

from r2d2_jax.methods.base import (METHODS, HookContext, Method, Network, Task,
                                   get_method, register)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  if _module != "base" and not _module.startswith("_"):
    importlib.import_module(f"{__name__}.{_module}")
