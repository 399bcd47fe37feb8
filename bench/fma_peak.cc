// The float32 FMA peak of this machine: independent fused multiply-adds on the
// widest vectors the CPU has (AVX-512, else AVX2), one chain set per thread.
// benchmark.py divides each kernel's GFLOP/s by this figure.
//
//   build/fma_peak THREADS    ->  "avx512 2 threads 412.3 GFLOP/s"
//
// Enough independent accumulators hide the FMA latency on every x86-64 core
// (latency 4-5 cycles, up to 2 FMA ports); the best of several runs is taken,
// as other jobs on a shared machine only ever add time.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kIterations = 20'000'000;

__attribute__((target("avx512f"))) float ChainsAvx512(int64_t iterations) {
  constexpr int kChains = 16;  // of the 32 zmm registers
  __m512 acc[kChains];
  for (int k = 0; k < kChains; ++k) acc[k] = _mm512_set1_ps(0.001f * k);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < kChains; ++k) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
  }
  alignas(64) float lanes[16];
  float sum = 0.0f;
  for (int k = 0; k < kChains; ++k) {
    _mm512_store_ps(lanes, acc[k]);
    for (float lane : lanes) sum += lane;
  }
  return sum;
}

__attribute__((target("avx2,fma"))) float ChainsAvx2(int64_t iterations) {
  constexpr int kChains = 12;  // of the 16 ymm registers
  __m256 acc[kChains];
  for (int k = 0; k < kChains; ++k) acc[k] = _mm256_set1_ps(0.001f * k);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int k = 0; k < kChains; ++k) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
  }
  alignas(32) float lanes[8];
  float sum = 0.0f;
  for (int k = 0; k < kChains; ++k) {
    _mm256_store_ps(lanes, acc[k]);
    for (float lane : lanes) sum += lane;
  }
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  if (threads < 1) {
    std::fprintf(stderr, "fma_peak: error: THREADS must be >= 1\n");
    return 2;
  }
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
    std::fprintf(stderr, "fma_peak: error: the CPU has neither AVX-512 nor AVX2 with FMA\n");
    return 1;
  }
  const double flops_per_iteration = avx512 ? 16 * 16 * 2 : 12 * 8 * 2;
  auto chains = avx512 ? ChainsAvx512 : ChainsAvx2;
  double best = 1e30;
  volatile float sink = 0.0f;
  for (int run = 0; run < 5; ++run) {
    std::vector<float> sums(threads);
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] { sums[t] = chains(kIterations); });
    }
    for (auto& worker : workers) worker.join();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    for (float s : sums) sink = sink + s;
  }
  std::printf("%s %d threads %.1f GFLOP/s\n", avx512 ? "avx512" : "avx2", threads,
              flops_per_iteration * kIterations * threads / best / 1e9);
  return 0;
}
