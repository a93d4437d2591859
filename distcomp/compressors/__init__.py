"""Built-in compressors; importing this package registers them by name."""

from distcomp.compressors import cast, none, powersgd, quant, sign, sparse

__all__ = ["cast", "none", "powersgd", "quant", "sign", "sparse"]
