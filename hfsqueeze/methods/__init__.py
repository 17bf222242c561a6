"""One folder per compression method; each defines a `Stage` (see `hfsqueeze.core.stage`).

Method folders import only `hfsqueeze.core` and `hfsqueeze.compat`; `hfsqueeze.registry` is the one module that
imports them.
"""
