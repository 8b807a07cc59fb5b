// XNOR + popcount binary convolution on bit-packed activations and weights (CPU).
//
// Layouts (bit b of a 64-bit word is bit (1 << b); bit = 1 stands for +1, 0 for -1):
//   activations  int64 [N, H, W, G, Wg]: channel c of group g at word c / 64, bit c % 64,
//                Wg = ceil(Cg / 64) words per pixel and group, unused bits 0.
//   weights      int64 [O, Kw]: output channel o's receptive field as one dense bit string,
//                tap t = kh * KW + kw holding bits [t * Cg, (t + 1) * Cg); Kw = ceil(T Cg / 64)
//                words, unused bits 0 (they XOR to 0 against the patch); vector tails are
//                masked loads (AVX-512) or scalar popcounts (AVX2).
//   tap_pop      int32 [O, T]: popcount of each tap's weight bits.
// Per output (pixel p, channel o) the patch of p is built with the same dense layout (im2col
// on bits); zero-padded taps are left 0 in the patch and marked in a mask. Then
//   dot = sum over real taps of a * w = Kv - 2 * popcount_real(a XOR w),
//   popcount_real = popcount(patch XOR w) - sum over padded taps of tap_pop[o][t],
// Kv = (number of in-bounds taps) * Cg: padded positions contribute exactly 0, as in the
// zero-padded fp32 conv. The output is float(dot) (* scale[o]) (+ bias[o]).
//
// Instruction sets, chosen at run time (__builtin_cpu_supports) through per-function target
// attributes, so the library itself is built without -march and loads on any x86-64:
//   avx512  VPOPCNTQ on 512-bit vectors (avx512f + avx512vpopcntdq)
//   avx2    nibble-table popcount (VPSHUFB) with byte accumulators and VPSADBW (Mula et al.)
//   scalar  __builtin_popcountll (portable)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XNOR_X86 1
#else
#define XNOR_X86 0
#endif

using u64 = uint64_t;

namespace {

constexpr int MR = 4;  // pixels per micro-tile
constexpr int NR = 4;  // output channels per micro-tile
constexpr int64_t PIXEL_BLOCK = 32;

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

int detect_isa() {
#if XNOR_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2")) return AVX2;
#endif
  return SCALAR;
}

const char* isa_name(int isa) {
  return isa == AVX512 ? "avx512_vpopcntdq" : isa == AVX2 ? "avx2" : "scalar";
}

inline uint32_t sign_bit(float v) {  // 1 for +1 (sign(0) = sign(-0) = +1), 0 for -1
  float z = v + 0.0f;                // -0.0 + 0.0 = +0.0
  uint32_t u;
  std::memcpy(&u, &z, 4);
  return (u >> 31) ^ 1u;
}

// OR `nbits` bits (whole words of src, bits beyond nbits are 0) into dst at bit offset off.
inline void append_bits(u64* dst, int64_t off, const u64* src, int64_t nwords) {
  const int64_t q = off >> 6;
  const int r = static_cast<int>(off & 63);
  if (r == 0) {
    for (int64_t j = 0; j < nwords; ++j) dst[q + j] |= src[j];
  } else {
    for (int64_t j = 0; j < nwords; ++j) {
      dst[q + j] |= src[j] << r;
      dst[q + j + 1] |= src[j] >> (64 - r);
    }
  }
}

// ---------------------------------------------------------------- micro-kernels
// res[i * NR + j] = popcount(A_i XOR B_j) over nw words.
void kern_scalar(const u64* A, int64_t lda, const u64* const* B, int64_t nw, int64_t* res) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const u64* a = A + i * lda;
      const u64* b = B[j];
      int64_t s = 0;
      for (int64_t k = 0; k < nw; ++k) s += __builtin_popcountll(a[k] ^ b[k]);
      res[i * NR + j] = s;
    }
}

#if XNOR_X86
__attribute__((target("avx512f,avx512vpopcntdq"))) void kern_avx512(
    const u64* A, int64_t lda, const u64* const* B, int64_t nw, int64_t* res) {
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 8 <= nw; k += 8) {
    __m512i b[NR];
    for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_si512(B[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_loadu_si512(A + i * lda + k);
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(a, b[j])));
    }
  }
  if (k < nw) {  // tail of 1..7 words: masked loads read nothing past the row
    const __mmask8 m = static_cast<__mmask8>((1u << (nw - k)) - 1);
    __m512i b[NR];
    for (int j = 0; j < NR; ++j) b[j] = _mm512_maskz_loadu_epi64(m, B[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_maskz_loadu_epi64(m, A + i * lda + k);
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(a, b[j])));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) res[i * NR + j] = _mm512_reduce_add_epi64(acc[i][j]);
}

__attribute__((target("avx2,popcnt"))) void kern_avx2(
    const u64* A, int64_t lda, const u64* const* B, int64_t nw, int64_t* res) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  constexpr int H = 2;  // rows per pass: 8 byte accumulators fit the 16 ymm registers
  for (int i0 = 0; i0 < MR; i0 += H) {
    __m256i acc[H][NR];
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = zero;
    const int64_t nv = nw / 4 * 4;  // whole vectors; the last 0..3 words in scalar popcnt
    int64_t k = 0;
    while (k < nv) {
      // a byte counts at most 8 per step: 31 steps stay below 256
      const int64_t kend = std::min(nv, k + 4 * 31);
      __m256i accb[H][NR];
      for (int i = 0; i < H; ++i)
        for (int j = 0; j < NR; ++j) accb[i][j] = zero;
      for (; k < kend; k += 4) {
        __m256i b[NR];
        for (int j = 0; j < NR; ++j)
          b[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B[j] + k));
        for (int i = 0; i < H; ++i) {
          const __m256i a =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + (i0 + i) * lda + k));
          for (int j = 0; j < NR; ++j) {
            const __m256i x = _mm256_xor_si256(a, b[j]);
            const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(x, low));
            const __m256i hi =
                _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
            accb[i][j] = _mm256_add_epi8(accb[i][j], _mm256_add_epi8(lo, hi));
          }
        }
      }
      for (int i = 0; i < H; ++i)
        for (int j = 0; j < NR; ++j)
          acc[i][j] = _mm256_add_epi64(acc[i][j], _mm256_sad_epu8(accb[i][j], zero));
    }
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < NR; ++j) {
        alignas(32) int64_t t[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[i][j]);
        int64_t s = t[0] + t[1] + t[2] + t[3];
        for (int64_t r = nv; r < nw; ++r) s += __builtin_popcountll(A[(i0 + i) * lda + r] ^ B[j][r]);
        res[(i0 + i) * NR + j] = s;
      }
  }
}
#endif

using Kernel = void (*)(const u64*, int64_t, const u64* const*, int64_t, int64_t*);

int resolve_isa(int64_t isa) {
  static const int best = detect_isa();
  if (isa < 0) return best;
  TORCH_CHECK(isa <= best, "xnor: instruction set ", isa_name(static_cast<int>(isa)),
              " is not supported by this CPU (best: ", isa_name(best), ")");
  return static_cast<int>(isa);
}

Kernel kernel_for(int isa) {
#if XNOR_X86
  if (isa == AVX512) return kern_avx512;
  if (isa == AVX2) return kern_avx2;
#endif
  return kern_scalar;
}

int64_t round_words(int64_t bits) { return (bits + 63) / 64; }

}  // namespace

// ---------------------------------------------------------------- packing
// float [N, C, H, W] -> int64 [N, H, W, G, Wg] (sign bits)
torch::Tensor pack_activations(torch::Tensor x, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32,
              "xnor: activations must be a float32 NCHW tensor");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "xnor: channels not divisible by groups");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cg = C / groups, Wg = (Cg + 63) / 64, G = groups;
  auto out = torch::zeros({N, H, W, G, Wg}, torch::kInt64);
  const float* src = x.data_ptr<float>();
  u64* dst = reinterpret_cast<u64*>(out.data_ptr<int64_t>());
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, h = r % H;
      u64* row = dst + r * W * G * Wg;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / Cg, cc = c % Cg;
        const int64_t word = g * Wg + cc / 64;
        const int bit = static_cast<int>(cc % 64);
        const float* s = src + ((n * C + c) * H + h) * W;
        for (int64_t w = 0; w < W; ++w)
          row[w * G * Wg + word] |= static_cast<u64>(sign_bit(s[w])) << bit;
      }
    }
  });
  return out;
}

// float [O, Cg, KH, KW] -> (int64 [O, Kw], int32 [O, KH * KW])
std::vector<torch::Tensor> pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == torch::kFloat32,
              "xnor: weight must be a float32 [O, Cg, KH, KW] tensor");
  w = w.contiguous();
  const int64_t O = w.size(0), Cg = w.size(1), KH = w.size(2), KW = w.size(3), T = KH * KW;
  TORCH_CHECK(T <= 64, "xnor: kernels with more than 64 taps are not supported");
  const int64_t Wg = (Cg + 63) / 64, Kw = round_words(T * Cg);
  auto words = torch::zeros({O, Kw + 1}, torch::kInt64);  // one slack word for append_bits
  auto pop = torch::zeros({O, T}, torch::kInt32);
  const float* src = w.data_ptr<float>();
  std::vector<u64> tap(Wg);
  for (int64_t o = 0; o < O; ++o) {
    u64* row = reinterpret_cast<u64*>(words.data_ptr<int64_t>()) + o * (Kw + 1);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(tap.begin(), tap.end(), 0);
      for (int64_t c = 0; c < Cg; ++c)
        tap[c / 64] |= static_cast<u64>(sign_bit(src[(o * Cg + c) * T + t])) << (c % 64);
      int32_t p = 0;
      for (auto v : tap) p += __builtin_popcountll(v);
      pop.data_ptr<int32_t>()[o * T + t] = p;
      append_bits(row, t * Cg, tap.data(), Wg);
    }
  }
  return {words.narrow(1, 0, Kw).contiguous(), pop};
}

// ---------------------------------------------------------------- convolution
torch::Tensor xnor_conv2d(torch::Tensor xp, torch::Tensor wp, torch::Tensor tap_pop,
                          c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> bias,
                          int64_t Cg, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, int64_t isa) {
  TORCH_CHECK(xp.dim() == 5 && xp.scalar_type() == torch::kInt64,
              "xnor: packed activations must be int64 [N, H, W, G, Wg]");
  TORCH_CHECK(wp.dim() == 2 && wp.scalar_type() == torch::kInt64, "xnor: bad packed weight");
  xp = xp.contiguous();
  wp = wp.contiguous();
  tap_pop = tap_pop.contiguous();
  const int64_t N = xp.size(0), H = xp.size(1), W = xp.size(2), G = xp.size(3), Wg = xp.size(4);
  const int64_t O = wp.size(0), Kw = wp.size(1), T = KH * KW, Og = O / G;
  TORCH_CHECK(Wg == (Cg + 63) / 64, "xnor: packed activations do not match Cg=", Cg);
  TORCH_CHECK(O % G == 0, "xnor: output channels not divisible by groups");
  TORCH_CHECK(Kw == round_words(T * Cg), "xnor: packed weight does not match the kernel");
  TORCH_CHECK(tap_pop.size(0) == O && tap_pop.size(1) == T, "xnor: bad tap popcounts");
  const int64_t OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "xnor: output would be empty");
  const float* sc = nullptr;
  const float* bi = nullptr;
  torch::Tensor scale_c, bias_c;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->numel() == O && scale->scalar_type() == torch::kFloat32, "xnor: scale");
    scale_c = scale->contiguous();
    sc = scale_c.data_ptr<float>();
  }
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->numel() == O && bias->scalar_type() == torch::kFloat32, "xnor: bias");
    bias_c = bias->contiguous();
    bi = bias_c.data_ptr<float>();
  }
  const Kernel kern = kernel_for(resolve_isa(isa));
  auto out = torch::empty({N, O, OH, OW}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  const u64* X = reinterpret_cast<const u64*>(xp.data_ptr<int64_t>());
  const u64* Wt = reinterpret_cast<const u64*>(wp.data_ptr<int64_t>());
  const int32_t* tp = tap_pop.data_ptr<int32_t>();
  const int64_t P = N * OH * OW, nblocks = (P + PIXEL_BLOCK - 1) / PIXEL_BLOCK;
  const u64 full = T == 64 ? ~u64(0) : ((u64(1) << T) - 1);

  at::parallel_for(0, G * nblocks, 1, [&](int64_t tb, int64_t te) {
    std::vector<u64> patch((PIXEL_BLOCK + MR) * Kw + 1);
    std::vector<u64> mask(PIXEL_BLOCK + MR);
    for (int64_t task = tb; task < te; ++task) {
      const int64_t g = task / nblocks, p0 = (task % nblocks) * PIXEL_BLOCK;
      const int64_t np = std::min(PIXEL_BLOCK, P - p0);
      std::fill(patch.begin(), patch.end(), 0);
      for (int64_t i = 0; i < np; ++i) {  // im2col on bits
        const int64_t p = p0 + i, n = p / (OH * OW), oh = (p / OW) % OH, ow = p % OW;
        u64* row = patch.data() + i * Kw;
        u64 m = 0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh * sh - ph + kh;
          if (ih < 0 || ih >= H) continue;
          for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t iw = ow * sw - pw + kw;
            if (iw < 0 || iw >= W) continue;
            const int64_t t = kh * KW + kw;
            append_bits(row, t * Cg, X + (((n * H + ih) * W + iw) * G + g) * Wg, Wg);
            m |= u64(1) << t;
          }
        }
        mask[i] = m;
      }
      int64_t res[MR * NR];
      const u64* bptr[NR];
      for (int64_t o0 = 0; o0 < Og; o0 += NR) {
        const int64_t no = std::min<int64_t>(NR, Og - o0);
        for (int j = 0; j < NR; ++j)
          bptr[j] = Wt + (g * Og + o0 + std::min<int64_t>(j, no - 1)) * Kw;
        for (int64_t i0 = 0; i0 < np; i0 += MR) {  // rows past np are zero patches: ignored
          kern(patch.data() + i0 * Kw, Kw, bptr, Kw, res);
          for (int64_t i = i0; i < std::min(np, i0 + MR); ++i) {
            const int64_t p = p0 + i, n = p / (OH * OW), pix = p % (OH * OW);
            const u64 m = mask[i];
            const int64_t kv = __builtin_popcountll(m) * Cg;
            for (int64_t j = 0; j < no; ++j) {
              const int64_t o = g * Og + o0 + j;
              int64_t cnt = res[(i - i0) * NR + j];
              if (m != full) {
                u64 pad = ~m & full;
                while (pad) {
                  cnt -= tp[o * T + __builtin_ctzll(pad)];
                  pad &= pad - 1;
                }
              }
              float v = static_cast<float>(kv - 2 * cnt);
              if (sc) v *= sc[o];
              if (bi) v += bi[o];
              op[(n * O + o) * OH * OW + pix] = v;
            }
          }
        }
      }
    }
  });
  return out;
}

std::string best_isa() { return isa_name(resolve_isa(-1)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_activations", &pack_activations, "sign bits of NCHW float -> [N, H, W, G, Wg]");
  m.def("pack_weight", &pack_weight, "sign bits of [O, Cg, KH, KW] -> (words, tap popcounts)");
  m.def("xnor_conv2d", &xnor_conv2d, "XNOR + popcount conv on packed bits");
  m.def("best_isa", &best_isa, "the instruction set chosen at run time");
  m.def("detect_isa", &detect_isa, "0 scalar, 1 avx2, 2 avx512_vpopcntdq");
}
