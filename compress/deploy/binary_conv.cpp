// XNOR + popcount binary convolution on bit-packed activations and weights (CPU).
//
// Bits: bit b of a 64-bit word is (1 << b); bit 1 stands for +1, bit 0 for -1; sign(+-0) = +1.
//
// Layouts
//   activations (pack_activations) int64 [N, H, W, G, Wg]: channel c of group g at word c / 64,
//                bit c % 64 of pixel (h, w); Wg = ceil(Cg / 64) words per pixel and group,
//                unused bits 0.
//   weights      int64 [G, OB, Kw, 8] ("channels in lanes"): OB = ceil(Og / 8) blocks of 8
//                output channels per group; word k of the 8 channels of a block is one 64-byte
//                row, so one 512-bit load holds word k of 8 output channels. Word k of channel o
//                is word k of o's receptive field as one dense bit string: tap t = kh * KW + kw
//                holds bits [t * Cg, (t + 1) * Cg), Kw = ceil(T * Cg / 64). When Cg % 64 == 0
//                this is just tap t = words [t * Wg, (t + 1) * Wg). Lanes of channels past Og
//                and bits past T * Cg are 0.
//   tap_pop      int32 [G, T, Ogp]: popcount of each tap's weight bits, Ogp = Og rounded up to
//                16 (zero lanes past Og).
//
// Convolution (xnor_conv2d, float NCHW or packed int64 input, float NCHW output):
// 1. The input is packed into a zero-padded buffer of Hp x Wp = (H + 2 ph) x (W + 2 pw) pixels,
//    so every tap of every output pixel is a valid address (no bounds checks in the kernel):
//    group-major [G, N, Hp, Wp, Wg] when Cg % 64 == 0 (the taps kw, kw + 1 of a kernel row are
//    then adjacent words: one contiguous K segment per kernel row), else pixel-major
//    [N, Hp, Wp, G, Wg]; word-major [G, Wg, N, H, W] for the 1x1 kernel (step 3b).
//    Sign + pack of a float input are fused into the call (AVX-512: VPMOVD2M of x + 0 per 16
//    pixels of a channel, each channel's rows read contiguously, then VPSHUFBITQMB gathers the
//    64 channel bits of one pixel into a word: a bit transpose without scalar bit loops; for
//    Cg < 64 dividing 64 a word of 64 channels is split into the words of 64 / Cg groups).
// 2. Tasks (at::parallel_for) of PB = 16 output pixels of one image, all groups. The K words of
//    a pixel are read in place, as segments (pixel base + segment offset, length), when
//    Cg % 64 == 0 (no im2col). Otherwise the taps are not word aligned and the pixel's dense
//    bit patch is built per task (im2col on bits): for Wg == 1 (Cg < 64, e.g. NIN-GC's
//    16-channel groups) the patches of all groups at once with loops over groups that
//    vectorize, else one group at a time.
// 3. Micro-kernel, output channels in vector lanes: for each K word, the activation word of
//    each of MR = 4 pixels is broadcast (VPBROADCASTQ) and XORed against NB <= 4 weight vectors
//    (8 channels each), VPOPCNTQ, VPADDQ into MR x NB <= 16 zmm accumulators; the K loop is
//    innermost and no horizontal reduction is needed: the lanes are the output channels. The
//    counts (< 2^31) of two blocks are merged into one vector of 16 int32 (VPERMT2D) and
//    stored to a tile [PB pixels][Ogp channels].
// 3b. 1x1, stride 1, no padding, Cg % 64 == 0 (NIN's 1x1 layers; AVX-512 only): pixels in
//    lanes instead. One 512-bit load = word k of 8 consecutive pixels (word-major buffer), the
//    weight word of one output channel is broadcast; 4 channels x 32 pixels (16 zmm
//    accumulators) per step. A vector of counts is then 16 pixels of one channel, contiguous
//    in NCHW: the epilogue (dot = Cg - 2 * popcount, * scale, + bias) needs no transpose, and
//    tasks are 32 pixels of one image.
// 4. Epilogue of steps 2-3: padded taps read zero words, so popcount(0 XOR w) = tap_pop is
//    subtracted for them (border pixels only, vectors over channels); the tile is transposed
//    16 x 16 so a vector holds 16 pixels of one channel (contiguous in NCHW), and
//      dot = Kv - 2 * popcount,   Kv = (number of in-bounds taps) * Cg
//    (padded positions contribute exactly 0, as in the zero-padded fp32 conv), out =
//    float(dot) (* scale[o]) (+ bias[o]): |dot| < 2^24 is exact in fp32, then one fp32
//    rounding per operation (built with -ffp-contract=off: no FMA contraction).
// 5. Packed output (xnor_conv2d_bits; a conv feeding the next binary conv): the epilogue's
//    fp32 values go to a per-task scratch tile instead of NCHW memory; per 16 pixels, 16-bit
//    masks of v >= 0 (sign bit of v + 0: sign(+-0) = +1, the very value the float path would
//    store, so bit-exact) are stored at the DESTINATION channel perm[c] (the next block's
//    channel shuffle, applied for free), then 64 destination channels' masks are
//    bit-transposed into 16 pixel words (VPSHUFBITQMB) in the next conv's layout
//    [N, H, W, G', Wg'] (split into 64 / Cg' groups' words when Cg' < 64 divides 64). A max
//    pool after the conv runs on bits: OR over the window (padding = 0 bit = -1, the OR
//    identity; exact since sign is monotone). A channels_last float input (an NHWC stem
//    output) is packed per pixel without a transpose; unpack_bits gives +-1 floats back.
// The cost floor of the AVX-512 kernel is 3 vector uops (XOR, VPOPCNTQ, VPADDQ) per 8 words
// of one output channel block, on the two 512-bit vector ALU ports: ~1.5 cycles per 512
// bit-MACs.
//
// Instruction sets, chosen at run time (__builtin_cpu_supports) through per-function target
// attributes, so the library itself is built without -march and loads on any x86-64:
//   avx512  VPOPCNTQ kernel (avx512f + avx512vpopcntdq); the fused sign + pack additionally
//           needs avx512bw/dq/bitalg and falls back to the scalar packer without them
//   avx2    same layout and driver, 4 lanes per ymm (two per weight block), nibble-table
//           popcount (VPSHUFB) with byte accumulators and VPSADBW (Mula et al.); scalar
//           packing and epilogue
//   scalar  __builtin_popcountll (portable)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
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

constexpr int MR = 4;   // pixels per micro-tile
constexpr int LANES = 8;  // output channels per weight block (one 512-bit vector of words)
constexpr int PB = 16;  // output pixels per task (one 16 x 16 transpose in the epilogue)
constexpr int NBMAX = 4;  // weight blocks per micro-tile

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

bool detect_fast_pack() {
#if XNOR_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bitalg");
#else
  return false;
#endif
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

// OR `nwords` whole words of src into dst at bit offset off (dst needs one slack word).
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

int64_t round_words(int64_t bits) { return (bits + 63) / 64; }
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------- micro-kernels
// cnt[i * ldc + j * 8 + l] = sum over k < Kw of popcount(A_i[k] XOR Wb_j[k][l]), where the K
// words of pixel i come in nseg segments of contiguous words: segment s is A[i] + off[s],
// len[s] words (the next len[s] words of k); Wb_j = Wb + j * Kw * 8 (block j, [Kw][8] words);
// i < MR, j < nb, l < 8.
using Kernel = void (*)(const u64* const* A, const int64_t* off, const int64_t* len,
                        int64_t nseg, const u64* Wb, int64_t Kw, int nb, int32_t* cnt,
                        int64_t ldc);

void kern_scalar(const u64* const* A, const int64_t* off, const int64_t* len, int64_t nseg,
                 const u64* Wb, int64_t Kw, int nb, int32_t* cnt, int64_t ldc) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nb; ++j)
      for (int l = 0; l < LANES; ++l) {
        const u64* w = Wb + j * Kw * LANES + l;
        int64_t s = 0, k = 0;
        for (int64_t t = 0; t < nseg; ++t)
          for (int64_t q = 0; q < len[t]; ++q, ++k)
            s += __builtin_popcountll(A[i][off[t] + q] ^ w[k * LANES]);
        cnt[i * ldc + j * LANES + l] = static_cast<int32_t>(s);
      }
}

#if XNOR_X86
template <int NB>
__attribute__((target("avx512f,avx512vpopcntdq"))) inline void kern_avx512_nb(
    const u64* const* A, const int64_t* off, const int64_t* len, int64_t nseg, const u64* Wb,
    int64_t Kw, int32_t* cnt, int64_t ldc) {
  __m512i acc[MR][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const u64* a0 = A[0];
  const u64* a1 = A[1];
  const u64* a2 = A[2];
  const u64* a3 = A[3];
  const int64_t bs = Kw * LANES;  // block stride in words
  const u64* w = Wb;
  for (int64_t t = 0; t < nseg; ++t) {
    const int64_t o = off[t], nq = len[t];
    for (int64_t q = 0; q < nq; ++q) {
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(w + j * bs + q * LANES);
      const __m512i b[MR] = {
          _mm512_set1_epi64(static_cast<long long>(a0[o + q])),
          _mm512_set1_epi64(static_cast<long long>(a1[o + q])),
          _mm512_set1_epi64(static_cast<long long>(a2[o + q])),
          _mm512_set1_epi64(static_cast<long long>(a3[o + q])),
      };
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j)
          acc[i][j] =
              _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(b[i], wv[j])));
    }
    w += nq * LANES;
  }
  // counts < 2^31: the low dwords of two blocks' qwords -> one vector of 16 channels
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    int32_t* c = cnt + i * ldc;
    if constexpr (NB >= 2)
      _mm512_storeu_si512(c, _mm512_permutex2var_epi32(acc[i][0], even, acc[i][1]));
    if constexpr (NB == 4)
      _mm512_storeu_si512(c + 16, _mm512_permutex2var_epi32(acc[i][2], even, acc[i][3]));
    if constexpr (NB == 1 || NB == 3)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (NB - 1) * LANES),
                          _mm512_cvtepi64_epi32(acc[i][NB - 1]));
  }
}

__attribute__((target("avx512f,avx512vpopcntdq"))) void kern_avx512(
    const u64* const* A, const int64_t* off, const int64_t* len, int64_t nseg, const u64* Wb,
    int64_t Kw, int nb, int32_t* cnt, int64_t ldc) {
  switch (nb) {
    case 4: return kern_avx512_nb<4>(A, off, len, nseg, Wb, Kw, cnt, ldc);
    case 3: return kern_avx512_nb<3>(A, off, len, nseg, Wb, Kw, cnt, ldc);
    case 2: return kern_avx512_nb<2>(A, off, len, nseg, Wb, Kw, cnt, ldc);
    default: return kern_avx512_nb<1>(A, off, len, nseg, Wb, Kw, cnt, ldc);
  }
}

// One weight block at a time: 4 pixels x 2 ymm halves of byte accumulators.
__attribute__((target("avx2,popcnt"))) void kern_avx2(const u64* const* A, const int64_t* off,
                                                     const int64_t* len, int64_t nseg,
                                                     const u64* Wb, int64_t Kw, int nb,
                                                     int32_t* cnt, int64_t ldc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  for (int j = 0; j < nb; ++j) {
    const u64* wb = Wb + j * Kw * LANES;
    __m256i acc[MR][2], accb[MR][2];
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) acc[i][h] = accb[i][h] = zero;
    int steps = 0;  // a byte counts at most 8 per step: flush after 31 steps (< 256)
    const u64* w = wb;
    for (int64_t t = 0; t < nseg; ++t) {
      const int64_t o = off[t], nq = len[t];
      for (int64_t q = 0; q < nq; ++q, w += LANES) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 4));
        for (int i = 0; i < MR; ++i) {
          const __m256i b = _mm256_set1_epi64x(static_cast<long long>(A[i][o + q]));
          const __m256i x0 = _mm256_xor_si256(b, w0), x1 = _mm256_xor_si256(b, w1);
          accb[i][0] = _mm256_add_epi8(
              accb[i][0],
              _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low)),
                              _mm256_shuffle_epi8(
                                  lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low))));
          accb[i][1] = _mm256_add_epi8(
              accb[i][1],
              _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low)),
                              _mm256_shuffle_epi8(
                                  lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low))));
        }
        if (++steps == 31) {
          for (int i = 0; i < MR; ++i)
            for (int h = 0; h < 2; ++h) {
              acc[i][h] = _mm256_add_epi64(acc[i][h], _mm256_sad_epu8(accb[i][h], zero));
              accb[i][h] = zero;
            }
          steps = 0;
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < 2; ++h) {
        acc[i][h] = _mm256_add_epi64(acc[i][h], _mm256_sad_epu8(accb[i][h], zero));
        alignas(32) int64_t v[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc[i][h]);
        for (int l = 0; l < 4; ++l)
          cnt[i * ldc + j * LANES + h * 4 + l] = static_cast<int32_t>(v[l]);
      }
  }
}
#endif

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

// ---------------------------------------------------------------- bit patches (im2col)
// Patches of all G groups of one pixel when Wg == 1: word k of group g at P[k * G + g];
// tap t of group g is the word src[tap_off[t] + g] placed at bit t * Cg (loops over g
// vectorize). P has (Kw + 1) * G words (slack for the carry).
using PatchFn = void (*)(u64* P, int64_t len, const u64* src, const int64_t* tap_off, int64_t T,
                         int64_t Cg, int64_t G);

__attribute__((always_inline)) inline void gpatch_impl(u64* P, int64_t len, const u64* src,
                                                        const int64_t* tap_off, int64_t T,
                                                        int64_t Cg, int64_t G) {
  std::fill(P, P + len, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = t * Cg, q = off >> 6;
    const int r = static_cast<int>(off & 63);
    const u64* s = src + tap_off[t];
    u64* d = P + q * G;
    if (r == 0) {
      for (int64_t g = 0; g < G; ++g) d[g] |= s[g];
    } else {
      for (int64_t g = 0; g < G; ++g) {
        d[g] |= s[g] << r;
        d[G + g] |= s[g] >> (64 - r);
      }
    }
  }
}

void gpatch_generic(u64* P, int64_t len, const u64* src, const int64_t* tap_off, int64_t T,
                    int64_t Cg, int64_t G) {
  gpatch_impl(P, len, src, tap_off, T, Cg, G);
}

#if XNOR_X86
__attribute__((target("avx512f"))) void gpatch_avx512(u64* P, int64_t len, const u64* src,
                                                      const int64_t* tap_off, int64_t T,
                                                      int64_t Cg, int64_t G) {
  gpatch_impl(P, len, src, tap_off, T, Cg, G);
}
#endif

PatchFn gpatch_for(int isa) {
#if XNOR_X86
  if (isa == AVX512) return gpatch_avx512;
#endif
  return gpatch_generic;
}

// ---------------------------------------------------------------- sign + pack
// float NCHW rows -> packed words: word q of group g of pixel (n, h, w) at
// at(n, h, w) + g * gs + q * qs, at(n, h, w) = buf + ((n * Hp + h + ph) * Wp + w + pw) * ps
// (pixel-major [N, Hp, Wp, G, Wg]: ps = G Wg, gs = Wg, qs = 1; group-major
// [G, N, Hp, Wp, Wg]: ps = Wg, gs = N Hp Wp Wg, qs = 1; word-major [G, Wg, N, H, W]: ps = 1,
// gs = Wg N H W, qs = N H W). Words of the buffer that are
// not written must be zero beforehand (the scalar packer ORs bits in).
struct PackDst {
  u64* buf;
  int64_t Hp, Wp, ph, pw, ps, gs, qs;
  u64* at(int64_t n, int64_t h, int64_t w) const {
    return buf + ((n * Hp + h + ph) * Wp + w + pw) * ps;
  }
};

void pack_scalar(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
                 const PackDst& d) {
  const int64_t Cg = C / G, Wg = (Cg + 63) / 64;
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, h = r % H;
      u64* row = d.at(n, h, 0);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / Cg, cc = c % Cg;
        const int64_t word = g * d.gs + cc / 64 * d.qs;
        const int bit = static_cast<int>(cc % 64);
        const float* s = src + ((n * C + c) * H + h) * W;
        for (int64_t w = 0; w < W; ++w)
          row[w * d.ps + word] |= static_cast<u64>(sign_bit(s[w])) << bit;
      }
    }
  });
}

#if XNOR_X86
// Rows [h0, h1) of image n, 64 channels (one word) at a time: each channel's rows are read
// contiguously (streaming), VPMOVD2M of (x + 0) per 16 pixels -> 16-bit masks
// M[h][w / 16][c]; then per 16 pixels the masks' low / high bytes in two vectors and
// VPSHUFBITQMB with control byte i of every qword = 8 i + w gathers bit w of the 64 bytes =
// the 64 channel bits of pixel w (a bit transpose).
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bitalg"))) void pack_avx512_rows(
    const float* src, int64_t C, int64_t H, int64_t W, int64_t G, const PackDst& d, int64_t n,
    int64_t h0, int64_t h1, uint16_t* M) {
  const int64_t Cg = C / G, Wg = (Cg + 63) / 64, nwc = (W + 15) / 16, nh = h1 - h0;
  __m512i ctrl[8];
  for (int w = 0; w < 8; ++w)
    ctrl[w] = _mm512_set1_epi64(
        static_cast<long long>(0x3830282018100800ULL + 0x0101010101010101ULL * w));
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 tail = static_cast<__mmask16>((1u << (W - (nwc - 1) * 16)) - 1);
  // chunks of 64 channels: one word of one group, or (Cg < 64 dividing 64) the words of
  // 64 / Cg consecutive groups, split after the transpose
  const bool split = Wg == 1 && Cg < 64 && 64 % Cg == 0;
  const int64_t nchunks = split ? (C + 63) / 64 : G * Wg;
  const u64 gmask = Cg >= 64 ? ~u64(0) : (u64(1) << Cg) - 1;
  for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
    int64_t c0, nc, g, q;
    if (split) {
      c0 = chunk * 64, nc = std::min<int64_t>(64, C - c0), g = c0 / Cg, q = 0;
    } else {
      g = chunk / Wg, q = chunk % Wg;
      c0 = g * Cg + q * 64, nc = std::min<int64_t>(64, Cg - q * 64);
    }
    for (int64_t c = 0; c < 64; ++c) {
      uint16_t* mc = M + c;
      if (c >= nc) {
        for (int64_t r = 0; r < nh * nwc; ++r) mc[r * 64] = 0;
        continue;
      }
      const float* s = src + ((n * C + c0 + c) * H + h0) * W;
      for (int64_t h = 0; h < nh; ++h, s += W) {
        for (int64_t wc = 0; wc + 1 < nwc; ++wc, mc += 64) {
          const __m512 v = _mm512_add_ps(_mm512_loadu_ps(s + wc * 16), zero);
          *mc = static_cast<uint16_t>(~_mm512_movepi32_mask(_mm512_castps_si512(v)));
        }
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(tail, s + (nwc - 1) * 16), zero);
        *mc = static_cast<uint16_t>(~_mm512_movepi32_mask(_mm512_castps_si512(v)));
        mc += 64;
      }
    }
    const int64_t ng = split ? nc / Cg : 1;
    for (int64_t h = 0; h < nh; ++h) {
      u64* row = d.at(n, h0 + h, 0) + g * d.gs + q * d.qs;
      for (int64_t wc = 0; wc < nwc; ++wc) {
        const uint16_t* m = M + (h * nwc + wc) * 64;
        const __m512i m0 = _mm512_loadu_si512(m), m1 = _mm512_loadu_si512(m + 32);
        const __m512i lo = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi16_epi8(m0)), _mm512_cvtepi16_epi8(m1), 1);
        const __m512i hi = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srli_epi16(m0, 8))),
            _mm512_cvtepi16_epi8(_mm512_srli_epi16(m1, 8)), 1);
        const int nw = static_cast<int>(std::min<int64_t>(16, W - wc * 16));
        u64* o = row + wc * 16 * d.ps;
        for (int w = 0; w < nw; ++w) {
          const u64 word = _mm512_bitshuffle_epi64_mask(w < 8 ? lo : hi, ctrl[w & 7]);
          if (!split) {
            o[w * d.ps] = word;
          } else {
            for (int64_t j = 0; j < ng; ++j) o[w * d.ps + j * d.gs] = (word >> (j * Cg)) & gmask;
          }
        }
      }
    }
  }
}

void pack_avx512(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
                 const PackDst& d) {
  // tasks: blocks of rows of one image, ~256 pixels each (contiguous reads per channel)
  const int64_t nwc = (W + 15) / 16, hb = std::max<int64_t>(1, std::min<int64_t>(H, 256 / W));
  const int64_t nhb = (H + hb - 1) / hb;
  at::parallel_for(0, N * nhb, 1, [&](int64_t b, int64_t e) {
    std::vector<uint16_t> M(static_cast<size_t>(hb * nwc * 64));
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nhb, h0 = (t % nhb) * hb;
      pack_avx512_rows(src, C, H, W, G, d, n, h0, std::min(H, h0 + hb), M.data());
    }
  });
}
#endif

bool fast_pack_supported() {
  static const bool fast = detect_fast_pack();
  return fast;
}

void pack_into(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
               const PackDst& d, int isa) {
#if XNOR_X86
  if (isa == AVX512 && fast_pack_supported()) return pack_avx512(src, N, C, H, W, G, d);
#endif
  pack_scalar(src, N, C, H, W, G, d);
}

// float NHWC (channels_last) -> packed words: the 64 channels of a word are contiguous floats
// of one pixel (no transpose: 4 x VPMOVD2M of 16 channels). Every interior word is written.
void pack_nhwc_scalar(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
                      const PackDst& d) {
  const int64_t Cg = C / G, Wg = (Cg + 63) / 64;
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, h = r % H;
      for (int64_t w = 0; w < W; ++w) {
        const float* px = src + ((n * H + h) * W + w) * C;
        u64* o = d.at(n, h, w);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t q = 0; q < Wg; ++q) {
            const int64_t c0 = g * Cg + q * 64, nc = std::min<int64_t>(64, Cg - q * 64);
            u64 word = 0;
            for (int64_t c = 0; c < nc; ++c) word |= static_cast<u64>(sign_bit(px[c0 + c])) << c;
            o[g * d.gs + q * d.qs] = word;
          }
      }
    }
  });
}

#if XNOR_X86
// rows [r0, r1) of N * H (a lambda does not inherit the target attribute: a function per range)
__attribute__((target("avx512f,avx512dq"))) void pack_nhwc_rows_avx512(
    const float* src, int64_t C, int64_t H, int64_t W, int64_t G, const PackDst& d, int64_t r0,
    int64_t r1) {
  const int64_t Cg = C / G, Wg = (Cg + 63) / 64;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / H, h = r % H;
    for (int64_t w = 0; w < W; ++w) {
      const float* px = src + ((n * H + h) * W + w) * C;
      u64* o = d.at(n, h, w);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t q = 0; q < Wg; ++q) {
          const int64_t c0 = g * Cg + q * 64, nc = std::min<int64_t>(64, Cg - q * 64);
          u64 word = 0;
          for (int j = 0; j < 4 && j * 16 < nc; ++j) {
            const int64_t left = nc - j * 16;
            const __mmask16 lm =
                left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
            const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, px + c0 + j * 16), zero);
            const __mmask16 pos = static_cast<__mmask16>(
                ~_mm512_movepi32_mask(_mm512_castps_si512(v)) & lm);
            word |= static_cast<u64>(pos) << (16 * j);
          }
          o[g * d.gs + q * d.qs] = word;
        }
    }
  }
}

void pack_nhwc_avx512(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
                      const PackDst& d) {
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    pack_nhwc_rows_avx512(src, C, H, W, G, d, b, e);
  });
}
#endif

void pack_nhwc_into(const float* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G,
                    const PackDst& d, int isa) {
#if XNOR_X86
  if (isa == AVX512 && fast_pack_supported()) return pack_nhwc_avx512(src, N, C, H, W, G, d);
#endif
  pack_nhwc_scalar(src, N, C, H, W, G, d);
}

// ---------------------------------------------------------------- epilogue
// The int32 count tile [PB pixels][ldc channels] of a task -> out[c * plane + i] (NCHW) for
// c < Og, i < np.
struct Epi {
  const int32_t* tp;  // [T][ldc] tap popcounts of this group
  const float* sc;    // scale of this group's channels or null
  const float* bi;    // bias or null
  int64_t Og, ldc, T, Cg;
  u64 full;
};

void epilogue_scalar(const int32_t* tile, const u64* mask, int np, const Epi& e, float* out,
                     int64_t plane) {
  for (int i = 0; i < np; ++i) {
    const int32_t* row = tile + i * e.ldc;
    const u64 m = mask[i];
    const int64_t kv = __builtin_popcountll(m) * e.Cg;
    const u64 pad = ~m & e.full;
    for (int64_t c = 0; c < e.Og; ++c) {
      int64_t cnt = row[c];
      for (u64 p = pad; p; p &= p - 1) cnt -= e.tp[__builtin_ctzll(p) * e.ldc + c];
      float v = static_cast<float>(kv - 2 * cnt);
      if (e.sc) v *= e.sc[c];
      if (e.bi) v += e.bi[c];
      out[c * plane + i] = v;
    }
  }
}

#if XNOR_X86
__attribute__((target("avx512f"))) inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  // r[4k + m] holds rows 4k..4k+3, column m of each 4-column lane group
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
  }
}

__attribute__((target("avx512f"))) void epilogue_avx512(int32_t* tile, const u64* mask,
                                                        const int32_t* kv, int np, const Epi& e,
                                                        float* out, int64_t plane) {
  const int64_t ldc = e.ldc, Og = e.Og;
  const int32_t* tp = e.tp;
  for (int i = 0; i < PB; ++i) {  // border pixels: padded taps read zero words, XOR gave w
    const u64 pad = ~mask[i] & e.full;
    if (!pad) continue;
    int32_t* row = tile + i * ldc;
    for (int64_t c = 0; c < ldc; c += 16) {
      __m512i v = _mm512_loadu_si512(row + c);
      for (u64 p = pad; p; p &= p - 1)
        v = _mm512_sub_epi32(v, _mm512_loadu_si512(tp + __builtin_ctzll(p) * ldc + c));
      _mm512_storeu_si512(row + c, v);
    }
  }
  // transposed: one vector = 16 pixels of one channel; dot = Kv - 2 * count
  const __m512i kvv = _mm512_loadu_si512(kv);
  const __mmask16 pm = static_cast<__mmask16>((1u << np) - 1);
  const float* sc = e.sc;
  const float* bi = e.bi;
  for (int64_t c0 = 0; c0 < Og; c0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(tile + i * ldc + c0));
    transpose16(r);
    const int nc = static_cast<int>(std::min<int64_t>(16, Og - c0));
    float* o = out + c0 * plane;
    const float* s = sc ? sc + c0 : nullptr;
    const float* b = bi ? bi + c0 : nullptr;
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      if (c >= nc) break;
      const __m512i cnt = _mm512_castps_si512(r[c]);
      __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(kvv, _mm512_slli_epi32(cnt, 1)));
      if (s) f = _mm512_mul_ps(f, _mm512_set1_ps(s[c]));
      if (b) f = _mm512_add_ps(f, _mm512_set1_ps(b[c]));
      _mm512_mask_storeu_ps(o + c * plane, pm, f);
    }
  }
}
#endif

#if XNOR_X86
// 1x1, stride 1, no padding, Cg % 64 == 0 (NIN's 1x1 layers): pixels in lanes. Activations
// word-major [G, Wg, N * H * W], so one 512-bit load = word q of 8 consecutive pixels; the
// weight word of one output channel is broadcast (from the lanes layout: any address works).
// 4 channels x 32 pixels (16 zmm accumulators) per step; the counts of 16 pixels of a channel
// are contiguous in NCHW, so the epilogue needs no transpose. np <= 32 pixels: word k of
// pixel i at a[k * wstride + i], output channel o of pixel i at out[o * plane + i].
__attribute__((target("avx512f,avx512vpopcntdq"))) void conv1x1_plane_avx512(
    const u64* a, int64_t wstride, const u64* Wl, int64_t Kw, int64_t Og, int64_t Cg,
    const float* sc, const float* bi, int np, float* out, int64_t plane) {
  const __mmask8 vm[4] = {
      static_cast<__mmask8>(np >= 8 ? 0xFF : (1u << std::max(np, 0)) - 1),
      static_cast<__mmask8>(np >= 16 ? 0xFF : (1u << std::max(np - 8, 0)) - 1),
      static_cast<__mmask8>(np >= 24 ? 0xFF : (1u << std::max(np - 16, 0)) - 1),
      static_cast<__mmask8>(np >= 32 ? 0xFF : (1u << std::max(np - 24, 0)) - 1)};
  const __mmask16 sm0 = static_cast<__mmask16>(np >= 16 ? 0xFFFF : (1u << np) - 1);
  const __mmask16 sm1 =
      static_cast<__mmask16>(np >= 32 ? 0xFFFF : (1u << std::max(np - 16, 0)) - 1);
  const __m512i even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i kv = _mm512_set1_epi32(static_cast<int>(Cg));
  for (int64_t o0 = 0; o0 < Og; o0 += 4) {
    const int nc = static_cast<int>(std::min<int64_t>(4, Og - o0));
    const u64* wp[4];
    for (int c = 0; c < 4; ++c) {
      const int64_t o = o0 + std::min(c, nc - 1);
      wp[c] = Wl + (o / LANES) * Kw * LANES + o % LANES;
    }
    __m512i acc[4][4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[c][v] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kw; ++k) {
      const u64* ak = a + k * wstride;
      __m512i av[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) av[v] = _mm512_maskz_loadu_epi64(vm[v], ak + 8 * v);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i b = _mm512_set1_epi64(static_cast<long long>(wp[c][k * LANES]));
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
          acc[c][v] =
              _mm512_add_epi64(acc[c][v], _mm512_popcnt_epi64(_mm512_xor_si512(av[v], b)));
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      if (c >= nc) break;
      const int64_t o = o0 + c;
      float* dst = out + o * plane;
      const __m512i cnt0 = _mm512_permutex2var_epi32(acc[c][0], even, acc[c][1]);
      const __m512i cnt1 = _mm512_permutex2var_epi32(acc[c][2], even, acc[c][3]);
      __m512 f0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(kv, _mm512_slli_epi32(cnt0, 1)));
      __m512 f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(kv, _mm512_slli_epi32(cnt1, 1)));
      if (sc) {
        const __m512 s = _mm512_set1_ps(sc[o]);
        f0 = _mm512_mul_ps(f0, s), f1 = _mm512_mul_ps(f1, s);
      }
      if (bi) {
        const __m512 b = _mm512_set1_ps(bi[o]);
        f0 = _mm512_add_ps(f0, b), f1 = _mm512_add_ps(f1, b);
      }
      _mm512_mask_storeu_ps(dst, sm0, f0);
      if (np > 16) _mm512_mask_storeu_ps(dst + 16, sm1, f1);
    }
  }
}
#endif

// ---------------------------------------------------------------- packed (bit) output
// The output of a conv that feeds the next binary conv (through an optional max pool and
// channel shuffle) as sign bits in that conv's packed activation layout [N, H, W, G2, Wg2]:
// out_bit = sign_bit(v) of the very fp32 value v the float epilogue computes (the float path
// would store v, max-pool it and pack sign(v)): each task's epilogue writes its floats into a
// scratch tile [O][ldp] (ldp pixels per channel), then, per 16 pixels, 16-bit masks of
// v >= 0 (sign bit of v + 0) are stored at the DESTINATION channel perm[c] (the shuffle is a
// permutation of the channels; applying it here is free), and 64 destination channels' masks
// are bit-transposed into 16 pixel words (VPSHUFBITQMB, as in the packer; scalar otherwise).
struct BitOut {
  const int64_t* perm;  // destination channel of output channel c, or null (identity)
  int64_t G2, Cg2, Wg2;
  u64* out;             // [N, OH, OW, G2 * Wg2] (before pooling)
};

// chunks of 64 destination channels: one word of one group, or (Cg2 < 64 dividing 64) the
// words of 64 / Cg2 consecutive groups (split after the transpose), as in pack_avx512_rows
struct Chunking {
  bool split;
  int64_t n, C;
  Chunking(const BitOut& b) {
    C = b.G2 * b.Cg2;
    split = b.Wg2 == 1 && b.Cg2 < 64 && 64 % b.Cg2 == 0;
    n = split ? (C + 63) / 64 : b.G2 * b.Wg2;
  }
  void get(const BitOut& b, int64_t chunk, int64_t& c0, int64_t& nc, int64_t& g,
           int64_t& q) const {
    if (split) {
      c0 = chunk * 64, nc = std::min<int64_t>(64, C - c0), g = c0 / b.Cg2, q = 0;
    } else {
      g = chunk / b.Wg2, q = chunk % b.Wg2;
      c0 = g * b.Cg2 + q * 64, nc = std::min<int64_t>(64, b.Cg2 - q * 64);
    }
  }
};

inline void store_chunk_words(const BitOut& b, const Chunking& ch, const u64* words, int nw,
                              int64_t nc, int64_t g, int64_t q, u64* row) {
  // row = out + pixel0 * G2 Wg2; word w of pixel w
  const int64_t GW2 = b.G2 * b.Wg2;
  if (!ch.split) {
    for (int w = 0; w < nw; ++w) row[w * GW2 + g * b.Wg2 + q] = words[w];
  } else {
    const int64_t ng = nc / b.Cg2;
    const u64 gm = (u64(1) << b.Cg2) - 1;
    for (int w = 0; w < nw; ++w)
      for (int64_t j = 0; j < ng; ++j) row[w * GW2 + g + j] = (words[w] >> (j * b.Cg2)) & gm;
  }
}

// sf: floats [O][ldp] of np pixels; M: scratch uint16 [O2]; writes pixels [0, np) at row
void emit_bits_scalar(const float* sf, int64_t ldp, int np, int64_t O, const BitOut& b,
                      uint16_t* M, u64* row) {
  const Chunking ch(b);
  const int64_t GW2 = b.G2 * b.Wg2;
  for (int h0 = 0; h0 < np; h0 += 16) {
    const int nh = std::min(16, np - h0);
    for (int64_t c = 0; c < O; ++c) {
      const float* v = sf + c * ldp + h0;
      uint32_t m = 0;
      for (int i = 0; i < nh; ++i) m |= sign_bit(v[i]) << i;
      M[b.perm ? b.perm[c] : c] = static_cast<uint16_t>(m);
    }
    u64 words[16];
    for (int64_t k = 0; k < ch.n; ++k) {
      int64_t c0, nc, g, q;
      ch.get(b, k, c0, nc, g, q);
      for (int i = 0; i < nh; ++i) {
        u64 w = 0;
        for (int64_t c = 0; c < nc; ++c) w |= static_cast<u64>((M[c0 + c] >> i) & 1) << c;
        words[i] = w;
      }
      store_chunk_words(b, ch, words, nh, nc, g, q, row + h0 * GW2);
    }
  }
}

#if XNOR_X86
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bitalg"))) void emit_bits_avx512(
    const float* sf, int64_t ldp, int np, int64_t O, const BitOut& b, uint16_t* M, u64* row) {
  const Chunking ch(b);
  const int64_t GW2 = b.G2 * b.Wg2;
  __m512i ctrl[8];
  for (int w = 0; w < 8; ++w)
    ctrl[w] = _mm512_set1_epi64(
        static_cast<long long>(0x3830282018100800ULL + 0x0101010101010101ULL * w));
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) uint16_t tmp[64];
  for (int h0 = 0; h0 < np; h0 += 16) {
    const int nh = std::min(16, np - h0);
    const __mmask16 pm = static_cast<__mmask16>((1u << nh) - 1);
    for (int64_t c = 0; c < O; ++c) {
      const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(pm, sf + c * ldp + h0), zero);
      const uint16_t m = static_cast<uint16_t>(~_mm512_movepi32_mask(_mm512_castps_si512(v)));
      M[b.perm ? b.perm[c] : c] = m;  // lanes past nh are never read below
    }
    u64 words[16];
    for (int64_t k = 0; k < ch.n; ++k) {
      int64_t c0, nc, g, q;
      ch.get(b, k, c0, nc, g, q);
      const uint16_t* m = M + c0;
      if (nc < 64) {
        std::memset(tmp, 0, sizeof(tmp));
        std::memcpy(tmp, m, nc * sizeof(uint16_t));
        m = tmp;
      }
      const __m512i m0 = _mm512_loadu_si512(m), m1 = _mm512_loadu_si512(m + 32);
      const __m512i lo = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm512_cvtepi16_epi8(m0)), _mm512_cvtepi16_epi8(m1), 1);
      const __m512i hi = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srli_epi16(m0, 8))),
          _mm512_cvtepi16_epi8(_mm512_srli_epi16(m1, 8)), 1);
      for (int w = 0; w < nh; ++w)
        words[w] = _mm512_bitshuffle_epi64_mask(w < 8 ? lo : hi, ctrl[w & 7]);
      store_chunk_words(b, ch, words, nh, nc, g, q, row + h0 * GW2);
    }
  }
}
#endif

void emit_bits(const float* sf, int64_t ldp, int np, int64_t O, const BitOut& b, uint16_t* M,
               u64* row, int isa);

// max pool of packed +-1 bits: OR over the window (padding = 0 bits = -1, the OR identity,
// as a -inf padded float max pool followed by sign). in [N, H, W, GW] -> [N, PH, PW, GW]
void pool_bits_into(const u64* in, int64_t N, int64_t H, int64_t W, int64_t GW, int64_t k,
                    int64_t s, int64_t p, u64* out, int64_t PH, int64_t PW) {
  at::parallel_for(0, N * PH, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / PH, oh = r % PH;
      const int64_t h0 = std::max<int64_t>(0, oh * s - p), h1 = std::min(H, oh * s - p + k);
      for (int64_t ow = 0; ow < PW; ++ow) {
        const int64_t w0 = std::max<int64_t>(0, ow * s - p), w1 = std::min(W, ow * s - p + k);
        u64* o = out + ((n * PH + oh) * PW + ow) * GW;
        std::fill(o, o + GW, 0);
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w) {
            const u64* src = in + ((n * H + h) * W + w) * GW;
            for (int64_t j = 0; j < GW; ++j) o[j] |= src[j];
          }
      }
    }
  });
}

}  // namespace

namespace {
void emit_bits(const float* sf, int64_t ldp, int np, int64_t O, const BitOut& b, uint16_t* M,
               u64* row, int isa) {
#if XNOR_X86
  if (isa == AVX512 && fast_pack_supported()) return emit_bits_avx512(sf, ldp, np, O, b, M, row);
#endif
  emit_bits_scalar(sf, ldp, np, O, b, M, row);
}
}  // namespace

// ---------------------------------------------------------------- packing
// float [N, C, H, W] -> int64 [N, H, W, G, Wg] (sign bits)
torch::Tensor pack_activations(torch::Tensor x, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32,
              "xnor: activations must be a float32 NCHW tensor");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "xnor: channels not divisible by groups");
  x = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Wg = (C / groups + 63) / 64, G = groups;
  auto out = torch::zeros({N, H, W, G, Wg}, torch::kInt64);
  PackDst d{reinterpret_cast<u64*>(out.data_ptr<int64_t>()), H, W, 0, 0, G * Wg, Wg, 1};
  pack_into(x.data_ptr<float>(), N, C, H, W, G, d, resolve_isa(-1));
  return out;
}

// float [O, Cg, KH, KW] -> (int64 [G, OB, Kw, 8], int32 [G, KH * KW, Ogp])
std::vector<torch::Tensor> pack_weight(torch::Tensor w, int64_t groups) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == torch::kFloat32,
              "xnor: weight must be a float32 [O, Cg, KH, KW] tensor");
  TORCH_CHECK(groups >= 1 && w.size(0) % groups == 0, "xnor: out channels not divisible by groups");
  w = w.contiguous();
  const int64_t O = w.size(0), Cg = w.size(1), KH = w.size(2), KW = w.size(3), T = KH * KW;
  TORCH_CHECK(T <= 64, "xnor: kernels with more than 64 taps are not supported");
  const int64_t G = groups, Og = O / G, OB = (Og + LANES - 1) / LANES, Ogp = round_up(Og, 16);
  const int64_t Wg = (Cg + 63) / 64, Kw = round_words(T * Cg);
  auto words = torch::zeros({G, OB, Kw, LANES}, torch::kInt64);
  auto pop = torch::zeros({G, T, Ogp}, torch::kInt32);
  u64* W8 = reinterpret_cast<u64*>(words.data_ptr<int64_t>());
  int32_t* P = pop.data_ptr<int32_t>();
  const float* src = w.data_ptr<float>();
  std::vector<u64> tap(Wg), row(Kw + 1);
  for (int64_t o = 0; o < O; ++o) {
    const int64_t g = o / Og, oo = o % Og;
    std::fill(row.begin(), row.end(), 0);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(tap.begin(), tap.end(), 0);
      for (int64_t c = 0; c < Cg; ++c)
        tap[c / 64] |= static_cast<u64>(sign_bit(src[(o * Cg + c) * T + t])) << (c % 64);
      int32_t p = 0;
      for (auto v : tap) p += __builtin_popcountll(v);
      P[(g * T + t) * Ogp + oo] = p;
      append_bits(row.data(), t * Cg, tap.data(), Wg);
    }
    u64* blk = W8 + (g * OB + oo / LANES) * Kw * LANES + oo % LANES;
    for (int64_t k = 0; k < Kw; ++k) blk[k * LANES] = row[k];
  }
  return {words, pop};
}

// ---------------------------------------------------------------- convolution
// x: float [N, C, H, W] (its sign is taken) or int64 [N, H, W, G, Wg] from pack_activations.
// bits == null: float NCHW output; else sign bits into bits->out ([N, OH, OW, G2 Wg2], before
// any pooling), returned tensor undefined.
torch::Tensor conv_core(torch::Tensor x, torch::Tensor wp, torch::Tensor tap_pop,
                        const c10::optional<torch::Tensor>& scale,
                        const c10::optional<torch::Tensor>& bias, int64_t Cg, int64_t O,
                        int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                        int64_t isa_arg, BitOut* bits, int64_t* out_hw) {
  TORCH_CHECK(wp.dim() == 4 && wp.scalar_type() == torch::kInt64 && wp.size(3) == LANES,
              "xnor: packed weight must be int64 [G, OB, Kw, 8]");
  wp = wp.contiguous();
  tap_pop = tap_pop.contiguous();
  const int64_t G = wp.size(0), OB = wp.size(1), Kw = wp.size(2), T = KH * KW;
  TORCH_CHECK(O % G == 0, "xnor: output channels not divisible by groups");
  const int64_t Og = O / G, Ogp = round_up(Og, 16), Wg = (Cg + 63) / 64, GW = G * Wg;
  TORCH_CHECK(OB == (Og + LANES - 1) / LANES, "xnor: packed weight does not match O=", O);
  TORCH_CHECK(Kw == round_words(T * Cg), "xnor: packed weight does not match the kernel");
  TORCH_CHECK(T <= 64 && tap_pop.dim() == 3 && tap_pop.size(0) == G && tap_pop.size(1) == T &&
                  tap_pop.size(2) == Ogp && tap_pop.scalar_type() == torch::kInt32,
              "xnor: bad tap popcounts");
  const int isa = resolve_isa(isa_arg);
  int64_t N, H, W;
  const bool packed_in = x.scalar_type() == torch::kInt64;
  if (packed_in) {
    TORCH_CHECK(x.dim() == 5 && x.size(3) == G && x.size(4) == Wg,
                "xnor: packed activations must be int64 [N, H, W, G=", G, ", Wg=", Wg, "]");
    N = x.size(0), H = x.size(1), W = x.size(2);
  } else {
    TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32,
                "xnor: activations must be float32 NCHW or packed int64");
    TORCH_CHECK(x.size(1) == G * Cg, "xnor: input has ", x.size(1),
                " channels, the weight expects ", Cg, " x ", G, " groups");
    N = x.size(0), H = x.size(2), W = x.size(3);
  }
  // a channels_last float input is packed as it is (no NCHW copy)
  const bool nhwc_in = !packed_in && !x.is_contiguous() &&
                       x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!nhwc_in) x = x.contiguous();
  const int64_t OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0 && ph >= 0 && pw >= 0 && sh > 0 && sw > 0,
              "xnor: output would be empty");
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

  // 1. zero-padded packed activations
  //    Direct path (Cg % 64 == 0): group-major [G, N, Hp, Wp, Wg], so the taps kw, kw + 1 of
  //    a row are adjacent words of a group (one K segment per kernel row); otherwise
  //    pixel-major [N, Hp, Wp, G, Wg] (the patch builder reads all groups of a pixel at once).
  //    1x1 layers (stride 1, no padding, Cg % 64 == 0) on AVX-512: word-major [G, Wg, N, H, W]
  //    for the pixels-in-lanes kernel (conv1x1_plane_avx512).
  const bool direct = Cg % 64 == 0, gpatch = !direct && Wg == 1;
  const bool plane1x1 = isa == AVX512 && direct && KH == 1 && KW == 1 && sh == 1 && sw == 1 &&
                        ph == 0 && pw == 0;
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, NP = N * Hp * Wp;
  const int64_t ps = plane1x1 ? 1 : direct ? Wg : GW;
  const int64_t gs = plane1x1 || direct ? Wg * NP : Wg, qs = plane1x1 ? NP : 1;
  const u64* X;
  std::unique_ptr<u64[]> pad_buf;
  if (packed_in && ph == 0 && pw == 0 && !plane1x1 && (!direct || G == 1)) {
    X = reinterpret_cast<const u64*>(x.data_ptr<int64_t>());
  } else {
    const size_t len = static_cast<size_t>(N * Hp * Wp * GW);
    pad_buf.reset(new u64[len]);
    // the fast packer writes every interior word: zeroing is needed for padding only
    const bool full_write = !packed_in && (nhwc_in || (isa == AVX512 && fast_pack_supported()));
    if (!full_write || ph || pw) std::memset(pad_buf.get(), 0, len * sizeof(u64));
    PackDst d{pad_buf.get(), Hp, Wp, ph, pw, ps, gs, qs};
    if (packed_in) {
      const u64* s = reinterpret_cast<const u64*>(x.data_ptr<int64_t>());
      for (int64_t r = 0; r < N * H; ++r)
        for (int64_t w = 0; w < W; ++w)
          for (int64_t g = 0; g < G; ++g)
            for (int64_t q = 0; q < Wg; ++q)
              d.at(r / H, r % H, w)[g * gs + q * qs] = s[(r * W + w) * GW + g * Wg + q];
    } else if (nhwc_in) {
      pack_nhwc_into(x.data_ptr<float>(), N, G * Cg, H, W, G, d, isa);
    } else {
      pack_into(x.data_ptr<float>(), N, G * Cg, H, W, G, d, isa);
    }
    X = pad_buf.get();
  }

  if (out_hw) out_hw[0] = OH, out_hw[1] = OW;
  torch::Tensor out;
  float* op = nullptr;
  if (!bits) {
    out = torch::empty({N, O, OH, OW}, torch::kFloat32);
    op = out.data_ptr<float>();
  } else {
    TORCH_CHECK(bits->G2 * bits->Cg2 == O, "xnor: bit output channels do not match O=", O);
  }
  const u64* Wt = reinterpret_cast<const u64*>(wp.data_ptr<int64_t>());
  const int64_t plane = OH * OW;
  const int64_t GW2 = bits ? bits->G2 * bits->Wg2 : 0;
#if XNOR_X86
  if (plane1x1) {  // tasks of 32 pixels of one image, all groups and channels
    const int64_t nb32 = (plane + 31) / 32;
    at::parallel_for(0, N * nb32, 1, [&](int64_t tb, int64_t te) {
      std::vector<float> sf(bits ? O * 32 : 0);
      std::vector<uint16_t> M(bits ? O : 0);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t n = task / nb32, p0 = (task % nb32) * 32;
        const int np = static_cast<int>(std::min<int64_t>(32, plane - p0));
        for (int64_t g = 0; g < G; ++g)
          conv1x1_plane_avx512(X + g * gs + n * plane + p0, qs, Wt + g * OB * Kw * LANES, Kw,
                               Og, Cg, sc ? sc + g * Og : nullptr, bi ? bi + g * Og : nullptr,
                               np,
                               bits ? sf.data() + g * Og * 32 : op + (n * O + g * Og) * plane + p0,
                               bits ? 32 : plane);
        if (bits)
          emit_bits(sf.data(), 32, np, O, *bits, M.data(), bits->out + (n * plane + p0) * GW2,
                    isa);
      }
    });
    return out;
  }
#endif

  // 2. tasks of PB output pixels of one image (all groups)
  //   direct (Cg % 64 == 0): word q of tap t of pixel i at base_i + tap_off[t] + g * gs + q,
  //          taps adjacent in memory merged into one K segment
  //   gpatch (Wg == 1, taps not word aligned): bit patches of all groups at once, word k of
  //          group g at patch_i[k * G + g] (vector ops across groups)
  //   else:  one group's bit patch at a time, patch_i[k]
  std::vector<int64_t> tap_off(T), seg_off, seg_len;
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) tap_off[kh * KW + kw] = (kh * Wp + kw) * ps;
  if (direct) {  // taps adjacent in memory (kw, kw + 1 of a kernel row) form one segment
    for (int64_t t = 0; t < T; ++t) {
      if (!seg_off.empty() && seg_off.back() + seg_len.back() == tap_off[t])
        seg_len.back() += Wg;
      else
        seg_off.push_back(tap_off[t]), seg_len.push_back(Wg);
    }
  } else if (gpatch) {
    for (int64_t k = 0; k < Kw; ++k) seg_off.push_back(k * G), seg_len.push_back(1);
  } else {
    seg_off.push_back(0), seg_len.push_back(Kw);
  }
  const int64_t* offs = seg_off.data();
  const int64_t* lens = seg_len.data();
  const int64_t nseg = static_cast<int64_t>(seg_off.size());
  const int64_t pstride = (Kw + 1) * (gpatch ? G : 1);  // one slack word for append_bits
  const Kernel kern = kernel_for(isa);
  const PatchFn build_gpatch = gpatch_for(isa);
  const int32_t* tp = tap_pop.data_ptr<int32_t>();
  const int64_t nblk = (plane + PB - 1) / PB;
  const u64 full = T == 64 ? ~u64(0) : ((u64(1) << T) - 1);

  at::parallel_for(0, N * nblk, 1, [&](int64_t tb, int64_t te) {
    std::vector<int32_t> tile(PB * Ogp, 0);
    std::vector<u64> patch(direct ? 0 : PB * pstride);
    std::vector<float> sf(bits ? O * PB : 0);
    std::vector<uint16_t> M(bits ? O : 0);
    const u64* base[PB];
    const u64* rows[PB];
    u64 mask[PB];
    alignas(64) int32_t kv[PB];
    for (int64_t task = tb; task < te; ++task) {
      const int64_t n = task / nblk, p0 = (task % nblk) * PB;
      const int np = static_cast<int>(std::min<int64_t>(PB, plane - p0));
      int64_t oh = p0 / OW, ow = p0 % OW;  // of pixel p0 + min(i, np - 1)
      for (int i = 0; i < PB; ++i) {
        if (i > 0 && i < np && ++ow == OW) ow = 0, ++oh;
        base[i] = X + ((n * Hp + oh * sh) * Wp + ow * sw) * ps;
        u64 m = 0;
        int taps = 0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh * sh - ph + kh;
          if (ih < 0 || ih >= H) continue;
          for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t iw = ow * sw - pw + kw;
            if (iw >= 0 && iw < W) m |= u64(1) << (kh * KW + kw), ++taps;
          }
        }
        mask[i] = m;
        kv[i] = static_cast<int32_t>(taps * Cg);
        if (gpatch) {
          build_gpatch(patch.data() + i * pstride, pstride, base[i], tap_off.data(), T, Cg, G);
          rows[i] = patch.data() + i * pstride;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < PB; ++i) {
          if (direct) {
            rows[i] = base[i] + g * gs;
          } else if (gpatch) {
            rows[i] = patch.data() + i * pstride + g;
          } else {  // im2col on bits of group g (padded taps read zero words)
            u64* prow = patch.data() + i * pstride;
            std::fill(prow, prow + pstride, 0);
            for (int64_t t = 0; t < T; ++t)
              append_bits(prow, t * Cg, base[i] + tap_off[t] + g * gs, Wg);
            rows[i] = prow;
          }
        }
        const u64* wg = Wt + g * OB * Kw * LANES;
        for (int64_t ob0 = 0; ob0 < OB; ob0 += NBMAX) {
          const int nb = static_cast<int>(std::min<int64_t>(NBMAX, OB - ob0));
          for (int i0 = 0; i0 < np; i0 += MR)
            kern(rows + i0, offs, lens, nseg, wg + ob0 * Kw * LANES, Kw, nb,
                 tile.data() + i0 * Ogp + ob0 * LANES, Ogp);
        }
        Epi e{tp + g * T * Ogp, sc ? sc + g * Og : nullptr, bi ? bi + g * Og : nullptr,
              Og, Ogp, T, Cg, full};
        float* o = bits ? sf.data() + g * Og * PB : op + (n * O + g * Og) * plane + p0;
        const int64_t ostride = bits ? PB : plane;
#if XNOR_X86
        if (isa == AVX512) {
          epilogue_avx512(tile.data(), mask, kv, np, e, o, ostride);
          continue;
        }
#endif
        epilogue_scalar(tile.data(), mask, np, e, o, ostride);
      }
      if (bits)
        emit_bits(sf.data(), PB, np, O, *bits, M.data(), bits->out + (n * plane + p0) * GW2,
                  isa);
    }
  });
  return out;
}

torch::Tensor xnor_conv2d(torch::Tensor x, torch::Tensor wp, torch::Tensor tap_pop,
                          c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> bias,
                          int64_t Cg, int64_t O, int64_t KH, int64_t KW, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t isa_arg) {
  return conv_core(x, wp, tap_pop, scale, bias, Cg, O, KH, KW, sh, sw, ph, pw, isa_arg, nullptr,
                   nullptr);
}

int64_t pooled_size(int64_t n, int64_t k, int64_t s, int64_t p) { return (n + 2 * p - k) / s + 1; }

// The same conv, output as the packed sign bits of (dot * scale + bias) in the activation
// layout of the NEXT binary conv: int64 [N, PH, PW, out_groups, ceil(O / out_groups / 64)],
// output channel c at channel perm[c] (a channel shuffle before the next conv; empty tensor:
// identity), max-pooled (kernel pool_k > 0, stride pool_s, padding pool_p; OR of bits).
torch::Tensor xnor_conv2d_bits(torch::Tensor x, torch::Tensor wp, torch::Tensor tap_pop,
                               c10::optional<torch::Tensor> scale,
                               c10::optional<torch::Tensor> bias, int64_t Cg, int64_t O,
                               int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                               int64_t pw, int64_t isa_arg, torch::Tensor perm,
                               int64_t out_groups, int64_t pool_k, int64_t pool_s,
                               int64_t pool_p) {
  TORCH_CHECK(out_groups >= 1 && O % out_groups == 0, "xnor: O not divisible by out_groups");
  const int64_t G2 = out_groups, Cg2 = O / G2, Wg2 = (Cg2 + 63) / 64, GW2 = G2 * Wg2;
  torch::Tensor perm_c;
  const int64_t* pp = nullptr;
  if (perm.defined() && perm.numel() > 0) {
    TORCH_CHECK(perm.numel() == O && perm.scalar_type() == torch::kInt64, "xnor: perm");
    perm_c = perm.contiguous();
    pp = perm_c.data_ptr<int64_t>();
    std::vector<char> seen(O, 0);
    for (int64_t c = 0; c < O; ++c) {
      TORCH_CHECK(pp[c] >= 0 && pp[c] < O && !seen[pp[c]], "xnor: perm is not a permutation");
      seen[pp[c]] = 1;
    }
  }
  // output size first (the checks of the core run again, cheaply)
  int64_t N, H, W;
  if (x.scalar_type() == torch::kInt64) {
    TORCH_CHECK(x.dim() == 5, "xnor: packed activations must be 5-d");
    N = x.size(0), H = x.size(1), W = x.size(2);
  } else {
    TORCH_CHECK(x.dim() == 4, "xnor: activations must be NCHW");
    N = x.size(0), H = x.size(2), W = x.size(3);
  }
  const int64_t OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "xnor: output would be empty");
  const bool pool = pool_k > 0;
  if (pool)
    TORCH_CHECK(pool_s > 0 && pool_p >= 0 && 2 * pool_p <= pool_k &&
                    pooled_size(OH, pool_k, pool_s, pool_p) > 0 &&
                    pooled_size(OW, pool_k, pool_s, pool_p) > 0,
                "xnor: bad max pool");
  auto unpooled = torch::empty({N, OH, OW, G2, Wg2}, torch::kInt64);
  BitOut b{pp, G2, Cg2, Wg2, reinterpret_cast<u64*>(unpooled.data_ptr<int64_t>())};
  conv_core(x, wp, tap_pop, scale, bias, Cg, O, KH, KW, sh, sw, ph, pw, isa_arg, &b, nullptr);
  if (!pool) return unpooled;
  const int64_t PH = pooled_size(OH, pool_k, pool_s, pool_p);
  const int64_t PW = pooled_size(OW, pool_k, pool_s, pool_p);
  auto out = torch::empty({N, PH, PW, G2, Wg2}, torch::kInt64);
  pool_bits_into(b.out, N, OH, OW, GW2, pool_k, pool_s, pool_p,
                 reinterpret_cast<u64*>(out.data_ptr<int64_t>()), PH, PW);
  return out;
}

// max pool in bit space of packed activations [N, H, W, G, Wg]
torch::Tensor maxpool_bits(torch::Tensor x, int64_t k, int64_t s, int64_t p) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kInt64, "xnor: packed activations");
  TORCH_CHECK(k > 0 && s > 0 && p >= 0 && 2 * p <= k, "xnor: bad max pool");
  x = x.contiguous();
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), GW = x.size(3) * x.size(4);
  const int64_t PH = pooled_size(H, k, s, p), PW = pooled_size(W, k, s, p);
  TORCH_CHECK(PH > 0 && PW > 0, "xnor: max pool output would be empty");
  auto out = torch::empty({N, PH, PW, x.size(3), x.size(4)}, torch::kInt64);
  pool_bits_into(reinterpret_cast<const u64*>(x.data_ptr<int64_t>()), N, H, W, GW, k, s, p,
                 reinterpret_cast<u64*>(out.data_ptr<int64_t>()), PH, PW);
  return out;
}

// packed [N, H, W, G, Wg] -> float +-1 NCHW with C = G * Cg channels (exactly sign(x))
torch::Tensor unpack_bits(torch::Tensor x, int64_t C, bool channels_last) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kInt64, "xnor: packed activations");
  x = x.contiguous();
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), G = x.size(3), Wg = x.size(4);
  TORCH_CHECK(C % G == 0 && (C / G + 63) / 64 == Wg, "xnor: C does not match the packing");
  const int64_t Cg = C / G, HW = H * W;
  const u64* s = reinterpret_cast<const u64*>(x.data_ptr<int64_t>());
  if (channels_last) {  // NHWC memory: one pixel's bits -> its C contiguous floats
    auto out = torch::empty({N, C, H, W},
                            torch::TensorOptions().dtype(torch::kFloat32).memory_format(
                                at::MemoryFormat::ChannelsLast));
    float* o = out.data_ptr<float>();
    at::parallel_for(0, N * HW, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const u64* src = s + r * G * Wg;
        float* dst = o + r * C;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t cc = 0; cc < Cg; ++cc)
            dst[g * Cg + cc] = ((src[g * Wg + cc / 64] >> (cc % 64)) & 1) ? 1.0f : -1.0f;
      }
    });
    return out;
  }
  auto out = torch::empty({N, C, H, W}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / C, c = r % C, g = c / Cg, cc = c % Cg;
      const u64* src = s + n * HW * G * Wg + g * Wg + cc / 64;
      const int bit = static_cast<int>(cc % 64);
      float* dst = o + r * HW;
      for (int64_t i = 0; i < HW; ++i)
        dst[i] = ((src[i * G * Wg] >> bit) & 1) ? 1.0f : -1.0f;
    }
  });
  return out;
}

std::string best_isa() { return isa_name(resolve_isa(-1)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_activations", &pack_activations, "sign bits of NCHW float -> [N, H, W, G, Wg]");
  m.def("pack_weight", &pack_weight,
        "sign bits of [O, Cg, KH, KW] -> (words [G, OB, Kw, 8], tap popcounts [G, T, Ogp])");
  m.def("xnor_conv2d", &xnor_conv2d, "XNOR + popcount conv on packed bits");
  m.def("xnor_conv2d_bits", &xnor_conv2d_bits,
        "XNOR conv with packed sign-bit output (shuffle permutation, bit max pool)");
  m.def("maxpool_bits", &maxpool_bits, "max pool of packed +-1 activations (OR of bits)");
  m.def("unpack_bits", &unpack_bits, "packed [N, H, W, G, Wg] -> float +-1 NCHW",
        py::arg("x"), py::arg("channels"), py::arg("channels_last") = false);
  m.def("best_isa", &best_isa, "the instruction set chosen at run time");
  m.def("detect_isa", &detect_isa, "0 scalar, 1 avx2, 2 avx512_vpopcntdq");
}
