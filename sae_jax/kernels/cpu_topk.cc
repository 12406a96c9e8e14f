// Row-wise top-k for the XLA CPU backend (an XLA FFI custom call).
//
// XLA's own CPU TopK partially sorts every row on one thread. Here, per row: the maximum of each
// block of 16 values (vectorised); the k-th largest block maximum, a lower bound of the k-th
// largest value (k blocks reaching it hold k values >= it); the values >= that bound, usually
// little more than k, from the blocks that reach it; an exact selection among those. Rows are
// shared between the calling thread and XLA's intra-op thread pool.
//
// Semantics equal lax.top_k: values descending in the IEEE total order (-0 < +0, NaN above
// +inf), ties broken towards the lower index. Comparisons run on int32 keys with that order.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <climits>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Item {
  int32_t v;  // total-order key of the value
  int32_t i;
};

// Sign-magnitude float bits -> two's complement order; the map is its own inverse.
inline int32_t Key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

inline float KeyFloat(int32_t key) {
  int32_t bits = Key(key);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// "a is better than b": a larger value, or an equal value at a lower index.
inline bool Better(const Item& a, const Item& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

constexpr int64_t kBlock = 16;

struct Scratch {
  std::vector<int32_t> block_max;
  std::vector<Item> cand;
};

void TopKRow(const float* xf, int64_t m, int k, float* out_v, int32_t* out_i, Scratch& s) {
  const int32_t* x = reinterpret_cast<const int32_t*>(xf);  // raw bits; Key() orders them
  const int64_t full = m / kBlock;
  const int64_t n_blocks = full + (m % kBlock != 0);
  s.block_max.resize(n_blocks);
  for (int64_t b = 0; b < full; ++b) {
    const int32_t* p = x + b * kBlock;
    int32_t mx = Key(p[0]);
    for (int t = 1; t < kBlock; ++t) mx = std::max(mx, Key(p[t]));
    s.block_max[b] = mx;
  }
  if (full < n_blocks) {
    int32_t mx = Key(x[full * kBlock]);
    for (int64_t j = full * kBlock + 1; j < m; ++j) mx = std::max(mx, Key(x[j]));
    s.block_max[full] = mx;
  }
  int32_t thr;
  if (n_blocks <= k) {
    thr = INT32_MIN;  // every value is a candidate
  } else {
    std::vector<int32_t> tmp(s.block_max);
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<int32_t>());
    thr = tmp[k - 1];
  }
  s.cand.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (s.block_max[b] < thr) continue;
    const int64_t end = std::min(m, (b + 1) * kBlock);
    for (int64_t j = b * kBlock; j < end; ++j) {
      const int32_t key = Key(x[j]);
      if (key >= thr) s.cand.push_back(Item{key, static_cast<int32_t>(j)});
    }
  }
  // s.cand holds every value >= thr (at least k of them) in index order.
  if (static_cast<int64_t>(s.cand.size()) > k)
    std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), Better);
  std::sort(s.cand.begin(), s.cand.begin() + k, Better);
  for (int t = 0; t < k; ++t) {
    out_v[t] = KeyFloat(s.cand[t].v);
    out_i[t] = s.cand[t].i;
  }
}

struct Work {
  const float* x;
  float* vals;
  int32_t* idx;
  int64_t rows, m;
  int k;
  int64_t block_rows, n_blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Claim row blocks until none are left. The caller runs this too and then waits only for
// blocks already claimed by running workers, so it never waits on a task that has not started.
void Drain(Work* w) {
  Scratch scratch;
  scratch.cand.reserve(static_cast<size_t>(std::min<int64_t>(w->m, 4 * w->k + 64)));
  while (true) {
    int64_t b = w->next.fetch_add(1);
    if (b >= w->n_blocks) return;
    int64_t r0 = b * w->block_rows, r1 = std::min(w->rows, r0 + w->block_rows);
    for (int64_t r = r0; r < r1; ++r)
      TopKRow(w->x + r * w->m, w->m, w->k, w->vals + r * w->k, w->idx + r * w->k, scratch);
    w->done.fetch_add(1);
  }
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("top-k input must have rank >= 1");
  const int64_t m = dims.back();
  const int64_t k = vals->dimensions().back();
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("top-k needs 1 <= k <= row length");
  auto w = std::make_shared<Work>();
  w->x = x.typed_data();
  w->vals = vals->typed_data();
  w->idx = idx->typed_data();
  w->m = m;
  w->k = static_cast<int>(k);
  w->rows = m ? static_cast<int64_t>(x.element_count()) / m : 0;
  w->block_rows = 16;
  w->n_blocks = (w->rows + w->block_rows - 1) / w->block_rows;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), w->n_blocks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([w] { Drain(w.get()); });
  Drain(w.get());
  while (w->done.load() < w->n_blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
