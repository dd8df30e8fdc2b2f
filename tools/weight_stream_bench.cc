// Standalone experiments kept for their numbers (docs/RESULTS.md, sections 1c and 1e): how fast
// 1-row products stream 192M synthetic weights: int8 stored as rows ([N, K], the four rows of a
// block read as four streams) or as row groups ([N/4, K/32, 4, 32], one stream), 4-bit blocks
// like GGUF's Q4_1 stored as rows (16 bytes of nibbles, a scale and a minimum per 32 weights;
// the nibbles are the unsigned operand of the VNNI dot, so no sign trick), and a plain read.
// AVX512-VNNI required; not the project's kernels (no tails, synthetic values, f32 scales).
//
//   g++ -O3 -march=native -std=c++17 -pthread tools/weight_stream_bench.cc -o /tmp/ws
//   /tmp/ws 576 2     # K, threads
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <thread>
#include <vector>
#include <algorithm>
static inline float Sum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo);
}
struct X { std::vector<int8_t> q, a; std::vector<float> s, sq; int64_t nb; };
// row-major [N, K]
void RowMajor(const X& x, const int8_t* w, float* out, int64_t K, int64_t n0, int64_t n1) {
  constexpr int VB = 4;
  for (int64_t n = n0; n + VB <= n1; n += VB) {
    if (n + 3 * VB <= n1) for (int64_t c = 0; c < VB * K; c += 64) __builtin_prefetch(w + (n + 2 * VB) * K + c);
    __m256 acc[VB]; for (int j = 0; j < VB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < x.nb; ++b) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)&x.q[b * 32]);
      const __m256i a = _mm256_loadu_si256((const __m256i*)&x.a[b * 32]);
      const __m256 s = _mm256_set1_ps(x.s[b]);
      for (int j = 0; j < VB; ++j) {
        __m256i wv = _mm256_loadu_si256((const __m256i*)(w + (n + j) * K + b * 32));
        __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, _mm256_sign_epi8(wv, q));
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[j]);
      }
    }
    for (int j = 0; j < VB; ++j) out[n + j] = Sum8(acc[j]);
  }
}
// interleaved [N/4, nb, 4, 32]; PF = prefetch distance in bytes (0: none)
template <int PF>
void Inter(const X& x, const int8_t* w, float* out, int64_t K, int64_t n0, int64_t n1) {
  constexpr int VB = 4;
  const int64_t group = VB * K;
  for (int64_t n = n0; n + VB <= n1; n += VB) {
    const int8_t* g = w + n * K;  // n/4 groups of 4K bytes
    __m256 acc[VB]; for (int j = 0; j < VB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < x.nb; ++b) {
      if (PF) __builtin_prefetch(g + b * 128 + PF), __builtin_prefetch(g + b * 128 + PF + 64);
      const __m256i q = _mm256_loadu_si256((const __m256i*)&x.q[b * 32]);
      const __m256i a = _mm256_loadu_si256((const __m256i*)&x.a[b * 32]);
      const __m256 s = _mm256_set1_ps(x.s[b]);
      for (int j = 0; j < VB; ++j) {
        __m256i wv = _mm256_loadu_si256((const __m256i*)(g + b * 128 + j * 32));
        __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, _mm256_sign_epi8(wv, q));
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[j]);
      }
    }
    for (int j = 0; j < VB; ++j) out[n + j] = Sum8(acc[j]);
  }
}
// Q4 row layout: for each block b: 16 bytes nibbles (weights 0..15: lo nibbles = first 16, hi = last 16)
// scales/mins in separate arrays [N, nb].
void Q4(const X& x, const uint8_t* w, const float* d, const float* m, float* out, int64_t K,
        int64_t n0, int64_t n1) {
  constexpr int VB = 4; const int64_t nb = x.nb; const int64_t rowb = nb * 16;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n + VB <= n1; n += VB) {
    for (int64_t c = 0; c < VB * rowb; c += 64) __builtin_prefetch(w + (n + 2 * VB) * rowb + c);
    __m256 acc[VB]; float mins[VB] = {0, 0, 0, 0};
    for (int j = 0; j < VB; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)&x.q[b * 32]);
      for (int j = 0; j < VB; ++j) {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(w + (n + j) * rowb + b * 16));
        const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
        __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nib, q);
        const float scale = d[(n + j) * nb + b] * x.s[b];
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc[j]);
        mins[j] += m[(n + j) * nb + b] * x.sq[b];
      }
    }
    for (int j = 0; j < VB; ++j) out[n + j] = Sum8(acc[j]) + mins[j];
  }
}
// plain read
float sink[64];
void Read(const int8_t* w, int64_t K, int64_t n0, int64_t n1) {
  __m256i acc = _mm256_setzero_si256();
  const int8_t* p = w + n0 * K; const int64_t bytes = (n1 - n0) * K;
  for (int64_t i = 0; i < bytes; i += 32) acc = _mm256_add_epi8(acc, _mm256_loadu_si256((const __m256i*)(p + i)));
  _mm256_storeu_si256((__m256i*)&sink[0], acc);
}
int main(int argc, char** argv) {
  const int64_t K = argc > 1 ? atoll(argv[1]) : 576, nb = K / 32;
  const int threads = argc > 2 ? atoi(argv[2]) : 2;
  const int64_t N = (192ll << 20) / K / 8 * 8;
  std::vector<int8_t> W(N * K); for (int64_t i = 0; i < N * K; ++i) W[i] = (int8_t)((i * 2654435761u >> 13) % 255 - 127);
  std::vector<uint8_t> W4(N * nb * 16); for (size_t i = 0; i < W4.size(); ++i) W4[i] = (uint8_t)(i * 40503u >> 7);
  std::vector<float> d(N * nb, 0.01f), m(N * nb, -0.08f), out(N);
  X x; x.nb = nb; x.q.resize(K); x.a.resize(K); x.s.assign(nb, 0.02f); x.sq.assign(nb, 3.f);
  for (int k = 0; k < K; ++k) { x.q[k] = (int8_t)(k % 200 - 100); x.a[k] = std::abs(x.q[k]); }
  auto run = [&](const char* name, auto fn, double bytes_per_weight = 1.0) {
    double best = 1e9;
    for (int r = 0; r < 7; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      if (threads == 2) { std::thread t1([&] { fn(0, N / 8 * 4); }); fn(N / 8 * 4, N); t1.join(); }
      else fn(0, N);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("K=%ld thr=%d %-10s %6.2f G weights/s %6.2f GB/s\n", K, threads, name, N * K / best / 1e9,
           N * K * bytes_per_weight / best / 1e9);
  };
  for (int rep = 0; rep < 2; ++rep) {
    run("read", [&](int64_t a, int64_t b) { Read(W.data(), K, a, b); });
    run("rowmajor", [&](int64_t a, int64_t b) { RowMajor(x, W.data(), out.data(), K, a, b); });
    run("inter", [&](int64_t a, int64_t b) { Inter<0>(x, W.data(), out.data(), K, a, b); });
    run("inter-pf1k", [&](int64_t a, int64_t b) { Inter<1024>(x, W.data(), out.data(), K, a, b); });
    run("inter-pf2k", [&](int64_t a, int64_t b) { Inter<2048>(x, W.data(), out.data(), K, a, b); });
    run("q4-rows", [&](int64_t a, int64_t b) { Q4(x, W4.data(), d.data(), m.data(), out.data(), K, a, b); },
        0.75);
  }
  printf("%f\n", out[5]);
}
