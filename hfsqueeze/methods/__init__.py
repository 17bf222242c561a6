"""Built-in stages. Importing this package registers each method folder's stage (see `hfsqueeze.registry`)."""

from . import quantize  # noqa: F401
