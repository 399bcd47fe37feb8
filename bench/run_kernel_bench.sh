#!/bin/sh
# Builds bench/kernel_bench.cc against the objects `make -j` left in build/ and
# runs the cases the issue's targets name. Extra arguments go to every run.
set -e
cd "$(dirname "$0")/.."
g++ -O3 -std=c++17 -Iipu_sparse_ops/cc -o build/kernel_bench bench/kernel_bench.cc \
    build/sparse_pattern.o build/sparse_kernels.o build/claiming_parallel_for.o \
    build/sparse_kernels_isa_*.o -lpthread
for case in "1 256 4096 4096 0.1" "1 256 4096 4096 0.3" "16 256 4096 4096 0.1" "16 256 4096 4096 0.3" \
            "8 256 4096 4096 0.1" "1 128 784 320 0.1" "1 16 784 320 0.1" "16 16 784 320 0.1"; do
  build/kernel_bench $case "${THREADS:-1}" "$@"
done
