"""benchmarks/ as a pytest-benchmark suite (test_rows.py); the scripts beside it are not tests."""

collect_ignore = ["gpu_check.py", "compile_kernels.py", "roofline.py"]
