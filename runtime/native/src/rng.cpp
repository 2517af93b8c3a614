// numpy's default_rng, bit for bit: SeedSequence entropy mixing, PCG64 (XSL-RR 128/64), the
// float32 ziggurat normal sampler and Lemire's bounded integers, as numpy's Generator draws them.
// The Python runtime seeds one generator per sample with default_rng([seed, index, stream]);
// tests/runtime/native checks every draw here against numpy.
#include <cmath>

#include "common.hpp"

namespace gdx {
namespace {
#include "ziggurat_tables.inc"

// SeedSequence's hash constants (O'Neill's seed_seq_fe), uint32 arithmetic throughout.
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd,
                   kMultB = 0x58f38ded, kMixL = 0xca01f9dd, kMixR = 0x4973f715;
constexpr int kXShift = 16;
constexpr int kPoolSize = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> kXShift;
  return value;
}
uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t r = kMixL * x - kMixR * y;
  r ^= r >> kXShift;
  return r;
}

const unsigned __int128 kPcgMult =
    (static_cast<unsigned __int128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
constexpr float kZigR = 3.6541528853610088f;
constexpr float kZigInvR = 0.27366123732975828f;

}  // namespace

Rng::Rng(const std::vector<uint64_t>& entropy) {
  // Each int becomes its little-endian 32-bit words (0 -> one zero word), concatenated.
  std::vector<uint32_t> words;
  for (uint64_t v : entropy) {
    do {
      words.push_back(static_cast<uint32_t>(v));
      v >>= 32;
    } while (v);
  }
  uint32_t pool[kPoolSize];
  uint32_t hc = kInitA;
  for (int k = 0; k < kPoolSize; ++k)
    pool[k] = hashmix(k < static_cast<int>(words.size()) ? words[k] : 0, hc);
  for (int src = 0; src < kPoolSize; ++src)
    for (int dst = 0; dst < kPoolSize; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hc));
  for (size_t src = kPoolSize; src < words.size(); ++src)
    for (int dst = 0; dst < kPoolSize; ++dst) pool[dst] = mix(pool[dst], hashmix(words[src], hc));
  // generate_state(4, uint64): 8 words from the cycled pool, paired little-endian.
  uint32_t st[8];
  uint32_t hb = kInitB;
  for (int k = 0; k < 8; ++k) {
    uint32_t v = pool[k % kPoolSize];
    v ^= hb;
    hb *= kMultB;
    v *= hb;
    v ^= v >> kXShift;
    st[k] = v;
  }
  uint64_t s64[4];
  for (int k = 0; k < 4; ++k) s64[k] = uint64_t(st[2 * k]) | (uint64_t(st[2 * k + 1]) << 32);
  unsigned __int128 seed = (static_cast<unsigned __int128>(s64[0]) << 64) | s64[1];
  unsigned __int128 seq = (static_cast<unsigned __int128>(s64[2]) << 64) | s64[3];
  // pcg_setseq_128_srandom_r
  state_ = 0;
  inc_ = (seq << 1) | 1u;
  state_ = state_ * kPcgMult + inc_;
  state_ += seed;
  state_ = state_ * kPcgMult + inc_;
}

uint64_t Rng::next64() {
  state_ = state_ * kPcgMult + inc_;
  uint64_t hi = static_cast<uint64_t>(state_ >> 64), lo = static_cast<uint64_t>(state_);
  unsigned rot = static_cast<unsigned>(state_ >> 122);
  uint64_t x = hi ^ lo;
  return (x >> rot) | (x << ((64 - rot) & 63));
}

uint32_t Rng::next32() {
  // A 64-bit draw serves two 32-bit ones, low half first (numpy's pcg64_next32).
  if (has32_) {
    has32_ = false;
    return buf32_;
  }
  uint64_t v = next64();
  has32_ = true;
  buf32_ = static_cast<uint32_t>(v >> 32);
  return static_cast<uint32_t>(v);
}

float Rng::normal_f() {
  for (;;) {
    uint32_t r = next32();
    int idx = r & 0xff;
    uint32_t sign = (r >> 8) & 1u;
    uint32_t rabs = (r >> 9) & 0x7fffffu;
    float x = static_cast<float>(rabs) * kZigW[idx];
    if (sign) x = -x;
    if (rabs < kZigK[idx]) return x;  // the rectangle: ~99% of draws
    if (idx == 0) {
      for (;;) {  // the tail beyond r (Marsaglia's method), with 1 - U against log(0)
        float xx = -kZigInvR * std::log1p(-next_float());
        float yy = -std::log1p(-next_float());
        if (yy + yy > xx * xx) return ((rabs >> 8) & 1u) ? -(kZigR + xx) : kZigR + xx;
      }
    }
    // The wedge; the density is evaluated in double, as numpy does.
    if ((kZigF[idx - 1] - kZigF[idx]) * next_float() + kZigF[idx] <
        std::exp(-0.5 * static_cast<double>(x) * x))
      return x;
  }
}

int64_t Rng::integers(int64_t low, int64_t high) {
  // Generator.integers(low, high) for one int64: Lemire's method on 32-bit draws when the
  // range fits in 32 bits (every class count does).
  uint64_t rng = static_cast<uint64_t>(high - 1 - low);
  if (rng == 0) return low;
  if (rng > 0xFFFFFFFFull) fail(GDX_ERR_INTERNAL, "integers: range wider than 32 bits");
  if (rng == 0xFFFFFFFFull) return low + next32();
  uint32_t rng_excl = static_cast<uint32_t>(rng) + 1;
  uint64_t m = uint64_t(next32()) * rng_excl;
  uint32_t leftover = static_cast<uint32_t>(m);
  if (leftover < rng_excl) {
    uint32_t threshold = (0xFFFFFFFFu - static_cast<uint32_t>(rng)) % rng_excl;
    while (leftover < threshold) {
      m = uint64_t(next32()) * rng_excl;
      leftover = static_cast<uint32_t>(m);
    }
  }
  return low + static_cast<int64_t>(m >> 32);
}

}  // namespace gdx
