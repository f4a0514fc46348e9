"""The CUDA C++ extension, shared by the ops that have CUDA kernels: ``build`` (how to compile
``csrc/``: used by ``setup.py``, which loads it by path, by the JIT build and by the tests' CPU
emulation build) and ``extension`` (loads it; availability for :mod:`gift_kernels.ops.plan`).
The launchers are in the op folders (``linear/cuda.py``).
"""
