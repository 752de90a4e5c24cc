// The CPU row kernels' bodies. rows.cpp includes this file twice, into namespaces compiled for
// baseline x86-64 and for AVX2 + FMA, and picks one at run time (no include guard on purpose).
//
// Rows run in parallel (at::parallel_for). Each row is read once into scratch rows in the
// compute type (the scaled student S, the target G, and their exponentials), which stay in the
// core's cache while the passes over them run; every inner loop is a plain loop over arrays that the compiler
// vectorizes (#pragma omp simd, whose reductions are the only reassociation allowed). Sums run
// in blocks of kSumBlock entries whose sums then add in order in double, so their rounding
// error grows with kSumBlock, not n, and a row's many tiny terms are not lost beside a large
// one (a confident row: a sum of exps near 1 plus 150k terms of 1e-11).

constexpr int64_t kSumBlock = 256;

template <typename T, typename F>
T blocked_sum(int64_t n, F&& f) {
  double total = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    T part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t v = b0; v < b1; ++v) part += f(v);
    total += part;
  }
  return T(total);
}

template <typename T>
T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < n; ++v) m = x[v] > m ? x[v] : m;
  return m;
}

template <typename T>
T row_sum(const T* x, int64_t n) {
  return blocked_sum<T>(n, [&](int64_t v) { return x[v]; });
}

// The log-sum-exp of a row: log p = (x - max) - log_sum.
template <typename T>
RowLse<T> row_lse(const T* x, int64_t n) {
  const T m = row_max(x, n);
  return {m, std::log(blocked_sum<T>(n, [&](int64_t v) { return exp_nonpos(x[v] - m); }))};
}

// The same, keeping e^(x - max) in e and returning 1 / sum too: the softmax is then e * inv_sum,
// one multiplication instead of another exponential.
template <typename T>
RowLse<T> row_lse_keeping_exps(const T* x, T* e, int64_t n, T& inv_sum) {
  const T m = row_max(x, n);
  const T sum = blocked_sum<T>(n, [&](int64_t v) { return e[v] = exp_nonpos(x[v] - m); });
  inv_sum = T(1) / sum;
  return {m, std::log(sum)};
}

// log-sum-exp of a raw row times `scale`, as row_lse gives it, without a scratch row.
template <typename In, typename T>
RowLse<T> raw_lse(const In* x, int64_t n, T scale) {
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < n; ++v) {
    const T y = to_compute<T>(x[v]) * scale;
    m = y > m ? y : m;
  }
  return {m, std::log(blocked_sum<T>(n, [&](int64_t v) { return exp_nonpos(to_compute<T>(x[v]) * scale - m); }))};
}

template <typename In, typename T>
void scale_into(T* out, const In* x, int64_t n, T scale) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) out[v] = to_compute<T>(x[v]) * scale;
}

template <typename In, typename T>
void difference_into(T* out, const In* x, const In* y, int64_t n, T scale) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) out[v] = to_compute<T>(x[v]) * scale - to_compute<T>(y[v]) * scale;
}

// out = (x - y) - max_diff, x and y scaled, summed in double: with max_diff = max x - max y,
// log p_T - log p_R up to the log-sums' difference. Both differences of float numbers are exact
// in double; in float they would cancel to the logits' ulp where |x| ~ 1e5 (one stream's logit
// far above the other's, or both far above the rest).
template <typename In, typename T>
void log_ratio_into(T* out, const In* x, const In* y, int64_t n, T scale, double max_diff) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    out[v] = T((double(to_compute<T>(x[v]) * scale) - double(to_compute<T>(y[v]) * scale)) - max_diff);
  }
}

// G <- the target logits, from G holding d (t, or t - r) and the base (anchor, or S). The
// branches are hoisted out of the loops, which then vectorize.
template <bool CLIP, typename In, typename T>
void target_loop(T* G, const T* S, const In* a, int64_t n, T kappa, const Scalars<T>& k) {
  if (a != nullptr) {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) G[v] = target_logit(G[v], to_compute<T>(a[v]) * k.inv_tau, kappa, k, true, CLIP);
  } else {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) G[v] = target_logit(G[v], S[v], kappa, k, true, CLIP);
  }
}

template <typename In, typename T>
void target_into(T* G, const T* S, const In* a, int64_t n, T kappa, const Scalars<T>& k, bool clip_on) {
  if (clip_on) {
    target_loop<true>(G, S, a, n, kappa, k);
  } else {
    target_loop<false>(G, S, a, n, kappa, k);
  }
}

// The loss pass, with Es, Eg = e^(S - max), e^(G - max): {loss, sum of slopes}, and the statistics
// when STATS. Leaves in S the gradient p - q when FAST (forward KL), else p in S and the slope in G.
template <int KIND, bool ENTRY_CLIP, bool STATS, bool FAST, typename T>
void loss_pass(T* S, T* G, const T* Es, const T* Eg, int64_t n, RowLse<T> ls, RowLse<T> lg, T inv_zs, T inv_zg,
               const Scalars<T>& k, T (&result)[2], T (&stats)[kStats]) {
  double total[2 + kStats] = {0};
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    T loss = 0, slope_sum = 0, kl = 0, ent_p = 0, ent_q = 0;
#pragma omp simd reduction(+ : loss, slope_sum, kl, ent_p, ent_q)
    for (int64_t v = b0; v < b1; ++v) {
      const T lp = (S[v] - ls.max) - ls.log_sum, lq = (G[v] - lg.max) - lg.log_sum;
      const Terms<T> e = summand_and_slope<KIND, ENTRY_CLIP>(lp, lq, Es[v] * inv_zs, Eg[v] * inv_zg, k);
      loss += e.f;
      slope_sum += e.slope;
      if (STATS) add_stats(kl, ent_p, ent_q, lp, lq, e.p, e.q);
      if (FAST) {
        S[v] = e.p - e.q;
      } else {
        S[v] = e.p;
        G[v] = e.slope;
      }
    }
    const T part[2 + kStats] = {loss, slope_sum, kl, ent_p, ent_q};
    for (int j = 0; j < 2 + kStats; ++j) total[j] += part[j];
  }
  for (int j = 0; j < 2; ++j) result[j] = T(total[j]);
  for (int j = 0; j < kStats; ++j) stats[j] = T(total[2 + j]);
}

template <typename T, typename F>
void with_loss_kind(int kind, bool entry_clip, bool stats, bool fast, F&& f) {
  using std::integral_constant;
  auto kinds = [&](auto clip_c, auto stats_c) {
    if (fast) return f(integral_constant<int, kForwardKL>{}, clip_c, stats_c, std::true_type{});
    if (kind == kForwardKL) return f(integral_constant<int, kForwardKL>{}, clip_c, stats_c, std::false_type{});
    if (kind == kReverseKL) return f(integral_constant<int, kReverseKL>{}, clip_c, stats_c, std::false_type{});
    return f(integral_constant<int, kMixedJSD>{}, clip_c, stats_c, std::false_type{});
  };
  auto clips = [&](auto stats_c) {
    return entry_clip ? kinds(std::true_type{}, stats_c) : kinds(std::false_type{}, stats_c);
  };
  return stats ? clips(std::true_type{}) : clips(std::false_type{});
}

template <typename In, typename T>
void zero_row(In* grad, int64_t n) {
  for (int64_t v = 0; v < n; ++v) grad[v] = from_compute<In>(T(0));
}

// exp(x - m) into e, with m the whole vocabulary's maximum (a shard's entries are <= it).
template <typename T>
void exps_into(T* e, const T* x, int64_t n, T m) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) e[v] = exp_nonpos(x[v] - m);
}

template <typename In, typename T>
void rows_typed(const RowsArgs& args) {
  const LossOptions& o = args.options;
  const Scalars<T> k = o.scalars<T>();
  const int64_t n = args.vocab;
  const int kappa_source = o.kappa_source(args.kappa != nullptr);
  const int phase = args.phase;
  // Within the phases, only forward KL's gradient is written before the slopes are summed.
  const bool write_grad = args.grad != nullptr && phase != kPhaseLse && (phase != kPhaseFromLse || o.fast_grad());
  const bool fast = write_grad && o.fast_grad();
  T* loss_out = static_cast<T*>(args.loss);
  T* stats_out = phase == kPhaseAll || phase == kPhaseFromLse ? static_cast<T*>(args.stats) : nullptr;
  const T* lse_in = static_cast<const T*>(args.lse_in);
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(4 * n);
    T *S = scratch.data(), *G = S + n, *Es = G + n, *Eg = Es + n;
    for (int64_t row = begin; row < end; ++row) {
      const In* s = static_cast<const In*>(args.s) + row * args.stride_s;
      const In* t = static_cast<const In*>(args.t) + row * args.stride_t;
      const In* r = args.r ? static_cast<const In*>(args.r) + row * args.stride_r : nullptr;
      const In* a = args.a ? static_cast<const In*>(args.a) + row * args.stride_a : nullptr;
      In* grad = write_grad ? static_cast<In*>(args.grad) + row * args.stride_grad : nullptr;
      loss_out[row] = 0;
      if (args.mask != nullptr && !args.mask[row]) {
        if (stats_out) std::fill(stats_out + row * kStats, stats_out + (row + 1) * kStats, T(0));
        if (grad) zero_row<In, T>(grad, n);
        if (args.lse_out) {  // no mass here
          T* out = static_cast<T*>(args.lse_out) + row * 4;
          out[0] = out[2] = neg_inf<T>();
          out[1] = out[3] = 0;
        }
        if (args.slope_sum_out) static_cast<T*>(args.slope_sum_out)[row] = 0;
        continue;
      }
      // Everything is read before anything is written: grad may alias s.
      scale_into(S, s, n, k.inv_tau);
      T kappa = 0;
      if (kappa_source == kKappaLseDiff) {
        // Centering off: Δ = log p_T - log p_R, G <- (t - r) - (max t - max r), kappa the log-sums'.
        const RowLse<T> lt = raw_lse(t, n, k.inv_tau), lr = raw_lse(r, n, k.inv_tau);
        log_ratio_into(G, t, r, n, k.inv_tau, double(lt.max) - double(lr.max));
        kappa = lt.log_sum - lr.log_sum;
      } else if (o.pmi && r != nullptr) {
        difference_into(G, t, r, n, k.inv_tau);
      } else {
        scale_into(G, t, n, k.inv_tau);
      }
      if (kappa_source == kKappaGiven) {
        kappa = static_cast<const T*>(args.kappa)[row];
      } else if (kappa_source == kKappaMean) {
        kappa = row_sum(G, n) / T(n);
      }
      if (o.pmi) target_into(G, S, a, n, kappa, k, o.clip_on());
      T inv_zs, inv_zg;
      RowLse<T> ls, lg;
      if (phase == kPhaseAll || phase == kPhaseLse) {
        ls = row_lse_keeping_exps(S, Es, n, inv_zs);
        lg = row_lse_keeping_exps(G, Eg, n, inv_zg);
        if (phase == kPhaseLse) {  // this shard's (max, sum of exp) of s and g
          T* out = static_cast<T*>(args.lse_out) + row * 4;
          out[0] = ls.max, out[1] = T(1) / inv_zs, out[2] = lg.max, out[3] = T(1) / inv_zg;
          continue;
        }
      } else {  // the whole vocabulary's (max, log sum of exp), gathered from every shard
        const T* in = lse_in + row * 4;
        ls = {in[0], in[1]};
        lg = {in[2], in[3]};
        exps_into(Es, S, n, ls.max);
        exps_into(Eg, G, n, lg.max);
        inv_zs = std::exp(-ls.log_sum);
        inv_zg = std::exp(-lg.log_sum);
      }
      T sums[2], stats[kStats];
      with_loss_kind<T>(o.loss_kind(), o.entry_clip_on(), stats_out != nullptr, fast, [&](auto kind, auto clip,
                                                                                           auto with_stats, auto f) {
        loss_pass<decltype(kind)::value, decltype(clip)::value, decltype(with_stats)::value, decltype(f)::value>(
            S, G, Es, Eg, n, ls, lg, inv_zs, inv_zg, k, sums, stats);
      });
      if (phase != kPhaseGrad) {
        loss_out[row] = sums[0];
        if (stats_out) std::copy(stats, stats + kStats, stats_out + row * kStats);
        if (args.slope_sum_out) static_cast<T*>(args.slope_sum_out)[row] = sums[1];
      }
      if (grad == nullptr) continue;
      T scale = k.inv_tau;
      if (args.row_scale) scale *= static_cast<const T*>(args.row_scale)[row * args.stride_row_scale];
      if (fast) {
#pragma omp simd
        for (int64_t v = 0; v < n; ++v) grad[v] = from_compute<In>(S[v] * scale);
      } else {
        const T slope_sum = phase == kPhaseGrad ? static_cast<const T*>(args.slope_sum_in)[row] : sums[1];
#pragma omp simd
        for (int64_t v = 0; v < n; ++v) grad[v] = from_compute<In>((G[v] - S[v] * slope_sum) * scale);
      }
    }
  });
}

// The diagnostics of one row in four passes over scratch rows: the three log-sum-exps; the
// decomposition's dot products with the entropy and KL of the teacher; the target; its KL
// and entropy. out: backends.DIAGNOSTICS order.
template <typename In, typename T>
void diagnostics_typed(const DiagnosticsArgs& args) {
  const LossOptions& o = args.options;
  const Scalars<T> k = o.scalars<T>();
  const int64_t n = args.vocab;
  const T tiny = std::numeric_limits<T>::min();
  T* out_all = static_cast<T*>(args.out);
  at::parallel_for(0, args.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(3 * n);
    T *S = scratch.data(), *Tt = S + n, *R = Tt + n;
    for (int64_t row = begin; row < end; ++row) {
      const In* a = args.a ? static_cast<const In*>(args.a) + row * args.stride_a : nullptr;
      scale_into(S, static_cast<const In*>(args.s) + row * args.stride_s, n, k.inv_tau);
      scale_into(Tt, static_cast<const In*>(args.t) + row * args.stride_t, n, k.inv_tau);
      scale_into(R, static_cast<const In*>(args.r) + row * args.stride_r, n, k.inv_tau);
      const RowLse<T> ls = row_lse(S, n), lt = row_lse(Tt, n), lr = row_lse(R, n);
      // total, ref and pmi as rows_typed forms log p_T - log p_R (log_ratio_into).
      const LogRatio<T> total_of(lt, ls), ref_of(lr, ls), pmi_of(lt, lr);
      // tt, rr, tr, ii, ti: the dot products of total, ref and pmi; then KL(p_T || p_S), H(p), sum(t - r).
      double sums[8] = {0};
      for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
        const int64_t b1 = std::min(n, b0 + kSumBlock);
        T tt = 0, rr = 0, tr = 0, ii = 0, ti = 0, kl_ts = 0, ent_p = 0, sum_d = 0;
#pragma omp simd reduction(+ : tt, rr, tr, ii, ti, kl_ts, ent_p, sum_d)
        for (int64_t v = b0; v < b1; ++v) {
          const T lp = (S[v] - ls.max) - ls.log_sum, ltv = (Tt[v] - lt.max) - lt.log_sum;
          const T total = total_of(Tt[v], S[v]), ref = ref_of(R[v], S[v]), pmi_part = pmi_of(Tt[v], R[v]);
          tt += total * total;
          rr += ref * ref;
          tr += total * ref;
          ii += pmi_part * pmi_part;
          ti += total * pmi_part;
          kl_ts += exp_nonpos(ltv) * total;
          ent_p -= exp_nonpos(lp) * lp;
          sum_d += Tt[v] - R[v];
        }
        const T part[8] = {tt, rr, tr, ii, ti, kl_ts, ent_p, sum_d};
        for (int j = 0; j < 8; ++j) sums[j] += part[j];
      }
      const T tt = T(sums[0]), rr = T(sums[1]), tr = T(sums[2]), ii = T(sums[3]), ti = T(sums[4]),
              kl_ts = T(sums[5]), ent_p = T(sums[6]), sum_d = T(sums[7]);
      // Tt <- t - r less the centering mean, or log p_T - log p_R as rows_typed forms it; then the
      // target logits.
      const T kappa = o.center ? sum_d / T(n) : lt.log_sum - lr.log_sum;
      const double max_diff = o.center ? 0.0 : double(lt.max) - double(lr.max);
#pragma omp simd
      for (int64_t v = 0; v < n; ++v) Tt[v] = T((double(Tt[v]) - double(R[v])) - max_diff);
      target_into(Tt, S, a, n, kappa, k, o.clip_on());
      const RowLse<T> lg = row_lse(Tt, n);
      const T kl_qp = blocked_sum<T>(n, [&](int64_t v) {
        const T lp = (S[v] - ls.max) - ls.log_sum, lq = (Tt[v] - lg.max) - lg.log_sum;
        return exp_nonpos(lq) * (lq - lp);
      });
      const T ent_q = -blocked_sum<T>(n, [&](int64_t v) {
        const T lq = (Tt[v] - lg.max) - lg.log_sum;
        return exp_nonpos(lq) * lq;
      });
      const T norm_t = std::sqrt(tt), norm_r = std::sqrt(rr), norm_i = std::sqrt(ii);
      T* out = out_all + row * kDiagnostics;
      out[0] = tr / std::max(norm_t * norm_r, tiny);
      out[1] = ti / std::max(norm_t * norm_i, tiny);
      out[2] = norm_r / std::max(norm_t, tiny);
      out[3] = kl_ts;
      out[4] = kl_qp;
      out[5] = ent_p;
      out[6] = ent_q;
    }
  });
}
