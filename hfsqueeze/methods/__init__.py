"""Built-in stages. Importing this package registers each method folder's stage (see `hfsqueeze.registry`)."""

from . import quantize  # noqa: F401
from . import distill  # noqa: F401
from . import prune  # noqa: F401
