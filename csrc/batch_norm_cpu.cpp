// BatchNorm on the CPU: the parallel structure around the inner loops of cpu/kernels_impl.inc.
//
// Statistics are computed per block (runs of one channel, or a chunk of rows), two-pass inside
// the block while it sits in cache, and the blocks are merged per channel in a fixed order with
// Chan's formula: numerically stable (no E[x^2] - E[x]^2), one read of the input, and the same
// bits whatever the thread count (the blocks depend on the shape alone). Per-channel vectors (weight, running stats, ...) are
// read and written in place: at small sizes (BatchNorm1d on 200 x 1000) a handful of ATen
// temporaries would cost as much as the kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "checks.h"
#include "cpu/kernel_type.h"
#include "cpu/output_allocator.h"

namespace fastbn {
namespace {

// The per-channel loops (merges, constants, conversions; a few doubles per channel) are also
// compiled for AVX2 and AVX-512, the best picked at load time: at C = 1000 and small batches they
// are most of the op (with products by 1/M for divisions, 2 x 1000 ops became 1.2-1.7x faster).
// Without FMA contraction every clone computes the same bits, so paths and machines agree.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTBN_CHANNEL_LOOP __attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off")))
#else
#define FASTBN_CHANNEL_LOOP
#endif

constexpr int64_t kPlaneBlock = 4096;  // values of one channel per block (16 KB of float: fits L1)
constexpr int64_t kRowsBlock = 65536;  // values per row-chunk in the channels-innermost layout (L2)
constexpr int64_t kGrainValues = 32768;  // below this, a parallel region runs inline

// Inputs larger than this come from memory, not from the caches (2 MB of L2 a core here): the
// elementwise passes over their rows walk them one row after the other (cpu/kernels.h:
// from_memory). Paired in one process, the same bits (EPYC VM): channels_last float32 at 6-32 MiB
// fwd+bwd 1.15-1.54x as fast, eval 0.92-1.91x; at 4 MiB and below the blocks of rows are as fast
// or faster (benchmarks/results/cpu-2026-11-27-epyc-rows-from-memory.md).
// (The planar walks switch at the same size, for their own reason: kWholeChannelMaxBytes.)
constexpr int64_t kFromMemoryBytes = int64_t(4) << 20;

int64_t bytes_of(const Tensor& t) { return int64_t(t.numel()) * int64_t(t.element_size()); }

bool from_memory(const Tensor& input) { return bytes_of(input) > kFromMemoryBytes; }

// at::parallel_for grain for `tasks` tasks over `values` values in all: one inline task for
// small inputs, where waking the other threads costs more than the work.
int64_t grain(int64_t tasks, int64_t values) { return values < kGrainValues ? std::max<int64_t>(tasks, 1) : 1; }

// Scratch for per-block partials, every element of which is written before it is read: not
// zero-filled (at BatchNorm1d sizes the fill would cost as much as the merge). Line-aligned: the
// rows loops load a per-channel vector for every vector of a row, and one that straddles two
// lines costs two (the eval tasks' own constants in 16-byte-aligned buffers made channels_last
// 80x64x32x32 eval 1.1-1.3x as slow). Aligned by hand inside a plain allocation: aligned_alloc
// cost ~40 ns more a call, and an op makes 10-15 of them.
template <typename T>
class Scratch {
 public:
  Scratch() = default;  // holds nothing
  explicit Scratch(int64_t n) : base_(new T[std::max<int64_t>(n, 1) + kLine / sizeof(T)]) {
    const auto a = reinterpret_cast<std::uintptr_t>(base_.get());
    p_ = reinterpret_cast<T*>((a + kLine - 1) / kLine * kLine);
  }
  T* get() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  static constexpr std::uintptr_t kLine = 64;
  std::unique_ptr<T[]> base_;
  T* p_ = nullptr;
};

template <typename T>
Scratch<T> partials(int64_t n) {
  return Scratch<T>(n);
}

// A call's per-channel values (statistics, constants, parameters in double), likewise not
// zero-filled: every path writes each channel before reading it. (std::vector's fill of the ops'
// ~10 such vectors, whose lines the other thread last wrote in the previous call's merge phase,
// was most of the 3.5 us BatchNorm1d 200x1000's forward op spent before its region; now 1.5 us.)
template <typename V>
class ChannelValues {
 public:
  explicit ChannelValues(int64_t C) : v_(partials<V>(C)) {}
  V* data() { return v_.get(); }
  const V* data() const { return v_.get(); }
  V& operator[](int64_t c) { return v_[c]; }
  const V& operator[](int64_t c) const { return v_[c]; }

 private:
  Scratch<V> v_;
};

// Merges K partial (count, mean, m2) of one channel, in a fixed order:
//   mean = sum(n_k * mean_k) / n,   m2 = sum(m2_k + n_k * (mean_k - mean)^2)
// (the parallel-axis form of Chan et al.: stable, as it only squares deviations of block means
// from the overall mean, and free of divisions in the loop).
template <typename CountFn>
void merge_moments(int64_t K, CountFn count, const double* pmean, const double* pm2, int64_t stride,
                   double* mean_out, double* m2_out) {
  if (K == 1) {
    *mean_out = pmean[0];
    *m2_out = pm2[0];
    return;
  }
  double n = 0, s = 0;
  for (int64_t k = 0; k < K; ++k) {
    n += count(k);
    s += count(k) * pmean[k * stride];
  }
  const double mean = s * (1.0 / n);  // as merge_columns
  double m2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double d = pmean[k * stride] - mean;
    m2 += pm2[k * stride] + count(k) * d * d;
  }
  *mean_out = mean;
  *m2_out = m2;
}

// merge_moments for C channels at once, the K partials of channel c at [k * stride + c]: the
// same arithmetic, in the same order, vectorised over channels.
template <typename CountFn, typename P>
FASTBN_CHANNEL_LOOP
void merge_columns(int64_t K, CountFn count, const P* pmean, const P* pm2, int64_t C, int64_t stride,
                   double* mean, double* m2) {
  if (K == 1) {
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = double(pmean[c]);
      m2[c] = double(pm2[c]);
    }
    return;
  }
  double n = 0;
  for (int64_t k = 0; k < K; ++k) n += count(k);
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double w = count(k);
    const P* pk = pmean + k * stride;
    for (int64_t c = 0; c < C; ++c) mean[c] += w * double(pk[c]);
  }
  const double inv_n = 1.0 / n;  // a product per channel, not a division
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv_n;
  for (int64_t k = 0; k < K; ++k) {
    const double w = count(k);
    const P *pk = pmean + k * stride, *qk = pm2 + k * stride;
    for (int64_t c = 0; c < C; ++c) {
      const double d = double(pk[c]) - mean[c];
      m2[c] += double(qk[c]) + w * d * d;
    }
  }
}

// The chunks of rows of the rows layout (M rows of C columns): a cache block of all C columns,
// but at least 4 chunks so that up to 4 threads share small inputs evenly (more chunks cost more
// partials to merge across cores: BatchNorm1d 200x1000 forward, 8 -> 4, 79 -> 69 us). The same
// chunks whether a task owns a column slice or a range of chunks, and from the shape alone, so
// that the partial statistics -- and so the results, to the bit -- do not depend on the thread
// count or the path.
constexpr int64_t kMinRowChunks = 4;
struct RowChunks {
  int64_t M, rows, count;  // rows per chunk, chunks
  RowChunks(int64_t C, int64_t M) : M(M) {
    const int64_t block = std::max<int64_t>(1, kRowsBlock / std::max<int64_t>(C, 1));
    rows = std::max<int64_t>(1, std::min(block, (M + kMinRowChunks - 1) / kMinRowChunks));
    count = (M + rows - 1) / rows;
  }
  int64_t first(int64_t q) const { return q * rows; }                          // its first row
  int64_t length(int64_t q) const { return std::min(rows, M - q * rows); }     // its rows
  double values(int64_t q) const { return double(length(q)); }                 // per column

  // Partial statistics of chunk q, columns [c0, c0 + W) of x (rows of C values), at [q * W]:
  // means as deviations from the input's first row, which merge adds back.
  template <typename T, typename P>
  void stats(const cpu::Kernels<T>& k, const T* x, int64_t C, int64_t c0, int64_t W, int64_t q, P* pmean,
             P* pm2) const {
    k.rows_stats(x + first(q) * C + c0, length(q), W, C, x + c0, &pmean[q * W], &pm2[q * W]);
  }
  // (mean, m2) of columns [c0, c0 + W) from the chunks' partials, chunk q's at [q * stride]
  // (stride: the W that stats was given)
  template <typename T, typename P>
  void merge(const T* x, int64_t c0, int64_t W, const P* pmean, const P* pm2, int64_t stride, double* mean,
             double* m2) const {
    merge_columns(count, [&](int64_t q) { return values(q); }, pmean, pm2, W, stride, mean, m2);
    for (int64_t c = 0; c < W; ++c) mean[c] += cpu::to_double(x[c0 + c]);
  }
};

// sdy[c] = sum of p1[k * C + c] over the K partials in order (sdyxmu likewise from p2), for
// channels [c0, c1): the per-channel gradient sums of block or chunk partials, the same
// arithmetic on every path.
template <typename P>
FASTBN_CHANNEL_LOOP
void sum_partials(int64_t K, const P* p1, const P* p2, int64_t C, int64_t c0, int64_t c1, double* sdy,
                  double* sdyxmu) {
  for (int64_t c = c0; c < c1; ++c) sdy[c] = sdyxmu[c] = 0;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = c0; c < c1; ++c) {
      sdy[c] += p1[k * C + c];
      sdyxmu[c] += p2[k * C + c];
    }
}

// Whole channels per task when there are enough of them (a channel's values are N runs of S,
// C * S apart) and runs are at least two vectors; else
// the threads share all (block, channel) pairs, then a per-channel merge. Both walk the same
// blocks and merge them in the same order: the same results to the bit.
constexpr int64_t kMinRun = 32;
bool parallel_over_channels(const BatchNormLayout& L) {
  return L.C >= 4 * int64_t(at::get_num_threads()) && L.S >= kMinRun;
}

// Planes shorter than kMinRun values (2x2 to 5x5 maps) are walked as rows: the input (N, C, S)
// is also (N, C * S), a column per (channel, position), where the row loops run at full vector
// width across channels instead of a few values at a time (a 5x5 plane is one vector and a
// 9-value tail: 40x64x5x5 forward 79 -> 40-46 us, backward 65 -> 49-54 us as rows). Statistics
// and sums are then merged over each channel's S columns (in column order), and the elementwise
// passes use per-column constants.
//
// Planes of exactly 16 values (4x4) are one AVX-512 vector each, which the planar walk handles
// well: below N = 32 it beats the rows walk, whose per-column work is then not amortised (ops at
// 1..8 x 512 x 4 x 4 against torch's: forward 0.5-1.0x as rows, 0.7-2.0x as planes; backward
// 0.4-0.7x and 0.5-0.9x).
constexpr int64_t kMinRowsForVectorPlanes = 32;
bool vector_planes(const BatchNormLayout& L) { return L.planar && L.S == 16 && L.N < kMinRowsForVectorPlanes; }
// (so a vector-plane channel is one ChannelBlocks block: its partials sit at index c)
static_assert(kMinRowsForVectorPlanes * 16 <= kPlaneBlock, "vector planes: one block a channel");
bool short_planes(const BatchNormLayout& L) { return L.planar && L.S < kMinRun && !vector_planes(L); }

// The elementwise passes over short planes walked as rows run on one thread below this many rows: the
// per-column constants that one core writes and the other reads then cost more than the second core
// saves. Paired in one process, the same bits (EPYC VM, benchmarks/results/cpu-2026-11-27-short-planes-inline.md):
// 16-48 x 512 x 2 x 2, 48 x 256 x 3 x 3, 40 x 64 x 5 x 5: eval 2.0-5.1x, training forward 1.25-1.70x,
// backward 1.17-1.37x as fast inline; 64 rows and more unchanged.
constexpr int64_t kMinShortPlaneRowsToThread = 64;

// The elementwise passes over vector planes take a range of channels per kernel call (one call per
// 16-value plane cost more than the plane): f(c0, c1, offset of channel c0), the threads sharing
// the channels.
template <typename F>
void for_channel_ranges(const BatchNormLayout& L, F&& f) {
  at::parallel_for(0, L.C, grain(L.C, L.x.numel()), [&](int64_t c0, int64_t c1) { f(c0, c1, c0 * L.S); });
}
BatchNormLayout as_rows(const BatchNormLayout& L) { return {L.x, false, L.format, L.N, L.C * L.S, 1}; }

// v[c] repeated over channel c's S columns. Each channel is written as whole blocks of kFill
// copies that the next channel's partly overwrites (the tail lands in padding): fixed-length
// stores instead of a loop of S per channel, which at small batches cost more than the kernel
// (1 x 512 x 2 x 2 forward: a third of the op).
template <typename V>
Scratch<V> per_column(const V* v, int64_t C, int64_t S) {
  constexpr int64_t kFill = 16;
  const int64_t blocks = (S + kFill - 1) / kFill;
  auto out = partials<V>(C * S + kFill);
  V* o = out.get();
  for (int64_t c = 0; c < C; ++c, o += S) {
    const V value = v[c];  // a local: stores through `o` could otherwise alias v
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t k = 0; k < kFill; ++k) o[b * kFill + k] = value;
  }
  return out;
}

// One channel's N runs of S values (C * S apart) in blocks that fit L1: several whole runs per
// block when runs are short, else each run cut into pieces. Block b of every channel holds the
// same number of values.
struct ChannelBlocks {
  int64_t N, C, S, runs_per_block, splits, len, count;  // count: blocks per channel
  explicit ChannelBlocks(const BatchNormLayout& L) : N(L.N), C(L.C), S(L.S) {
    runs_per_block = S <= kPlaneBlock ? std::max<int64_t>(1, kPlaneBlock / std::max<int64_t>(S, 1)) : 1;
    splits = S <= kPlaneBlock ? 1 : (S + kPlaneBlock - 1) / kPlaneBlock;
    len = (S + splits - 1) / splits;
    count = (N + runs_per_block - 1) / runs_per_block * splits;
  }
  int64_t stride() const { return C * S; }
  int64_t runs(int64_t b) const { return std::min(runs_per_block, N - b / splits * runs_per_block); }
  int64_t length(int64_t b) const { return std::min(len, S - b % splits * len); }
  double values(int64_t b) const { return double(runs(b) * length(b)); }
  // block b of channel c starts at start(b) + c * S
  int64_t start(int64_t b) const { return b / splits * runs_per_block * C * S + b % splits * len; }
  // f(block, offset, runs, length) for every block of channel c, in order
  template <typename F>
  void each(int64_t c, F&& f) const {
    for (int64_t b = 0; b < count; ++b) f(b, start(b) + c * S, runs(b), length(b));
  }
  // f(i, channel, offset, runs, length) for every (block b, channel c), i = b * C + c, the
  // threads sharing them (numel: the input's size, for the grain)
  template <typename F>
  void parallel_each(int64_t numel, F&& f) const {
    at::parallel_for(0, count * C, grain(count * C, numel), [&](int64_t i0, int64_t i1) {
      // divisions once per task and per block, not per item: with 16-value blocks (1 x 512 x 4 x 4)
      // a division cost as much as the block
      int64_t b = i0 / C, c = i0 % C;
      int64_t base = start(b), n_runs = runs(b), n = length(b);
      for (int64_t i = i0; i < i1; ++i) {
        f(i, c, base + c * S, n_runs, n);
        if (++c == C && i + 1 < i1) {
          c = 0;
          ++b;
          base = start(b), n_runs = runs(b), n = length(b);
        }
      }
    });
  }
};

// Channel slices for the rows layout: with enough channels each task owns whole channels (one
// parallel region, no cross-thread merge, and its slice stays in its core's cache); with few
// channels a single slice, cut into row chunks that the threads share.
struct ColumnSlices {
  int64_t count, width;
  ColumnSlices(int64_t C, int64_t itemsize) {
    const int64_t threads = at::get_num_threads();
    const int64_t unit = std::max<int64_t>(16, 64 / itemsize);  // whole vectors and cache lines
    const int64_t w = C >= 32 * threads ? ((C + threads - 1) / threads + unit - 1) / unit * unit : C;
    width = std::max<int64_t>(1, w);
    count = (C + width - 1) / width;
  }
  int64_t start(int64_t s) const { return s * width; }
  int64_t length(int64_t s, int64_t C) const { return std::min(width, C - s * width); }
};

// ---- one region, three phases: the rows layout in training ------------------------------------
//
// Rows (channels innermost: channels_last, BatchNorm1d) are walked in row chunks. Rather than
// separate regions (statistics; a serial per-channel merge; the elementwise pass), one region runs
// them as phases with a barrier between: each thread's chunks, then each thread's slice of the
// channels (merge, constants), then the same chunks again, which the thread re-reads from its own
// cache where they fit. The chunks and the merge order are those of channel_moments/grad_sums:
// the same results to the bit. Tasks that own column slices instead (as planes own channels,
// below) lose on rows: their slices of every row (128 B to 2 KB) interleave with the other
// threads' in the line pairs and pages the prefetchers fetch. Paired in one process, against owned
// slices: forward 1.1-2.3x and backward 1.1-2.5x as fast (channels_last 16x64x16x16, 32x256x8x8,
// 40x64x5x5, 32x64x32x32, 128x64x32x32; BatchNorm1d 200x1024, 512x256, 4096x256, 16384x64; only a
// 128x512 forward read 0.95x): benchmarks/results/cpu-2026-11-27-rows-phases.md.

// Runs phase1(q0, q1) on each thread's share of `tasks`, barrier, phase2(c0, c1) on its share of
// C channels (whole vectors), barrier, phase3(q0, q1) on its first share again. Raw OpenMP (the
// runtime ATen's parallel_for uses): a parallel_for task may not wait at a barrier. No phase may
// throw (an exception cannot leave an OpenMP region): the callers check every argument, dtypes
// included, before.
template <typename F1, typename F2, typename F3>
void three_phases(int64_t tasks, int64_t C, int64_t numel, F1&& phase1, F2&& phase2, F3&& phase3) {
  const bool threaded = numel >= kGrainValues && at::get_num_threads() > 1 && !at::in_parallel_region();
  if (!threaded) {  // not `omp parallel if (false)`: that still ends in a futex wake, a syscall per call
    if (tasks > 0) phase1(int64_t(0), tasks);
    if (C > 0) phase2(int64_t(0), C);
    if (tasks > 0) phase3(int64_t(0), tasks);
    return;
  }
#pragma omp parallel
  {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t q0 = tasks * t / T, q1 = tasks * (t + 1) / T;
    const int64_t units = (C + 15) / 16, c0 = std::min(C, units * t / T * 16), c1 = std::min(C, units * (t + 1) / T * 16);
    if (q0 < q1) phase1(q0, q1);
#pragma omp barrier
    if (c0 < c1) phase2(c0, c1);
#pragma omp barrier
    if (q0 < q1) phase3(q0, q1);
  }
}

// ---- fused paths: a task owns whole channels ---------------------------------------------------
//
// When every task can own whole channels and their values fit in its core's L2, the statistics
// and the elementwise pass run in one parallel region, and the elementwise pass re-reads the
// input from cache: the forward moves 2 passes of memory instead of 3, the backward 3 instead
// of 5. Training uses them for planes; groups of column slices (rows) serve only channel_moments'
// statistics of short planes walked as rows.
constexpr int64_t kGroupCacheBytes = int64_t(1) << 20;
// A whole-channel task reads a channel's N runs C * S values apart across the whole input. On the
// EPYC VM that read at 12-15 GB/s where the blocks' memory order read at 26-38 GB/s, so planar
// inputs from this size up go in blocks, one pass more and still faster: paired in one process,
// the same bits, module fwd+bwd 1.12-1.62x and forward 1.05-1.85x at 4-32 MiB, smaller inputs
// unchanged (benchmarks/results/cpu-2026-11-27-epyc-whole-channels.md).
constexpr int64_t kWholeChannelMaxBytes = int64_t(4) << 20;

// Whole-channel tasks over short planes of whole cache lines (up to 512 bytes: 4x4 and 8x8 maps)
// take groups of up to 8 channels rather than one: run by run over the group's planes, which lie
// back to back in each run (cpu/kernels.h: planes_*), each channel's arithmetic that of a channel
// alone (the same bits). A channel alone is one chain of sums and a few lines from each run,
// C * S values apart. Paired in one process, the same bits (EPYC VM): forward op 1.34-1.70x and
// backward op 1.0-1.7x as fast at 8x8 planes (32x256x8x8: 1.6x both); 16x16 and 10x10 planes
// gained nothing (0.88-1.07x), groups of 2 channels lost (0.93-0.95x at 40x16x12x12), and groups
// over 256 KB (x and dy) lost in the backward (0.96x at 128x64x8x8 with 512 KB groups):
// benchmarks/results/cpu-2026-11-27-planar-stats.md.
constexpr int64_t kPlanesPerGroup = 8;
constexpr int64_t kMinPlanesPerGroup = 4;
constexpr int64_t kGroupedPlaneBytes = 512;
constexpr int64_t kPlaneGroupBytes = int64_t(256) << 10;
bool planes_side_by_side(const BatchNormLayout& L) {
  const int64_t bytes = L.S * int64_t(L.x.element_size());
  return L.planar && bytes > 0 && bytes <= kGroupedPlaneBytes && bytes % 64 == 0;  // empty: S = 0
}

struct ChannelGroups {
  // usable: whole-channel tasks apply, and (unless bytes_per_value is 0) a group's values fit
  // kGroupCacheBytes, so that the fused paths re-read them from cache
  bool usable;
  int64_t count, width;  // width: channels per group
  ChannelGroups(const BatchNormLayout& L, int64_t bytes_per_value) {
    const int64_t threads = at::get_num_threads();
    if (L.planar) {
      width = planes_side_by_side(L)
                  ? std::min<int64_t>({kPlanesPerGroup, L.C / (4 * threads),
                                       bytes_per_value ? kPlaneGroupBytes / (L.per_channel() * bytes_per_value) : kPlanesPerGroup})
                  : 1;
      if (width < kMinPlanesPerGroup) width = 1;
      count = (L.C + width - 1) / width;
      usable = parallel_over_channels(L) && bytes_of(L.x) < kWholeChannelMaxBytes;
    } else {
      const int64_t itemsize = L.x.element_size();
      const ColumnSlices cs(L.C, itemsize);
      width = cs.width;
      count = cs.count;
      // Slices of rows that are not a whole number of cache lines long share a line at every
      // slice boundary, which the threads would fight over: those go in memory order instead.
      usable = (count > 1 || threads == 1) && (L.C * itemsize) % 64 == 0;
    }
    usable = usable && L.per_channel() * width * bytes_per_value <= kGroupCacheBytes;
  }
  int64_t start(int64_t g) const { return g * width; }
  int64_t length(int64_t g, int64_t C) const { return std::min(width, C - g * width); }
};

// The group_* passes below take channels [c0, c0 + W) of a planar layout block by block. W > 1
// only for planes_side_by_side, whose blocks hold whole planes (length S), the group's planes back
// to back in each run; W = 1 takes any block, pieces of long planes included.

// Moments of channels [c0, c0 + W) into mean/m2 (indexed by channel).
template <typename T>
void group_moments(const BatchNormLayout& L, const T* x, int64_t c0, int64_t W, double* mean, double* m2) {
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const ChannelBlocks cb(L);
    thread_local std::vector<double> scratch;  // per block and channel: mean, m2 (block b of c0 + j at [b * W + j])
    scratch.resize(2 * cb.count * W);
    double *bm = scratch.data(), *bm2 = bm + cb.count * W;
    for (int64_t b = 0; b < cb.count; ++b)
      k.planes_stats(x + cb.start(b) + c0 * L.S, cb.runs(b), W, cb.length(b), cb.stride(), &bm[b * W], &bm2[b * W]);
    for (int64_t j = 0; j < W; ++j)
      merge_moments(cb.count, [&](int64_t b) { return cb.values(b); }, &bm[j], &bm2[j], W, &mean[c0 + j], &m2[c0 + j]);
    return;
  }
  const int64_t C = L.C;
  const RowChunks rc(C, L.per_channel());
  auto pmean = partials<cpu::acc_t<T>>(rc.count * W), pm2 = partials<cpu::acc_t<T>>(rc.count * W);
  for (int64_t q = 0; q < rc.count; ++q) rc.stats(k, x, C, c0, W, q, pmean.get(), pm2.get());
  rc.merge(x, c0, W, pmean.get(), pm2.get(), W, mean + c0, m2 + c0);
}

// y = (x - mean) * scale + shift for channels [c0, c0 + W) of a planar layout (rows run in three
// phases); the vectors are indexed by channel.
template <typename T>
void group_normalize(const BatchNormLayout& L, const T* x, T* y, int64_t c0, int64_t W, const cpu::acc_t<T>* m,
                     const cpu::acc_t<T>* scale, const cpu::acc_t<T>* shift) {
  const auto& k = cpu::kernels_for<T>();
  const ChannelBlocks cb(L);
  for (int64_t b = 0; b < cb.count; ++b) {
    const int64_t o = cb.start(b) + c0 * L.S;
    k.planes_normalize(x + o, y + o, cb.runs(b), W, cb.length(b), cb.stride(), &m[c0], &scale[c0], &shift[c0]);
  }
}

// sum(dy), sum(dy * (x - mean)) of channels [c0, c0 + W) of a planar layout into sdy/sdyxmu
// (indexed by channel), summed over the blocks in order (as sum_partials).
template <typename T>
void group_grad_sums(const BatchNormLayout& L, const T* g, const T* x, int64_t c0, int64_t W,
                     const cpu::acc_t<T>* mu, double* sdy, double* sdyxmu) {
  const auto& k = cpu::kernels_for<T>();
  const ChannelBlocks cb(L);
  thread_local std::vector<double> scratch;  // per block and channel, as group_moments
  scratch.resize(2 * cb.count * W);
  double *p1 = scratch.data(), *p2 = p1 + cb.count * W;
  for (int64_t b = 0; b < cb.count; ++b) {
    const int64_t o = cb.start(b) + c0 * L.S;
    k.planes_grad_sums(g + o, x + o, cb.runs(b), W, cb.length(b), cb.stride(), &mu[c0], &p1[b * W], &p2[b * W]);
  }
  for (int64_t j = 0; j < W; ++j) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < cb.count; ++b) {
      s1 += p1[b * W + j];
      s2 += p2[b * W + j];
    }
    sdy[c0 + j] = s1;
    sdyxmu[c0 + j] = s2;
  }
}

// dx = a * dy - (x - mean) * b - c for channels [c0, c0 + W) of a planar layout (rows run in
// three phases).
template <typename T>
void group_grad_input(const BatchNormLayout& L, const T* g, const T* x, T* dx, int64_t c0, int64_t W,
                      const cpu::acc_t<T>* m, const cpu::acc_t<T>* a, const cpu::acc_t<T>* b, const cpu::acc_t<T>* c) {
  const auto& k = cpu::kernels_for<T>();
  const ChannelBlocks cb(L);
  for (int64_t blk = 0; blk < cb.count; ++blk) {
    const int64_t o = cb.start(blk) + c0 * L.S;
    k.planes_grad_input(g + o, x + o, dx + o, cb.runs(blk), W, cb.length(blk), cb.stride(), &m[c0], &a[c0], &b[c0],
                        &c[c0]);
  }
}

// Per-channel (mean, m2), stable and deterministic: whole-channel tasks where the layout allows
// (see ChannelGroups), else blocks in memory order -- planar runs, or row chunks -- then a
// per-channel merge in a fixed order.
template <typename T>
void channel_moments(const BatchNormLayout& L, const T* x, double* mean, double* m2) {
  const int64_t C = L.C;
  if (short_planes(L)) {  // moments per column of (N, C * S), then Chan's merge of a channel's S
    const int64_t S = L.S;
    auto cmean = partials<double>(C * S), cm2 = partials<double>(C * S);  // every column written
    channel_moments<T>(as_rows(L), x, cmean.get(), cm2.get());
    for (int64_t c = 0; c < C; ++c)
      merge_moments(S, [&](int64_t) { return double(L.N); }, &cmean[c * S], &cm2[c * S], 1, &mean[c], &m2[c]);
    return;
  }
  const ChannelGroups groups(L, /*bytes_per_value=*/0);  // no cache limit: one pass either way
  if (groups.usable) {
    at::parallel_for(0, groups.count, grain(groups.count, L.x.numel()), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) group_moments<T>(L, x, groups.start(g), groups.length(g, C), mean, m2);
    });
    return;
  }
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const ChannelBlocks cb(L);
    const int64_t K = cb.count;
    auto pmean = partials<double>(K * C), pm2 = partials<double>(K * C);  // block b of channel c at [b * C + c]
    if (vector_planes(L)) {  // one block a channel (K = 1): whole ranges of channels a call
      for_channel_ranges(L, [&](int64_t c0, int64_t c1, int64_t o) {
        k.planes_stats(x + o, L.N, c1 - c0, L.S, cb.stride(), &pmean[c0], &pm2[c0]);
      });
    } else {
      cb.parallel_each(L.x.numel(), [&](int64_t i, int64_t, int64_t off, int64_t runs, int64_t len) {
        k.plane_stats(x + off, runs, len, cb.stride(), &pmean[i], &pm2[i]);
      });
    }
    merge_columns(K, [&](int64_t b) { return cb.values(b); }, pmean.get(), pm2.get(), C, C, mean, m2);
    return;
  }
  const RowChunks rc(C, L.per_channel());
  auto pmean = partials<cpu::acc_t<T>>(rc.count * C), pm2 = partials<cpu::acc_t<T>>(rc.count * C);
  at::parallel_for(0, rc.count, grain(rc.count, L.x.numel()), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) rc.stats(k, x, C, 0, C, q, pmean.get(), pm2.get());
  });
  rc.merge(x, 0, C, pmean.get(), pm2.get(), C, mean, m2);
}

// Walks the layout, the threads sharing it: f(offset, runs, length, stride, channel) for planar
// blocks, or g(row0, nrows) for row chunks; each task a contiguous range. `no_planes` is the f
// of a layout known to be rows. A rows walk of fewer than `min_rows_to_thread` rows runs on the calling thread.
constexpr auto no_planes = [](int64_t, int64_t, int64_t, int64_t, int64_t) {};
template <typename F, typename G>
void for_each_span(const BatchNormLayout& L, F&& planar_fn, G&& rows_fn, int64_t min_rows_to_thread = 0) {
  if (L.planar) {
    const ChannelBlocks cb(L);
    cb.parallel_each(L.x.numel(), [&](int64_t, int64_t c, int64_t off, int64_t runs, int64_t len) {
      planar_fn(off, runs, len, cb.stride(), c);
    });
  } else {
    const RowChunks rc(L.C, L.per_channel());
    const int64_t values = L.N < min_rows_to_thread ? 0 : L.x.numel();  // 0: one inline task
    at::parallel_for(0, rc.count, grain(rc.count, values), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) rows_fn(rc.first(q), rc.length(q));
    });
  }
}

// Per-channel tensors <-> double vectors, in their own dtype and stride, no temporaries.
template <typename S>
FASTBN_CHANNEL_LOOP void to_double(const S* p, int64_t st, int64_t C, double* __restrict v) {
  if (st == 1)  // the usual case, as its own loop: it vectorises
    for (int64_t c = 0; c < C; ++c) v[c] = double(p[c]);
  else
    for (int64_t c = 0; c < C; ++c) v[c] = double(p[c * st]);
}

template <typename S>
FASTBN_CHANNEL_LOOP void from_double(const double* __restrict v, int64_t C, S* p, int64_t st) {
  if (st == 1)
    for (int64_t c = 0; c < C; ++c) p[c] = S(v[c]);
  else
    for (int64_t c = 0; c < C; ++c) p[c * st] = S(v[c]);
}

// v[c] = t[c] (or `fill` where t is absent) for channels [c0, c1); v is indexed by channel
void read_channels(const OptTensor& t, double fill, int64_t c0, int64_t c1, double* v) {
  if (!t.has_value() || !t->defined()) {
    std::fill(v + c0, v + c1, fill);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "fastbn_read_channels", [&] {
    to_double(t->const_data_ptr<scalar_t>() + c0 * t->stride(0), t->stride(0), c1 - c0, v + c0);
  });
}

ChannelValues<double> read_channels(const OptTensor& t, int64_t C, double fill) {
  ChannelValues<double> v(C);
  read_channels(t, fill, 0, C, v.data());
  return v;
}

// t[c] = v[c] for channels [c0, c1) (t: C values of any float dtype and stride)
void write_channels(const Tensor& t, const double* v, int64_t c0, int64_t c1) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastbn_write_channels", [&] {
    from_double(v + c0, c1 - c0, t.data_ptr<scalar_t>() + c0 * t.stride(0), t.stride(0));
  });
}

template <typename S>
FASTBN_CHANNEL_LOOP void blend_into(S* r, int64_t st, int64_t n, double momentum, const double* __restrict batch,
                                    double scale) {
  for (int64_t c = 0; c < n; ++c) r[c * st] = S((1 - momentum) * double(r[c * st]) + momentum * (batch[c] * scale));
}

// running = (1 - momentum) * running + momentum * batch for channels [c0, c1), in the running
// stats' own dtype (batch: the mean, or m2 with scale 1 / (M - 1), the unbiased variance).
void update_running(const Tensor& running, int64_t c0, int64_t c1, double momentum, const double* batch,
                    double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "fastbn_update_running", [&] {
    const int64_t st = running.stride(0);
    blend_into(running.data_ptr<scalar_t>() + c0 * st, st, c1 - c0, momentum, batch + c0, scale);
  });
}

// The mean in the kernels' accumulation type A (the dtype it has when the forward made it): the
// tensor itself where it is that dtype and dense (each thread then reads the lines the forward's
// threads wrote, rather than a copy that the calling thread writes and the other threads read: a
// line transfer each, every call), else a copy.
template <typename A>
class MeanAs {
 public:
  MeanAs(const Tensor& mean, int64_t C) {
    if (mean.scalar_type() == c10::CppTypeToScalarType<A>::value && (mean.stride(0) == 1 || C <= 1)) {
      p_ = mean.const_data_ptr<A>();
      return;
    }
    copy_ = partials<A>(C);
    A* v = copy_.get();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mean.scalar_type(), "fastbn_mean_as", [&] {
      const scalar_t* p = mean.const_data_ptr<scalar_t>();
      const int64_t st = mean.stride(0);
      for (int64_t c = 0; c < C; ++c) v[c] = A(double(p[c * st]));
    });
    p_ = v;
  }
  const A* data() const { return p_; }

 private:
  Scratch<A> copy_;
  const A* p_ = nullptr;
};

Tensor channel_tensor(const double* v, int64_t C, const Tensor& like, at::ScalarType dtype) {
  Tensor t = at::empty({C}, like.options().dtype(dtype));
  write_channels(t, v, 0, C);
  return t;
}

// The constants of dx = a * dy - (x - mean) * b - c for channels [j0, j1): a = weight * invstd
// and, in training, b = a * invstd^2 * sum_dy_xmu / M, c = a * sum_dy / M (zero sums: eval).
// The sums are rounded to the accumulation type as the reduce op returns them, so that the fused
// backward and reduce-then-input give the same bits.
template <typename A>
FASTBN_CHANNEL_LOOP
void grad_input_constants(const double* w, const double* is, const double* sdy,
                          const double* sdyxmu, int64_t M, int64_t j0, int64_t j1, A* a, A* b, A* c) {
  const double inv_m = 1.0 / double(M);
  for (int64_t j = j0; j < j1; ++j) {
    const double aj = w[j] * is[j];
    a[j] = A(aj);
    b[j] = A(aj * is[j] * is[j] * double(A(sdyxmu[j])) * inv_m);
    c[j] = A(aj * double(A(sdy[j])) * inv_m);
  }
}

// The eval backward's dx = dy * a, a = weight * invstd (as grad_input_constants makes it), in the
// normalise form (dy - m) * a + shift with m = shift = 0.
template <typename A>
void eval_grad_constants(const OptTensor& weight, const Tensor& invstd, int64_t C, A* m, A* a, A* shift) {
  ChannelValues<double> w(C), is(C);
  read_channels(weight, 1.0, 0, C, w.data());
  read_channels(invstd, 1.0, 0, C, is.data());
  for (int64_t c = 0; c < C; ++c) {
    a[c] = A(w[c] * is[c]);
    m[c] = shift[c] = A(0);
  }
}

// The forward's constants of channels [c0, c1): in training var = m2 / M; invstd; and those of
// y = (x - m) * scale + shift: m = mean, scale = weight * invstd, shift = bias. Restrict
// parameters (and -fno-math-errno, setup.py) let the loop vectorise, square root included.
template <typename A>
FASTBN_CHANNEL_LOOP
void forward_constants(int64_t c0, int64_t c1, bool training, int64_t M, double eps, const double* __restrict mean,
                       const double* __restrict m2, const double* __restrict w, const double* __restrict b,
                       double* __restrict var, double* __restrict invstd, A* __restrict m, A* __restrict scale,
                       A* __restrict shift) {
  if (training) {
    const double inv_m = 1.0 / double(M);
    for (int64_t c = c0; c < c1; ++c) var[c] = m2[c] * inv_m;
  }
  for (int64_t c = c0; c < c1; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    m[c] = A(mean[c]);
    scale[c] = A(w[c] * invstd[c]);
    shift[c] = A(b[c]);
  }
}

// y = (x - m) * scale + shift per channel, the constants given, on any layout: the forward's
// normalise where it is a pass of its own, and the eval backward's dx = dy * (weight * invstd).
template <typename T>
void normalize_pass(const BatchNormLayout& L, const T* x, T* y, const cpu::acc_t<T>* m,
                    const cpu::acc_t<T>* scale, const cpu::acc_t<T>* shift, bool in_memory) {
  const auto& k = cpu::kernels_for<T>();
  const int64_t C = L.C;
  if (short_planes(L)) {
    const BatchNormLayout R = as_rows(L);
    const auto cm = per_column(m, C, L.S), cs = per_column(scale, C, L.S), csh = per_column(shift, C, L.S);
    for_each_span(
        R, no_planes,
        [&](int64_t r0, int64_t nr) {
          k.rows_normalize(x + r0 * R.C, y + r0 * R.C, nr, R.C, R.C, cm.get(), cs.get(), csh.get(), in_memory);
        },
        kMinShortPlaneRowsToThread);
    return;
  }
  if (vector_planes(L)) {
    for_channel_ranges(L, [&](int64_t c0, int64_t c1, int64_t o) {
      k.planes_normalize(x + o, y + o, L.N, c1 - c0, L.S, C * L.S, &m[c0], &scale[c0], &shift[c0]);
    });
    return;
  }
  const ChannelGroups groups(L, sizeof(T));
  if (L.planar && groups.usable && groups.width > 1) {  // short planes in channel groups, as the fused forward
    at::parallel_for(0, groups.count, grain(groups.count, L.x.numel()), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g)
        group_normalize<T>(L, x, y, groups.start(g), groups.length(g, C), m, scale, shift);
    });
    return;
  }
  for_each_span(
      L,
      [&](int64_t off, int64_t runs, int64_t len, int64_t stride, int64_t c) {
        k.plane_normalize(x + off, y + off, runs, len, stride, m[c], scale[c], shift[c]);
      },
      [&](int64_t r0, int64_t nr) {
        k.rows_normalize(x + r0 * C, y + r0 * C, nr, C, C, m, scale, shift, in_memory);
      });
}

// The eval forward's constants from the running stats and parameters (forward_constants in eval),
// and mean and invstd in double for the op's outputs.
template <typename A>
void eval_forward_constants(const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& weight,
                            const OptTensor& bias, double eps, int64_t C, double* mean, double* invstd, A* m, A* scale,
                            A* shift) {
  ChannelValues<double> var(C), w(C), b(C);
  read_channels(running_mean, 0.0, 0, C, mean);
  read_channels(running_var, 1.0, 0, C, var.data());
  read_channels(weight, 1.0, 0, C, w.data());
  read_channels(bias, 0.0, 0, C, b.data());
  forward_constants(0, C, /*training=*/false, /*M (unused in eval)=*/0, eps, mean, nullptr, w.data(), b.data(),
                    var.data(), invstd, m, scale, shift);
}

// Eval: y = (x - m) * scale + shift with constants that make(m, scale, shift, first) computes from
// tensors read-only here (running stats, parameters; the saved invstd). On the rows layout
// (BatchNorm1d, channels_last) every task makes them itself, `first` for the task of row 0 (the
// calling thread's), rather than the calling thread making them for the others to read: a
// per-channel vector that one core writes and the other reads costs a line transfer each call (and
// the next call's write, an invalidation), where read-only tensors stay cached in both cores. Paired
// in one process, the same bits: eval at 200x1000 1.06x as fast in the VM's fast minutes, 1.53x in
// slow ones (benchmarks/results/cpu-2026-11-28-eval-private-constants.md). Planes, whose tasks hold a
// few channels each, and empty inputs: made once, by the calling thread.
template <typename T, typename Make>
void eval_affine_pass(const BatchNormLayout& L, const T* x, T* y, bool in_memory, Make&& make) {
  using A = cpu::acc_t<T>;
  const int64_t C = L.C, M = L.per_channel();
  if (!L.planar && M > 0) {
    const auto& k = cpu::kernels_for<T>();
    const RowChunks rc(C, M);
    at::parallel_for(0, rc.count, grain(rc.count, L.x.numel()), [&](int64_t q0, int64_t q1) {
      ChannelValues<A> m(C), scale(C), shift(C);
      make(m.data(), scale.data(), shift.data(), q0 == 0);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t o = rc.first(q) * C;
        k.rows_normalize(x + o, y + o, rc.length(q), C, C, m.data(), scale.data(), shift.data(), in_memory);
      }
    });
    return;
  }
  ChannelValues<A> m(C), scale(C), shift(C);
  make(m.data(), scale.data(), shift.data(), true);
  if (M > 0) normalize_pass<T>(L, x, y, m.data(), scale.data(), shift.data(), in_memory);
}

Tensor empty_like_layout(const BatchNormLayout& L) {
  return cpu::empty_output(L.x.sizes(), L.x.scalar_type(), L.format);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_cpu(const Tensor& input, const OptTensor& weight,
                                                  const OptTensor& bias, const OptTensor& running_mean,
                                                  const OptTensor& running_var, bool training,
                                                  double momentum, double eps) {
  check_batch_norm_args("fastbn.batch_norm", input, weight, bias, running_mean, running_var, training,
                        /*allow_half=*/false);
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t C = L.C, M = L.per_channel();
  const auto acc = acc_type(input.scalar_type());
  Tensor out = empty_like_layout(L);
  const bool has_running = running_mean.has_value() && running_mean->defined();

  Tensor mean_out = at::empty({C}, input.options().dtype(acc)), invstd_out = at::empty({C}, input.options().dtype(acc));
  if (training && M == 0)  // empty batch: nothing to normalise, running stats untouched (as torch)
    return {out, mean_out.zero_(), invstd_out.zero_()};
  if (!training) {  // the running stats' constants, then one normalise pass
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_eval", [&] {
      using T = cpu::kernel_type<scalar_t>;
      using A = cpu::acc_t<T>;
      eval_affine_pass<T>(L, reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()),
                          reinterpret_cast<T*>(out.data_ptr<scalar_t>()), from_memory(input),
                          [&](A* m, A* scale, A* shift, bool first) {
        ChannelValues<double> mean(C), invstd(C);
        eval_forward_constants(running_mean, running_var, weight, bias, eps, C, mean.data(), invstd.data(), m,
                               scale, shift);
        if (first) {
          write_channels(mean_out, mean.data(), 0, C);
          write_channels(invstd_out, invstd.data(), 0, C);
        }
      });
    });
    return {out, mean_out, invstd_out};
  }
  // Training from here. The batch's mean and biased variance, per channel.
  ChannelValues<double> mean(C), var(C), invstd(C), m2(C), w(C), b(C);
  const double unbiased = M > 1 ? 1.0 / double(M - 1) : NAN;  // the running variance is unbiased
  // The per-channel work around the statistics, for channels [c0, c1): the parameters in, and
  // once the statistics are known the outputs: the running stats' update, mean and invstd. The
  // rows' merge phase does both for each thread's own channels (the calling thread would otherwise
  // read them all from the other cores after the region: BatchNorm1d 200x1000's forward op ~2 us
  // faster); the other paths, whose tasks hold a few channels each, before and after their region
  // (done per group, 32x256x8x8's training step was 3% slower).
  const bool rows_phases = !L.planar;
  auto parameters = [&](int64_t c0, int64_t c1) {
    read_channels(weight, 1.0, c0, c1, w.data());
    read_channels(bias, 0.0, c0, c1, b.data());
  };
  auto outputs = [&](int64_t c0, int64_t c1) {
    if (has_running) {
      update_running(*running_mean, c0, c1, momentum, mean.data(), 1.0);
      update_running(*running_var, c0, c1, momentum, m2.data(), unbiased);
    }
    write_channels(mean_out, mean.data(), c0, c1);
    write_channels(invstd_out, invstd.data(), c0, c1);
  };
  if (!rows_phases) parameters(0, C);
  bool normalized = false;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_forward", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    T* y = reinterpret_cast<T*>(out.data_ptr<scalar_t>());
    ChannelValues<A> m(C), scale(C), shift(C);
    const bool in_memory = from_memory(input);
    auto constants = [&](int64_t c0, int64_t c1) {
      forward_constants(c0, c1, /*training=*/true, M, eps, mean.data(), m2.data(), w.data(), b.data(), var.data(),
                        invstd.data(), m.data(), scale.data(), shift.data());
    };
    const ChannelGroups groups(L, sizeof(T));
    if (L.planar && groups.usable) {  // one region: statistics, then normalise from cache
      at::parallel_for(0, groups.count, grain(groups.count, L.x.numel()), [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t c0 = groups.start(g), W = groups.length(g, C);
          group_moments<T>(L, x, c0, W, mean.data(), m2.data());
          constants(c0, c0 + W);
          group_normalize<T>(L, x, y, c0, W, m.data(), scale.data(), shift.data());
        }
      });
      normalized = true;
      return;
    }
    const auto& k = cpu::kernels_for<T>();
    if (rows_phases) {  // chunk moments | merge, constants | normalise the chunks
      const RowChunks rc(C, M);
      auto pmean = partials<A>(rc.count * C), pm2 = partials<A>(rc.count * C);
      three_phases(
          rc.count, C, L.x.numel(),
          [&](int64_t q0, int64_t q1) {
            for (int64_t q = q0; q < q1; ++q) rc.stats(k, x, C, 0, C, q, pmean.get(), pm2.get());
          },
          [&](int64_t c0, int64_t c1) {
            rc.merge(x, c0, c1 - c0, &pmean[c0], &pm2[c0], C, &mean[c0], &m2[c0]);
            parameters(c0, c1);
            constants(c0, c1);
            outputs(c0, c1);
          },
          [&](int64_t q0, int64_t q1) {
            for (int64_t q = q0; q < q1; ++q) {
              const int64_t o = rc.first(q) * C;
              k.rows_normalize(x + o, y + o, rc.length(q), C, C, m.data(), scale.data(), shift.data(), in_memory);
            }
          });
      normalized = true;
      return;
    }
    channel_moments<T>(L, x, mean.data(), m2.data());
    constants(0, C);
    normalize_pass<T>(L, x, y, m.data(), scale.data(), shift.data(), in_memory);
    normalized = true;
  });
  TORCH_INTERNAL_ASSERT(normalized);
  if (!rows_phases) outputs(0, C);
  return {out, mean_out, invstd_out};
}

// sum(dy) and sum(dy * (x - mean)) per channel: blocks or row chunks in memory order, summed per
// channel in a fixed order.
template <typename T>
void grad_sums(const BatchNormLayout& L, const T* g, const T* x, const cpu::acc_t<T>* mu, double* sdy,
               double* sdyxmu) {
  using A = cpu::acc_t<T>;
  const auto& k = cpu::kernels_for<T>();
  const int64_t C = L.C;
  if (short_planes(L)) {  // sums per column of (N, C * S), then over a channel's S columns in order
    const int64_t S = L.S;
    auto s1 = partials<double>(C * S), s2 = partials<double>(C * S);  // every column written
    const auto column_mu = per_column(mu, C, S);
    grad_sums<T>(as_rows(L), g, x, column_mu.get(), s1.get(), s2.get());
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t s = 0; s < S; ++s) {
        t1 += s1[c * S + s];
        t2 += s2[c * S + s];
      }
      sdy[c] = t1;
      sdyxmu[c] = t2;
    }
    return;
  }
  // Planes in blocks, never whole channels: one pass either way, and the blocks' memory order read
  // 1.02-2.8x as fast (the reduce op on the EPYC VM, the same bits; see kWholeChannelMaxBytes).
  if (L.planar) {
    const ChannelBlocks cb(L);
    const int64_t K = cb.count;
    auto p1 = partials<double>(K * C), p2 = partials<double>(K * C);  // block b of channel c at [b * C + c]
    if (vector_planes(L)) {  // as channel_moments
      for_channel_ranges(L, [&](int64_t c0, int64_t c1, int64_t o) {
        k.planes_grad_sums(g + o, x + o, L.N, c1 - c0, L.S, cb.stride(), &mu[c0], &p1[c0], &p2[c0]);
      });
    } else {
      cb.parallel_each(L.x.numel(), [&](int64_t i, int64_t c, int64_t off, int64_t runs, int64_t len) {
        k.plane_grad_sums(g + off, x + off, runs, len, cb.stride(), mu[c], &p1[i], &p2[i]);
      });
    }
    sum_partials(K, p1.get(), p2.get(), C, 0, C, sdy, sdyxmu);  // block order, as group_grad_sums
    return;
  }
  // Rows are summed in row chunks, not in owned column slices: 1.2-1.45x as fast for the reduce op
  // (channels_last 16x64x16x16 to 128x64x32x32, BatchNorm1d 512x256 and 4096x256), 0.97-1.24x
  // for short planes walked as rows (paired in one process; the same bits).
  const RowChunks rc(C, L.per_channel());
  auto p1 = partials<A>(rc.count * C), p2 = partials<A>(rc.count * C);
  at::parallel_for(0, rc.count, grain(rc.count, L.x.numel()), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t o = rc.first(q) * C;
      k.rows_grad_sums(g + o, x + o, rc.length(q), C, C, mu, &p1[q * C], &p2[q * C]);
    }
  });
  sum_partials(rc.count, p1.get(), p2.get(), C, 0, C, sdy, sdyxmu);  // chunk order: deterministic
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_output,
                                                                          const Tensor& input, const Tensor& mean,
                                                                          const Tensor& invstd, const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward_reduce";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  const int64_t C = L.C;
  ChannelValues<double> sdy(C), sdyxmu(C);
  if (L.per_channel() == 0) {
    std::fill_n(sdy.data(), C, 0.0);
    std::fill_n(sdyxmu.data(), C, 0.0);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_reduce", [&] {
      using T = cpu::kernel_type<scalar_t>;
      using A = cpu::acc_t<T>;
      const MeanAs<A> mu(mean, C);
      grad_sums<T>(L, reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()),
                   reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()), mu.data(), sdy.data(), sdyxmu.data());
    });
  }
  // grad_weight = sum(dy * x_hat) = sum(dy * (x - mean)) * invstd;  grad_bias = sum(dy)
  const ChannelValues<double> is = read_channels(invstd, C, 1);
  ChannelValues<double> gw(C);
  for (int64_t c = 0; c < C; ++c) gw[c] = sdyxmu[c] * is[c];
  const auto acc = mean.scalar_type();
  const auto pdtype = param_grad_dtype(weight, mean);
  return {channel_tensor(sdy.data(), C, mean, acc), channel_tensor(sdyxmu.data(), C, mean, acc),
          channel_tensor(gw.data(), C, mean, pdtype), channel_tensor(sdy.data(), C, mean, pdtype)};
}

// dx = a * dy - (x - mean) * b - c over the whole input, the threads sharing it.
template <typename T>
void grad_input_pass(const BatchNormLayout& L, const T* g, const T* x, T* d, const cpu::acc_t<T>* m,
                     const ChannelValues<cpu::acc_t<T>>& a, const ChannelValues<cpu::acc_t<T>>& b,
                     const ChannelValues<cpu::acc_t<T>>& c, bool in_memory) {
  const auto& k = cpu::kernels_for<T>();
  const int64_t C = L.C;
  if (short_planes(L)) {
    const BatchNormLayout R = as_rows(L);
    const int64_t S = L.S;
    const auto cm = per_column(m, C, S), ca = per_column(a.data(), C, S), cb = per_column(b.data(), C, S),
               cc = per_column(c.data(), C, S);
    for_each_span(
        R, no_planes,
        [&](int64_t r0, int64_t nr) {
          k.rows_grad_input(g + r0 * R.C, x + r0 * R.C, d + r0 * R.C, nr, R.C, R.C, cm.get(), ca.get(), cb.get(),
                            cc.get(), in_memory);
        },
        kMinShortPlaneRowsToThread);
    return;
  }
  if (vector_planes(L)) {
    for_channel_ranges(L, [&](int64_t j0, int64_t j1, int64_t o) {
      k.planes_grad_input(g + o, x + o, d + o, L.N, j1 - j0, L.S, C * L.S, &m[j0], &a[j0], &b[j0], &c[j0]);
    });
    return;
  }
  for_each_span(
      L,
      [&](int64_t off, int64_t runs, int64_t len, int64_t stride, int64_t j) {
        k.plane_grad_input(g + off, x + off, d + off, runs, len, stride, m[j], a[j], b[j], c[j]);
      },
      [&](int64_t r0, int64_t nr) {
        k.rows_grad_input(g + r0 * C, x + r0 * C, d + r0 * C, nr, C, C, m, a.data(), b.data(), c.data(), in_memory);
      });
}

Tensor batch_norm_backward_input_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                     const Tensor& invstd, const OptTensor& weight, const OptTensor& sum_dy,
                                     const OptTensor& sum_dy_xmu) {
  const char* op = "fastbn.batch_norm_backward_input";
  check_batch_norm_backward_input_args(op, grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  Tensor dx = empty_like_layout(L);
  const int64_t C = L.C, M = L.per_channel();
  if (M == 0) return dx;
  if (!(sum_dy.has_value() && sum_dy->defined())) {  // eval: dx = dy * (weight * invstd), x not read
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input_eval", [&] {
      using T = cpu::kernel_type<scalar_t>;
      using A = cpu::acc_t<T>;
      const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
      T* d = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
      eval_affine_pass<T>(L, g, d, from_memory(input), [&](A* zero_mean, A* a, A* zero_shift, bool) {
        eval_grad_constants(weight, invstd, C, zero_mean, a, zero_shift);
      });
    });
    return dx;
  }

  const ChannelValues<double> w = read_channels(weight, C, 1.0), is = read_channels(invstd, C, 1.0);
  const ChannelValues<double> s1 = read_channels(sum_dy, C, 0.0), s2 = read_channels(sum_dy_xmu, C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const MeanAs<A> m(mean, C);
    ChannelValues<A> a(C), b(C), c(C);
    grad_input_constants(w.data(), is.data(), s1.data(), s2.data(), M, 0, C, a.data(), b.data(), c.data());
    grad_input_pass<T>(L, reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()),
                       reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()),
                       reinterpret_cast<T*>(dx.data_ptr<scalar_t>()), m.data(), a, b, c, from_memory(input));
  });
  return dx;
}

// All three gradients in training mode. Planes in channel groups: the per-channel sums and dx in
// one region (dx re-reads x and dy from cache); rows: three phases of one region; other planes:
// the sums, then dx, as reduce-then-input but without their intermediate tensors (at small
// batches those cost more than the passes).
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& mean, const Tensor& invstd,
                                                           const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t C = L.C, M = L.per_channel();
  const Tensor dy = grad_output.contiguous(L.format);
  Tensor dx = empty_like_layout(L);
  const auto pdtype = param_grad_dtype(weight, mean);
  Tensor grad_weight = at::empty({C}, mean.options().dtype(pdtype)), grad_bias = at::empty({C}, mean.options().dtype(pdtype));
  if (M == 0)  // empty batch: zero parameter gradients
    return {dx, grad_weight.zero_(), grad_bias.zero_()};
  const bool fused = L.planar && ChannelGroups(L, 2 * input.element_size()).usable;
  const bool phases = !L.planar;
  ChannelValues<double> w(C), is(C), sdy(C), sdyxmu(C), gw(C);
  // The per-channel work around the sums, for channels [j0, j1), as the forward's: the parameters
  // in, and the parameter gradients out, grad_weight = sum(dy * (x - mean)) * invstd and
  // grad_bias = sum(dy) (in the rows' merge phase for each thread's own channels).
  auto parameters = [&](int64_t j0, int64_t j1) {
    read_channels(weight, 1.0, j0, j1, w.data());
    read_channels(invstd, 1.0, j0, j1, is.data());
  };
  auto outputs = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) gw[j] = sdyxmu[j] * is[j];
    write_channels(grad_weight, gw.data(), j0, j1);
    write_channels(grad_bias, sdy.data(), j0, j1);
  };
  if (!phases) parameters(0, C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_backward", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
    T* d = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
    const MeanAs<A> m(mean, C);
    ChannelValues<A> a(C), b(C), c(C);
    const bool in_memory = from_memory(input);
    auto constants = [&](int64_t j0, int64_t j1) {
      grad_input_constants(w.data(), is.data(), sdy.data(), sdyxmu.data(), M, j0, j1, a.data(), b.data(), c.data());
    };
    if (!fused && !phases) {  // sums, constants, dx: the arithmetic of reduce-then-input
      grad_sums<T>(L, g, x, m.data(), sdy.data(), sdyxmu.data());
      constants(0, C);
      grad_input_pass<T>(L, g, x, d, m.data(), a, b, c, in_memory);
      return;
    }
    if (phases) {  // chunk sums | per-channel sums, constants | dx of the chunks
      const auto& k = cpu::kernels_for<T>();
      const RowChunks rc(C, M);
      auto p1 = partials<A>(rc.count * C), p2 = partials<A>(rc.count * C);
      three_phases(
          rc.count, C, L.x.numel(),
          [&](int64_t q0, int64_t q1) {
            for (int64_t q = q0; q < q1; ++q) {
              const int64_t o = rc.first(q) * C;
              k.rows_grad_sums(g + o, x + o, rc.length(q), C, C, m.data(), &p1[q * C], &p2[q * C]);
            }
          },
          [&](int64_t j0, int64_t j1) {
            sum_partials(rc.count, p1.get(), p2.get(), C, j0, j1, sdy.data(), sdyxmu.data());  // as grad_sums
            parameters(j0, j1);
            constants(j0, j1);
            outputs(j0, j1);
          },
          [&](int64_t q0, int64_t q1) {
            for (int64_t q = q0; q < q1; ++q) {
              const int64_t o = rc.first(q) * C;
              k.rows_grad_input(g + o, x + o, d + o, rc.length(q), C, C, m.data(), a.data(), b.data(), c.data(), in_memory);
            }
          });
      return;
    }
    const ChannelGroups groups(L, 2 * sizeof(T));
    at::parallel_for(0, groups.count, grain(groups.count, L.x.numel()), [&](int64_t g0, int64_t g1) {
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t c0 = groups.start(grp), W = groups.length(grp, C);
        group_grad_sums<T>(L, g, x, c0, W, m.data(), sdy.data(), sdyxmu.data());
        constants(c0, c0 + W);
        group_grad_input<T>(L, g, x, d, c0, W, m.data(), a.data(), b.data(), c.data());
      }
    });
  });
  if (!phases) outputs(0, C);
  return {dx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace fastbn
