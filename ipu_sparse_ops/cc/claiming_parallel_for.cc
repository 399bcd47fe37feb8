#include "claiming_parallel_for.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <utility>

namespace ipu_sparse_ops {
namespace {

// In the kernels' cost units (about cycles): below kMinParallelCost in all the
// caller runs everything (a helper would start about when it is done); above
// it a part is at least kMinPartCost, and there are up to kPartsPerThread parts
// per thread, so that a helper that starts late still finds some. Not more: a
// panel-sweeping kernel reads its panels again for every part.
constexpr int64_t kMinParallelCost = 100000;
constexpr int64_t kMinPartCost = 20000;
constexpr int64_t kPartsPerThread = 8;

// Outlives the call: a helper may start after the caller has returned.
struct Parts {
  std::atomic<int64_t> next{0};
  std::atomic<int> running{0};  // helpers inside RunParts
  int64_t n = 0;
  int64_t count = 0;
  const std::function<void(int64_t, int64_t)>* fn = nullptr;  // valid while parts remain
};

void RunParts(Parts& parts) {
  for (int64_t p; (p = parts.next.fetch_add(1)) < parts.count;) {
    (*parts.fn)(parts.n * p / parts.count, parts.n * (p + 1) / parts.count);
  }
}

}  // namespace

ParallelFor ClaimingParallelFor(int threads, Schedule schedule) {
  return [threads, schedule = std::move(schedule)](
             int64_t n, int64_t cost_per_item,
             const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t total = n * std::max<int64_t>(cost_per_item, 1);
    const int64_t count = std::min({n, total / kMinPartCost, kPartsPerThread * threads});
    if (threads <= 1 || total < kMinParallelCost || count <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    auto parts = std::make_shared<Parts>();
    parts->n = n;
    parts->count = count;
    parts->fn = &fn;
    const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, count - 1));
    for (int h = 0; h < helpers; ++h) {
      schedule([parts] {
        // Counted before claiming: the caller, once every part is claimed, waits
        // for every helper counted; one counted later can claim nothing.
        parts->running.fetch_add(1);
        RunParts(*parts);
        parts->running.fetch_sub(1);
      });
    }
    RunParts(*parts);
    for (int spins = 0; parts->running.load() != 0; ++spins) {
      if (spins > 64) std::this_thread::yield();
    }
  };
}

}  // namespace ipu_sparse_ops
