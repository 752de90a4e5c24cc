// The per-entry arithmetic of the PMI-KL row operation, written once and compiled by both
// the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda): the target logit with the soft
// clip, one log-sum-exp merge, the summand and slope of each loss kind with the entry clip,
// and the row statistics. The loss it computes is docs/loss.md; the plain-torch form of the
// same arithmetic is pmi_kernels/backends/plain_torch/row_op.py.
//
// Only exp, log1p, log and tanh's one division differ between the two: the GPU uses its
// special-function unit (as Triton's tl.exp and `/` do), the CPU branch-free polynomials that
// vectorize and an exact division.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define PMI_HD __host__ __device__ __forceinline__
#else
#define PMI_HD inline __attribute__((always_inline))
#endif

namespace pmi {

// Numbered as pmi_kernels/options.py numbers them.
enum LossKind : int { kForwardKL = 0, kReverseKL = 1, kMixedJSD = 2 };
// kappa, the per-row shift of t - r under the soft clip: where it comes from.
enum KappaSource : int { kKappaNone = 0, kKappaGiven = 1, kKappaMean = 2, kKappaLseDiff = 3 };
// Columns of the row statistics: KL(q || p), H(p), H(q) (pmi_kernels.backends.STATS).
constexpr int kStats = 3;
// Columns of the diagnostics rows (pmi_kernels.backends.DIAGNOSTICS).
constexpr int kDiagnostics = 7;

template <typename T>
PMI_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// e^x for x <= 0: every exponent here is a logit minus its row maximum, or -2|x| in tanh.
PMI_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  // x = k ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6 polynomial for e^r (about 1 ulp),
  // with no branch or library call so that loops over it vectorize.
  constexpr float kLowest = -87.33654f;  // below it e^x is no normal float: 0
  const float xc = x < kLowest ? kLowest : x;
  // Round to the nearest integer by adding and removing 1.5 * 2^23.
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return x < kLowest ? 0.0f : y * two_k;
#endif
}

PMI_HD double exp_nonpos(double x) {
  return exp(x);
}

// log(1 + e) for e in [0, 1] (the mixed JSD's log-add-exp).
PMI_HD float log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return __logf(1.0f + e);
#else
  // 2 atanh(f) with f = e / (2 + e) in [0, 1/3]: the series to f^15 is within 1e-8.
  const float f = e / (2.0f + e);
  const float f2 = f * f;
  float p = 1.0f / 15;
  p = p * f2 + 1.0f / 13;
  p = p * f2 + 1.0f / 11;
  p = p * f2 + 1.0f / 9;
  p = p * f2 + 1.0f / 7;
  p = p * f2 + 1.0f / 5;
  p = p * f2 + 1.0f / 3;
  p = p * f2 + 1.0f;
  return 2.0f * f * p;
#endif
}

PMI_HD double log1p_unit(double e) {
  return log1p(e);
}

// The loss options as the kernels use them, in the compute type (fp32, or fp64 for fp64).
template <typename T>
struct Scalars {
  T inv_tau, inv_beta, clip, inv_clip, lam, log_1m_lam, log_lam, entry_clip;
};

// a / b for b in [1, 2]: on the GPU the fast division (MUFU.RCP and a multiply, within 2 ulp,
// as Triton's `/` on fp32), not the IEEE one (a Newton step and a slow-path check); exact on
// the CPU, where the division vectorizes.
PMI_HD float ratio_unit(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

PMI_HD double ratio_unit(double a, double b) {
  return a / b;
}

// tanh(u): through e^(-2|u|) so nothing overflows; below |u| = 1/8, where 1 - e^(-2|u|) would
// cancel (a large clip c makes every u = x / c small), its odd Taylor series to u^11 (relative
// error under 1e-11).
template <typename T>
PMI_HD T tanh_(T u) {
  const T au = u < T(0) ? -u : u;
  const T e = exp_nonpos(T(-2) * au);
  const T u2 = u * u;
  T series = T(-1382.0 / 155925.0);
  series = series * u2 + T(62.0 / 2835.0);
  series = series * u2 + T(-17.0 / 315.0);
  series = series * u2 + T(2.0 / 15.0);
  series = series * u2 + T(-1.0 / 3.0);
  series = series * u2 + T(1);
  const T th = au < T(0.125) ? au * series : ratio_unit(T(1) - e, T(1) + e);
  return u < T(0) ? -th : th;
}

// c * tanh(x / c).
template <typename T>
PMI_HD T soft_clip(T x, T clip, T inv_clip) {
  return clip * tanh_(x * inv_clip);
}

// The target logit g from scaled logits: d is the teacher, or t - r in PMI mode with a
// reference-only stream; base is the anchor, or the student when there is none.
template <typename T>
PMI_HD T target_logit(T d, T base, T kappa, const Scalars<T>& k, bool pmi, bool clip_on) {
  if (!pmi) return d;
  const T delta = clip_on ? soft_clip(d - kappa, k.clip, k.inv_clip) : d;
  return base + delta * k.inv_beta;
}

// A running log-sum-exp: max m and z = sum of e^(x - m).
template <typename T>
struct Lse {
  T m, z;
};

template <typename T>
PMI_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  const T m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<T>()) return {m, T(0)};
  return {m, a.z * exp_nonpos(a.m - m) + b.z * exp_nonpos(b.m - m)};
}

// A finished log-sum-exp of a row: log p_v = (x_v - max) - log_sum, never x_v - (max + log_sum),
// which rounds log_sum away at |x| ~ 1e4 (an fp32 ulp of the max outweighs a runner-up's mass).
template <typename T>
struct RowLse {
  T max, log_sum;
};

// log p_X - log p_Y of one entry from the scaled logits x and y, as the loss forms log p_T - log p_R
// with centering off: (x - y) - (max x - max y) in double, where both differences of float numbers
// are exact, less the log-sums' difference. Formed per stream, (x - max x - log z_x) -
// (y - max y - log z_y) cancels to the logits' ulp where x and y share a confident token at 1e5.
template <typename T>
struct LogRatio {
  double max_diff;
  T log_sum_diff;
  PMI_HD LogRatio(RowLse<T> x, RowLse<T> y)
      : max_diff(double(x.max) - double(y.max)), log_sum_diff(x.log_sum - y.log_sum) {}
  PMI_HD T operator()(T x, T y) const { return T((double(x) - double(y)) - max_diff) - log_sum_diff; }
};

// One entry's loss summand f, its derivative in log p (0 where entry_clip clamps f), p and q.
template <typename T>
struct Terms {
  T f, slope, p, q;
};

// p = e^lp and q = e^lq are given (the CPU kernel keeps them from the log-sum-exp pass).
template <int KIND, bool ENTRY_CLIP, typename T>
PMI_HD Terms<T> summand_and_slope(T lp, T lq, T p, T q, const Scalars<T>& k) {
  T f, slope;
  if (KIND == kForwardKL) {
    f = q * (lq - lp);
    slope = -q;
  } else if (KIND == kReverseKL) {
    f = p * (lp - lq);
    slope = p * (lp - lq + T(1));
  } else {
    const T x = lp + k.log_1m_lam, y = lq + k.log_lam;
    const T diff = x - y;
    const T lm = (x > y ? x : y) + log1p_unit(exp_nonpos(diff < T(0) ? diff : -diff));
    f = k.lam * q * (lq - lm) + (T(1) - k.lam) * p * (lp - lm);
    slope = (T(1) - k.lam) * p * (lp - lm);
  }
  if (ENTRY_CLIP) {
    slope = f > k.entry_clip ? T(0) : slope;
    f = f > k.entry_clip ? k.entry_clip : f;
  }
  return {f, slope, p, q};
}

template <int KIND, bool ENTRY_CLIP, typename T>
PMI_HD Terms<T> summand_and_slope(T lp, T lq, const Scalars<T>& k) {
  return summand_and_slope<KIND, ENTRY_CLIP>(lp, lq, exp_nonpos(lp), exp_nonpos(lq), k);
}

// One entry's share of the row statistics: KL(q || p), H(p), H(q).
template <typename T>
PMI_HD void add_stats(T& kl, T& ent_p, T& ent_q, T lp, T lq, T p, T q) {
  kl += q * (lq - lp);
  ent_p -= p * lp;
  ent_q -= q * lq;
}

}  // namespace pmi
