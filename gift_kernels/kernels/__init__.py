"""Backends' launchers: one module per backend, each exposing ``gift_fwd`` and ``gift_bwd``.

Loaded lazily by :mod:`gift_kernels.backends`; nothing here is imported at package import.
"""
