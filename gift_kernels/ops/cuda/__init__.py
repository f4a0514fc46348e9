"""The CUDA C++ backend: ``backend`` (loads the extension built from ``csrc/``, the launchers
and the backend interface), ``ops`` (the fake implementations and autograd of the extension's
own ops) and ``build`` (how to compile ``csrc/``: used by ``setup.py``, which loads it by path,
by the JIT build and by the tests' CPU emulation build).
"""
