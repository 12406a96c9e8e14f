// Row-wise top-k for the XLA CPU backend (an XLA FFI custom call).
//
// XLA's own CPU TopK partially sorts every row on one thread. Here each row is scanned once with
// a running threshold (the k-th best value so far): blocks of 16 values are rejected with one
// vectorised comparison, and only values above the threshold touch a k-element heap. Rows are
// shared between the calling thread and XLA's intra-op thread pool.
//
// Semantics equal lax.top_k: values descending in the IEEE total order (-0 < +0, NaN above
// +inf), ties broken towards the lower index. Comparisons run on int32 keys with that order.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
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

// With Better as the heap order, heap[0] is the worst kept item.
inline void SiftDown(Item* h, int k) {
  int pos = 0;
  Item top = h[0];
  while (true) {
    int c = 2 * pos + 1;
    if (c >= k) break;
    if (c + 1 < k && Better(h[c], h[c + 1])) ++c;  // the worse child
    if (!Better(top, h[c])) break;
    h[pos] = h[c];
    pos = c;
  }
  h[pos] = top;
}

inline void Offer(Item* heap, int k, int32_t v, int32_t i, int32_t& thr) {
  if (v > thr) {  // strictly: an equal value at a later index loses the tie
    heap[0] = Item{v, i};
    SiftDown(heap, k);
    thr = heap[0].v;
  }
}

void TopKRow(const float* xf, int64_t m, int k, float* out_v, int32_t* out_i, Item* heap) {
  const int32_t* x = reinterpret_cast<const int32_t*>(xf);  // raw bits; Key() orders them
  for (int j = 0; j < k; ++j) heap[j] = Item{Key(x[j]), static_cast<int32_t>(j)};
  // Sorted worst-first is a valid heap for SiftDown: every parent is worse than its children.
  std::sort(heap, heap + k, [](const Item& a, const Item& b) { return Better(b, a); });
  int32_t thr = heap[0].v;
  int64_t j = k;
  constexpr int64_t kBlock = 16;
  for (; j < m && (j % kBlock); ++j) Offer(heap, k, Key(x[j]), static_cast<int32_t>(j), thr);
  for (; j + kBlock <= m; j += kBlock) {
    const int32_t* b = x + j;
    int any = 0;
    for (int t = 0; t < kBlock; ++t) any |= (Key(b[t]) > thr);
    if (!any) continue;
    for (int t = 0; t < kBlock; ++t) Offer(heap, k, Key(b[t]), static_cast<int32_t>(j + t), thr);
  }
  for (; j < m; ++j) Offer(heap, k, Key(x[j]), static_cast<int32_t>(j), thr);
  std::sort(heap, heap + k, Better);
  for (int t = 0; t < k; ++t) {
    out_v[t] = KeyFloat(heap[t].v);
    out_i[t] = heap[t].i;
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
  std::vector<Item> heap(w->k);
  while (true) {
    int64_t b = w->next.fetch_add(1);
    if (b >= w->n_blocks) return;
    int64_t r0 = b * w->block_rows, r1 = std::min(w->rows, r0 + w->block_rows);
    for (int64_t r = r0; r < r1; ++r)
      TopKRow(w->x + r * w->m, w->m, w->k, w->vals + r * w->k, w->idx + r * w->k, heap.data());
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
