// A ParallelFor whose caller never waits for a thread that has not started.
//
// A thread pool's ParallelFor splits the range up front and waits for every
// part. Waking a sleeping pool thread can take tens of microseconds (more in a
// VM), as long as a small kernel runs, so the caller then waited for a part it
// could have done itself: at 128x784x320 the forward kernel took as long on two
// threads as on one. Here the parts are claimed from a shared counter by the
// caller and by helpers the pool runs whenever they start; the caller waits
// only for parts already claimed, and a helper that starts after the last part
// is claimed returns without running anything.
#ifndef IPU_SPARSE_OPS_CC_CLAIMING_PARALLEL_FOR_H_
#define IPU_SPARSE_OPS_CC_CLAIMING_PARALLEL_FOR_H_

#include <cstdint>
#include <functional>

#include "sparse_kernels.h"

namespace ipu_sparse_ops {

// Runs a task on some other thread, at some later time.
using Schedule = std::function<void(std::function<void()>)>;

// `threads` counts the caller: threads - 1 helpers are scheduled per call.
ParallelFor ClaimingParallelFor(int threads, Schedule schedule);

}  // namespace ipu_sparse_ops

#endif  // IPU_SPARSE_OPS_CC_CLAIMING_PARALLEL_FOR_H_
