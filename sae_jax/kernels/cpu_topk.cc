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
#include <cstdint>
#include <climits>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu_ffi.h"
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
  std::vector<Item> ties;  // values equal to the threshold, the first k in index order
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
  // Values above thr, and the first k values equal to it: only those ties can be selected
  // (ties go to the lower index). Without this cap a row whose threshold is shared by most of
  // its values (the AuxK input: every live latent masked to -inf) makes them all candidates.
  s.cand.clear();
  s.ties.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (s.block_max[b] < thr) continue;
    const int64_t end = std::min(m, (b + 1) * kBlock);
    for (int64_t j = b * kBlock; j < end; ++j) {
      const int32_t key = Key(x[j]);
      if (key > thr) {
        s.cand.push_back(Item{key, static_cast<int32_t>(j)});
      } else if (key == thr && static_cast<int64_t>(s.ties.size()) < k) {
        s.ties.push_back(Item{key, static_cast<int32_t>(j)});
      }
    }
  }
  if (static_cast<int64_t>(s.cand.size()) < k)
    s.cand.insert(s.cand.end(), s.ties.begin(), s.ties.begin() + (k - s.cand.size()));
  // s.cand holds at least k values, among them the top k.
  if (static_cast<int64_t>(s.cand.size()) > k)
    std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), Better);
  std::sort(s.cand.begin(), s.cand.begin() + k, Better);
  for (int t = 0; t < k; ++t) {
    out_v[t] = KeyFloat(s.cand[t].v);
    out_i[t] = s.cand[t].i;
  }
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("top-k input must have rank >= 1");
  const int64_t m = dims.back();
  const int64_t k = vals->dimensions().back();
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("top-k needs 1 <= k <= row length");
  const float* xp = x.typed_data();
  float* vp = vals->typed_data();
  int32_t* ip = idx->typed_data();
  const int64_t rows = m ? static_cast<int64_t>(x.element_count()) / m : 0;
  constexpr int64_t kBlockRows = 16;
  sae_jax::ParallelFor(pool, (rows + kBlockRows - 1) / kBlockRows, [&](int64_t b) {
    thread_local Scratch scratch;  // reused across calls: no allocation per row block
    const int64_t r1 = std::min(rows, (b + 1) * kBlockRows);
    for (int64_t r = b * kBlockRows; r < r1; ++r)
      TopKRow(xp + r * m, m, static_cast<int>(k), vp + r * k, ip + r * k, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
