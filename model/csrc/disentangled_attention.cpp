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
// c2p = q PK^T and p2c = k PQ^T are (N, L, S) GEMMs outside the kernel (autograd does their
// backward); here they are gathered by w(r). One task per n (heads x B of them, spread over
// ATen's intra-op threads): the task walks its queries in blocks of BLOCK rows, so the only
// score memory is a (BLOCK, L) fp32 tile per thread, never an (N, L, L) tensor. Within a
// block the softmax is exact over all L keys (no online rescaling needed at this tile size).
// The tile products are at::mm on fp32 copies of the task's q, k, v (oneDNN/MKL pick the
// ISA at run time); the gather, mask, softmax and dropout loops are compiled for AVX2.
//
// Backward recomputes P from the saved row log-sum-exp, and, because one task owns all of
// n, accumulates dk, dv and the position-table gradients d c2p[i, w] and d p2c[j, w]
// (sums of dS over the pairs whose distance uses row w) without atomics or races.
//
// Dropout: pair (i, j) of n is kept when hash(seed, n, i L + j) >= p 2^32 (a counter-based
// hash, so backward regenerates the forward's mask without storing it); `keep_mask` returns
// it for tests.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;  // query rows per tile
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

template <typename P>
inline float as_float(P x) {
  return static_cast<float>(x);
}

// Scores of query rows [i0, i0 + m) against all keys, in place over tile (m, L) that holds
// q k^T: scale, + c2p and p2c gathered by distance row, padded keys masked.
template <typename P>
void add_position_terms(float* tile, int64_t i0, int64_t m, int64_t L, int64_t S, float scale,
                        const P* c2p, const P* p2c, const int32_t* rev, const int8_t* kmask) {
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = i0 + r;
    float* s = tile + r * L;
    const P* c2p_i = c2p + i * S;
    const int32_t* w = rev + (L - 1 - i);  // w[j] = row of distance i - j
    for (int64_t j = 0; j < L; ++j) {
      s[j] = s[j] * scale + as_float(c2p_i[w[j]]) + as_float(p2c[j * S + w[j]]);
    }
    if (kmask != nullptr) {
      for (int64_t j = 0; j < L; ++j) s[j] = kmask[j] ? s[j] : MASKED;
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
// caller's thread-local grad mode or autocast state, so both are switched off here.
struct TaskGuards {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

struct Problem {  // shapes and scalars shared by forward and backward
  int64_t N, L, D, S, B;
  float scale;
  double drop;
  int64_t seed;
};

template <typename P>
void forward_task(const Problem& pb, int64_t n, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const P* c2p, const P* p2c, const int32_t* rev,
                  const int8_t* kmask, at::Tensor& out, float* lse) {
  const int64_t L = pb.L, S = pb.S;
  const at::Tensor qf = q[n].to(at::kFloat), kf = k[n].to(at::kFloat), vf = v[n].to(at::kFloat);
  at::Tensor tile = at::empty({BLOCK, L}, qf.options());
  at::Tensor of = at::empty({L, pb.D}, qf.options());
  const Dropout dropout(pb.drop, pb.seed, n);
  const int8_t* km = kmask ? kmask + (n % pb.B) * L : nullptr;
  for (int64_t i0 = 0; i0 < L; i0 += BLOCK) {
    const int64_t m = std::min(BLOCK, L - i0);
    at::Tensor t = tile.narrow(0, 0, m);
    at::mm_out(t, qf.narrow(0, i0, m), kf.t());  // q k^T
    float* ts = t.data_ptr<float>();
    add_position_terms(ts, i0, m, L, S, pb.scale, c2p + n * L * S, p2c + n * L * S, rev, km);
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
    at::mm_out(o_blk, t, vf);  // dropout(P) v
  }
  out[n].copy_(of);
}

// One query block of backward: tile holds P (recomputed), dtile dP = dO v^T; on return
// tile holds dropout(P) and dtile dS, and d c2p / d p2c have the block's sums added.
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
    for (int64_t j = 0; j < L; ++j) {
      const float f = dropout.on ? dropout.factor(c0 + j) : 1.0f;
      dp[j] *= f;  // gradient w.r.t. P through the dropout
      delta += p[j] * dp[j];
    }
    float* dc2p_i = dc2p + i * S;
    const int32_t* w = rev + (L - 1 - i);
    for (int64_t j = 0; j < L; ++j) {
      const float ds = p[j] * (dp[j] - delta);
      dc2p_i[w[j]] += ds;
      dp2c[j * S + w[j]] += ds;
      dp[j] = ds;
      if (dropout.on) p[j] *= dropout.factor(c0 + j);
    }
  }
}

template <typename P>
void backward_task(const Problem& pb, int64_t n, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const P* c2p, const P* p2c, const int32_t* rev,
                   const int8_t* kmask, const at::Tensor& dout, const float* lse,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float* dc2p, float* dp2c) {
  const int64_t L = pb.L, S = pb.S;
  const at::Tensor qf = q[n].to(at::kFloat), kf = k[n].to(at::kFloat), vf = v[n].to(at::kFloat);
  const at::Tensor dof = dout[n].to(at::kFloat);
  at::Tensor tile = at::empty({BLOCK, L}, qf.options());
  at::Tensor dtile = at::empty({BLOCK, L}, qf.options());
  at::Tensor dqf = at::empty({L, pb.D}, qf.options());
  at::Tensor dkf = at::zeros({L, pb.D}, qf.options());
  at::Tensor dvf = at::zeros({L, pb.D}, qf.options());
  const int8_t* km = kmask ? kmask + (n % pb.B) * L : nullptr;
  float* dc2p_n = dc2p + n * L * S;
  float* dp2c_n = dp2c + n * L * S;
  for (int64_t i0 = 0; i0 < L; i0 += BLOCK) {
    const int64_t m = std::min(BLOCK, L - i0);
    at::Tensor t = tile.narrow(0, 0, m), dt = dtile.narrow(0, 0, m);
    const at::Tensor q_blk = qf.narrow(0, i0, m), do_blk = dof.narrow(0, i0, m);
    at::mm_out(t, q_blk, kf.t());
    add_position_terms(t.data_ptr<float>(), i0, m, L, S, pb.scale, c2p + n * L * S,
                       p2c + n * L * S, rev, km);
    at::mm_out(dt, do_blk, vf.t());  // dO v^T
    softmax_backward_block(pb, n, i0, m, t.data_ptr<float>(), dt.data_ptr<float>(), lse, rev,
                           dc2p_n, dp2c_n);
    dvf.addmm_(t.t(), do_blk);  // += dropout(P)^T dO
    dkf.addmm_(dt.t(), q_blk, 1.0, pb.scale);  // += scale dS^T q
    at::Tensor dq_blk = dqf.narrow(0, i0, m);
    at::mm_out(dq_blk, dt, kf);
    dq_blk.mul_(pb.scale);  // scale dS k
  }
  dq[n].copy_(dqf);
  dk[n].copy_(dkf);
  dv[n].copy_(dvf);
}

Problem check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& c2p, const at::Tensor& p2c, const at::Tensor& rev,
                     const c10::optional<at::Tensor>& kmask, double scale, double drop,
                     int64_t seed) {
  TORCH_CHECK(q.device().is_cpu(), "fused disentangled attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must be (N, L, d) of one shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v dtypes differ");
  TORCH_CHECK(c2p.dim() == 3 && c2p.sizes() == p2c.sizes() && c2p.size(0) == q.size(0) &&
                  c2p.size(1) == q.size(1), "c2p, p2c must be (N, L, S)");
  TORCH_CHECK(c2p.scalar_type() == p2c.scalar_type(), "c2p, p2c dtypes differ");
  const int64_t L = q.size(1);
  TORCH_CHECK(L <= 65535, "sequence length ", L, " > 65535 (32-bit dropout counters)");
  TORCH_CHECK(rev.scalar_type() == at::kInt && rev.numel() == 2 * L - 1,
              "distance rows must be int32 (2L - 1,)");
  for (const at::Tensor* t : {&q, &k, &v, &c2p, &p2c, &rev})
    TORCH_CHECK(t->is_contiguous(), "inputs must be contiguous");
  int64_t B = 1;
  if (kmask.has_value()) {
    TORCH_CHECK(kmask->scalar_type() == at::kChar && kmask->dim() == 2 &&
                    kmask->size(1) == L && q.size(0) % kmask->size(0) == 0 &&
                    kmask->is_contiguous(), "key mask must be int8 (B, L), N = heads x B");
    B = kmask->size(0);
  }
  TORCH_CHECK(drop >= 0.0 && drop < 1.0, "dropout must be in [0, 1)");
  return Problem{q.size(0), L, q.size(2), c2p.size(2), B, static_cast<float>(scale), drop,
                 seed};
}

#define DISPATCH_POSITION_DTYPE(t, ...)                                  \
  if ((t).scalar_type() == at::kFloat) {                                 \
    using P = float;                                                     \
    __VA_ARGS__();                                                       \
  } else if ((t).scalar_type() == at::kBFloat16) {                       \
    using P = at::BFloat16;                                              \
    __VA_ARGS__();                                                       \
  } else {                                                               \
    TORCH_CHECK(false, "c2p/p2c dtype must be float32 or bfloat16");     \
  }

}  // namespace

// o (N, L, d) in q's dtype and the rows' log-sum-exp (N, L) fp32. `rev` lists the window row
// of distance r = i - j at index (L - 1) - r (rows for distances L-1 .. -(L-1)).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& c2p, const at::Tensor& p2c,
                                const at::Tensor& rev, const c10::optional<at::Tensor>& kmask,
                                double scale, double drop, int64_t seed) {
  const Problem pb = check_inputs(q, k, v, c2p, p2c, rev, kmask, scale, drop, seed);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({pb.N, pb.L}, q.options().dtype(at::kFloat));
  const int8_t* km = kmask.has_value() ? kmask->data_ptr<int8_t>() : nullptr;
  DISPATCH_POSITION_DTYPE(c2p, [&] {
    const P* c = c2p.data_ptr<P>();
    const P* p = p2c.data_ptr<P>();
    at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
      const TaskGuards guards;
      for (int64_t n = begin; n < end; ++n)
        forward_task<P>(pb, n, q, k, v, c, p, rev.data_ptr<int32_t>(), km, out,
                        lse.data_ptr<float>());
    });
  });
  return {out, lse};
}

// dq, dk, dv (in q's dtype) and d c2p, d p2c (N, L, S) fp32.
std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& c2p, const at::Tensor& p2c,
                                 const at::Tensor& rev, const c10::optional<at::Tensor>& kmask,
                                 const at::Tensor& lse, double scale, double drop,
                                 int64_t seed) {
  const Problem pb = check_inputs(q, k, v, c2p, p2c, rev, kmask, scale, drop, seed);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.is_contiguous(), "dout must be like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == pb.N * pb.L, "lse (N, L) fp32");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dc2p = at::zeros(c2p.sizes(), c2p.options().dtype(at::kFloat));
  at::Tensor dp2c = at::zeros(p2c.sizes(), p2c.options().dtype(at::kFloat));
  const int8_t* km = kmask.has_value() ? kmask->data_ptr<int8_t>() : nullptr;
  DISPATCH_POSITION_DTYPE(c2p, [&] {
    const P* c = c2p.data_ptr<P>();
    const P* p = p2c.data_ptr<P>();
    at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
      const TaskGuards guards;
      for (int64_t n = begin; n < end; ++n)
        backward_task<P>(pb, n, q, k, v, c, p, rev.data_ptr<int32_t>(), km, dout,
                         lse.data_ptr<float>(), dq, dk, dv, dc2p.data_ptr<float>(),
                         dp2c.data_ptr<float>());
    });
  });
  return {dq, dk, dv, dc2p, dp2c};
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
  m.attr("BLOCK") = BLOCK;
}
