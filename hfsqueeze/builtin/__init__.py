"""The built-in models and texts: fetched from PyPI packages (`fetch`), converted once (`models`), or shipped as
package data (`texts`: ``builtin:generated``). On the ground floor beside `hfsqueeze.core`, using only its leaf
modules (errors, utils, hf); `core.data` and `core.models` resolve the built-in names through it."""
