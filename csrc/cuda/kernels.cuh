// The CUDA row kernels (backend "cuda"): a block per row streams the vocabulary in passes,
// like the Triton kernel, with 16-byte vector loads where every row is aligned, statistics in
// fp32 (fp64 for fp64) registers, warp-shuffle and shared-memory reductions, 64-bit offsets,
// the gradient written in place (it may alias the student logits: each thread reads an entry
// before it writes it). The per-entry arithmetic is csrc/include/pmi_math.h, shared with the
// CPU kernel. Each rows_<dtype>.cu instantiates these templates for one input dtype.
//
// On Hopper (sm_90) a row may instead be split over a thread-block cluster (launch_rows's
// cluster size, PMI_KERNELS_CUDA_CLUSTER): each block streams its slice of the vocabulary, and
// the row's statistics are merged through distributed shared memory between passes. A later
// pass then re-reads a slice that was read moments before, from L2 rather than HBM: one block
// per row keeps ~264 rows in flight, whose passes are ~1.2 MB apart at V = 152k (past L2).
//
//   0. kappa, when the soft clip needs it and it is not given: mean(t - r), or with centering
//      off the rows' maxima and log-sums of t and r (TargetShift)
//   1. log-sum-exp of the student s and the target g
//   2. loss, sum of slopes, row statistics; forward KL writes (p - q) * scale
//   3. other losses: grad = (slope - p * sum of slopes) * scale
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <type_traits>
#include <utility>

#include "../include/rows_args.h"

namespace pmi {
namespace cuda {

constexpr int kWarp = 32;
// Threads per row (block): enough to stream a 152k-entry row with 16-byte loads while the
// registers of two blocks fit an SM; fp64's registers are twice as wide: half as many.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarp;
template <typename In>
constexpr int kMaxThreadsFor = sizeof(In) == 8 ? kMaxThreads / 2 : kMaxThreads;
// Two blocks per SM: bytes in flight for a streaming kernel. Stated, ptxas fits the kernels in
// the registers that leaves without spilling (left to itself it spilled a few bytes).
constexpr int kMinBlocksPerSM = 2;
// The widest block reduction: the diagnostics' eight sums.
constexpr int kMaxSums = 8;

template <typename In>
using Acc = std::conditional_t<std::is_same_v<In, double>, double, float>;

// Entries of In per 16-byte load.
template <typename In>
constexpr int kVec = 16 / sizeof(In);

template <typename T, typename In>
__device__ __forceinline__ T to_acc(In x) {
  if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<In, __half>) {
    return __half2float(x);
  } else {
    return static_cast<T>(x);
  }
}

template <typename In, typename T>
__device__ __forceinline__ In from_acc(T x) {
  if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else if constexpr (std::is_same_v<In, __half>) {
    return __float2half_rn(x);
  } else {
    return static_cast<In>(x);
  }
}

// N entries of a row from v on, times scale. N > 1: one 16-byte load (the row is aligned).
template <int N, typename In, typename T>
__device__ __forceinline__ void load(const In* row, int64_t v, T scale, T (&out)[N]) {
  if constexpr (N > 1) {
    static_assert(N * sizeof(In) == 16, "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(row + v);
    const In* e = reinterpret_cast<const In*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_acc<T>(e[i]) * scale;
  } else {
    out[0] = to_acc<T>(row[v]) * scale;
  }
}

template <int N, typename In, typename T>
__device__ __forceinline__ void store(In* row, int64_t v, const T (&x)[N]) {
  if constexpr (N > 1) {
    uint4 raw;
    In* e = reinterpret_cast<In*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_acc<In>(x[i]);
    *reinterpret_cast<uint4*>(row + v) = raw;
  } else {
    row[v] = from_acc<In>(x[0]);
  }
}

// f(v, N) for every group of N entries of a row's entries [lo, hi) (lo a multiple of VEC): the
// block's threads take 16-byte groups in turn (VEC > 1), then single entries for the tail.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_group(int64_t lo, int64_t hi, F&& f) {
  const int64_t full = VEC > 1 ? lo + (hi - lo) / VEC * VEC : lo;
  for (int64_t v = lo + int64_t(threadIdx.x) * VEC; v < full; v += int64_t(blockDim.x) * VEC) {
    f(v, std::integral_constant<int, VEC>{});
  }
  for (int64_t v = full + threadIdx.x; v < hi; v += blockDim.x) f(v, std::integral_constant<int, 1>{});
}

template <int VEC, typename F>
__device__ __forceinline__ void for_each_group(int64_t V, F&& f) {
  for_each_group<VEC>(0, V, f);
}

// The log-sum-exp of N values, to merge into a running one.
template <int N, typename T>
__device__ __forceinline__ Lse<T> group_lse(const T (&x)[N]) {
  T m = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) m = x[i] > m ? x[i] : m;
  T z = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) z += exp_nonpos(x[i] - m);
  return {m, z};
}

// Sums K values over the block; every thread returns with the totals. The butterfly gives all
// lanes the same bits, and every thread adds the warps' sums in the same order.
template <int K, typename T>
__device__ void block_sum(T (&x)[K], T* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = kWarp / 2; o > 0; o /= 2) x[k] += __shfl_xor_sync(0xffffffffu, x[k], o);
    if (lane == 0) smem[warp * K + k] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T total = 0;
    for (int w = 0; w < warps; ++w) total += smem[w * K + k];
    x[k] = total;
  }
  __syncthreads();
}

// Merges K running log-sum-exps over the block, as block_sum does sums.
template <int K, typename T>
__device__ void block_lse(Lse<T> (&x)[K], T* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const Lse<T> other{__shfl_xor_sync(0xffffffffu, x[k].m, o), __shfl_xor_sync(0xffffffffu, x[k].z, o)};
      x[k] = lse_merge(x[k], other);
    }
    if (lane == 0) {
      smem[(warp * K + k) * 2] = x[k].m;
      smem[(warp * K + k) * 2 + 1] = x[k].z;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    Lse<T> total{neg_inf<T>(), T(0)};
    for (int w = 0; w < warps; ++w) total = lse_merge(total, Lse<T>{smem[(w * K + k) * 2], smem[(w * K + k) * 2 + 1]});
    x[k] = total;
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ RowLse<T> finish(Lse<T> x) {
  return {x.m, log(x.z)};
}

// The part of a row one block takes: the whole row, or its slice of a row split over a cluster
// (slices of whole 16-byte groups, in rank order).
struct Slice {
  int64_t row, lo, hi;
  int rank, blocks;  // the block's rank in the row's cluster, and the cluster's blocks (1: none)
};

__device__ __forceinline__ Slice row_slice(int64_t V, int vec) {
  int blocks = 1, rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  blocks = int(cluster.num_blocks());
  rank = int(cluster.block_rank());
#endif
  const int64_t per = ((V + blocks - 1) / blocks + vec - 1) / vec * vec;
  const int64_t lo = rank * per < V ? rank * per : V;
  return {int64_t(blockIdx.x) / blocks, lo, lo + per < V ? lo + per : V, rank, blocks};
}

// Merges K per-block values (equal in every thread of a block) over the row's cluster: every
// thread of every block returns with the merge of the blocks' values in rank order, so all get
// the same bits. xchg: 2 * K of the block's shared memory; merge(a, b) merges two values,
// merge.put and merge.get write and read one in xchg.
template <int K, typename V, typename T, typename Merge>
__device__ void cluster_merge(V (&x)[K], T* xchg, int blocks, Merge merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) merge.put(xchg + 2 * k, x[k]);
  }
  cluster.sync();  // every block's values written (and visible: release, acquire)
#pragma unroll
  for (int k = 0; k < K; ++k) {
    V total = merge.get(cluster.map_shared_rank(xchg, 0) + 2 * k);
    for (int b = 1; b < blocks; ++b) total = merge(total, merge.get(cluster.map_shared_rank(xchg, b) + 2 * k));
    x[k] = total;
  }
  cluster.sync();  // every block done reading: none leaves, or writes xchg again, before
#endif
}

template <typename T>
struct SumMerge {
  __device__ T operator()(T a, T b) const { return a + b; }
  __device__ void put(T* p, T x) const { p[0] = x; }
  __device__ T get(const T* p) const { return p[0]; }
};

template <typename T>
struct LseMerge {
  __device__ Lse<T> operator()(Lse<T> a, Lse<T> b) const { return lse_merge(a, b); }
  __device__ void put(T* p, Lse<T> x) const { p[0] = x.m, p[1] = x.z; }
  __device__ Lse<T> get(const T* p) const { return {p[0], p[1]}; }
};

// Sums over the row: the block's part (block_sum), then the cluster's when the row is split.
template <int K, typename T>
__device__ void row_sum(T (&x)[K], T* smem, T* xchg, const Slice& slice) {
  block_sum(x, smem);
  if (slice.blocks > 1) cluster_merge(x, xchg, slice.blocks, SumMerge<T>{});
}

template <int K, typename T>
__device__ void row_lse(Lse<T> (&x)[K], T* smem, T* xchg, const Slice& slice) {
  block_lse(x, smem);
  if (slice.blocks > 1) cluster_merge(x, xchg, slice.blocks, LseMerge<T>{});
}

// One row's input streams, already offset to the row.
template <typename In>
struct Row {
  const In *s, *t, *r, *a;
};

// What the soft clip's argument subtracts from d: kappa, the centering mean of t - r or given;
// with centering off (log_ratio), d = Δ = log p_T - log p_R up to kappa = log z_t - log z_r,
// summed as (t - r) - max_diff in double with max_diff = max t - max r: both differences of
// float numbers are exact there, where in float they would cancel to the logits' ulp at
// |x| ~ 1e5 (one stream's logit far above the other's, or both far above the rest).
template <typename T>
struct TargetShift {
  T kappa;
  double max_diff;
  bool log_ratio;
};

// The scaled student s, d (the teacher, or t - r in PMI mode: TargetShift), and the target's
// base (the anchor, or s) for N entries from v on.
template <int N, typename In, typename T>
__device__ __forceinline__ void load_streams(const Row<In>& row, int64_t v, T inv_tau, bool pmi,
                                             const TargetShift<T>& shift, T (&s)[N], T (&d)[N], T (&base)[N]) {
  load<N>(row.s, v, inv_tau, s);
  load<N>(row.t, v, inv_tau, d);
  if (pmi && row.r != nullptr) {
    T r[N];
    load<N>(row.r, v, inv_tau, r);
    if (shift.log_ratio) {
#pragma unroll
      for (int i = 0; i < N; ++i) d[i] = T((double(d[i]) - double(r[i])) - shift.max_diff);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) d[i] -= r[i];
    }
  }
  if (row.a != nullptr) {
    load<N>(row.a, v, inv_tau, base);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) base[i] = s[i];
  }
}

// One row's streams, offset to the row, from a launch's arguments.
template <typename In>
__device__ __forceinline__ Row<In> row_streams(const RowsArgs& a, int64_t row) {
  const auto at = [row](const void* p, int64_t stride) {
    return p ? static_cast<const In*>(p) + row * stride : nullptr;
  };
  return {at(a.s, a.stride_s), at(a.t, a.stride_t), at(a.r, a.stride_r), at(a.a, a.stride_a)};
}

// f(i, log p, log q, loss terms) for each of N entries from v on, once the log-sum-exps are
// known (a callback, so that each entry's values are used at once and not kept in registers).
template <int KIND, bool ENTRY_CLIP, int N, typename In, typename T, typename F>
__device__ __forceinline__ void group_terms(const Row<In>& in, int64_t v, const Scalars<T>& k,
                                            const TargetShift<T>& shift, bool pmi, bool clip_on, RowLse<T> ls,
                                            RowLse<T> lg, F&& f) {
  T s[N], g[N], base[N];
  load_streams<N>(in, v, k.inv_tau, pmi, shift, s, g, base);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const T lp = (s[i] - ls.max) - ls.log_sum;
    const T lq = (target_logit(g[i], base[i], shift.kappa, k, pmi, clip_on) - lg.max) - lg.log_sum;
    f(i, lp, lq, summand_and_slope<KIND, ENTRY_CLIP>(lp, lq, k));
  }
}

// The row operation on one row per block, or per cluster (row_slice). `a` is the launch's
// arguments with grad and stats already cleared where this phase writes none (launch_rows).
template <typename In, int VEC, int KIND, bool ENTRY_CLIP>
__global__ void __launch_bounds__(kMaxThreadsFor<In>, kMinBlocksPerSM)
    pmi_rows_kernel(const RowsArgs a, const Scalars<Acc<In>> k) {
  using T = Acc<In>;
  __shared__ T smem[kMaxWarps * kMaxSums];
  __shared__ T xchg[2 * kMaxSums];  // what the blocks of a row's cluster read of each other's
  const int64_t V = a.vocab;
  const Slice slice = row_slice(V, VEC);
  const int64_t row = slice.row;
  const bool writes_row = threadIdx.x == 0 && slice.rank == 0;  // the row's loss, statistics
  const int phase = a.phase;
  const bool pmi = a.options.pmi, clip_on = a.options.clip_on();
  const Row<In> in = row_streams<In>(a, row);
  In* grad = a.grad ? static_cast<In*>(a.grad) + row * a.stride_grad : nullptr;
  T* loss = static_cast<T*>(a.loss);
  T* stats = a.stats ? static_cast<T*>(a.stats) + row * kStats : nullptr;
  T* lse_out = a.lse_out ? static_cast<T*>(a.lse_out) + row * 4 : nullptr;
  T* slope_out = a.slope_sum_out ? static_cast<T*>(a.slope_sum_out) + row : nullptr;

  if (a.mask != nullptr && !a.mask[row]) {
    if (grad) for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      T zero[decltype(n)::value] = {};
      store(grad, v, zero);
    });
    if (writes_row) {
      loss[row] = 0;
      if (stats) for (int j = 0; j < kStats; ++j) stats[j] = 0;
      if (lse_out) {  // no mass here
        lse_out[0] = lse_out[2] = neg_inf<T>();
        lse_out[1] = lse_out[3] = 0;
      }
      if (slope_out) *slope_out = 0;
    }
    return;
  }

  TargetShift<T> shift{0, 0.0, false};
  const int kappa_source = a.options.kappa_source(a.kappa != nullptr);
  if (kappa_source == kKappaGiven) {
    shift.kappa = static_cast<const T*>(a.kappa)[row];
  } else if (kappa_source == kKappaMean) {
    T sum[1] = {0};
    for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      constexpr int N = decltype(n)::value;
      T d[N];
      load<N>(in.t, v, k.inv_tau, d);
      if (in.r != nullptr) {  // else t already holds t - r
        T r[N];
        load<N>(in.r, v, k.inv_tau, r);
#pragma unroll
        for (int i = 0; i < N; ++i) d[i] -= r[i];
      }
#pragma unroll
      for (int i = 0; i < N; ++i) sum[0] += d[i];
    });
    row_sum(sum, smem, xchg, slice);
    shift.kappa = sum[0] / T(V);
  } else if (kappa_source == kKappaLseDiff) {
    Lse<T> tr[2] = {{neg_inf<T>(), T(0)}, {neg_inf<T>(), T(0)}};
    for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      constexpr int N = decltype(n)::value;
      T t[N], r[N];
      load<N>(in.t, v, k.inv_tau, t);
      load<N>(in.r, v, k.inv_tau, r);
      tr[0] = lse_merge(tr[0], group_lse(t));
      tr[1] = lse_merge(tr[1], group_lse(r));
    });
    row_lse(tr, smem, xchg, slice);
    shift = {log(tr[0].z) - log(tr[1].z), double(tr[0].m) - double(tr[1].m), true};
  }

  RowLse<T> ls, lg;
  if (phase == kPhaseAll || phase == kPhaseLse) {
    // Pass 1: the log-sum-exps of s and g.
    Lse<T> sg[2] = {{neg_inf<T>(), T(0)}, {neg_inf<T>(), T(0)}};
    for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      constexpr int N = decltype(n)::value;
      T s[N], g[N], base[N];
      load_streams<N>(in, v, k.inv_tau, pmi, shift, s, g, base);
#pragma unroll
      for (int i = 0; i < N; ++i) g[i] = target_logit(g[i], base[i], shift.kappa, k, pmi, clip_on);
      sg[0] = lse_merge(sg[0], group_lse(s));
      sg[1] = lse_merge(sg[1], group_lse(g));
    });
    row_lse(sg, smem, xchg, slice);
    if (phase == kPhaseLse) {  // this shard's (max, sum of exp) of s and g
      if (writes_row) {
        lse_out[0] = sg[0].m, lse_out[1] = sg[0].z, lse_out[2] = sg[1].m, lse_out[3] = sg[1].z;
        loss[row] = 0;
      }
      return;
    }
    ls = finish(sg[0]);
    lg = finish(sg[1]);
  } else {  // the whole vocabulary's (max, log sum of exp), gathered from every shard
    const T* lse_in = static_cast<const T*>(a.lse_in) + row * 4;
    ls = {lse_in[0], lse_in[1]};
    lg = {lse_in[2], lse_in[3]};
  }
  T scale = k.inv_tau;
  if (a.row_scale != nullptr) scale *= static_cast<const T*>(a.row_scale)[row * a.stride_row_scale];

  // Pass 2: loss, sum of slopes, statistics; forward KL's gradient.
  const bool fast = grad != nullptr && a.options.fast_grad();
  T sums[2 + kStats] = {0, 0, 0, 0, 0};
  if (phase == kPhaseGrad) {
    sums[1] = static_cast<const T*>(a.slope_sum_in)[row];
  } else {
    for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      constexpr int N = decltype(n)::value;
      T out[N];
      group_terms<KIND, ENTRY_CLIP, N>(in, v, k, shift, pmi, clip_on, ls, lg,
                                       [&](int i, T lp, T lq, const Terms<T>& e) {
                                         sums[0] += e.f;
                                         sums[1] += e.slope;
                                         if (stats) add_stats(sums[2], sums[3], sums[4], lp, lq, e.p, e.q);
                                         out[i] = (e.p - e.q) * scale;
                                       });
      if (fast) store(grad, v, out);
    });
    row_sum(sums, smem, xchg, slice);
  }

  // Pass 3: grad = (slope - p * sum of slopes) * scale.
  if (grad != nullptr && !fast) {
    const T slope_sum = sums[1];
    for_each_group<VEC>(slice.lo, slice.hi, [&](int64_t v, auto n) {
      constexpr int N = decltype(n)::value;
      T out[N];
      group_terms<KIND, ENTRY_CLIP, N>(in, v, k, shift, pmi, clip_on, ls, lg,
                                       [&](int i, T, T, const Terms<T>& e) { out[i] = (e.slope - e.p * slope_sum) * scale; });
      store(grad, v, out);
    });
  }
  if (writes_row) {
    loss[row] = sums[0];  // 0 in the gradient-only phase
    if (stats) for (int j = 0; j < kStats; ++j) stats[j] = sums[2 + j];
    if (slope_out) *slope_out = sums[1];
  }
}

// The diagnostics of one row in four passes: the log-sum-exps of s, t and r; the
// decomposition's dot products, KL(p_T || p_S), H(p) and sum(t - r); the target's
// log-sum-exp; KL(q || p) and H(q). out: pmi_kernels.backends.DIAGNOSTICS order.
template <typename In, int VEC>
__global__ void __launch_bounds__(kMaxThreadsFor<In>, kMinBlocksPerSM)
    pmi_diagnostics_kernel(const DiagnosticsArgs a, const Scalars<Acc<In>> k) {
  using T = Acc<In>;
  __shared__ T smem[kMaxWarps * kMaxSums];
  const int64_t row = blockIdx.x, V = a.vocab;
  const bool clip_on = a.options.clip_on();
  const auto at = [row](const void* p, int64_t stride) {
    return p ? static_cast<const In*>(p) + row * stride : nullptr;
  };
  const Row<In> in{at(a.s, a.stride_s), at(a.t, a.stride_t), at(a.r, a.stride_r), at(a.a, a.stride_a)};

  Lse<T> str[3] = {{neg_inf<T>(), T(0)}, {neg_inf<T>(), T(0)}, {neg_inf<T>(), T(0)}};
  for_each_group<VEC>(V, [&](int64_t v, auto n) {
    constexpr int N = decltype(n)::value;
    T s[N], t[N], r[N];
    load<N>(in.s, v, k.inv_tau, s);
    load<N>(in.t, v, k.inv_tau, t);
    load<N>(in.r, v, k.inv_tau, r);
    str[0] = lse_merge(str[0], group_lse(s));
    str[1] = lse_merge(str[1], group_lse(t));
    str[2] = lse_merge(str[2], group_lse(r));
  });
  block_lse(str, smem);
  const RowLse<T> ls = finish(str[0]), lt = finish(str[1]), lr = finish(str[2]);

  // total, ref and pmi as the loss forms log p_T - log p_R with centering off (load_streams).
  const LogRatio<T> total_of(lt, ls), ref_of(lr, ls), pmi_of(lt, lr);
  // tt, rr, tr, ii, ti: the dot products of total, ref and pmi; then KL(p_T || p_S), H(p), sum(t - r).
  T sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for_each_group<VEC>(V, [&](int64_t v, auto n) {
    constexpr int N = decltype(n)::value;
    T s[N], t[N], r[N];
    load<N>(in.s, v, k.inv_tau, s);
    load<N>(in.t, v, k.inv_tau, t);
    load<N>(in.r, v, k.inv_tau, r);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const T lp = (s[i] - ls.max) - ls.log_sum, ltv = (t[i] - lt.max) - lt.log_sum;
      const T total = total_of(t[i], s[i]), ref = ref_of(r[i], s[i]), pmi_part = pmi_of(t[i], r[i]);
      sums[0] += total * total;
      sums[1] += ref * ref;
      sums[2] += total * ref;
      sums[3] += pmi_part * pmi_part;
      sums[4] += total * pmi_part;
      sums[5] += exp_nonpos(ltv) * total;
      sums[6] -= exp_nonpos(lp) * lp;
      sums[7] += t[i] - r[i];
    }
  });
  block_sum(sums, smem);
  const TargetShift<T> shift = a.options.center
                                   ? TargetShift<T>{sums[7] / T(V), 0.0, false}
                                   : TargetShift<T>{lt.log_sum - lr.log_sum, double(lt.max) - double(lr.max), true};

  Lse<T> g_lse[1] = {{neg_inf<T>(), T(0)}};
  for_each_group<VEC>(V, [&](int64_t v, auto n) {
    constexpr int N = decltype(n)::value;
    T s[N], g[N], base[N];
    load_streams<N>(in, v, k.inv_tau, true, shift, s, g, base);
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] = target_logit(g[i], base[i], shift.kappa, k, true, clip_on);
    g_lse[0] = lse_merge(g_lse[0], group_lse(g));
  });
  block_lse(g_lse, smem);
  const RowLse<T> lg = finish(g_lse[0]);

  T target[2] = {0, 0};  // KL(q || p), H(q)
  for_each_group<VEC>(V, [&](int64_t v, auto n) {
    constexpr int N = decltype(n)::value;
    T s[N], g[N], base[N];
    load_streams<N>(in, v, k.inv_tau, true, shift, s, g, base);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      g[i] = target_logit(g[i], base[i], shift.kappa, k, true, clip_on);
      const T lp = (s[i] - ls.max) - ls.log_sum, lq = (g[i] - lg.max) - lg.log_sum;
      const T q = exp_nonpos(lq);
      target[0] += q * (lq - lp);
      target[1] -= q * lq;
    }
  });
  block_sum(target, smem);

  if (threadIdx.x == 0) {
    const T tiny = std::numeric_limits<T>::min();
    const T norm_t = sqrt(sums[0]), norm_r = sqrt(sums[1]), norm_i = sqrt(sums[3]);
    T* out = static_cast<T*>(a.out) + row * kDiagnostics;
    out[0] = sums[2] / max(norm_t * norm_r, tiny);
    out[1] = sums[4] / max(norm_t * norm_i, tiny);
    out[2] = norm_r / max(norm_t, tiny);
    out[3] = sums[5];
    out[4] = target[0];
    out[5] = sums[6];
    out[6] = target[1];
  }
}

// Threads per block: enough to cover a row once with 16-byte groups, a multiple of a warp.
template <typename In>
int threads_for(int64_t vocab, int vec) {
  int threads = kWarp;
  while (threads < kMaxThreadsFor<In> && int64_t(threads) * vec < vocab) threads *= 2;
  return threads;
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether every row of every stream starts on a 16-byte boundary.
template <typename In>
bool rows_aligned(std::initializer_list<std::pair<const void*, int64_t>> streams) {
  for (const auto& [ptr, stride] : streams) {
    if (ptr != nullptr && (!aligned16(ptr) || (stride * int64_t(sizeof(In))) % 16 != 0)) return false;
  }
  return true;
}

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// The blocks each row is split over: PMI_KERNELS_CUDA_CLUSTER (1, 2, 4, 8 or 16; unset: 1, a
// block per row) on a device with clusters (sm_90), else 1; -1 for a value it cannot be.
inline int cluster_blocks(int64_t rows) {
  const char* env = std::getenv("PMI_KERNELS_CUDA_CLUSTER");
  if (env == nullptr || *env == '\0') return 1;
  char* end = nullptr;
  const long wanted = std::strtol(env, &end, 10);
  if (*end != '\0' || (wanted != 1 && wanted != 2 && wanted != 4 && wanted != 8 && wanted != 16)) return -1;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9 ||
      rows * wanted > INT32_MAX) {
    return 1;
  }
  return int(wanted);
}

// kernel<<<rows * blocks, threads>>>(args...) in clusters of `blocks` (1: no cluster; also
// where the device cannot co-schedule such a cluster of the kernel's blocks).
template <typename... Params, typename... Args>
void launch_split(void (*kernel)(Params...), int64_t rows, int blocks, int threads, cudaStream_t stream,
                  Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(rows * blocks));
  config.blockDim = dim3(unsigned(threads));
  config.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = unsigned(blocks);
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = 1;
  int fits = 0;  // clusters of the kernel's blocks the device can hold at once
  if (blocks > 1) {
    const bool allowed =  // past 8 blocks, a cluster size Hopper allows but does not promise
        blocks <= 8 || cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (!allowed || cudaOccupancyMaxActiveClusters(&fits, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // not an error of the launch: it runs unsplit
      fits = 0;
    }
  }
  if (fits == 0) {
    config.gridDim = dim3(unsigned(rows));
    config.numAttrs = 0;
  }
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename In>
const char* launch_rows(const RowsArgs& args, cudaStream_t stream) {
  using T = Acc<In>;
  const LossOptions& o = args.options;
  RowsArgs a = args;
  // Within the phases, only forward KL's gradient is written before the slopes are summed.
  const int phase = a.phase;
  if (phase == kPhaseLse || (phase == kPhaseFromLse && !o.fast_grad())) a.grad = nullptr;
  if (phase != kPhaseAll && phase != kPhaseFromLse) a.stats = nullptr;
  const bool vec = rows_aligned<In>({{a.s, a.stride_s}, {a.t, a.stride_t}, {a.r, a.stride_r}, {a.a, a.stride_a},
                                     {a.grad, a.stride_grad}});
  const int blocks = cluster_blocks(a.rows);
  if (blocks < 0) return "PMI_KERNELS_CUDA_CLUSTER must be 1, 2, 4, 8 or 16";
  const Scalars<T> k = o.scalars<T>();
  auto go = [&](auto vec_c, auto kind_c, auto clip_c) {
    constexpr int VEC = decltype(vec_c)::value;
    const int threads = threads_for<In>((a.vocab + blocks - 1) / blocks, VEC);
    launch_split(pmi_rows_kernel<In, VEC, decltype(kind_c)::value, decltype(clip_c)::value>, a.rows, blocks,
                 threads, stream, a, k);
  };
  auto kinds = [&](auto vec_c, auto clip_c) {
    using std::integral_constant;
    switch (o.loss_kind()) {
      case kForwardKL: return go(vec_c, integral_constant<int, kForwardKL>{}, clip_c);
      case kReverseKL: return go(vec_c, integral_constant<int, kReverseKL>{}, clip_c);
      default: return go(vec_c, integral_constant<int, kMixedJSD>{}, clip_c);
    }
  };
  auto clips = [&](auto vec_c) {
    return o.entry_clip_on() ? kinds(vec_c, std::true_type{}) : kinds(vec_c, std::false_type{});
  };
  if (vec) {
    clips(std::integral_constant<int, kVec<In>>{});
  } else {
    clips(std::integral_constant<int, 1>{});
  }
  return last_error();
}

template <typename In>
const char* launch_diagnostics(const DiagnosticsArgs& a, cudaStream_t stream) {
  const Scalars<Acc<In>> k = a.options.scalars<Acc<In>>();
  if (rows_aligned<In>({{a.s, a.stride_s}, {a.t, a.stride_t}, {a.r, a.stride_r}, {a.a, a.stride_a}})) {
    pmi_diagnostics_kernel<In, kVec<In>><<<a.rows, threads_for<In>(a.vocab, kVec<In>), 0, stream>>>(a, k);
  } else {
    pmi_diagnostics_kernel<In, 1><<<a.rows, threads_for<In>(a.vocab, 1), 0, stream>>>(a, k);
  }
  return last_error();
}

}  // namespace cuda
}  // namespace pmi

// Explicit instantiations, one input dtype per translation unit (they compile in parallel).
#define PMI_INSTANTIATE_CUDA_KERNELS(In)                                                           \
  template const char* pmi::cuda::launch_rows<In>(const pmi::RowsArgs&, cudaStream_t);             \
  template const char* pmi::cuda::launch_diagnostics<In>(const pmi::DiagnosticsArgs&, cudaStream_t);
