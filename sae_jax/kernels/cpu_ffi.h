// Shared by the XLA FFI CPU kernels (cpu_topk.cc, cpu_rows.cc): work split over XLA's pool.
#ifndef SAE_JAX_KERNELS_CPU_FFI_H_
#define SAE_JAX_KERNELS_CPU_FFI_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace sae_jax {

// Runs fn(b) for every b in [0, n_blocks) on the calling thread and XLA's intra-op thread pool.
// Blocks are claimed from a shared counter; the caller claims too and then waits only for blocks
// already claimed by running helpers, so it never waits on a task that has not started (a pool
// busy with other ops cannot deadlock it). Helpers that start late find nothing left and return
// without touching fn, whose captures may by then be gone.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n_blocks, const Fn& fn) {
  if (n_blocks <= 0) return;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    const Fn* fn = nullptr;
  };
  auto s = std::make_shared<State>();
  s->n = n_blocks;
  s->fn = &fn;
  auto drain = [](const std::shared_ptr<State>& s) {
    while (true) {
      const int64_t b = s->next.fetch_add(1);
      if (b >= s->n) return;
      (*s->fn)(b);
      s->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n_blocks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s, drain] { drain(s); });
  drain(s);
  while (s->done.load() < s->n) std::this_thread::yield();
}

}  // namespace sae_jax

#endif  // SAE_JAX_KERNELS_CPU_FFI_H_
