// Micro-benchmark of the plain C++ kernels, without TensorFlow: the quickest
// loop for tuning them and the input to perf / callgrind.
//
//   g++ -O3 -std=c++17 -Iipu_sparse_ops/cc -o build/kernel_bench bench/kernel_bench.cc \
//       build/sparse_pattern.o build/sparse_kernels.o build/claiming_parallel_for.o \
//       build/sparse_kernels_isa_*.o -lpthread
//   build/kernel_bench BLOCK BATCH INPUT OUTPUT DENSITY THREADS [REPEATS]
//
// (bench/run_kernel_bench.sh does both for the cases the issue sets targets for.)
//
// Prints the best time of REPEATS runs (other jobs on a shared machine only
// ever add time) and useful GFLOP/s of forward, grad-input and grad-values.
// IPU_SPARSE_OPS_ISA picks the instruction set as in the op.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "claiming_parallel_for.h"
#include "sparse_kernels.h"
#include "sparse_pattern.h"

namespace kernel_bench {

// threads - 1 workers that run scheduled tasks, as TensorFlow's intra-op pool
// does for the op; the kernels share work with them as in the op.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this] { Work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    ready_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
  }

 private:
  void Work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return done_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool done_ = false;
  std::vector<std::thread> threads_;
};

double BestMs(const std::function<void()>& run, int repeats) {
  run();  // warm up
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    ms.push_back(std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - start).count());
  }
  return *std::min_element(ms.begin(), ms.end());
}

int Main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s BLOCK BATCH INPUT OUTPUT DENSITY THREADS [REPEATS]\n", argv[0]);
    return 2;
  }
  const int64_t bs = std::atoll(argv[1]), batch = std::atoll(argv[2]);
  const int64_t input = std::atoll(argv[3]), output = std::atoll(argv[4]);
  const double density = std::atof(argv[5]);
  const int threads = std::atoi(argv[6]);
  const int repeats = argc > 7 ? std::atoi(argv[7]) : 5;
  const int64_t ib = input / bs, ob = output / bs;

  std::mt19937 gen(0);
  std::bernoulli_distribution keep(density);
  std::vector<int64_t> rows, cols;
  for (int64_t i = 0; i < ib; ++i)
    for (int64_t j = 0; j < ob; ++j)
      if (keep(gen)) rows.push_back(i), cols.push_back(j);
  const int64_t nnz = static_cast<int64_t>(rows.size());
  std::vector<int32_t> meta;
  std::vector<int64_t> order;
  ipu_sparse_ops::BuildMetainfo(rows.data(), cols.data(), nnz, ib, ob, nnz, &meta, &order);
  ipu_sparse_ops::BlockPattern pattern;
  ipu_sparse_ops::ValidateMetainfo(meta.data(), meta.size(), nnz, ib, ob, bs, &pattern);

  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  auto random_vector = [&](int64_t n) {
    std::vector<float> v(n);
    for (float& f : v) f = uniform(gen);
    return v;
  };
  const std::vector<float> values = random_vector(nnz * bs * bs);
  const std::vector<float> x = random_vector(batch * input);
  const std::vector<float> dy = random_vector(batch * output);
  std::vector<float> y(batch * output), dx(batch * input), dv(nnz * bs * bs);
  Pool pool(threads - 1);
  const auto pf = ipu_sparse_ops::ClaimingParallelFor(
      threads, [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); });

  const double gflop = 2.0 * batch * nnz * bs * bs / 1e9;
  const double fwd = BestMs([&] {
    ipu_sparse_ops::SparseMatmul(pattern, values.data(), x.data(), batch, y.data(), pf);
  }, repeats);
  const double gin = BestMs([&] {
    ipu_sparse_ops::SparseMatmulGradInput(pattern, values.data(), dy.data(), batch, dx.data(), pf);
  }, repeats);
  const double gval = BestMs([&] {
    ipu_sparse_ops::SparseMatmulGradValues(pattern, x.data(), dy.data(), batch, nnz, dv.data(), pf);
  }, repeats);
  std::printf("%s bs %lld batch %lld %lldx%lld d %.2f threads %d: "
              "fwd %.3f ms (%.0f GF/s)  gin %.3f ms (%.0f)  gval %.3f ms (%.0f)\n",
              ipu_sparse_ops::KernelIsa(), (long long)bs, (long long)batch,
              (long long)input, (long long)output, density, threads,
              fwd, gflop / fwd * 1e3, gin, gflop / gin * 1e3, gval, gflop / gval * 1e3);
  return 0;
}

}  // namespace kernel_bench

int main(int argc, char** argv) { return kernel_bench::Main(argc, argv); }
