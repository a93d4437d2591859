"""Adapters that plug compressors into torch's data-parallel wrappers."""

from distcomp.hooks.ddp import CompressionState, compressed_hook, ddp_comm_hook, register

__all__ = ["CompressionState", "compressed_hook", "ddp_comm_hook", "register"]
