// BatchNorm on the CPU: the parallel structure around the inner loops of cpu/kernels_impl.inc.
//
// Statistics are computed per block (a run of one channel, or a chunk of rows), two-pass inside
// the block while it sits in cache, and the blocks are merged per channel in a fixed order with
// Chan's formula: numerically stable (no E[x^2] - E[x]^2), one read of the input, and
// deterministic whatever the thread count. Per-channel vectors (weight, running stats, ...) are
// read and written in place: at small sizes (BatchNorm1d on 200 x 1000) a handful of ATen
// temporaries would cost as much as the kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/kernel_type.h"
#include "cpu/output_allocator.h"

namespace fastbn {
namespace {

constexpr int64_t kPlaneBlock = 4096;  // values of one channel per block (fits L1)
constexpr int64_t kRowsBlock = 65536;  // values per row-chunk in the channels-innermost layout (L2)
constexpr int64_t kGrainValues = 32768;  // below this, a parallel region runs inline

// Merges K partial (count, mean, m2) of one channel, in a fixed order:
//   mean = sum(n_k * mean_k) / n,   m2 = sum(m2_k + n_k * (mean_k - mean)^2)
// (the parallel-axis form of Chan et al.: stable, as it only squares deviations of block means
// from the overall mean, and free of divisions in the loop).
template <typename CountFn>
void merge_moments(int64_t K, CountFn count, const double* pmean, const double* pm2, int64_t stride,
                   double* mean_out, double* m2_out) {
  double n = 0, s = 0;
  for (int64_t k = 0; k < K; ++k) {
    n += count(k);
    s += count(k) * pmean[k * stride];
  }
  const double mean = s / n;
  double m2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double d = pmean[k * stride] - mean;
    m2 += pm2[k * stride] + count(k) * d * d;
  }
  *mean_out = mean;
  *m2_out = m2;
}

// Each (n, c) run of S values is cut into `splits` blocks of at most `len`.
struct PlaneBlocks {
  int64_t splits, len;
  explicit PlaneBlocks(int64_t S)
      : splits(std::max<int64_t>(1, (S + kPlaneBlock - 1) / kPlaneBlock)), len((S + splits - 1) / splits) {}
  int64_t start(int64_t k) const { return k * len; }
  int64_t length(int64_t k, int64_t S) const { return std::min(len, S - k * len); }
};

int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kRowsBlock / std::max<int64_t>(C, 1)); }

// Whole channels per task when there are enough of them and their runs are long enough to
// stream (a channel's values are N runs of S, C * S apart); else blocks in memory order, then a
// per-channel merge.
constexpr int64_t kLongRun = 1024;
bool parallel_over_channels(const BatchNormLayout& L) {
  return L.C >= 4 * int64_t(at::get_num_threads()) && L.S >= kLongRun;
}

// Calls f(c, n, k, offset, length) for every block of channel c, in a fixed order.
template <typename F>
void for_channel_blocks(const BatchNormLayout& L, const PlaneBlocks& pb, int64_t c, F&& f) {
  for (int64_t n = 0; n < L.N; ++n)
    for (int64_t k = 0; k < pb.splits; ++k) f(n, k, (n * L.C + c) * L.S + pb.start(k), pb.length(k, L.S));
}

// Channel slices for the rows layout: with enough channels each task owns whole channels (one
// parallel region, no cross-thread merge, and its slice stays in its core's cache); with few
// channels a single slice, cut into row chunks that the threads share.
struct ColumnSlices {
  int64_t count, width;
  explicit ColumnSlices(int64_t C) {
    const int64_t threads = at::get_num_threads();
    const int64_t w = C >= 32 * threads ? ((C + threads - 1) / threads + 15) / 16 * 16 : C;
    width = std::max<int64_t>(1, w);
    count = (C + width - 1) / width;
  }
  int64_t start(int64_t s) const { return s * width; }
  int64_t length(int64_t s, int64_t C) const { return std::min(width, C - s * width); }
};

// ---- fused paths: a task owns whole channels ---------------------------------------------------
//
// When every task can own whole channels and their values fit in its core's L2, the statistics
// and the elementwise pass run in one parallel region, and the elementwise pass re-reads the
// input from cache: the forward moves 2 passes of memory instead of 3, the backward 3 instead
// of 5. Groups are single channels (planar) or column slices (rows).
constexpr int64_t kGroupCacheBytes = int64_t(1) << 20;

struct ChannelGroups {
  // usable: whole-channel tasks apply, and (unless bytes_per_value is 0) a group's values fit
  // kGroupCacheBytes, so that the fused paths re-read them from cache
  bool usable;
  int64_t count, width;  // width: channels per group
  ChannelGroups(const BatchNormLayout& L, int64_t bytes_per_value) {
    const int64_t threads = at::get_num_threads();
    if (L.planar) {
      width = 1;
      count = L.C;
      usable = parallel_over_channels(L);
    } else {
      const ColumnSlices cs(L.C);
      width = cs.width;
      count = cs.count;
      usable = count > 1 || threads == 1;
    }
    usable = usable && L.per_channel() * width * bytes_per_value <= kGroupCacheBytes;
  }
  int64_t start(int64_t g) const { return g * width; }
  int64_t length(int64_t g, int64_t C) const { return std::min(width, C - g * width); }
};

// Moments of channels [c0, c0 + W) into mean/m2 (indexed by channel).
template <typename T>
void group_moments(const BatchNormLayout& L, const T* x, int64_t c0, int64_t W, double* mean, double* m2) {
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    const int64_t per_c = L.N * pb.splits;
    std::vector<double> bm(per_c), bm2(per_c);
    auto block_count = [&](int64_t r) { return double(pb.length(r % pb.splits, L.S)); };
    for (int64_t c = c0; c < c0 + W; ++c) {
      for_channel_blocks(L, pb, c, [&](int64_t n, int64_t s, int64_t off, int64_t len) {
        k.plane_stats(x + off, len, &bm[n * pb.splits + s], &bm2[n * pb.splits + s]);
      });
      merge_moments(per_c, block_count, bm.data(), bm2.data(), 1, &mean[c], &m2[c]);
    }
    return;
  }
  const int64_t C = L.C, M = L.per_channel(), rows = rows_per_chunk(W), chunks = (M + rows - 1) / rows;
  std::vector<double> pmean(chunks * W), pm2(chunks * W);
  std::vector<cpu::acc_t<T>> scratch(2 * W);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t r0 = q * rows;
    k.rows_stats(x + r0 * C + c0, std::min(rows, M - r0), W, C, &pmean[q * W], &pm2[q * W], scratch.data());
  }
  auto chunk_count = [&](int64_t q) { return double(std::min(rows, M - q * rows)); };
  for (int64_t c = 0; c < W; ++c) merge_moments(chunks, chunk_count, &pmean[c], &pm2[c], W, &mean[c0 + c], &m2[c0 + c]);
}

// y = (x - mean) * scale + shift for channels [c0, c0 + W); the vectors are indexed by channel.
template <typename T>
void group_normalize(const BatchNormLayout& L, const T* x, T* y, int64_t c0, int64_t W, const cpu::acc_t<T>* m,
                     const cpu::acc_t<T>* scale, const cpu::acc_t<T>* shift) {
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    for (int64_t c = c0; c < c0 + W; ++c)
      for_channel_blocks(L, pb, c, [&](int64_t, int64_t, int64_t off, int64_t len) {
        k.plane_normalize(x + off, y + off, len, m[c], scale[c], shift[c]);
      });
    return;
  }
  k.rows_normalize(x + c0, y + c0, L.per_channel(), W, L.C, m + c0, scale + c0, shift + c0);
}

// sum(dy), sum(dy * (x - mean)) of channels [c0, c0 + W) into sdy/sdyxmu (indexed by channel).
template <typename T>
void group_grad_sums(const BatchNormLayout& L, const T* g, const T* x, int64_t c0, int64_t W,
                     const cpu::acc_t<T>* mu, double* sdy, double* sdyxmu) {
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    for (int64_t c = c0; c < c0 + W; ++c) {
      double s1 = 0, s2 = 0;
      for_channel_blocks(L, pb, c, [&](int64_t, int64_t, int64_t off, int64_t len) {
        double b1, b2;
        k.plane_grad_sums(g + off, x + off, len, mu[c], &b1, &b2);
        s1 += b1;
        s2 += b2;
      });
      sdy[c] = s1;
      sdyxmu[c] = s2;
    }
    return;
  }
  const int64_t C = L.C, M = L.per_channel(), rows = rows_per_chunk(W);
  std::vector<cpu::acc_t<T>> p1(W), p2(W);
  for (int64_t c = 0; c < W; ++c) sdy[c0 + c] = sdyxmu[c0 + c] = 0;
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    k.rows_grad_sums(g + r0 * C + c0, x + r0 * C + c0, std::min(rows, M - r0), W, C, mu + c0, p1.data(), p2.data());
    for (int64_t c = 0; c < W; ++c) {
      sdy[c0 + c] += p1[c];
      sdyxmu[c0 + c] += p2[c];
    }
  }
}

// dx = a * dy - (x - mean) * b - c for channels [c0, c0 + W).
template <typename T>
void group_grad_input(const BatchNormLayout& L, const T* g, const T* x, T* dx, int64_t c0, int64_t W,
                      const cpu::acc_t<T>* m, const cpu::acc_t<T>* a, const cpu::acc_t<T>* b, const cpu::acc_t<T>* c) {
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    for (int64_t ch = c0; ch < c0 + W; ++ch)
      for_channel_blocks(L, pb, ch, [&](int64_t, int64_t, int64_t off, int64_t len) {
        k.plane_grad_input(g + off, x + off, dx + off, len, m[ch], a[ch], b[ch], c[ch]);
      });
    return;
  }
  k.rows_grad_input(g + c0, x + c0, dx + c0, L.per_channel(), W, L.C, m + c0, a + c0, b + c0, c + c0);
}

// Per-channel (mean, m2), stable and deterministic: whole-channel tasks where the layout allows
// (see ChannelGroups), else blocks in memory order -- planar runs, or row chunks -- then a
// per-channel merge in a fixed order.
template <typename T>
void channel_moments(const BatchNormLayout& L, const T* x, double* mean, double* m2) {
  const int64_t C = L.C;
  const ChannelGroups groups(L, /*bytes_per_value=*/0);  // no cache limit: one pass either way
  if (groups.usable) {
    at::parallel_for(0, groups.count, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) group_moments<T>(L, x, groups.start(g), groups.length(g, C), mean, m2);
    });
    return;
  }
  const auto& k = cpu::kernels_for<T>();
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    const int64_t per_c = L.N * pb.splits;
    auto block_count = [&](int64_t r) { return double(pb.length(r % pb.splits, L.S)); };
    // block b = (n * C + c) * splits + s: the blocks in memory order
    std::vector<double> pmean(C * per_c), pm2(C * per_c);
    at::parallel_for(0, C * per_c, std::max<int64_t>(1, kGrainValues / pb.len), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pb.splits, s = b % pb.splits;
        k.plane_stats(x + plane * L.S + pb.start(s), pb.length(s, L.S), &pmean[b], &pm2[b]);
      }
    });
    std::vector<double> bm(per_c), bm2(per_c);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t n = 0; n < L.N; ++n)
        for (int64_t s = 0; s < pb.splits; ++s) {
          bm[n * pb.splits + s] = pmean[(n * C + c) * pb.splits + s];
          bm2[n * pb.splits + s] = pm2[(n * C + c) * pb.splits + s];
        }
      merge_moments(per_c, block_count, bm.data(), bm2.data(), 1, &mean[c], &m2[c]);
    }
    return;
  }
  const int64_t M = L.per_channel(), rows = rows_per_chunk(C), chunks = (M + rows - 1) / rows;
  std::vector<double> pmean(chunks * C), pm2(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<cpu::acc_t<T>> scratch(2 * C);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t r0 = q * rows;
      k.rows_stats(x + r0 * C, std::min(rows, M - r0), C, C, &pmean[q * C], &pm2[q * C], scratch.data());
    }
  });
  auto chunk_count = [&](int64_t q) { return double(std::min(rows, M - q * rows)); };
  for (int64_t c = 0; c < C; ++c) merge_moments(chunks, chunk_count, &pmean[c], &pm2[c], C, &mean[c], &m2[c]);
}

// Walks the layout in memory order: f(offset, length, channel) for planar runs, or
// g(row0, nrows) for row chunks; parallel, each task a contiguous range.
template <typename F, typename G>
void for_each_span(const BatchNormLayout& L, F&& planar_fn, G&& rows_fn) {
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    at::parallel_for(0, L.N * L.C * pb.splits, std::max<int64_t>(1, kGrainValues / pb.len), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pb.splits, s = b % pb.splits;
        planar_fn(plane * L.S + pb.start(s), pb.length(s, L.S), plane % L.C);
      }
    });
  } else {
    const int64_t M = L.per_channel(), rows = rows_per_chunk(L.C);
    at::parallel_for(0, (M + rows - 1) / rows, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) rows_fn(q * rows, std::min(rows, M - q * rows));
    });
  }
}

// Per-channel tensors <-> double vectors, in their own dtype and stride, no temporaries.
std::vector<double> read_channels(const OptTensor& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!t.has_value() || !t->defined()) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "fastbn_read_channels", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t st = t->stride(0);
    for (int64_t c = 0; c < C; ++c) v[c] = double(p[c * st]);
  });
  return v;
}

void write_channels(const Tensor& t, const std::vector<double>& v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastbn_write_channels", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    const int64_t st = t.stride(0);
    for (size_t c = 0; c < v.size(); ++c) p[c * st] = scalar_t(v[c]);
  });
}

Tensor channel_tensor(const std::vector<double>& v, const Tensor& like, at::ScalarType dtype) {
  Tensor t = at::empty({int64_t(v.size())}, like.options().dtype(dtype));
  write_channels(t, v);
  return t;
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
  const std::vector<double> w = read_channels(weight, C, 1.0), b = read_channels(bias, C, 0.0);

  // mean and the biased variance used to normalise, per channel
  std::vector<double> mean(C, 0.0), var(C, 0.0), invstd(C, 0.0);
  if (training && M == 0)  // empty batch: nothing to normalise, running stats untouched (as torch)
    return {out, channel_tensor(mean, input, acc), channel_tensor(var, input, acc)};
  if (!training) {
    mean = read_channels(running_mean, C, 0);
    var = read_channels(running_var, C, 1);
  }
  std::vector<double> m2(C, 0.0);
  bool normalized = false;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_forward", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    T* y = reinterpret_cast<T*>(out.data_ptr<scalar_t>());
    std::vector<A> m(C), scale(C), shift(C);
    auto constants = [&](int64_t c0, int64_t c1) {  // per-channel: invstd, then y = (x - m) * scale + shift
      for (int64_t c = c0; c < c1; ++c) {
        if (training) var[c] = m2[c] / double(M);
        invstd[c] = 1.0 / std::sqrt(var[c] + eps);
        m[c] = A(mean[c]);
        scale[c] = A(w[c] * invstd[c]);
        shift[c] = A(b[c]);
      }
    };
    const ChannelGroups groups(L, sizeof(T));
    if (training && groups.usable) {  // one region: statistics, then normalise from cache
      at::parallel_for(0, groups.count, 1, [&](int64_t g0, int64_t g1) {
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
    if (training) {
      channel_moments<T>(L, x, mean.data(), m2.data());
    }
    constants(0, C);
    if (M == 0) return;
    const auto& k = cpu::kernels_for<T>();
    for_each_span(
        L, [&](int64_t off, int64_t len, int64_t c) { k.plane_normalize(x + off, y + off, len, m[c], scale[c], shift[c]); },
        [&](int64_t r0, int64_t nr) {
          k.rows_normalize(x + r0 * C, y + r0 * C, nr, C, C, m.data(), scale.data(), shift.data());
        });
    normalized = true;
  });
  TORCH_INTERNAL_ASSERT(normalized || M == 0);
  if (training && has_running) {  // running = (1 - momentum) * running + momentum * batch (unbiased var)
    std::vector<double> rm = read_channels(running_mean, C, 0), rv = read_channels(running_var, C, 0);
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = (1 - momentum) * rm[c] + momentum * mean[c];
      rv[c] = (1 - momentum) * rv[c] + momentum * (M > 1 ? m2[c] / double(M - 1) : NAN);
    }
    write_channels(*running_mean, rm);
    write_channels(*running_var, rv);
  }
  return {out, channel_tensor(mean, input, acc), channel_tensor(invstd, input, acc)};
}

// sum(dy) and sum(dy * (x - mean)) per channel, as channel_moments: whole-channel tasks where
// the layout allows, else blocks in memory order summed per channel in a fixed order.
template <typename T>
void grad_sums(const BatchNormLayout& L, const T* g, const T* x, const std::vector<cpu::acc_t<T>>& mu,
               std::vector<double>& sdy, std::vector<double>& sdyxmu) {
  using A = cpu::acc_t<T>;
  const auto& k = cpu::kernels_for<T>();
  const int64_t C = L.C;
  const ChannelGroups groups(L, /*bytes_per_value=*/0);
  if (groups.usable) {
    at::parallel_for(0, groups.count, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t grp = g0; grp < g1; ++grp)
        group_grad_sums<T>(L, g, x, groups.start(grp), groups.length(grp, C), mu.data(), sdy.data(), sdyxmu.data());
    });
    return;
  }
  if (L.planar) {
    const PlaneBlocks pb(L.S);
    const int64_t per_c = L.N * pb.splits;
    std::vector<double> p1(C * per_c), p2(C * per_c);  // block (n * C + c) * splits + s
    at::parallel_for(0, C * per_c, std::max<int64_t>(1, kGrainValues / pb.len), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pb.splits, s = b % pb.splits, off = plane * L.S + pb.start(s);
        k.plane_grad_sums(g + off, x + off, pb.length(s, L.S), mu[plane % C], &p1[b], &p2[b]);
      }
    });
    for (int64_t b = 0; b < C * per_c; ++b) {  // memory order: deterministic
      const int64_t c = (b / pb.splits) % C;
      sdy[c] += p1[b];
      sdyxmu[c] += p2[b];
    }
    return;
  }
  const int64_t M = L.per_channel(), rows = rows_per_chunk(C), chunks = (M + rows - 1) / rows;
  std::vector<A> p1(chunks * C), p2(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t r0 = q * rows;
      k.rows_grad_sums(g + r0 * C, x + r0 * C, std::min(rows, M - r0), C, C, mu.data(), &p1[q * C], &p2[q * C]);
    }
  });
  for (int64_t q = 0; q < chunks; ++q)  // fixed order: deterministic
    for (int64_t c = 0; c < C; ++c) {
      sdy[c] += p1[q * C + c];
      sdyxmu[c] += p2[q * C + c];
    }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_output,
                                                                          const Tensor& input, const Tensor& mean,
                                                                          const Tensor& invstd, const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward_reduce";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  const int64_t C = L.C;
  std::vector<double> sdy(C, 0.0), sdyxmu(C, 0.0);
  if (L.per_channel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_reduce", [&] {
      using T = cpu::kernel_type<scalar_t>;
      using A = cpu::acc_t<T>;
      const std::vector<double> m = read_channels(mean, C, 0);
      grad_sums<T>(L, reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()),
                   reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()), std::vector<A>(m.begin(), m.end()),
                   sdy, sdyxmu);
    });
  }
  // grad_weight = sum(dy * x_hat) = sum(dy * (x - mean)) * invstd;  grad_bias = sum(dy)
  const std::vector<double> is = read_channels(invstd, C, 1);
  std::vector<double> gw(C);
  for (int64_t c = 0; c < C; ++c) gw[c] = sdyxmu[c] * is[c];
  const auto acc = mean.scalar_type();
  const auto pdtype = param_grad_dtype(weight, mean);
  return {channel_tensor(sdy, mean, acc), channel_tensor(sdyxmu, mean, acc), channel_tensor(gw, mean, pdtype),
          channel_tensor(sdy, mean, pdtype)};
}

Tensor batch_norm_backward_input_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                     const Tensor& invstd, const OptTensor& weight, const OptTensor& sum_dy,
                                     const OptTensor& sum_dy_xmu) {
  const char* op = "fastbn.batch_norm_backward_input";
  const bool training =
      check_batch_norm_backward_input_args(op, grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu);
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = grad_output.contiguous(L.format);
  Tensor dx = empty_like_layout(L);
  const int64_t C = L.C, M = L.per_channel();
  if (M == 0) return dx;

  // dx = a * dy - (x - mean) * b - c, with a = weight * invstd and, in training,
  //      b = a * invstd^2 * sum_dy_xmu / M,  c = a * sum_dy / M
  const std::vector<double> w = read_channels(weight, C, 1.0), is = read_channels(invstd, C, 1.0);
  const std::vector<double> s1 = read_channels(sum_dy, C, 0.0), s2 = read_channels(sum_dy_xmu, C, 0.0);
  const std::vector<double> mu = read_channels(mean, C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const auto& k = cpu::kernels_for<T>();
    std::vector<A> m(C), a(C), b(C), c(C);
    for (int64_t j = 0; j < C; ++j) {
      const double aj = w[j] * is[j];
      m[j] = A(mu[j]);
      a[j] = A(aj);
      b[j] = A(aj * is[j] * is[j] * s2[j] / double(M));
      c[j] = A(aj * s1[j] / double(M));
    }
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
    T* d = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
    for_each_span(
        L, [&](int64_t off, int64_t len, int64_t j) { k.plane_grad_input(g + off, x + off, d + off, len, m[j], a[j], b[j], c[j]); },
        [&](int64_t r0, int64_t nr) {
          k.rows_grad_input(g + r0 * C, x + r0 * C, d + r0 * C, nr, C, C, m.data(), a.data(), b.data(), c.data());
        });
  });
  return dx;
}

// All three gradients in training mode. With channel groups the per-channel sums and dx are
// computed in one region (dx re-reads x and dy from cache); otherwise reduce, then input.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& mean, const Tensor& invstd,
                                                           const OptTensor& weight) {
  const char* op = "fastbn.batch_norm_backward";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd, weight);
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t C = L.C, M = L.per_channel();
  const bool fused = M > 0 && ChannelGroups(L, 2 * input.element_size()).usable;
  if (!fused) {
    auto sums = batch_norm_backward_reduce_cpu(grad_output, input, mean, invstd, weight);
    Tensor dx = batch_norm_backward_input_cpu(grad_output, input, mean, invstd, weight, std::get<0>(sums),
                                              std::get<1>(sums));
    return {dx, std::get<2>(sums), std::get<3>(sums)};
  }
  const Tensor dy = grad_output.contiguous(L.format);
  Tensor dx = empty_like_layout(L);
  const std::vector<double> w = read_channels(weight, C, 1.0), is = read_channels(invstd, C, 1.0);
  const std::vector<double> mu = read_channels(mean, C, 0.0);
  std::vector<double> sdy(C), sdyxmu(C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_backward", [&] {
    using T = cpu::kernel_type<scalar_t>;
    using A = cpu::acc_t<T>;
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
    T* d = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
    std::vector<A> m(mu.begin(), mu.end()), a(C), b(C), c(C);
    const ChannelGroups groups(L, 2 * sizeof(T));
    at::parallel_for(0, groups.count, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t c0 = groups.start(grp), W = groups.length(grp, C);
        group_grad_sums<T>(L, g, x, c0, W, m.data(), sdy.data(), sdyxmu.data());
        for (int64_t j = c0; j < c0 + W; ++j) {  // as batch_norm_backward_input_cpu
          const double aj = w[j] * is[j];
          a[j] = A(aj);
          b[j] = A(aj * is[j] * is[j] * sdyxmu[j] / double(M));
          c[j] = A(aj * sdy[j] / double(M));
        }
        group_grad_input<T>(L, g, x, d, c0, W, m.data(), a.data(), b.data(), c.data());
      }
    });
  });
  std::vector<double> gw(C);
  for (int64_t j = 0; j < C; ++j) gw[j] = sdyxmu[j] * is[j];
  const auto pdtype = param_grad_dtype(weight, mean);
  return {dx, channel_tensor(gw, mean, pdtype), channel_tensor(sdy, mean, pdtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace fastbn
