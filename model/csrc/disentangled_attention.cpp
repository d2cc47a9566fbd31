// DeBERTa's disentangled attention as one fused CPU kernel, forward and backward
// (`attention_impl = "fused"`; model/attention_fused.py is the Python side).
//
// He, Liu, Gao, Chen, arXiv 2006.03654, eq. 2-4, with the V2/V3 log-bucketed relative
// positions. For batch x head n, query i, key j, distance r = i - j and w(r) the row of the
// relative window that r uses:
//
//   s[i, j] = scale q_i . k_j + c2p[i, w(r)] + p2c[j, w(r)]      (padded keys: -1e30)
//   o_i     = sum_j dropout(softmax_j s[i, :]) v_j
//
// c2p = q PK^T and p2c = k PQ^T (PK, PQ: the S window rows' position keys and queries of the
// head, scaled) are tile GEMMs inside the kernel, gathered by w(r): p2c (L, S) once per n,
// c2p (block, S) per query block. One task per n (heads x B of them, spread over ATen's
// intra-op threads) walks its queries in blocks of `block` rows, so the score memory is a
// (block, L) fp32 tile and an (L, S) table per thread, never an (N, L, L) or (N, L, S)
// tensor. Within a block the softmax is exact over all L keys (no online rescaling needed at
// this tile size). The tile products run on fp32 copies of the task's operands through
// ATen's batch-reduce GEMM, at::native::cpublas::brgemm, on raw row-major pointers (oneDNN's
// ukernel picks the ISA at run time; see `Gemm`); the gather, mask, softmax and dropout
// loops are compiled for AVX2.
//
// Backward recomputes P from the saved row log-sum-exp. One task owns all of n, so dk, dv
// and the position-table gradients d c2p[i, w] and d p2c[j, w] (sums of dS over the pairs
// whose distance uses row w) accumulate without atomics; they go back through the tile
// GEMMs into dq, dk and d PK, d PQ per n (summed over the batch by the caller).
//
// Dropout: pair (i, j) of n is kept when hash(seed, n, i L + j) >= p 2^32 (a counter-based
// hash, so backward regenerates the forward's mask without storing it); `keep_mask` returns
// it for tests.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr float MASKED = -1.0e30f;  // score of a padded key

using Vec = at::vec::Vectorized<float>;

inline uint32_t mix32(uint32_t x) {  // an invertible avalanche step (xorshift-multiply)
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t key0 = 0, key1 = 0, threshold = 0;
  float keep_scale = 1.0f;

  Dropout(double p, int64_t seed, int64_t n) {
    on = p > 0.0;
    if (!on) return;
    const uint64_t s = static_cast<uint64_t>(seed);
    key0 = mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(n) + 0x9e3779b9u));
    key1 = mix32(static_cast<uint32_t>(s >> 32) + mix32(key0 ^ static_cast<uint32_t>(n)));
    threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
    keep_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  // multiplier of pair counter c = i L + j: keep_scale when kept, 0 when dropped
  inline float factor(uint32_t c) const {
    return mix32(mix32(c ^ key0) + key1) >= threshold ? keep_scale : 0.0f;
  }
};

// Scores of query rows [i0, i0 + m) against all keys, in place over tile (m, L) that holds
// q k^T: scale, + c2p (the block's rows, (m, S)) and p2c ((L, S)) gathered by distance row,
// padded keys masked.
void add_position_terms(float* tile, int64_t i0, int64_t m, int64_t L, int64_t S, float scale,
                        const float* c2p, const float* p2c, const int32_t* rev,
                        const int8_t* kmask) {
  using IVec = at::vec::Vectorized<int32_t>;
  constexpr int64_t W = Vec::size();
  const int32_t S32 = static_cast<int32_t>(S);  // L S < 2^31 (L <= 65535, S <= 2k)
  const IVec lane_rows = IVec::arange(0, S32);  // row offsets j S of W consecutive keys
  const Vec vscale(scale);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    float* s = tile + r * L;
    const float* c2p_i = c2p + r * S;
    const int32_t* w = rev + (L - 1 - i);  // w[j] = row of distance i - j
    int64_t j = 0;
    for (; j + W <= L; j += W) {  // AVX2 gathers: c2p along the row, p2c down the keys
      const IVec wj = IVec::loadu(w + j);
      const IVec at_key = wj + lane_rows + IVec(static_cast<int32_t>(j) * S32);
      const Vec c = at::vec::gather<sizeof(float)>(c2p_i, wj);
      const Vec p = at::vec::gather<sizeof(float)>(p2c, at_key);
      (Vec::loadu(s + j) * vscale + c + p).store(s + j);
    }
    for (; j < L; ++j) s[j] = s[j] * scale + c2p_i[w[j]] + p2c[j * S + w[j]];
    if (kmask != nullptr) {
      for (int64_t jj = 0; jj < L; ++jj) s[jj] = kmask[jj] ? s[jj] : MASKED;
    }
  }
}

// p = exp(s - shift) over a row of length L, vectorised; returns the sum.
inline float exp_row(float* s, int64_t L, float shift) {
  const Vec vshift(shift);
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= L; j += Vec::size()) {
    Vec e = (Vec::loadu(s + j) - vshift).exp_u20();
    e.store(s + j);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < L; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

inline float row_max(const float* s, int64_t L) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) m = std::max(m, s[j]);
  return m;
}

// What a task thread needs before calling ATen ops: OpenMP workers do not inherit the
// caller's thread-local grad mode or autocast state, so both are switched off here. And
// denormals flush to zero while the task runs (restored after): far-off softmax
// probabilities and their products underflow into the denormal range, where x86 arithmetic
// is tens of times slower; values below 1.2e-38 change no result at fp32 tolerance.
struct TaskGuards {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
#if defined(__SSE__)
  const unsigned int csr = _mm_getcsr();
  TaskGuards() { _mm_setcsr(csr | 0x8040); }  // FTZ | DAZ
  ~TaskGuards() { _mm_setcsr(csr); }
#endif
};

struct Problem {  // shapes and scalars shared by forward and backward
  int64_t N, L, D, S, B, block;  // block: query rows per tile
  float scale;
  double drop;
  int64_t seed;
};

// Tile products in the GEMM dtype (fp32, or bf16 on CPUs whose bf16 GEMMs are faster; the
// caller decides), with fp32 results and accumulators either way. fp32 products whose three
// operands are row-major (unit column stride) go to ATen's batch-reduce GEMM
// (at::native::cpublas::brgemm: oneDNN's ukernel, chosen for the CPU at run time, or
// torch's fallback where there is none) on raw pointers: no dispatch, no allocation, and
// 1.2x the MKL sgemm behind at::mm at tile size (64 x 512 x 64: 37 vs 46 us, one thread, this
// session's AVX-512 EPYC). The rest (bf16 tiles, a CPU or torch build where brgemm fails
// its check) stay at::mm.
struct Gemm {
  at::ScalarType dtype;
  bool use_brgemm;  // brgemm_usable(), asked once on the calling thread
  at::Tensor cast(const at::Tensor& x) const {
    return x.scalar_type() == dtype ? x : x.to(dtype);
  }
  static bool row_major(const at::Tensor& x) { return x.size(1) == 1 || x.stride(1) == 1; }
  bool brgemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool add) const {
    if (!use_brgemm || dtype != at::kFloat || a.scalar_type() != at::kFloat ||
        b.scalar_type() != at::kFloat || !row_major(out) || !row_major(a) || !row_major(b))
      return false;
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    at::native::cpublas::brgemm(M, N, K, a.stride(0), b.stride(0), out.stride(0), add,
                                a.data_ptr<float>(), b.data_ptr<float>(),
                                out.data_ptr<float>(), /*is_vnni=*/false);
    return true;
  }
  void into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {  // out = a b
    if (brgemm(out, a, b, false)) return;
    if (dtype == at::kFloat) {
      at::mm_out(out, a, b);
    } else {
      out.copy_(at::mm(cast(a), cast(b)));
    }
  }
  void add(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) const {  // acc += a b
    if (brgemm(acc, a, b, true)) return;
    if (dtype == at::kFloat) {
      acc.addmm_(a, b);
    } else {
      acc.add_(at::mm(cast(a), cast(b)));
    }
  }
};

// Whether torch's fp32 brgemm runs and agrees with at::mm here: checked once per process on
// a small product of fixed values (no RNG drawn), so that a CPU or a torch build without it
// falls back to at::mm instead of failing.
bool brgemm_usable() {
  static const bool ok = [] {
    const TaskGuards guards;  // no autocast: the reference product stays fp32
    try {
      const at::Tensor a = at::arange(8 * 16, at::kFloat).reshape({8, 16}).div_(64);
      const at::Tensor b = at::arange(16 * 24, at::kFloat).reshape({16, 24}).div_(-96);
      at::Tensor c = at::empty({8, 24});
      at::native::cpublas::brgemm(8, 24, 16, 16, 24, 24, false, a.data_ptr<float>(),
                                  b.data_ptr<float>(), c.data_ptr<float>(), false);
      return at::allclose(c, at::mm(a, b), 1e-5, 1e-5);
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// The task's operands in the GEMM dtype: q, k, v of n and the window's position
// queries/keys of its head.
struct TaskTensors {
  at::Tensor q, k, v, pq, pk;
  at::Tensor kt, vt, pqt, pkt;  // the transposes, row-major (the right operands of q k^T, ...)
  TaskTensors(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
              const at::Tensor& pos_q, const at::Tensor& pos_k, int64_t n, int64_t B,
              const Gemm& g)
      : q(g.cast(q_[n])),
        k(g.cast(k_[n])),
        v(g.cast(v_[n])),
        pq(g.cast(pos_q[n / B])),
        pk(g.cast(pos_k[n / B])),
        kt(k.t().contiguous()),
        vt(v.t().contiguous()),
        pqt(pq.t().contiguous()),
        pkt(pk.t().contiguous()) {}
};

void forward_task(const Problem& pb, int64_t n, const TaskTensors& t, const Gemm& gemm,
                  const int32_t* rev, const int8_t* kmask, at::Tensor& out, float* lse) {
  const int64_t L = pb.L, S = pb.S;
  const auto opts = t.q.options().dtype(at::kFloat);
  at::Tensor tile = at::empty({pb.block, L}, opts), c2p = at::empty({pb.block, S}, opts);
  at::Tensor p2c = at::empty({L, S}, opts);
  gemm.into(p2c, t.k, t.pqt);  // (L, S): k_j against every window row
  at::Tensor of = at::empty({L, pb.D}, opts);
  const Dropout dropout(pb.drop, pb.seed, n);
  const int8_t* km = kmask ? kmask + (n % pb.B) * L : nullptr;
  for (int64_t i0 = 0; i0 < L; i0 += pb.block) {
    const int64_t m = std::min(pb.block, L - i0);
    at::Tensor st = tile.narrow(0, 0, m), ct = c2p.narrow(0, 0, m);
    const at::Tensor q_blk = t.q.narrow(0, i0, m);
    gemm.into(st, q_blk, t.kt);  // q k^T
    gemm.into(ct, q_blk, t.pkt);  // c2p rows of the block
    float* ts = st.data_ptr<float>();
    add_position_terms(ts, i0, m, L, S, pb.scale, ct.data_ptr<float>(), p2c.data_ptr<float>(),
                       rev, km);
    for (int64_t r = 0; r < m; ++r) {
      float* s = ts + r * L;
      const float mx = row_max(s, L);
      const float sum = exp_row(s, L, mx);
      lse[n * L + i0 + r] = mx + std::log(sum);
      const float inv = 1.0f / sum;
      const uint32_t c0 = static_cast<uint32_t>((i0 + r) * L);
      if (dropout.on) {
        for (int64_t j = 0; j < L; ++j) s[j] *= inv * dropout.factor(c0 + j);
      } else {
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
      }
    }
    at::Tensor o_blk = of.narrow(0, i0, m);
    gemm.into(o_blk, st, t.v);  // dropout(P) v
  }
  out[n].copy_(of);
}

// One query block of backward: tile holds the scores, dtile dP = dO v^T; on return tile
// holds dropout(P) and dtile scale dS (the c2c term's gradient factor, folded in here so
// the dq and dk products need no alpha), dc2p (m, S) the block's d c2p and dp2c (L, S) has
// the block's sums (of unscaled dS) added.
void softmax_backward_block(const Problem& pb, int64_t n, int64_t i0, int64_t m, float* tile,
                            float* dtile, const float* lse, const int32_t* rev, float* dc2p,
                            float* dp2c) {
  const int64_t L = pb.L, S = pb.S;
  const Dropout dropout(pb.drop, pb.seed, n);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    float* p = tile + r * L;
    float* dp = dtile + r * L;
    exp_row(p, L, lse[n * L + i]);  // P from the saved log-sum-exp
    const uint32_t c0 = static_cast<uint32_t>(i * L);
    float delta = 0.0f;  // sum_j P dP' = rowsum of dO * o
    if (dropout.on) {
      for (int64_t j = 0; j < L; ++j) dp[j] *= dropout.factor(c0 + j);  // through dropout
    }
    for (int64_t j = 0; j < L; ++j) delta += p[j] * dp[j];
    for (int64_t j = 0; j < L; ++j) dp[j] = p[j] * (dp[j] - delta);  // dS
    float* dc2p_r = dc2p + r * S;
    const int32_t* w = rev + (L - 1 - i);
    for (int64_t j = 0; j < L; ++j) {
      const float ds = dp[j];
      dc2p_r[w[j]] += ds;
      dp2c[j * S + w[j]] += ds;
      dp[j] = ds * pb.scale;
    }
    if (dropout.on) {
      for (int64_t j = 0; j < L; ++j) p[j] *= dropout.factor(c0 + j);
    }
  }
}

struct Grads {  // backward's outputs; dpq, dpk per n (N, S, d) fp32, summed over B outside
  at::Tensor dq, dk, dv, dpq, dpk;
};

void backward_task(const Problem& pb, int64_t n, const TaskTensors& t, const Gemm& gemm,
                   const int32_t* rev, const int8_t* kmask, const at::Tensor& dout,
                   const float* lse, Grads& g) {
  const int64_t L = pb.L, S = pb.S;
  const auto opts = t.q.options().dtype(at::kFloat);
  const at::Tensor dog = gemm.cast(dout[n]);
  // the gradients that are sums over query blocks of (block rows)^T products accumulate
  // transposed, (d, L) and (d, S), so that every operand of those products is row-major
  const at::Tensor dot = dog.t().contiguous(), qt = t.q.t().contiguous();  // (d, L)
  at::Tensor tile = at::empty({pb.block, L}, opts), dtile = at::empty({pb.block, L}, opts);
  at::Tensor c2p = at::empty({pb.block, S}, opts), dc2p = at::empty({pb.block, S}, opts);
  at::Tensor p2c = at::empty({L, S}, opts);
  gemm.into(p2c, t.k, t.pqt);  // (L, S), recomputed
  at::Tensor dp2c = at::zeros({L, S}, opts);
  at::Tensor dqf = at::empty({L, pb.D}, opts);
  at::Tensor dkt = at::zeros({pb.D, L}, opts), dvt = at::zeros({pb.D, L}, opts);
  at::Tensor dpkt = at::zeros({pb.D, S}, opts);  // d PK^T, accumulated over the query blocks
  const int8_t* km = kmask ? kmask + (n % pb.B) * L : nullptr;
  for (int64_t i0 = 0; i0 < L; i0 += pb.block) {
    const int64_t m = std::min(pb.block, L - i0);
    at::Tensor st = tile.narrow(0, 0, m), dt = dtile.narrow(0, 0, m);
    at::Tensor ct = c2p.narrow(0, 0, m), dct = dc2p.narrow(0, 0, m);
    const at::Tensor q_blk = t.q.narrow(0, i0, m), do_blk = dog.narrow(0, i0, m);
    const at::Tensor qt_blk = qt.narrow(1, i0, m), dot_blk = dot.narrow(1, i0, m);  // (d, m)
    gemm.into(st, q_blk, t.kt);
    gemm.into(ct, q_blk, t.pkt);
    add_position_terms(st.data_ptr<float>(), i0, m, L, S, pb.scale, ct.data_ptr<float>(),
                       p2c.data_ptr<float>(), rev, km);
    gemm.into(dt, do_blk, t.vt);  // dO v^T
    dct.zero_();
    softmax_backward_block(pb, n, i0, m, st.data_ptr<float>(), dt.data_ptr<float>(), lse, rev,
                           dct.data_ptr<float>(), dp2c.data_ptr<float>());
    const at::Tensor ds = gemm.cast(dt), dsc = gemm.cast(dct);  // scale dS, d c2p
    gemm.add(dvt, dot_blk, st);  // dv^T += dO^T dropout(P)
    gemm.add(dkt, qt_blk, ds);  // dk^T += q^T scale dS
    at::Tensor dq_blk = dqf.narrow(0, i0, m);
    gemm.into(dq_blk, dsc, t.pk);  // d c2p PK
    gemm.add(dq_blk, ds, t.k);  // + scale dS k
    gemm.add(dpkt, qt_blk, dsc);  // d PK^T += q^T d c2p
  }
  const at::Tensor dp2c_g = gemm.cast(dp2c);
  at::Tensor dkf = dkt.t().contiguous();
  gemm.add(dkf, dp2c_g, t.pq);  // + d p2c PQ
  at::Tensor dpqt = at::empty({pb.D, S}, opts);
  gemm.into(dpqt, t.kt, dp2c_g);  // d PQ^T = k^T d p2c
  g.dq[n].copy_(dqf);
  g.dk[n].copy_(dkf);
  g.dv[n].copy_(dvt.t());
  g.dpq[n].copy_(dpqt.t());
  g.dpk[n].copy_(dpkt.t());
}

Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& pos_q, const at::Tensor& pos_k, const at::Tensor& rev,
                     const c10::optional<at::Tensor>& kmask, double scale, double drop,
                     int64_t seed, int64_t block) {
  TORCH_CHECK(block >= 1, "block must be >= 1");
  TORCH_CHECK(q.device().is_cpu(), "fused disentangled attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must be (N, L, d) of one shape");
  TORCH_CHECK(pos_q.dim() == 3 && pos_q.sizes() == pos_k.sizes() &&
                  q.size(0) % pos_q.size(0) == 0 && pos_q.size(2) == q.size(2),
              "pos_q, pos_k must be (heads, S, d) with N = heads x B");
  const int64_t L = q.size(1);
  TORCH_CHECK(L <= 65535, "sequence length ", L, " > 65535 (32-bit dropout counters)");
  TORCH_CHECK(rev.scalar_type() == at::kInt && rev.numel() == 2 * L - 1,
              "distance rows must be int32 (2L - 1,)");
  const int64_t S = pos_q.size(1);
  const int64_t lo = rev.min().item<int32_t>(), hi = rev.max().item<int32_t>();
  TORCH_CHECK(lo >= 0 && hi < S, "distance rows outside the window's ", S, " rows");
  for (const at::Tensor* t : {&q, &k, &v, &pos_q, &pos_k, &rev})
    TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
  const int64_t B = q.size(0) / pos_q.size(0);
  if (kmask.has_value()) {
    TORCH_CHECK(kmask->scalar_type() == at::kChar && kmask->dim() == 2 &&
                    kmask->size(0) == B && kmask->size(1) == L && kmask->is_contiguous(),
                "key mask must be int8 (B, L), N = heads x B");
  }
  TORCH_CHECK(drop >= 0.0 && drop < 1.0, "dropout must be in [0, 1)");
  return Problem{q.size(0), L, q.size(2), S, B, block, static_cast<float>(scale), drop, seed};
}

}  // namespace

// o (N, L, d) in q's dtype and the rows' log-sum-exp (N, L) fp32. pos_q, pos_k: the window
// rows' position queries and keys (heads, S, d), scaled; `rev` lists the window row of
// distance r = i - j at index (L - 1) - r (rows for distances L-1 .. -(L-1)).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& pos_q, const at::Tensor& pos_k,
                                const at::Tensor& rev, const c10::optional<at::Tensor>& kmask,
                                double scale, double drop, int64_t seed, int64_t block,
                                bool bf16_tiles) {
  const Problem pb = check_inputs(q, k, v, pos_q, pos_k, rev, kmask, scale, drop, seed, block);
  const Gemm gemm{bf16_tiles ? at::kBFloat16 : at::kFloat, brgemm_usable()};
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({pb.N, pb.L}, q.options().dtype(at::kFloat));
  const int8_t* km = kmask.has_value() ? kmask->data_ptr<int8_t>() : nullptr;
  at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
    const TaskGuards guards;
    for (int64_t n = begin; n < end; ++n) {
      const TaskTensors t(q, k, v, pos_q, pos_k, n, pb.B, gemm);
      forward_task(pb, n, t, gemm, rev.data_ptr<int32_t>(), km, out, lse.data_ptr<float>());
    }
  });
  return {out, lse};
}

// dq, dk, dv (in q's dtype) and d pos_q, d pos_k per batch x head (N, S, d) fp32.
std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pos_q, const at::Tensor& pos_k,
                                 const at::Tensor& rev, const c10::optional<at::Tensor>& kmask,
                                 const at::Tensor& lse, double scale, double drop,
                                 int64_t seed, int64_t block, bool bf16_tiles) {
  const Problem pb = check_inputs(q, k, v, pos_q, pos_k, rev, kmask, scale, drop, seed, block);
  const Gemm gemm{bf16_tiles ? at::kBFloat16 : at::kFloat, brgemm_usable()};
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.is_contiguous(), "dout must be like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == pb.N * pb.L, "lse (N, L) fp32");
  const auto f32 = q.options().dtype(at::kFloat);
  Grads g{at::empty_like(q), at::empty_like(k), at::empty_like(v),
          at::empty({pb.N, pb.S, pb.D}, f32), at::empty({pb.N, pb.S, pb.D}, f32)};
  const int8_t* km = kmask.has_value() ? kmask->data_ptr<int8_t>() : nullptr;
  at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
    const TaskGuards guards;
    for (int64_t n = begin; n < end; ++n) {
      const TaskTensors t(q, k, v, pos_q, pos_k, n, pb.B, gemm);
      backward_task(pb, n, t, gemm, rev.data_ptr<int32_t>(), km, dout, lse.data_ptr<float>(), g);
    }
  });
  return {g.dq, g.dk, g.dv, g.dpq, g.dpk};
}

// The keep mask (N, L, L) bool that forward and backward apply with this seed and p.
at::Tensor keep_mask(int64_t N, int64_t L, double drop, int64_t seed) {
  at::Tensor out = at::empty({N, L, L}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Dropout dropout(drop, seed, n);
      for (int64_t c = 0; c < L * L; ++c)
        o[n * L * L + c] = !dropout.on || dropout.factor(static_cast<uint32_t>(c)) != 0.0f;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused disentangled attention, forward");
  m.def("backward", &backward, "fused disentangled attention, backward");
  m.def("keep_mask", &keep_mask, "the dropout keep mask of a seed");
}
