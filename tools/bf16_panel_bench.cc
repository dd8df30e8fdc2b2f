// A standalone experiment kept for its numbers (docs/RESULTS.md, section 1d): how fast two
// threads stream a 1-row product with 60 bf16 weights of 576 x 1536 (106 MB) stored row-major
// [K, N] as the model keeps them (threads split the columns, 8-row k blocks, as the project's
// kernel reads them) and stored as panels [N / 128][K][128] (threads split the panels, each one
// contiguous stream); f32 row-major as the yardstick. The order of each output's sum over k is
// the same in all three. Not the project's kernel: synthetic values, no tails, AVX-512 required.
//
//   g++ -O3 -march=native -std=c++17 -pthread tools/bf16_panel_bench.cc -o /tmp/p && /tmp/p
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
typedef float vec __attribute__((vector_size(64), aligned(4)));
static inline vec LoadW(const uint16_t* p) {
  __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
  vec v; memcpy(&v, &b, 64); return v;
}
static inline vec LoadW(const float* p) { return *(const vec*)p; }
template <typename W>
void RowMajor(const float* x, const W* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = 8, CB = 8; const int64_t width = CB * 16;
  for (int64_t n = n0; n < n1; ++n) out[n] = 0;
  for (int64_t k = 0; k + KB <= K; k += KB) {
    const W* wk = w + k * N;
    for (int64_t n = n0; n + width <= n1; n += width) {
      if (k + 2 * KB <= K) for (int j = 0; j < KB; ++j) for (int64_t c = 0; c < width; c += 64 / sizeof(W)) __builtin_prefetch(wk + (KB + j) * N + n + c);
      vec acc[CB]; for (int c = 0; c < CB; ++c) acc[c] = *(vec*)(out + n + c * 16);
      for (int j = 0; j < KB; ++j) { vec a = vec{} + x[k + j]; for (int c = 0; c < CB; ++c) acc[c] += a * LoadW(wk + j * N + n + c * 16); }
      for (int c = 0; c < CB; ++c) *(vec*)(out + n + c * 16) = acc[c];
    }
  }
}
void Panels(const float* x, const uint16_t* w, float* out, int64_t K, int64_t p0, int64_t p1) {
  constexpr int CB = 8;
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* wp = w + p * K * 128;
    vec acc[CB] = {};
    for (int64_t k = 0; k < K; ++k) {
      __builtin_prefetch(wp + (k + 8) * 128); __builtin_prefetch(wp + (k + 8) * 128 + 32);
      __builtin_prefetch(wp + (k + 8) * 128 + 64); __builtin_prefetch(wp + (k + 8) * 128 + 96);
      vec a = vec{} + x[k];
      for (int c = 0; c < CB; ++c) acc[c] += a * LoadW(wp + k * 128 + c * 16);
    }
    for (int c = 0; c < CB; ++c) *(vec*)(out + p * 128 + c * 16) = acc[c];
  }
}
int main() {
  const int64_t K = 576, N = 1536, MATS = 60;
  std::vector<uint16_t> wb(MATS * K * N); std::vector<float> wf(MATS * K * N);
  for (size_t i = 0; i < wb.size(); ++i) { wb[i] = 0x3f80 + (i % 7); wf[i] = 1.0f + (i % 7); }
  std::vector<float> x(K, 0.5f), out(N);
  auto bench = [&](const char* name, double bytes, auto half) {
    double best = 1e9;
    for (int r = 0; r < 15; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      std::thread t([&] { for (int m = 0; m < MATS; ++m) half(m, 1); });
      for (int m = 0; m < MATS; ++m) half(m, 0);
      t.join();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("%-18s %6.2f GB/s\n", name, bytes / best / 1e9);
  };
  std::vector<float> out1(N);
  for (int rep = 0; rep < 2; ++rep) {
    bench("f32 row-major", MATS * K * N * 4.0, [&](int m, int h) {
      RowMajor(x.data(), wf.data() + m * K * N, h ? out1.data() : out.data(), K, N, h * N / 2, (h + 1) * N / 2); });
    bench("bf16 row-major", MATS * K * N * 2.0, [&](int m, int h) {
      RowMajor(x.data(), wb.data() + m * K * N, h ? out1.data() : out.data(), K, N, h * N / 2, (h + 1) * N / 2); });
    bench("bf16 panels", MATS * K * N * 2.0, [&](int m, int h) {
      Panels(x.data(), wb.data() + m * K * N, h ? out1.data() : out.data(), K, h * N / 256, (h + 1) * N / 256); });
  }
  printf("%f %f\n", out[3], out1[5]);
}
