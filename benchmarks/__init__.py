"""Speed and memory benchmarks (not tests): ``python -m benchmarks.bench_kernels --help``."""
