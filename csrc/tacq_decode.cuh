// Decode of format-v1 bit-plane words (docs/format.md) for the CUDA GEMV (docs/cuda.md).
//
// Everything here is __host__ __device__: the host tests (tests/test_cuda_ext.py) compile this
// header into a small shared library and check every function against tacq_kernels.reference;
// the kernel (tacq_gemv.cu) uses the same functions. No torch and no CUDA headers are needed
// (compiled by a plain C++ compiler the qualifiers vanish).
//
// Layout reminder. A w-bit plane is int32 [K_pad * w / 32, N], N fastest; word r of column n
// holds the codes of K rows r * 32/w + t in bits [t*w, (t+1)*w). 3-bit codes are q2 | q1 << 2,
// with the 1-bit plane word of 32 rows covering two 2-bit words (bits 0-15 and 16-31).
//
// The fast decode ("top-bit magic", research note decode.md section 3). A 2-bit word holds rows
// t and t+8 at bits 2t and 2t+16: 16 bits apart, like the two halves of a half2. One shift puts
// both codes at the top of the two fp16 mantissas and one LOP3 ((v & mask) | magic) makes two
// fp16 numbers 2^b + q at once:
//
//   bits  magic   value      code bits in each 16-bit half   pairs per word
//   2     0x4400  4 + q      8-9                             8: rows (t, t+8) of a 16-row word
//   3     0x4800  8 + q      7-8 from q2, 9 from q1          8: rows (t, t+8) of a 16-row word
//   4     0x4C00  16 + q     6-9                             4: rows (t, t+4) of an 8-row word
//
// That uncentred pair 2^b + q serves bf16 x at M = 1: multiplied by (x[t], x[t+8]) with one HFMA2
// into an fp16x2 partial sum, flushed to fp32 every 32 rows, the offset removed once per column at
// the end with the sums of x. Its offset makes the fp16 partial sums 2-3e-3 relative error at
// K = 4096, so fp16 x takes the centred decode below (q - c, one LOP3 + one HFMA2 per pair, read
// in place without the per-pair shift; 5-7e-4): sum (q - z) x = sum (q - c) x - (z - c) sum x.
// For 3 bits the 1-bit word is first "spread" with one PRMT (spread_q1) so that rows t and t+8
// also sit 16 bits apart.

#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define TACQ_HD __host__ __device__ __forceinline__
#else
#define TACQ_HD inline
#endif

namespace tacq {

// Shift left by s >= 0, logically right by -s; s is a compile-time constant in the kernel.
TACQ_HD uint32_t shift(uint32_t w, int s) { return s >= 0 ? (w << s) : (w >> -s); }

// The uncentred decode (bf16 x at M = 1): fp16 bit pattern of 2^bits (the magic number, also the
// offset removed at the end).
TACQ_HD constexpr uint32_t magic_half(int bits) { return bits == 2 ? 0x4400u : bits == 3 ? 0x4800u : 0x4C00u; }
TACQ_HD constexpr float magic_value(int bits) { return bits == 2 ? 4.0f : bits == 3 ? 8.0f : 16.0f; }

// K rows one plane word of the low plane (q2 or q4) covers, and fp16 pairs decoded from it.
TACQ_HD constexpr int rows_per_word(int bits) { return bits == 4 ? 8 : 16; }
TACQ_HD constexpr int pairs_per_word(int bits) { return bits == 4 ? 4 : 8; }
// Distance in K rows between the two rows of a pair (t, t + pair_stride).
TACQ_HD constexpr int pair_stride(int bits) { return bits == 4 ? 4 : 8; }

// (a & b) | c in one LOP3. Written as a lop3 on the device because nvcc otherwise emits an AND
// and an OR (seen in the sm_90 SASS) for a constant mask and a constant magic number.
TACQ_HD uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#else
  return (a & b) | c;
#endif
}

// Two fp16 values (2^2 + q[t], 2^2 + q[t+8]) from a 2-bit plane word: one SHF, one LOP3.
TACQ_HD uint32_t pair2(uint32_t w, int t) { return and_or(shift(w, 8 - 2 * t), 0x03000300u, 0x44004400u); }

// Two fp16 values (16 + q[t], 16 + q[t+4]) from a 4-bit plane word.
TACQ_HD uint32_t pair4(uint32_t w, int t) { return and_or(shift(w, 6 - 4 * t), 0x03C003C0u, 0x4C004C00u); }

// The 1-bit word of 32 rows, spread for the 2-bit word h (0: rows 0-15, 1: rows 16-31) of the
// same 32 rows: bits 0-7 = rows 0-7 of that word, bits 16-23 = rows 8-15, zeros elsewhere.
// One PRMT on the device (bytes 2h and 2h+1 of q1 into bytes 0 and 2).
TACQ_HD uint32_t spread_q1(uint32_t q1, int h) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(q1, 0u, h ? 0x4342u : 0x4140u);  // selector nibbles >= 4 read the zero word
#else
  return ((q1 >> (16 * h)) & 0xFFu) | (((q1 >> (16 * h + 8)) & 0xFFu) << 16);
#endif
}

// Two fp16 values (8 + q[t], 8 + q[t+8]), q = q2 | q1 << 2, from a 2-bit word and the spread
// 1-bit word (spread_q1): two SHF, two LOP3.
TACQ_HD uint32_t pair3(uint32_t w2, uint32_t u1, int t) {
  return and_or(shift(u1, 9 - t), 0x02000200u, and_or(shift(w2, 7 - 2 * t), 0x01800180u, 0x48004800u));
}

// ---------------------------------------------------------------------------------------------
// The centred decode (fp16 x; the kernel's accurate path). Instead of shifting every code to the
// top of the mantissa and subtracting the offset (SHF + LOP3 + HADD2 per pair), each code is
// read where it lies, with a larger magic number, and one HFMA2 both rescales and centres it:
//
//   raw = lop3(src & mask | 0x6400)        = fp16 (1024 + q 2^p), q at bits [p, p + width) of
//                                            each half of src (p + width <= 10: in the mantissa)
//   out = hfma2(raw, 2^-p, -(1024 2^-p + c)) = q - c, exactly
//
// Exact because the product and sum are formed exactly and rounded once (fused), the result
// q - c is an fp16 number, and so are both constants: 2^-p, and 1024 2^-p + c, which needs
// p >= 2 for c = 1.5 (2 bits: 257.5 has an fp16 spacing of 0.25) and c = 7.5 (4 bits). Pairs
// of a 2-bit word at bits 2t (t < 4) are read from w << 2, the rest from w >> 6 (p = 2..8,
// two SHF per word instead of seven); 4 bits likewise with t < 2.
//
// 3 bits: q = q2 + 4 q1 from two raws, raw2 (the 2-bit word; t < 5 from w, t >= 5 from w >> 10,
// p2 = 2t mod 10) and raw1 = 1024 + q1 2^t (the spread 1-bit word, bit t of each half), merged
// by two HFMA2:
//   e   = hfma2(raw1, 4 2^-t, -(4096 2^-t + c + 1024 2^-p2))  = 4 q1 - c - 1024 2^-p2
//   out = hfma2(raw2, 2^-p2, e)                                = q2 + 4 q1 - c
// Every constant and e are fp16 numbers for c = 4 (not 3.5: 4096 + 3.5 + 1024 at t = 0 has an
// fp16 spacing of 4), so the 3-bit centre is 4 (values -4..3). tests/test_cuda_ext.py checks
// every constant for exactness in fp16 and every decoded value against the codes.
// ---------------------------------------------------------------------------------------------

// The magic number of the centred decode: fp16 1024, whose mantissa step is 1.
constexpr uint32_t kMagic1024 = 0x64006400u;

// The centre c the centred kernel subtracts (its pairs hold q - c); removed at the end with the
// sums of x: sum (q - z) x = sum (q - c) x - (z - c) sum x.
TACQ_HD constexpr float decode_center(int bits) { return bits == 2 ? 1.5f : bits == 3 ? 4.0f : 7.5f; }

// 2^-p, 0 <= p < 24 (exact; a loop here would survive into the kernel's SASS unfolded).
TACQ_HD constexpr float pow2_neg(int p) { return 1.0f / (float)(1u << p); }

// Pair t of a low-plane word (q2 or q4) is read from source word 0 (lo_src0) or 1 (lo_src1).
TACQ_HD constexpr int lo_source(int bits, int t) { return bits == 2 ? t >= 4 : bits == 4 ? t >= 2 : t >= 5; }
TACQ_HD uint32_t lo_src0(int bits, uint32_t w) { return bits == 3 ? w : w << 2; }
TACQ_HD uint32_t lo_src1(int bits, uint32_t w) { return bits == 3 ? w >> 10 : w >> 6; }
// Bit p of each half of the source word where pair t's low-plane code starts.
TACQ_HD constexpr int lo_pos(int bits, int t) {
  return bits == 2 ? 2 * (t & 3) + 2 : bits == 4 ? 4 * (t & 1) + 2 : 2 * (t < 5 ? t : t - 5);
}
TACQ_HD constexpr uint32_t lo_mask(int bits, int t) { return ((bits == 4 ? 15u : 3u) << lo_pos(bits, t)) * 0x10001u; }
// raw = 1024 + q 2^p in each half (q the low-plane code of pair t, from its source word).
TACQ_HD uint32_t lo_raw(int bits, uint32_t src, int t) { return and_or(src, lo_mask(bits, t), kMagic1024); }
// The HFMA2 constants of the low-plane code: scale 2^-p; offset -(1024 2^-p + c) (2, 4 bits).
TACQ_HD constexpr float lo_scale(int bits, int t) { return pow2_neg(lo_pos(bits, t)); }
TACQ_HD constexpr float lo_offset(int bits, int t) { return -(1024.0f * lo_scale(bits, t) + decode_center(bits)); }
// 3 bits: raw1 = 1024 + q1 2^t from the spread 1-bit word, and its HFMA2 constants.
TACQ_HD uint32_t q1_raw(uint32_t u1, int t) { return and_or(u1, 0x10001u << t, kMagic1024); }
TACQ_HD constexpr float q1_scale(int t) { return 4.0f * pow2_neg(t); }
TACQ_HD constexpr float q1_offset(int t) { return -(4096.0f * pow2_neg(t) + decode_center(3) + 1024.0f * lo_scale(3, t)); }

// half2 bits of the scale the kernel keeps in a register for pair t (the other constant of that
// HFMA2 is its immediate): the low-plane scale 2^-p for 2 and 4 bits, the q1 scale 4 2^-t for 3.
// Both are powers of two, so the fp16 pattern is the biased exponent alone.
TACQ_HD constexpr int log2_of_reg_scale(int bits, int t) { return bits == 3 ? 2 - t : -lo_pos(bits, t); }
TACQ_HD constexpr uint32_t reg_scale_bits(int bits, int t) {
  return (uint32_t)((15 + log2_of_reg_scale(bits, t)) << 10) * 0x10001u;
}

// Position (0..31) of K row `row` (0..31) of a 32-row chunk in the kernel's x order: pair j of
// word w is (x[w*R + j], x[w*R + j + S]) (R rows per word, S the pair stride), stored as the
// halves 2j and 2j+1 of that word's R halves. xprep_row is its inverse: the row at position i.
TACQ_HD constexpr int xprep_row(int bits, int i) {
  return bits == 4 ? 8 * (i >> 3) + ((i & 7) >> 1) + 4 * (i & 1) : 16 * (i >> 4) + ((i & 15) >> 1) + 8 * (i & 1);
}

// Inverse of xprep_row: the position (0..31) of row `row` (0..31) of a chunk in the x order.
TACQ_HD constexpr int xprep_pos(int bits, int row) {
  return bits == 4 ? 8 * (row >> 3) + 2 * (row & 3) + ((row >> 2) & 1)
                   : 16 * (row >> 4) + 2 * (row & 7) + ((row >> 3) & 1);
}

// Canonical decode, one code at a time (the generic kernel path: LUT segments, groups that are
// not a multiple of 32). `lo` is the q2/q4 word holding row `row` (0..31) of a 32-row chunk,
// `hi` the chunk's q1 word (3 bits only).
TACQ_HD uint32_t code_at(int bits, uint32_t lo, uint32_t hi, int row) {
  if (bits == 4) return (lo >> (4 * (row & 7))) & 15u;
  uint32_t q = (lo >> (2 * (row & 15))) & 3u;
  if (bits == 3) q |= ((hi >> row) & 1u) << 2;
  return q;
}

// The plane word (row index inside the chunk's words) that holds row `row` of a 32-row chunk.
TACQ_HD constexpr int word_of_row(int bits, int row) { return bits == 4 ? row >> 3 : row >> 4; }

// Decoders on one code (fp32, as tacq_kernels.reference computes them).
TACQ_HD float affine(uint32_t q, float scale, float zero) { return ((float)q - zero) * scale; }

// fp16 bits -> float, for host code (the device uses __half2float).
TACQ_HD float half_bits_to_float(uint32_t h) {
  uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 31u, man = h & 1023u;
  float v;
  if (exp == 0) {
    v = (float)man * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
  } else if (exp == 31) {
    v = man ? __builtin_nanf("") : __builtin_inff();
  } else {
    v = (1.0f + (float)man / 1024.0f);
    int e = (int)exp - 15;
    while (e > 0) { v *= 2.0f; --e; }
    while (e < 0) { v *= 0.5f; ++e; }
  }
  return sign ? -v : v;
}

}  // namespace tacq
