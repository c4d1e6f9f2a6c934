// BatchNorm on the CPU: the parallel structure around the inner loops of cpu/kernels_impl.inc.
//
// Statistics are computed per block (a run of one channel, or a chunk of rows), two-pass inside
// the block while it sits in cache, and the blocks are merged per channel in a fixed order with
// Chan's formula: numerically stable (no E[x^2] - E[x]^2), one read of the input, and
// deterministic whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace fastbn {
namespace {

constexpr const char* kOp = "fastbn.batch_norm";
constexpr int64_t kPlaneBlock = 4096;   // values of one channel per block (fits L1)
constexpr int64_t kRowsBlock = 16384;   // values per row-chunk in the channels-innermost layout

template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<c10::BFloat16> {
  using type = cpu::bf16;
};

// Running merge of (count, mean, m2) partials (Chan et al.).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double n_ab = n + nb, delta = mean_b - mean;
    mean += delta * nb / n_ab;
    m2 += m2_b + delta * delta * n * nb / n_ab;
    n = n_ab;
  }
};

// How the planar layout is cut: each (n, c) run of S values into `splits` blocks of `len`.
struct PlaneBlocks {
  int64_t splits, len;
  explicit PlaneBlocks(int64_t S) {
    splits = (S + kPlaneBlock - 1) / kPlaneBlock;
    len = (S + splits - 1) / splits;
  }
};

int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kRowsBlock / std::max<int64_t>(C, 1)); }

// Per-channel mean and m2 (sum of squared deviations) over N*S values.
template <typename T>
void channel_moments(const BatchNormLayout& L, const T* x, std::vector<double>& mean,
                     std::vector<double>& m2) {
  const auto& k = cpu::kernels_for<T>();
  const int64_t N = L.N, C = L.C, S = L.S;
  if (L.planar) {
    const PlaneBlocks pb(S);
    const int64_t per_c = N * pb.splits;
    std::vector<double> pmean(C * per_c), pm2(C * per_c);
    const int64_t grain = std::max<int64_t>(1, 32768 / pb.len);
    at::parallel_for(0, C * per_c, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b / per_c, r = b % per_c, n = r / pb.splits, s = r % pb.splits;
        const int64_t start = s * pb.len, len = std::min(pb.len, S - start);
        k.plane_stats(x + (n * C + c) * S + start, len, &pmean[b], &pm2[b]);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments mo;
        for (int64_t r = 0; r < per_c; ++r) {
          const int64_t s = r % pb.splits, len = std::min(pb.len, S - s * pb.len);
          mo.add(double(len), pmean[c * per_c + r], pm2[c * per_c + r]);
        }
        mean[c] = mo.mean;
        m2[c] = mo.m2;
      }
    });
  } else {
    const int64_t M = N * S, rows = rows_per_chunk(C), chunks = (M + rows - 1) / rows;
    std::vector<double> pmean(chunks * C), pm2(chunks * C);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<cpu::acc_t<T>> scratch(2 * C);
      for (int64_t q = k0; q < k1; ++q) {
        const int64_t r0 = q * rows, nr = std::min(rows, M - r0);
        k.rows_stats(x + r0 * C, nr, C, &pmean[q * C], &pm2[q * C], scratch.data());
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments mo;
        for (int64_t q = 0; q < chunks; ++q)
          mo.add(double(std::min(rows, M - q * rows)), pmean[q * C + c], pm2[q * C + c]);
        mean[c] = mo.mean;
        m2[c] = mo.m2;
      }
    });
  }
}

// y = (x - mean) * scale + shift, per channel.
template <typename T>
void normalize(const BatchNormLayout& L, const T* x, T* y, const std::vector<cpu::acc_t<T>>& mean,
               const std::vector<cpu::acc_t<T>>& scale, const std::vector<cpu::acc_t<T>>& shift) {
  const auto& k = cpu::kernels_for<T>();
  const int64_t C = L.C, S = L.S;
  if (L.planar) {
    const PlaneBlocks pb(S);
    const int64_t grain = std::max<int64_t>(1, 32768 / pb.len);
    at::parallel_for(0, L.N * C * pb.splits, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pb.splits, c = plane % C, start = (b % pb.splits) * pb.len;
        const int64_t off = plane * S + start, len = std::min(pb.len, S - start);
        k.plane_normalize(x + off, y + off, len, mean[c], scale[c], shift[c]);
      }
    });
  } else {
    const int64_t M = L.N * S, rows = rows_per_chunk(C);
    at::parallel_for(0, (M + rows - 1) / rows, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r0 = q * rows, nr = std::min(rows, M - r0);
        k.rows_normalize(x + r0 * C, y + r0 * C, nr, C, mean.data(), scale.data(), shift.data());
      }
    });
  }
}

template <typename A>
std::vector<A> to_vector(const Tensor& t) {
  const Tensor d = t.to(at::CppTypeToScalarType<A>::value).contiguous();
  return std::vector<A>(d.data_ptr<A>(), d.data_ptr<A>() + d.numel());
}

template <typename A>
Tensor from_vector(const std::vector<A>& v, const Tensor& like) {
  return at::from_blob(const_cast<A*>(v.data()), {int64_t(v.size())}, at::CppTypeToScalarType<A>::value)
      .to(like.options(), /*non_blocking=*/false, /*copy=*/true);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_cpu(const Tensor& input, const OptTensor& weight,
                                                  const OptTensor& bias, const OptTensor& running_mean,
                                                  const OptTensor& running_var, bool training,
                                                  double momentum, double eps) {
  check_batch_norm_args(kOp, input, weight, bias, running_mean, running_var, training,
                        /*allow_half=*/false);
  const BatchNormLayout L = batch_norm_layout(input);
  const int64_t C = L.C, M = L.per_channel();
  const auto acc = acc_type(input.scalar_type());
  Tensor out = at::empty(L.x.sizes(), L.x.options().memory_format(L.format));
  const bool has_running = running_mean.has_value() && running_mean->defined();

  Tensor save_mean, save_invstd;
  std::vector<double> mean(C), var(C);  // var: the biased variance used to normalise
  if (training) {
    if (M == 0) {  // empty batch: nothing to normalise, running stats untouched (as torch)
      return {out, at::zeros({C}, input.options().dtype(acc)), at::zeros({C}, input.options().dtype(acc))};
    }
    std::vector<double> m2(C);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_stats", [&] {
      using T = typename KernelType<scalar_t>::type;
      channel_moments<T>(L, reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()), mean, m2);
    });
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) {
      var[c] = m2[c] / double(M);
      unbiased[c] = M > 1 ? m2[c] / double(M - 1) : NAN;
    }
    if (has_running) {
      // running = (1 - momentum) * running + momentum * batch (unbiased variance)
      at::NoGradGuard no_grad;
      running_mean->mul_(1 - momentum).add_(from_vector(mean, *running_mean), momentum);
      running_var->mul_(1 - momentum).add_(from_vector(unbiased, *running_var), momentum);
    }
  } else {
    mean = to_vector<double>(*running_mean);
    var = to_vector<double>(*running_var);
  }

  std::vector<double> invstd(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  save_mean = from_vector(mean, at::empty({0}, input.options().dtype(acc)));
  save_invstd = from_vector(invstd, save_mean);
  if (M == 0) return {out, save_mean, save_invstd};

  const std::vector<double> w = to_vector<double>(channel_values(weight, input, 1.0));
  const std::vector<double> b = to_vector<double>(channel_values(bias, input, 0.0));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_normalize", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = cpu::acc_t<T>;
    std::vector<A> m(C), scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = A(mean[c]);
      scale[c] = A(w[c] * invstd[c]);
      shift[c] = A(b[c]);
    }
    normalize<T>(L, reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>()),
                 reinterpret_cast<T*>(out.data_ptr<scalar_t>()), m, scale, shift);
  });
  return {out, save_mean, save_invstd};
}

// grad_output in the same memory layout as the (possibly copied) input.
Tensor match_layout(const Tensor& grad_output, const BatchNormLayout& L) {
  return grad_output.contiguous(L.format);
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(const Tensor& grad_output,
                                                          const Tensor& input, const Tensor& mean,
                                                          const Tensor& invstd) {
  const char* op = "fastbn.batch_norm_backward_reduce";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd);
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = match_layout(grad_output, L);
  const int64_t N = L.N, C = L.C, S = L.S;
  std::vector<double> sdy(C, 0.0), sdyxmu(C, 0.0);
  if (L.per_channel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_reduce", [&] {
      using T = typename KernelType<scalar_t>::type;
      using A = cpu::acc_t<T>;
      const auto& k = cpu::kernels_for<T>();
      const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
      const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
      const std::vector<A> mu = to_vector<A>(mean);
      if (L.planar) {
        const PlaneBlocks pb(S);
        const int64_t per_c = N * pb.splits;
        std::vector<double> p1(C * per_c), p2(C * per_c);
        at::parallel_for(0, C * per_c, std::max<int64_t>(1, 32768 / pb.len), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t c = b / per_c, r = b % per_c, n = r / pb.splits;
            const int64_t start = (r % pb.splits) * pb.len, len = std::min(pb.len, S - start);
            const int64_t off = (n * C + c) * S + start;
            k.plane_grad_sums(g + off, x + off, len, mu[c], &p1[b], &p2[b]);
          }
        });
        for (int64_t c = 0; c < C; ++c)
          for (int64_t r = 0; r < per_c; ++r) {
            sdy[c] += p1[c * per_c + r];
            sdyxmu[c] += p2[c * per_c + r];
          }
      } else {
        const int64_t M = N * S, rows = rows_per_chunk(C), chunks = (M + rows - 1) / rows;
        std::vector<A> p1(chunks * C), p2(chunks * C);
        at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t r0 = q * rows, nr = std::min(rows, M - r0);
            k.rows_grad_sums(g + r0 * C, x + r0 * C, nr, C, mu.data(), &p1[q * C], &p2[q * C]);
          }
        });
        for (int64_t q = 0; q < chunks; ++q)
          for (int64_t c = 0; c < C; ++c) {
            sdy[c] += p1[q * C + c];
            sdyxmu[c] += p2[q * C + c];
          }
      }
    });
  }
  return {from_vector(sdy, mean), from_vector(sdyxmu, mean)};
}

Tensor batch_norm_backward_input_cpu(const Tensor& grad_output, const Tensor& input,
                                     const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                                     const OptTensor& sum_dy, const OptTensor& sum_dy_xmu) {
  const char* op = "fastbn.batch_norm_backward_input";
  check_batch_norm_backward_args(op, grad_output, input, mean, invstd);
  check_channel_tensor(op, "weight", weight, input);
  const bool training = sum_dy.has_value() && sum_dy->defined();
  TORCH_CHECK(training == (sum_dy_xmu.has_value() && sum_dy_xmu->defined()), op,
              ": sum_dy and sum_dy_xmu must both be given (training) or both be None (eval)");
  const BatchNormLayout L = batch_norm_layout(input);
  const Tensor dy = match_layout(grad_output, L);
  Tensor dx = at::empty(L.x.sizes(), L.x.options().memory_format(L.format));
  const int64_t C = L.C, S = L.S, M = L.per_channel();
  if (M == 0) return dx;

  const std::vector<double> w = to_vector<double>(channel_values(weight, input, 1.0));
  const std::vector<double> is = to_vector<double>(invstd);
  std::vector<double> a(C), b(C, 0.0), c(C, 0.0);
  std::vector<double> s1, s2;
  if (training) {
    s1 = to_vector<double>(*sum_dy);
    s2 = to_vector<double>(*sum_dy_xmu);
  }
  for (int64_t j = 0; j < C; ++j) {
    a[j] = w[j] * is[j];
    if (training) {  // dx = a * (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M)
      b[j] = a[j] * is[j] * is[j] * s2[j] / double(M);
      c[j] = a[j] * s1[j] / double(M);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "fastbn_bn_bwd_input", [&] {
    using T = typename KernelType<scalar_t>::type;
    using A = cpu::acc_t<T>;
    const auto& k = cpu::kernels_for<T>();
    const T* x = reinterpret_cast<const T*>(L.x.const_data_ptr<scalar_t>());
    const T* g = reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>());
    T* d = reinterpret_cast<T*>(dx.data_ptr<scalar_t>());
    const std::vector<A> mu = to_vector<A>(mean);
    const std::vector<A> av(a.begin(), a.end()), bv(b.begin(), b.end()), cv(c.begin(), c.end());
    if (L.planar) {
      const PlaneBlocks pb(S);
      at::parallel_for(0, L.N * C * pb.splits, std::max<int64_t>(1, 32768 / pb.len), [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t plane = blk / pb.splits, ch = plane % C, start = (blk % pb.splits) * pb.len;
          const int64_t off = plane * S + start, len = std::min(pb.len, S - start);
          k.plane_grad_input(g + off, x + off, d + off, len, mu[ch], av[ch], bv[ch], cv[ch]);
        }
      });
    } else {
      const int64_t rows = rows_per_chunk(C);
      at::parallel_for(0, (M + rows - 1) / rows, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t r0 = q * rows, nr = std::min(rows, M - r0);
          k.rows_grad_input(g + r0 * C, x + r0 * C, d + r0 * C, nr, C, mu.data(), av.data(),
                            bv.data(), cv.data());
        }
      });
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm", &batch_norm_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input_cpu);
}

}  // namespace fastbn
