// A standalone experiment kept for its numbers (docs/RESULTS.md, int8 row groups): how fast 1-row
// int8 products stream 192M synthetic weights stored as rows ([N, K], the four rows of a block
// read as four streams) against row groups ([N/4, K/32, 4, 32], one stream), and a plain read.
// AVX512-VNNI required; not the project's kernel (no tails, synthetic values).
//
//   g++ -O3 -march=native -std=c++17 -pthread tools/int8_layout_bench.cc -o /tmp/i8 && /tmp/i8 576 2
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
struct X { std::vector<int8_t> q, a; std::vector<float> s; int64_t nb; };
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
  std::vector<float> out(N);
  X x; x.nb = nb; x.q.resize(K); x.a.resize(K); x.s.assign(nb, 0.02f);
  for (int k = 0; k < K; ++k) { x.q[k] = (int8_t)(k % 200 - 100); x.a[k] = std::abs(x.q[k]); }
  auto run = [&](const char* name, auto fn) {
    double best = 1e9;
    for (int r = 0; r < 7; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      if (threads == 2) { std::thread t1([&] { fn(0, N / 8 * 4); }); fn(N / 8 * 4, N); t1.join(); }
      else fn(0, N);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("K=%ld thr=%d %-10s %6.2f GB/s\n", K, threads, name, N * K / best / 1e9);
  };
  for (int rep = 0; rep < 2; ++rep) {
    run("read", [&](int64_t a, int64_t b) { Read(W.data(), K, a, b); });
    run("rowmajor", [&](int64_t a, int64_t b) { RowMajor(x, W.data(), out.data(), K, a, b); });
    run("inter", [&](int64_t a, int64_t b) { Inter<0>(x, W.data(), out.data(), K, a, b); });
    run("inter-pf1k", [&](int64_t a, int64_t b) { Inter<1024>(x, W.data(), out.data(), K, a, b); });
    run("inter-pf2k", [&](int64_t a, int64_t b) { Inter<2048>(x, W.data(), out.data(), K, a, b); });
  }
  printf("%f\n", out[5]);
}
