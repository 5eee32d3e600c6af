// Attention over short sequences with unit-stride rows (temporal 8 <= T <= 32, spatial 8 <= S <=
// 16, Dh >= 16; with AVX2 n <= 16: attention.cpp holds the crossover), one (b, a) item at a time,
// head by head. Queries sit in vector lanes: the scores are kept transposed, S^T[key][query], so
// the softmax over keys is lane-wise, and the products read every operand as rows and the
// probabilities as broadcast scalars: O[i] = sum_j P^T[j][i] V[j]. The scores come from
// head_scores: as dot products of K's and Q's rows (no transposes; with AVX2 always, with AVX-512
// at n <= 24 from Dh 48 and in fp32 from Dh 129) or as K's staged elements broadcast against Q
// transposed. The products write the output rows straight into the outputs (ItemRows). The lanes kernel (attention_lanes.cpp)
// transposes q, k, v and the output where this one transposes q alone or nothing (it serves the
// strided layouts, the shortest sequences and, with AVX2, n > 16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"

namespace pvkernels {
namespace attention {
namespace {

using simd::kRegisters, simd::load, simd::store, simd::splat, simd::iota;

// Register blocks: score rows (keys) per broadcast_scores block (the staged buffers hold whole
// vectors of rows), and output rows x output vectors in the products (4 x 5 accumulators with 32
// registers; 4 x 3 with 16, all 16 with the 3 rows and the broadcast weight: 1.07-1.09x 4 x 2 at
// Dh 80 and 160 with AVX2). With 32 registers, rows of at most 3 vectors (Dh <= 48) take 8 rows a
// block (24 accumulators): each loaded vector feeds twice the FMAs (Dh 40, 16 frames, forward in L2:
// 4.87 us an item against 5.47 with 4 rows; benchmarks/README.md, "Tenth session").
constexpr int kKeys = kLanes;
constexpr int kOutRows = 4;
constexpr int kOutVecs = kRegisters >= 32 ? 5 : 3;
constexpr int kNarrowVecs = 3, kNarrowRows = kRegisters >= 32 ? 8 : kOutRows;

// A sequence's rows are staged in fp32 at a fixed stride of kRow floats (every row of a register
// block is then addressed off one pointer by a constant; kMaxHeadDim + kLanes: rows do not share
// L1 sets), zero past D and past N (to whole vectors and register blocks: the scratch is zeroed
// once and N, D do not change within a call).
constexpr int64_t kRow = kMaxHeadDim + kLanes;

// The cache lines of N rows (row stride and D in elements of T) that a later head reads, prefetched
// one at a time from the kernels' inner loops (ahead_of: which rows): the rows of a head are short
// strided runs, which the hardware prefetchers did not follow, and bursts of prefetches stalled the
// kernel instead. Into L2 (prefetcht1), where the current head's lines stay in L1: on the Sapphire
// Rapids VM 1.00-1.07x into L1 (benchmarks/README.md, "Ninth session"). The kernels take a stream
// (and the products their Weights) by const reference and copy it into a local where they use it:
// passed by value, the 40 bytes ahead_of had just stored field by field were copied with 32-byte
// loads, a store-forwarding stall at every call (perf: 18% of the forward's samples outside its
// callees on one instruction; benchmarks/README.md, "Seventeenth session"). Every other line
// prefetched, for the hardware prefetchers to fetch the rest: 0.74x.
class LineStream {
 public:
  LineStream() = default;  // nothing to prefetch
  template <typename T>
  LineStream(const T* x, int64_t stride, int64_t N, int64_t D)
      : p_(reinterpret_cast<uintptr_t>(x)), row_(p_), stride_(stride * sizeof(T)),
        last_(static_cast<uintptr_t>(D * sizeof(T) - 1)), rows_(N) {}
  void next() {
    if (rows_ == 0) return;
    __builtin_prefetch(reinterpret_cast<const void*>(p_), 0, 2);  // read, locality 2: prefetcht1
    p_ += 64;
    if ((p_ & ~uintptr_t{63}) > ((row_ + last_) & ~uintptr_t{63})) row_ += stride_, p_ = row_, --rows_;
  }
  void rest() {
    while (rows_ > 0) next();
  }
  void next(int64_t n) {
    for (; n > 0 && rows_ > 0; --n) next();
  }
  // the lines left, about (rows of other alignments may span a line more or less)
  int64_t lines() const { return rows_ * (((row_ + last_) >> 6) - (row_ >> 6) + 1); }

 private:
  uintptr_t p_ = 0, row_ = 0, stride_ = 0, last_ = 0;
  int64_t rows_ = 0;
};

// The next item's part of K operands' runs (each item's rows one run: diffusers' layout), a line of
// each at every step. Where the scores are broadcasts (Dh < 48, n <= 24), each of a head's stages
// that steps a stream (forward: Q's transposes, the scores, the products; backward: Q's and dO's
// transposes, the scores of K and of V) prefetches its share of every operand's part (ahead_share)
// in place of one operand's whole part. Sapphire Rapids VM, 320 channels from memory (4096 items,
// fp32), forward: 1.07-1.11x (bench_diffusers 1.10x); Dh 32 1.12-1.17x, 8 frames 1.03-1.09x, bf16
// 0.97-1.02x; in L2 and L3 unchanged; forward + backward 1.00-1.05x more (bench_diffusers); a line a
// step in turn (q's, k's, v's) 1.05x; at Dh 80-160 (dot-product scores) 0.70-0.96x, from memory too,
// at 32 frames 0.90-1.0x; AVX2 (dot-product scores at every Dh) 1.0-1.03x, not taken
// (benchmarks/README.md, "Eighteenth session").
template <int K>
class RunStreams {
 public:
  RunStreams() = default;  // nothing to prefetch
  RunStreams(const std::array<const void*, K>& runs, int64_t lines) : left_(K * lines) {
    for (int k = 0; k < K; ++k) p_[k] = reinterpret_cast<uintptr_t>(runs[k]) & ~uintptr_t{63};
  }
  void next() {
    if (left_ <= 0) return;
    left_ -= K;  // (counted in prefetches: the same count in steps measured 0.96x, by its code alone)
    for (int k = 0; k < K; ++k) {
      __builtin_prefetch(reinterpret_cast<const void*>(p_[k]), 0, 2);  // prefetcht1, as LineStream
      p_[k] += 64;
    }
  }
  void rest() {
    while (left_ > 0) next();
  }
  void next(int64_t n) {
    for (; n > 0 && left_ > 0; --n) next();
  }
  int64_t lines() const { return left_ / K; }  // steps left

 private:
  uintptr_t p_[K] = {};
  int64_t left_ = 0;  // prefetches left
};

// x's N rows, staged into dst in fp32
template <typename T>
void stage(const T* x, int64_t stride, int64_t N, int64_t D, float* dst) {
  for (int64_t n = 0; n < N; ++n) simd::to_f32(x + n * stride, D, dst + n * kRow);
}

// dst[d][i] = scale * X[i][d] for d < D and all NP lanes i (zero for i >= N), X's rows at x + i *
// stride (the operand itself, not staged): kLanes x kLanes transposes; ahead: a step per row read
template <typename T, typename S>
void transpose_rows(const T* x, int64_t stride, int64_t N, int64_t NP, int64_t D, float scale, float* dst,
                    const S& ahead_in) {
  S ahead = ahead_in;  // (a local copy: LineStream)
  vfloat r[kLanes];
  for (int64_t i0 = 0; i0 < NP; i0 += kLanes) {
    for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
      const int w = static_cast<int>(std::min<int64_t>(kLanes, D - d0));
      for (int l = 0; l < kLanes; ++l) {
        ahead.next();
        if (i0 + l >= N) {
          r[l] = vfloat{};
        } else {
          const T* row = x + (i0 + l) * stride + d0;
          r[l] = w == kLanes ? simd::load_f32(row) : simd::load_f32_partial(row, w);
        }
      }
      simd::transpose(r);
      for (int k = 0; k < w; ++k) store(dst + (d0 + k) * NP + i0, r[k] * scale);
    }
  }
  ahead.rest();
}

// St[j][i] = sum_d A[j][d] Bt[d][i] for j < N, all NP lanes i (A staged): kKeys rows of A at a
// time, their elements broadcast.
template <typename S>
void broadcast_scores(const float* A, const float* Bt, int64_t N, int64_t NP, int64_t D, float* St,
                      const S& ahead_in) {
  S ahead = ahead_in;
  for (int64_t i0 = 0; i0 < NP; i0 += kLanes) {
    for (int64_t j0 = 0; j0 < N; j0 += kKeys) {
      const float* a = A + j0 * kRow;
      vfloat acc[kKeys] = {};
      for (int64_t d = 0; d < D; ++d) {
        ahead.next();
        const vfloat b = load(Bt + d * NP + i0);
        for (int jj = 0; jj < kKeys; ++jj) acc[jj] += a[jj * kRow + d] * b;
      }
#pragma GCC unroll 16  // whole: acc stays in registers
      for (int jj = 0; jj < kKeys; ++jj)
        if (j0 + jj < N) store(St + (j0 + jj) * NP + i0, acc[jj]);
    }
  }
  ahead.rest();
}

// A stream that prefetches nothing (the products' blocks where their prefetches are issued per block)
struct NoStream {
  void next() {}
};

// Rows of fp32 elements, `stride` apart.
struct Rows {
  const float* p;
  int64_t stride;
  const float* row(int64_t n) const { return p + n * stride; }
};

// St[j][i] = scale * A[j] . B[i] for j < N and all NP lanes i (zero for i >= N; B's rows past N
// read as `zero`): dot products along the rows, D a whole number of vectors (zero past the
// operand's D), kDotQueries queries x kDotKeys keys at a time, each block's kLanes sums reduced
// into one vector (simd::sum_each); with AVX-512 4 x 4 (8 loads a step for its 16 FMAs, against 10
// for 8 queries x 2 keys: Sapphire Rapids VM, 64 items from L3, 1280 channels 1.03-1.08x forward
// and 1.02-1.10x forward + backward, 640 channels 1.02-1.08x and 0.96-1.07x; benchmarks/README.md,
// "Twenty-second session"); ahead_*: with AVX-512 a step each per step, with AVX2 their share of
// the lines per block, before its steps. An AVX2 step is half an AVX-512 one, and the streams'
// bookkeeping in every step cost more than their prefetches saved where the inputs sit in L3 (8x8
// level, Dh 160: 0.94-0.96x no prefetching at all; the bookkeeping without its prefetches
// 0.90-0.93x). Per block, the AVX2 build measured 1.05-1.11x forward at 8x8 and 16x16, 0.99-1.11x at
// 640 channels, 0.98-1.03x at 320 (forward + backward 1.04-1.16x, 1.01-1.04x, 0.99-1.01x), the
// AVX-512 one 0.94-1.04x (benchmarks/README.md, "Eleventh session").
constexpr int kDotKeys = kLanes == 16 ? 4 : 2, kDotQueries = kLanes / kDotKeys;
constexpr bool kPrefetchPerBlock = kLanes == 8;
template <typename S>
void dot_scores(Rows A, Rows B, int64_t N, int64_t NP, int64_t D, float scale, const float* zero, float* St,
                const S& ahead_a_in, const S& ahead_b_in) {
  S ahead_a = ahead_a_in, ahead_b = ahead_b_in;
  // per block: the streams' lines over the blocks that compute (a block of padded queries alone is skipped)
  const int64_t blocks = (N + kDotKeys - 1) / kDotKeys * ((N + kDotQueries - 1) / kDotQueries);
  auto share = [&](const S& s) { return kPrefetchPerBlock ? (s.lines() + blocks - 1) / blocks : 0; };
  const int64_t share_a = share(ahead_a), share_b = share(ahead_b);
  for (int64_t j0 = 0; j0 < N; j0 += kDotKeys) {
    const int keys = static_cast<int>(std::min<int64_t>(kDotKeys, N - j0));
    const float* a[kDotKeys];
    for (int t = 0; t < kDotKeys; ++t) a[t] = t < keys ? A.row(j0 + t) : zero;
    for (int64_t i0 = 0; i0 < NP; i0 += kDotQueries) {
      if (i0 >= N) {  // a block of padded queries alone
        for (int t = 0; t < keys; ++t) std::fill_n(St + (j0 + t) * NP + i0, kDotQueries, 0.0f);
        continue;
      }
      const float* b[kDotQueries];
      for (int q = 0; q < kDotQueries; ++q) b[q] = i0 + q < N ? B.row(i0 + q) : zero;
      vfloat acc[kLanes] = {};  // [key][query]
      if constexpr (kPrefetchPerBlock) ahead_a.next(share_a), ahead_b.next(share_b);
      for (int64_t d = 0; d < D; d += kLanes) {
        if constexpr (!kPrefetchPerBlock) ahead_a.next(), ahead_b.next();
        vfloat x[kDotKeys];
#pragma GCC unroll 4
        for (int t = 0; t < kDotKeys; ++t) x[t] = load(a[t] + d);
#pragma GCC unroll 8
        for (int q = 0; q < kDotQueries; ++q) {
          vfloat y = load(b[q] + d);
          simd::keep_in_register(y);  // loaded once for every key (not again as a memory operand)
#pragma GCC unroll 4
          for (int t = 0; t < kDotKeys; ++t) acc[t * kDotQueries + q] += x[t] * y;
        }
      }
      const vfloat sums = simd::sum_each(acc) * scale;
      for (int t = 0; t < keys; ++t) simd::store_lanes(St + (j0 + t) * NP + i0, sums, t * kDotQueries, kDotQueries);
    }
  }
  ahead_a.rest(), ahead_b.rest();
}

// Whether head_scores computes dot products (else broadcasts). A dot block's kLanes sums are
// reduced by simd::sum_each: 9 shuffles and adds with AVX2 (6 hadd), 45 with AVX-512, against D
// FMAs per block; the broadcasts stage K and transpose Q (an 8 x 8 transpose: 24 shuffles, a 16 x
// 16 one 64) and compute every padded query lane, where the dots skip blocks of padded queries.
// Measured (benchmarks/README.md, "dot products or broadcasts"), dots / broadcasts: AVX2 1.0-1.3x
// at n 16, Dh 40-160; AVX-512 at n <= 24 from Dh 48 0.98-1.18x where n is whole vectors (16),
// 1.04-1.7x where it is not (8, 12, 20, 24), below Dh 48 0.91-1.19x; at n 32 0.81-1.05x. With
// the 4 x 4 blocks (twenty-second session) also fp32 past n 24 from Dh 129 (f32: T is float): at
// 25-32 frames, Dh 144 and 160, 1.06-1.28x forward and 1.09-1.19x forward + backward; Dh 192 and
// 256 0.92-1.11x; bf16 0.90-1.08x, Dh 64-128 0.84-1.18x (not taken).
inline bool dot_products(int64_t N, int64_t D, bool f32) {
  return kLanes == 8 || (D >= 48 && (N <= 24 || (f32 && D > 128)));
}

// A head's scores, St[j][i] = scale * A[j] . B[i] (j < N, all NP lanes i, zero for i >= N), from
// two operands' rows: as dot products (dot_scores; the fp32 rows read where they lie when D is
// whole vectors, except with AVX-512 rows a multiple of 4 KB apart, which share L1 sets: staged,
// 0.97-1.1x broadcasts at Dh 128 and 256 against 0.83-0.93x in place; with AVX2 in place, staged
// measured 0.86-0.94x) or as broadcasts of A's staged elements against B transposed
// (broadcast_scores): dots = dot_products(N, D, f32). Scratch: As, Bs NP x kRow each (B transposed:
// [D][NP] in Bs), zero: a zero row. Returns A's fp32 rows (for the products that read them again).
template <typename T, typename S>
Rows head_scores(const T* a, int64_t as, const T* b, int64_t bs, int64_t N, int64_t NP, int64_t D, float scale,
                 float* As, float* Bs, const float* zero, float* St, bool dots, const S& ahead_a, const S& ahead_b) {
  if (dots) {
    // fp32 rows of whole vectors: the operand itself where it is fp32 and D whole vectors, else staged
    auto f32 = [&](const T* x, int64_t stride, float* scratch) -> Rows {
      if constexpr (std::is_same<T, float>::value) {
        if (D % kLanes == 0 && (kLanes == 8 || stride * sizeof(float) % 4096 != 0)) return {x, stride};
      }
      stage(x, stride, N, D, scratch);
      return {scratch, kRow};
    };
    const Rows A = f32(a, as, As);
    dot_scores(A, f32(b, bs, Bs), N, NP, simd::round_up(D), scale, zero, St, ahead_a, ahead_b);
    return A;
  }
  transpose_rows(b, bs, N, NP, D, scale, Bs, ahead_b);
  stage(a, as, N, D, As);
  broadcast_scores(As, Bs, N, NP, D, St, ahead_a);
  return {As, kRow};
}

// Out[r][:] = scale * sum_c W(r, c) M[c][:] for r < R, c < C, with W(r, c) = W[r * wr + c * wc], M's
// rows ms elements apart (staged, or the operand itself), into rows of T (row stride os; stream:
// non-temporal stores where aligned); causal: W(r, c) == 0 for c > r (lower) or c < r (upper), and
// those c are skipped.
struct Weights {
  const float* W;
  int64_t wr, wc;
  const float* rs = nullptr;  // per-row factors (times scale: the forward's 1 / softmax sums), or none
  float w(int64_t r, int64_t c) const { return W[r * wr + c * wc]; }
};
enum class Skip { none, lower, upper };

// rows r0 .. r0 + nr (nr <= RB) of V vectors from d0, the last `tail` lanes wide (Full: kLanes)
template <int V, int RB, bool Full, typename TM, typename T, typename S>
void product_block(const Weights& W_in, const TM* M, int64_t ms, int64_t r0, int64_t nr, int64_t c_lo, int64_t c_hi,
                   int64_t d0, int tail, float scale, T* out, int64_t os, bool stream, S& ahead) {
  const Weights W = W_in;  // a local (ahead's stores in the loop would make a reference's fields be read again)
  vfloat acc[RB][V] = {};
  for (int64_t c = c_lo; c < c_hi; ++c) {
    ahead.next();
    vfloat x[V];
    for (int v = 0; v < V; ++v) {
      const TM* m = M + c * ms + d0 + v * kLanes;
      x[v] = v + 1 < V || Full ? simd::load_f32(m) : simd::load_f32_partial(m, tail);
      simd::keep_in_register(x[v]);
    }
    for (int r = 0; r < RB; ++r) {
      const vfloat w = splat(W.w(r0 + r, c));  // rows past R: zero weights, not stored
      for (int v = 0; v < V; ++v) acc[r][v] += w * x[v];
    }
  }
#pragma GCC unroll 16  // whole: acc stays in registers
  for (int r = 0; r < RB; ++r) {
    if (r >= nr) break;
    T* o = out + (r0 + r) * os + d0;
    const vfloat s = W.rs != nullptr ? splat(W.rs[r0 + r] * scale) : splat(scale);
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      if (v + 1 < V || Full) {
        simd::store_from_f32(o + v * kLanes, acc[r][v] * s, stream);
      } else {
        simd::store_from_f32_partial(o + v * kLanes, acc[r][v] * s, tail);
      }
    }
  }
}

// product_block<V, RB, tail == kLanes> for the nv (<= V) vectors left of a row
template <int V, int RB, typename TM, typename T, typename S>
void product_vecs(int64_t nv, const Weights& W, const TM* M, int64_t ms, int64_t r0, int64_t nr, int64_t c_lo,
                  int64_t c_hi, int64_t d0, int tail, float scale, T* out, int64_t os, bool stream, S& ahead) {
  if constexpr (V > 1) {
    if (nv < V)
      return product_vecs<V - 1, RB>(nv, W, M, ms, r0, nr, c_lo, c_hi, d0, tail, scale, out, os, stream, ahead);
  }
  if (tail == kLanes) {
    product_block<V, RB, true>(W, M, ms, r0, nr, c_lo, c_hi, d0, tail, scale, out, os, stream, ahead);
  } else {
    product_block<V, RB, false>(W, M, ms, r0, nr, c_lo, c_hi, d0, tail, scale, out, os, stream, ahead);
  }
}

template <typename TM, typename T, typename S = LineStream>
void product(const Weights& W, const TM* M, int64_t ms, int64_t R, int64_t C, int64_t D, Skip skip, float scale, T* out,
             int64_t os, bool stream, const S& ahead_in = {}) {
  S ahead = ahead_in;
  const int64_t vecs = (D + kLanes - 1) / kLanes;
  const int last = static_cast<int>(D - (vecs - 1) * kLanes);  // lanes of the last vector
  // the row's vectors in blocks of at most kOutVecs, as even as they go (10 = 5 + 5, 8 = 4 + 4)
  const int64_t blocks = (vecs + kOutVecs - 1) / kOutVecs, per = (vecs + blocks - 1) / blocks;
  const bool narrow = per <= kNarrowVecs;
  const int64_t rows = narrow ? kNarrowRows : kOutRows;
  // With AVX2 a block's share of the stream's lines before the block, whose steps prefetch nothing
  // (as dot_scores): with the blocks' whole last vectors a template argument (product_vecs: no
  // check of the tail in every step), the AVX2 build's forward measured 1.02-1.05x at 320 channels,
  // 1.08-1.11x at 640 and 1280 in bench_diffusers, forward + backward 1.0-1.06x; the AVX-512 build
  // (a line a step) unchanged (benchmarks/README.md, "Nineteenth session").
  const int64_t nblocks = (R + rows - 1) / rows * blocks;
  const int64_t share = kPrefetchPerBlock ? (ahead.lines() + nblocks - 1) / nblocks : 0;
  NoStream none;
  auto& step = [&]() -> auto& {
    if constexpr (kPrefetchPerBlock) return none;
    else return ahead;
  }();
  for (int64_t r0 = 0; r0 < R; r0 += rows) {
    const int64_t nr = std::min<int64_t>(rows, R - r0);
    const int64_t c_lo = skip == Skip::upper ? r0 : 0;
    const int64_t c_hi = skip == Skip::lower ? std::min(C, r0 + nr) : C;
    for (int64_t v0 = 0; v0 < vecs; v0 += per) {
      const int64_t nv = std::min<int64_t>(per, vecs - v0), d0 = v0 * kLanes;
      const int tail = v0 + nv == vecs ? last : kLanes;
      if constexpr (kPrefetchPerBlock) ahead.next(share);
      if (narrow) {
        product_vecs<kNarrowVecs, kNarrowRows>(nv, W, M, ms, r0, nr, c_lo, c_hi, d0, tail, scale, out, os, stream,
                                               step);
      } else {
        product_vecs<kOutVecs, kOutRows>(nv, W, M, ms, r0, nr, c_lo, c_hi, d0, tail, scale, out, os, stream, step);
      }
    }
  }
  ahead.rest();
}

// One (b, a) item: its N rows of H * D elements, the heads' rows side by side.
struct Items {
  int64_t count, A, H, N, NP, D;
  int64_t base(int64_t item, const View& v) const { return item / A * v.sb + item % A * v.sa; }
};
Items items_of(const Sizes& z) { return {z.B * z.A, z.A, z.H, z.N, simd::round_up(z.N), z.D}; }

// How far ahead the LineStreams prefetch. Where an item's rows are one run of N x H x D elements
// (sn == H * D, sh == D: diffusers' projections viewed in place, short spatial sequences), head h
// prefetches the h-th of H equal parts of the next item's run: sequential lines, one item (3-4
// operands' runs) ahead, into L2 (at Dh < 48 every operand's part a share a stage: RunStreams).
// Sapphire Rapids VM, one process, alternating calls with diffusers' SDPA between them
// (benchmarks/README.md, "Fourteenth session"), against the strided scheme below:
// 1.00-1.15x forward and 1.01-1.17x forward + backward at Dh 40-160 (AVX2 1.00-1.10x, 1.05-1.09x).
// Otherwise the rows of the head about kAheadBytes of operands later (in this item or the next
// ones; at least the next head: Dh 160 forward, 30 KB a head): seventh session, 32 KB 1.02-1.10x
// 128 KB at Dh 40-160 forward and forward + backward, with AVX2 1.03-1.08x, no prefetching
// 0.75-0.97x; Zen 5 (us per item at Dh 160, 256 x 16 x 8 forward): the same head two items ahead
// (~480 KB) 20-24, 32 KB 17-19, 96-192 KB 15-22.
constexpr int64_t kAheadBytes = 32 << 10;

// heads per kAheadBytes of `operands` operands' rows of element size `bytes` (at least 1)
inline int64_t heads_ahead(int64_t operands, const Items& it, int64_t bytes) {
  return std::max<int64_t>(1, kAheadBytes / (operands * it.N * it.D * bytes));
}

// whether an operand's item rows are one run of N x H x D elements (above)
inline bool one_run(const View& v, const Items& it) { return v.sn == it.H * it.D && v.sh == it.D; }

// the LineStream over operand x's lines that head h of item prefetches (above), none past end
template <typename T>
LineStream ahead_of(const T* x, const View& v, const Items& it, int64_t item, int64_t h, int64_t heads, int64_t end) {
  if (one_run(v, it)) {
    if (item + 1 >= end) return {};
    const int64_t part = it.N * it.D;  // (N * H * D) / H
    return LineStream(x + it.base(item + 1, v) + h * part, part, 1, part);
  }
  const int64_t next = item * it.H + h + heads, ni = next / it.H;
  if (ni >= end) return {};
  return LineStream(x + it.base(ni, v) + next % it.H * v.sh, v.sn, it.N, it.D);
}

// share t of `shares` of the next item's part h of the operands' runs (each item's rows one run)
template <typename T, int K>
RunStreams<K> ahead_share(const std::array<const T*, K>& x, const std::array<View, K>& v, const Items& it,
                          int64_t item, int64_t h, int t, int shares, int64_t end) {
  if (item + 1 >= end) return {};
  const int64_t part = it.N * it.D, lo = part * t / shares, hi = part * (t + 1) / shares;
  std::array<const void*, K> runs;
  for (int k = 0; k < K; ++k) runs[k] = x[k] + it.base(item + 1, v[k]) + h * part + lo;
  const uintptr_t first = reinterpret_cast<uintptr_t>(runs[0]), last = first + (hi - lo) * sizeof(T) - 1;
  return RunStreams<K>(runs, static_cast<int64_t>((last >> 6) - (first >> 6) + 1));
}

// An item's output rows (N rows of H heads x D, at x + n * sn + h * sh), written by the products
// straight into the output, or, where a head's D elements are not whole cache lines of a streamed
// output (two heads share a line, which streaming stores would write in parts), assembled in an fp32
// scratch ([N][H * D]) and written out as whole rows (rows, done). The kernels keep two scratches and
// write an item's rows out a share after each head of the next item, not in one burst at its end
// (20 KB of streaming stores an output at 320 channels, which held the fill buffers the next
// item's prefetches need): 320 channels from memory 1.03-1.05x forward, fp32; in bench_diffusers
// 1.07x forward + backward (benchmarks/README.md, "Seventeenth session").
template <typename T>
struct ItemRows {
  T* x;
  int64_t sh, sn;
  float* scratch;  // nullptr: straight into x
  int64_t N, HD;
  bool stream;
  static bool direct(int64_t D, bool stream) { return !stream || D * static_cast<int64_t>(sizeof(T)) % 64 == 0; }
  // fn(rows of head h, their stride, stream)
  template <typename Fn>
  void head(int64_t h, int64_t D, const Fn& fn) const {
    if (scratch == nullptr) {
      fn(x + h * sh, sn, stream);
    } else {
      fn(scratch + h * D, HD, false);
    }
  }
  void done() const { rows(0, N); }
  // the scratch's rows n0 .. n1 written out
  void rows(int64_t n0, int64_t n1) const {
    if (scratch != nullptr)
      for (int64_t n = n0; n < n1; ++n) simd::from_f32(scratch + n * HD, HD, x + n * sn, 1.0f, stream);
  }
};

// causal mask of key j on query lanes i0..: true where i < j
inline auto future(int64_t j, int64_t i0) { return iota(static_cast<int32_t>(i0)) < static_cast<int32_t>(j); }
}  // namespace

// bias: padded_bias(...) (attention_blocked.cpp: [H][N keys][NP queries]) or nullptr
template <typename T>
void rows_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* bias, at::Tensor& out,
                  at::Tensor& lse, bool temporal, bool causal) {
  const Items it = items_of(sizes_of(q, temporal));
  const auto [qp, kp, vp, op, lp, qv, kv, vv, ov, lv] = fwd_operands<T>(q, k, v, out, lse, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(it.D));
  const int64_t N = it.N, NP = it.NP, D = it.D, H = it.H;
  const bool stream = streamed(out);
  const bool direct = ItemRows<T>::direct(D, stream), dots = dot_products(N, D, std::is_same<T, float>::value);
  const int64_t ahead = heads_ahead(3, it, sizeof(T));  // q, k, v
  // the next item's q, k and v in thirds of each head's part (RunStreams)
  const bool thirds = !dots && N <= 24 && D < 48 && one_run(qv, it) && one_run(kv, it) && one_run(vv, it);
  at::parallel_for(0, it.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(3 * NP * kRow + NP * NP + NP + (direct ? 0 : 2 * N * H * D) + kLanes, 0.0f);
    float* Ks = aligned(ws.data());  // head_scores' scratch
    float* Qs = Ks + NP * kRow;
    const float* zero = Qs + NP * kRow;
    float* Pt = Qs + 2 * NP * kRow;  // [NP keys][NP queries]: scores, then probabilities (zero past N)
    // [2][N][H * D]: the output rows of this item and of the one before, where not direct
    float* O = direct ? nullptr : Pt + NP * NP;
    float* rinv = Pt + NP * NP + (direct ? 0 : 2 * N * H * D);  // [NP]: 1 / the softmax sums (the products')
    ItemRows<T> before{};  // the item before's rows, written out a share after each head (ItemRows)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = it.base(item, qv), kb = it.base(item, kv), vb = it.base(item, vv), lb = it.base(item, lv);
      const ItemRows<T> to_out{op + it.base(item, ov), ov.sh, ov.sn, direct ? nullptr : O + (item & 1) * N * H * D,
                               N, H * D, stream};
      for (int64_t h = 0; h < H; ++h) {
        if (!direct && item > begin) before.rows(h * N / H, (h + 1) * N / H);
        const T* q_h = qp + qb + h * qv.sh;
        const T* k_h = kp + kb + h * kv.sh;
        const T* v_h = vp + vb + h * vv.sh;
        // a later head's rows: K's and Q's prefetched from the scores, V's from the products (thirds:
        // a third of each operand's from Q's transposes, the scores and the products)
        auto later = [&](const T* x, const View& v) { return ahead_of(x, v, it, item, h, ahead, end); };
        auto third = [&](int t) { return ahead_share<T, 3>({qp, kp, vp}, {qv, kv, vv}, it, item, h, t, 3, end); };
        if (thirds) {  // Q's transposes, then the scores
          head_scores(k_h, kv.sn, q_h, qv.sn, N, NP, D, scale, Ks, Qs, zero, Pt, dots, third(1), third(0));
        } else {
          head_scores(k_h, kv.sn, q_h, qv.sn, N, NP, D, scale, Ks, Qs, zero, Pt, dots, later(kp, kv), later(qp, qv));
        }
        const float* bias_h = bias != nullptr ? bias + h * N * NP : nullptr;
        for (int64_t i0 = 0; i0 < NP; i0 += kLanes) {
          // the maximum and the sum over keys in 4 partial chains each (a quarter as long)
          auto score = [&](int64_t j) {
            vfloat x = load(Pt + j * NP + i0);
            if (bias_h != nullptr) x += load(bias_h + j * NP + i0);
            if (causal) x = future(j, i0) ? splat(-std::numeric_limits<float>::infinity()) : x;
            store(Pt + j * NP + i0, x);
            return x;
          };
          vfloat m0 = splat(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
          int64_t j = 0;
          for (; j + 4 <= N; j += 4) {
            m0 = simd::max(m0, score(j)), m1 = simd::max(m1, score(j + 1));
            m2 = simd::max(m2, score(j + 2)), m3 = simd::max(m3, score(j + 3));
          }
          for (; j < N; ++j) m0 = simd::max(m0, score(j));
          const vfloat m = simd::max(simd::max(m0, m1), simd::max(m2, m3));
          const vfloat shift = softmax_shift(m);
          auto prob = [&](int64_t j) {
            vfloat p = simd::exp(load(Pt + j * NP + i0) - shift);
            if (causal) p = future(j, i0) ? vfloat{} : p;
            store(Pt + j * NP + i0, p);
            return p;
          };
          vfloat l0 = {}, l1 = {}, l2 = {}, l3 = {};
          for (j = 0; j + 4 <= N; j += 4) l0 += prob(j), l1 += prob(j + 1), l2 += prob(j + 2), l3 += prob(j + 3);
          for (; j < N; ++j) l0 += prob(j);
          const vfloat l = (l0 + l1) + (l2 + l3);
          store(rinv + i0, softmax_rinv(m, l));
          const vfloat lse_i = softmax_lse(m, l);
          for (int64_t i = i0; i < std::min(N, i0 + kLanes); ++i) lp[lb + h * lv.sh + i * lv.sn] = lse_i[i - i0];
        }
        // O[i] = sum_j P^T[j][i] V[j]
        to_out.head(h, D, [&](auto* x, int64_t sn, bool s) {
          const Weights W{Pt, 1, NP, rinv};
          const Skip skip = causal ? Skip::lower : Skip::none;
          if (thirds) {
            product(W, v_h, vv.sn, N, N, D, skip, 1.0f, x, sn, s, third(2));
          } else {
            product(W, v_h, vv.sn, N, N, D, skip, 1.0f, x, sn, s, later(vp, vv));
          }
        });
      }
      before = to_out;
    }
    if (!direct && end > begin) before.done();
    simd::stream_fence();
  });
}

// dbias_acc: per thread [H][N][NP] sums of dS^T (reduced by padded_bias_grad) or nullptr
template <typename T>
void rows_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const float* bias, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   float* dbias_acc, bool temporal, bool causal) {
  const Items it = items_of(sizes_of(q, temporal));
  const auto [gp, qp, kp, vp, lp, dqp, dkp, dvp, gv, qv, kv, vv, lv, dqv, dkv, dvv] =
      bwd_operands<T>(grad_out, q, k, v, lse, dq, dk, dv, temporal);
  const float scale = 1.0f / std::sqrt(static_cast<float>(it.D));
  const int64_t N = it.N, NP = it.NP, D = it.D, H = it.H, HD = H * D;
  const bool stream = streamed(dq), direct = ItemRows<T>::direct(D, stream);
  const bool dots = dot_products(N, D, std::is_same<T, float>::value);
  const int64_t ahead = heads_ahead(4, it, sizeof(T));  // q, k, v, dO
  // the next item's q, k, v and dO in quarters of each head's part (RunStreams)
  const bool quarters =
      !dots && N <= 24 && D < 48 && one_run(qv, it) && one_run(kv, it) && one_run(vv, it) && one_run(gv, it);
  at::parallel_for(0, it.count, 1, [&](int64_t begin, int64_t end) {
    float* dbias_t = dbias_acc != nullptr ? dbias_acc + at::get_thread_num() * H * N * NP : nullptr;
    std::vector<float> ws(5 * NP * kRow + 2 * NP * NP + (direct ? 0 : 6 * N * HD) + kLanes, 0.0f);
    float* Ks = aligned(ws.data());  // head_scores' scratch
    float* Qs = Ks + NP * kRow;
    float* Vs = Qs + NP * kRow;
    float* Gs = Vs + NP * kRow;
    const float* zero = Gs + NP * kRow;
    float* Pt = Gs + 2 * NP * kRow;  // [NP][NP] probabilities
    float* dSt = Pt + NP * NP;    // [NP][NP] dP^T, then dS^T
    // [2][3][N][H * D]: dQ, dK, dV rows of this item and of the one before, where not direct
    float* dG = direct ? nullptr : dSt + NP * NP;
    ItemRows<T> before[3] = {};  // the item before's rows, written out a share after each head (rows_forward)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gb = it.base(item, gv), qb = it.base(item, qv), kb = it.base(item, kv), vb = it.base(item, vv);
      const int64_t lb = it.base(item, lv);
      auto scratch = [&](int g) { return direct ? nullptr : dG + ((item & 1) * 3 + g) * N * HD; };
      const ItemRows<T> to_dq{dqp + it.base(item, dqv), dqv.sh, dqv.sn, scratch(0), N, HD, stream};
      const ItemRows<T> to_dk{dkp + it.base(item, dkv), dkv.sh, dkv.sn, scratch(1), N, HD, stream};
      const ItemRows<T> to_dv{dvp + it.base(item, dvv), dvv.sh, dvv.sn, scratch(2), N, HD, stream};
      for (int64_t h = 0; h < H; ++h) {
        if (!direct && item > begin)
          for (const ItemRows<T>& b : before) b.rows(h * N / H, (h + 1) * N / H);
        const T* q_h = qp + qb + h * qv.sh;
        const T* k_h = kp + kb + h * kv.sh;
        const T* v_h = vp + vb + h * vv.sh;
        const T* g_h = gp + gb + h * gv.sh;
        auto later = [&](const T* x, const View& v) { return ahead_of(x, v, it, item, h, ahead, end); };
        auto quarter = [&](int t) {
          return ahead_share<T, 4>({qp, kp, vp, gp}, {qv, kv, vv, gv}, it, item, h, t, 4, end);
        };
        Rows K{};
        if (quarters) {  // Q's transposes, K's scores, dO's transposes, V's scores
          K = head_scores(k_h, kv.sn, q_h, qv.sn, N, NP, D, scale, Ks, Qs, zero, Pt, dots, quarter(1), quarter(0));
          head_scores(v_h, vv.sn, g_h, gv.sn, N, NP, D, 1.0f, Vs, Gs, zero, dSt, dots, quarter(3), quarter(2));
        } else {
          K = head_scores(k_h, kv.sn, q_h, qv.sn, N, NP, D, scale, Ks, Qs, zero, Pt, dots, later(kp, kv),
                          later(qp, qv));
          head_scores(v_h, vv.sn, g_h, gv.sn, N, NP, D, 1.0f, Vs, Gs, zero, dSt, dots, later(vp, vv),  // dP^T
                      later(gp, gv));
        }
        const float* bias_h = bias != nullptr ? bias + h * N * NP : nullptr;
        float* dbias_h = dbias_t != nullptr ? dbias_t + h * N * NP : nullptr;
        for (int64_t i0 = 0; i0 < NP; i0 += kLanes) {
          vfloat lse_i = {};
          for (int64_t i = i0; i < std::min(N, i0 + kLanes); ++i) lse_i[i - i0] = lp[lb + h * lv.sh + i * lv.sn];
          vfloat delta = {}, sum = {};  // rowsum(P * dP) == dO_i . O_i
          for (int64_t j = 0; j < N; ++j) {
            vfloat x = load(Pt + j * NP + i0);
            if (bias_h != nullptr) x += load(bias_h + j * NP + i0);
            vfloat p = simd::exp(x - lse_i);
            if (causal) p = future(j, i0) ? vfloat{} : p;
            store(Pt + j * NP + i0, p);
            delta += p * load(dSt + j * NP + i0);
            sum += p;
          }
          delta *= softmax_renorm(sum);
          for (int64_t j = 0; j < N; ++j) {
            const vfloat ds = load(Pt + j * NP + i0) * (load(dSt + j * NP + i0) - delta);
            store(dSt + j * NP + i0, ds);
            if (dbias_h != nullptr) store(dbias_h + j * NP + i0, load(dbias_h + j * NP + i0) + ds);
          }
        }
        // padded query lanes: P = exp(0) there, but dO is zero there (a zero row or dO^T), so dS^T is zero
        const Skip lower = causal ? Skip::lower : Skip::none, upper = causal ? Skip::upper : Skip::none;
        // dQ[i] = scale sum_j dS^T[j][i] K[j]; dK[j] = scale sum_i dS^T[j][i] Q[i]; dV[j] = sum_i P^T[j][i] dO[i]
        to_dq.head(h, D, [&](auto* x, int64_t sn, bool s) {
          product({dSt, 1, NP}, K.p, K.stride, N, N, D, lower, scale, x, sn, s);
        });
        to_dk.head(h, D, [&](auto* x, int64_t sn, bool s) {
          product({dSt, NP, 1}, q_h, qv.sn, N, N, D, upper, scale, x, sn, s);
        });
        to_dv.head(h, D, [&](auto* x, int64_t sn, bool s) {
          product({Pt, NP, 1}, g_h, gv.sn, N, N, D, upper, 1.0f, x, sn, s);
        });
      }
      before[0] = to_dq, before[1] = to_dk, before[2] = to_dv;
    }
    if (!direct && end > begin)
      for (const ItemRows<T>& b : before) b.done();
    simd::stream_fence();
  });
}

PVKERNELS_ATTENTION_INSTANTIATE(rows);

}  // namespace attention
}  // namespace pvkernels
