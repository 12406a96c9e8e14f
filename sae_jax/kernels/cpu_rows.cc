// Row gathers and scatter-adds of the sparse TopK kernels for the XLA CPU backend (XLA FFI).
//
// XLA's CPU form of these ops is a loop over the J selected columns, each a gather or
// scatter-add of N rows: with J = k_aux = 256 it makes 256 passes over an [N, D] accumulator.
// Here each output row is finished in one go: tokens (gathers) or latent rows (the scatter,
// after a counting sort of the (token, column) pairs by row) are split over XLA's intra-op
// thread pool, and no two threads write the same row, so results do not depend on the schedule.
//
// Shapes: rows [N, J] int32 local row ids (ids outside [0, M) are "not owned": the scatter drops
// them, the gathers read row M - 1 as XLA's clamped gather does); weights [N, J], table [M, D],
// g / source [N, D], all float32, accumulated in float32. Pairs with weight 0 are skipped: they
// add 0 (so a non-finite table row named only with weight 0 does not make the sum NaN).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTokensPerBlock = 16;
constexpr int64_t kRowsPerBlock = 16;
constexpr int64_t kLanes = 8;  // one AVX register of float32

inline int64_t Clamp(int32_t r, int64_t m) {
  return r < 0 ? 0 : (r >= m ? m - 1 : static_cast<int64_t>(r));
}

// Sums w * row into an output row held in L1, four rows a pass: one load and store of the output
// per four rows (one a row was store-bound: 4x slower at D=512, J=256). Rows with w == 0 are
// skipped; the last 1-3 rows are added when the sum goes out of scope.
class RowSum {
 public:
  RowSum(float* out, int64_t d) : o_(out), d_(d) { std::memset(out, 0, sizeof(float) * d); }
  ~RowSum() {
    for (int q = 0; q < n_; ++q)
      for (int64_t i = 0; i < d_; ++i) o_[i] += w_[q] * t_[q][i];
  }
  void Add(float w, const float* row) {
    if (w == 0.0f) return;
    w_[n_] = w;
    t_[n_++] = row;
    if (n_ < 4) return;
    const float *__restrict t0 = t_[0], *__restrict t1 = t_[1], *__restrict t2 = t_[2],
                            *__restrict t3 = t_[3];
    float* __restrict o = o_;
    for (int64_t i = 0; i < d_; ++i)
      o[i] += (w_[0] * t0[i] + w_[1] * t1[i]) + (w_[2] * t2[i] + w_[3] * t3[i]);
    n_ = 0;
  }

 private:
  float* o_;
  int64_t d_;
  int n_ = 0;
  float w_[4];
  const float* t_[4];
};

inline float Dot(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {0};  // independent partial sums: vectorised without reassociation
  const int64_t full = d - d % kLanes;
  for (int64_t i = 0; i < full; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.0f;
  for (int64_t i = full; i < d; ++i) s += a[i] * b[i];
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

bool RowShapes(const ffi::Buffer<ffi::S32>& rows, const ffi::Buffer<ffi::F32>& per_token,
               int64_t* n, int64_t* j) {
  auto rd = rows.dimensions();
  if (rd.size() != 2 || per_token.dimensions().size() != 2) return false;
  *n = rd[0];
  *j = rd[1];
  return per_token.dimensions()[0] == *n;
}

// out[n] = sum_j w[n, j] * table[rows[n, j]]
ffi::Error GatherSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> table,
                         ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, j;
  if (!RowShapes(rows, w, &n, &j) || w.dimensions()[1] != j || table.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("gather_sum: rows/weights [N, J], table [M, D]");
  const int64_t m = table.dimensions()[0], d = table.dimensions()[1];
  if (m < 1 && n * j > 0) return ffi::Error::InvalidArgument("gather_sum: empty table");
  const int32_t* rp = rows.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const float* tp = table.typed_data();
  sae_jax::ParallelFor(pool, (n + kTokensPerBlock - 1) / kTokensPerBlock, [&](int64_t b) {
    const int64_t t1 = std::min(n, (b + 1) * kTokensPerBlock);
    for (int64_t t = b * kTokensPerBlock; t < t1; ++t) {
      RowSum sum(op + t * d, d);
      for (int64_t c = 0; c < j; ++c) sum.Add(wp[t * j + c], tp + Clamp(rp[t * j + c], m) * d);
    }
  });
  return ffi::Error::Success();
}

// out[n, j] = <g[n], table[rows[n, j]]>
ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> table,
                         ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, j;
  if (!RowShapes(rows, g, &n, &j) || table.dimensions().size() != 2 ||
      table.dimensions()[1] != g.dimensions()[1])
    return ffi::Error::InvalidArgument("gather_dot: rows [N, J], g [N, D], table [M, D]");
  const int64_t m = table.dimensions()[0], d = table.dimensions()[1];
  if (m < 1 && n * j > 0) return ffi::Error::InvalidArgument("gather_dot: empty table");
  const int32_t* rp = rows.typed_data();
  float* op = out->typed_data();
  const float* gp = g.typed_data();
  const float* tp = table.typed_data();
  sae_jax::ParallelFor(pool, (n + kTokensPerBlock - 1) / kTokensPerBlock, [&](int64_t b) {
    const int64_t t1 = std::min(n, (b + 1) * kTokensPerBlock);
    for (int64_t t = b * kTokensPerBlock; t < t1; ++t)
      for (int64_t c = 0; c < j; ++c)
        op[t * j + c] = Dot(gp + t * d, tp + Clamp(rp[t * j + c], m) * d, d);
  });
  return ffi::Error::Success();
}

// The owned pairs with non-zero weight grouped by row by a counting sort, in (n, j) order within
// a row: each row's sum then runs on one thread in a fixed order. The sort runs on the pool too:
// each chunk of tokens counts its pairs per row, and fills the rows from its own offsets (chunks
// in token order, so the order within a row is the same). On one thread it took 15-19 ms of
// 4096 x 288 pairs, while the other core waited. Its arrays are reused by the calling thread.
class PairsByRow {
 public:
  // The caller checks n * j < 2^31 (slots are int32).
  // Pairs in columns >= split take their source row from the second source (see Sum).
  PairsByRow(ffi::ThreadPool& pool, const int32_t* rp, const float* wp, int64_t n, int64_t j,
             int64_t m, int64_t split = INT64_MAX)
      : b_(buffers_) {  // the calling thread's: Sum runs on the pool's threads
    Buffers& b = b_;
    const int64_t chunks =
        std::max<int64_t>(1, std::min<int64_t>(n, 2 * (pool.num_threads() + 1)));
    const int64_t per = (n + chunks - 1) / chunks;
    b.offset.assign(chunks * m, 0);
    auto owned = [&](int64_t p) { return rp[p] >= 0 && rp[p] < m && wp[p] != 0.0f; };
    sae_jax::ParallelFor(pool, chunks, [&](int64_t c) {
      int32_t* cnt = b.offset.data() + c * m;
      for (int64_t p = c * per * j; p < std::min(n, (c + 1) * per) * j; ++p)
        if (owned(p)) ++cnt[rp[p]];
    });
    b.start.resize(m + 1);
    int64_t total = 0;
    for (int64_t r = 0; r < m; ++r) {
      b.start[r] = total;
      for (int64_t c = 0; c < chunks; ++c) {
        const int32_t count = b.offset[c * m + r];
        b.offset[c * m + r] = static_cast<int32_t>(total);
        total += count;
      }
    }
    b.start[m] = total;
    if (b.token.size() < static_cast<size_t>(total)) {
      b.token.resize(total);
      b.weight.resize(total);
    }
    sae_jax::ParallelFor(pool, chunks, [&](int64_t c) {
      int32_t* fill = b.offset.data() + c * m;
      for (int64_t t = c * per; t < std::min(n, (c + 1) * per); ++t)
        for (int64_t col = 0, p = t * j; col < j; ++col, ++p) {
          if (!owned(p)) continue;
          const int32_t q = fill[rp[p]]++;
          b.token[q] = static_cast<int32_t>(t) | (col >= split ? kSecond : 0);
          b.weight[q] = wp[p];
        }
    });
  }

  // out (d floats) = sum of row r's weight * source[token] (second[token] for tagged pairs)
  void Sum(int64_t r, const float* source, int64_t d, float* out,
           const float* second = nullptr) const {
    const Buffers& b = b_;
    RowSum sum(out, d);
    for (int64_t q = b.start[r]; q < b.start[r + 1]; ++q) {
      const int32_t tok = b.token[q];
      const float* from = (tok & kSecond) ? second : source;
      sum.Add(b.weight[q], from + static_cast<int64_t>(tok & ~kSecond) * d);
    }
  }

  static constexpr int32_t kSecond = 1 << 30;  // token tag: N < 2^30

 private:
  struct Buffers {
    std::vector<int64_t> start;  // [M + 1]: row r's pairs are [start[r], start[r + 1])
    std::vector<int32_t> offset;  // [chunks, M]: counts, then each chunk's next slot per row
    std::vector<int32_t> token;  // grown, never shrunk: no page faults on the next call
    std::vector<float> weight;
  };
  static thread_local Buffers buffers_;
  Buffers& b_;
};

thread_local PairsByRow::Buffers PairsByRow::buffers_;

bool ScatterShapes(const ffi::Buffer<ffi::S32>& rows, const ffi::Buffer<ffi::F32>& w,
                   const ffi::Buffer<ffi::F32>& source, int64_t* n, int64_t* j) {
  return RowShapes(rows, w, n, j) && w.dimensions()[1] == *j && RowShapes(rows, source, n, j) &&
         *n * *j <= INT32_MAX;
}

// out[r] = sum over (n, j) with rows[n, j] == r of w[n, j] * source[n], r in [0, M)
ffi::Error ScatterRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> source,
                           ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, j;
  if (!ScatterShapes(rows, w, source, &n, &j) || out->dimensions().size() != 2 ||
      out->dimensions()[1] != source.dimensions()[1])
    return ffi::Error::InvalidArgument(
        "scatter_rows: rows/weights [N, J] (N * J < 2^31), source [N, D]");
  const int64_t m = out->dimensions()[0], d = source.dimensions()[1];
  const PairsByRow pairs(pool, rows.typed_data(), w.typed_data(), n, j, m);
  const float* sp = source.typed_data();
  float* op = out->typed_data();
  sae_jax::ParallelFor(pool, (m + kRowsPerBlock - 1) / kRowsPerBlock, [&](int64_t b) {
    const int64_t r1 = std::min(m, (b + 1) * kRowsPerBlock);
    for (int64_t r = b * kRowsPerBlock; r < r1; ++r) pairs.Sum(r, sp, d, op + r * d);
  });
  return ffi::Error::Success();
}

// The same sums written as columns: out[:, r], out [D, M]. A block's rows are summed into a
// buffer and stored 16 columns (one 64-byte line) at a time, so the [M, D] result is never
// written and then transposed (the encoder's gradient is used as W_enc [D, M]: XLA folded that
// transpose into each of Adam's W_enc updates, which then ran 3-5x slower than W_dec's).
ffi::Error ScatterColsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                           ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> source,
                           ffi::ResultBuffer<ffi::F32> out) {
  int64_t n, j;
  if (!ScatterShapes(rows, w, source, &n, &j) || out->dimensions().size() != 2 ||
      out->dimensions()[0] != source.dimensions()[1])
    return ffi::Error::InvalidArgument(
        "scatter_cols: rows/weights [N, J] (N * J < 2^31), source [N, D]");
  const int64_t m = out->dimensions()[1], d = source.dimensions()[1];
  const PairsByRow pairs(pool, rows.typed_data(), w.typed_data(), n, j, m);
  const float* sp = source.typed_data();
  float* op = out->typed_data();
  sae_jax::ParallelFor(pool, (m + kRowsPerBlock - 1) / kRowsPerBlock, [&](int64_t b) {
    const int64_t r0 = b * kRowsPerBlock, r1 = std::min(m, r0 + kRowsPerBlock);
    std::vector<float> buf((r1 - r0) * d);
    for (int64_t r = r0; r < r1; ++r) pairs.Sum(r, sp, d, buf.data() + (r - r0) * d);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t r = r0; r < r1; ++r) op[i * m + r] = buf[(r - r0) * d + i];
  });
  return ffi::Error::Success();
}

// Both sparse decodes of an AuxK step, backward, in one call: rows/vals [N, J] hold the TopK
// columns [0, split) and the AuxK columns [split, J); g0 / g1 [N, D] are their cotangents.
//   d_vals[n, j] = <g[n], table[rows[n, j]]> where owned, else 0 (g = g0 or g1 by column);
//   d_table[r] = sum over owned pairs of row r of vals[n, j] * g[n].
// As separate ops (two gather-dots, two scatters, an add) XLA ran them concurrently, each
// splitting its work over the same two cores: the AuxK scatter then took 3-5x its time alone.
// One call runs the dots (by token) and one scatter (by row) one after the other, each over the
// pool, and skips the second scatter's sort, output pass and the add.
ffi::Error DecodePairBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> rows,
                                  ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::F32> g0,
                                  ffi::Buffer<ffi::F32> g1, ffi::Buffer<ffi::F32> table,
                                  int64_t split, ffi::ResultBuffer<ffi::F32> d_vals,
                                  ffi::ResultBuffer<ffi::F32> d_table) {
  int64_t n, j;
  if (!ScatterShapes(rows, vals, g0, &n, &j) || !RowShapes(rows, g1, &n, &j) ||
      g1.dimensions()[1] != g0.dimensions()[1] || table.dimensions().size() != 2 ||
      table.dimensions()[1] != g0.dimensions()[1] || n >= PairsByRow::kSecond)
    return ffi::Error::InvalidArgument(
        "decode_pair_backward: rows/vals [N, J], g0/g1 [N, D], table [M, D]");
  const int64_t m = table.dimensions()[0], d = table.dimensions()[1];
  const int32_t* rp = rows.typed_data();
  const float *a = g0.typed_data(), *b = g1.typed_data(), *tp = table.typed_data();
  float* dv = d_vals->typed_data();
  // The dots one decode at a time: interleaved per token, the TopK rows (anywhere in the table)
  // evict the AuxK rows (a quarter of it, say), and the dots took 1.5x as long.
  for (const auto& [c0, c1, g] : {std::tuple(int64_t{0}, std::min(split, j), a),
                                  std::tuple(std::min(split, j), j, b)}) {
    sae_jax::ParallelFor(pool, (n + kTokensPerBlock - 1) / kTokensPerBlock, [&](int64_t blk) {
      const int64_t t1 = std::min(n, (blk + 1) * kTokensPerBlock);
      for (int64_t t = blk * kTokensPerBlock; t < t1; ++t)
        for (int64_t c = c0; c < c1; ++c) {
          const int32_t r = rp[t * j + c];
          dv[t * j + c] = (r >= 0 && r < m) ? Dot(g + t * d, tp + r * d, d) : 0.0f;
        }
    });
  }
  const PairsByRow pairs(pool, rp, vals.typed_data(), n, j, m, split);
  float* op = d_table->typed_data();
  sae_jax::ParallelFor(pool, (m + kRowsPerBlock - 1) / kRowsPerBlock, [&](int64_t blk) {
    const int64_t r1 = std::min(m, (blk + 1) * kRowsPerBlock);
    for (int64_t r = blk * kRowsPerBlock; r < r1; ++r) pairs.Sum(r, a, d, op + r * d, b);
  });
  return ffi::Error::Success();
}

}  // namespace

#define SAE_JAX_ROW_OP(name, impl)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                     \
                                ffi::Ffi::Bind()                \
                                    .Ctx<ffi::ThreadPool>()     \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

SAE_JAX_ROW_OP(SaeJaxGatherSum, GatherSumImpl)
SAE_JAX_ROW_OP(SaeJaxGatherDot, GatherDotImpl)
SAE_JAX_ROW_OP(SaeJaxScatterRows, ScatterRowsImpl)
SAE_JAX_ROW_OP(SaeJaxScatterCols, ScatterColsImpl)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxDecodePairBackward, DecodePairBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vals
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Attr<int64_t>("split")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_vals
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_table
