// A standalone experiment kept for its numbers (docs/RESULTS.md, "On the AMD EPYC Zen 4,
// 2026-12-07 night"): how fast two threads run M-row f32 products over SmolLM2's 30 layers of
// Linear weights (425 MB, no head) stored row-major [K, N] as the model keeps them (blocks of 16 k
// rows, accumulators loaded and stored per block, as the project's row-major kernel) and stored as
// panels [N / P][K][P] (one contiguous stream per thread, the sums in registers over all of K).
// Each output's sum over k is in the same order in both. The threads do not meet between
// matrices (the project's kernels do), so absolute times are lower than a forward's products.
// Not the project's kernel: synthetic values, no tails, AVX-512 required.
//
//   g++ -O3 -march=native -std=c++17 -pthread tools/f32_panel_bench.cc -o /tmp/f && /tmp/f
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
typedef float vec __attribute__((vector_size(64), aligned(4)));
static inline vec Ld(const float* p) { return *(const vec*)p; }
static inline vec Bc(const float* p) { __m512 b = _mm512_set1_ps(*p); asm volatile("" : "+v"(b)); vec v; memcpy(&v,&b,64); return v; }
template <int M, int CB, int RG>
void RowMajor(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int KB = 16; const int64_t width = CB * 16;
  for (int m = 0; m < M; ++m) for (int64_t n = n0; n < n1; ++n) out[m * N + n] = 0;
  for (int64_t k = 0; k + KB <= K; k += KB) {
    const float* wk = w + k * N;
    for (int64_t n = n0; n + width <= n1; n += width) {
      if (k + 2 * KB <= K) for (int j = 0; j < KB; ++j) for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(wk + (KB + j) * N + n + c, 0, 2);
      if (n + 2 * width <= n1) for (int j = 0; j < KB; ++j) for (int64_t c = 0; c < width; c += 16) __builtin_prefetch(wk + j * N + n + width + c, 0, 3);
      for (int m0 = 0; m0 < M; m0 += RG) {
        vec acc[RG][CB];
        for (int g = 0; g < RG && m0 + g < M; ++g) for (int c = 0; c < CB; ++c) acc[g][c] = Ld(out + (m0 + g) * N + n + c * 16);
        for (int j = 0; j < KB; ++j) {
          vec wv[CB]; for (int c = 0; c < CB; ++c) wv[c] = Ld(wk + j * N + n + c * 16);
          for (int g = 0; g < RG && m0 + g < M; ++g) { vec a = Bc(x + (m0 + g) * K + k + j); for (int c = 0; c < CB; ++c) acc[g][c] += a * wv[c]; }
        }
        for (int g = 0; g < RG && m0 + g < M; ++g) for (int c = 0; c < CB; ++c) *(vec*)(out + (m0 + g) * N + n + c * 16) = acc[g][c];
      }
    }
  }
}
// panels [N/P][K][P], P = CB*16
template <int M, int CB, int RG, int PD>
void Panels(const float* x, const float* w, float* out, int64_t K, int64_t N, int64_t p0, int64_t p1) {
  constexpr int P = CB * 16;
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * P;
    for (int m0 = 0; m0 < M; m0 += RG) {
      vec acc[RG][CB];
      for (int g = 0; g < RG; ++g) for (int c = 0; c < CB; ++c) acc[g][c] = vec{};
      for (int64_t k = 0; k < K; ++k) {
        if (m0 == 0) for (int c = 0; c < CB; ++c) __builtin_prefetch(panel + (k + PD) * P + c * 16, 0, 3);
        vec wv[CB]; for (int c = 0; c < CB; ++c) wv[c] = Ld(panel + k * P + c * 16);
        for (int g = 0; g < RG && m0 + g < M; ++g) { vec a = Bc(x + (m0 + g) * K + k); for (int c = 0; c < CB; ++c) acc[g][c] += a * wv[c]; }
      }
      for (int g = 0; g < RG && m0 + g < M; ++g) for (int c = 0; c < CB; ++c) *(vec*)(out + (m0 + g) * N + p * P + c * 16) = acc[g][c];
    }
  }
}
int main(int argc, char** argv) {
  int layers = 30;
  int64_t shapes[7][2] = {{576,576},{576,192},{576,192},{576,576},{576,1536},{576,1536},{1536,576}};
  std::vector<std::vector<float>> W;
  for (int l = 0; l < layers; ++l) for (auto& s : shapes) { W.emplace_back(s[0]*s[1]); for (auto& v : W.back()) v = (rand() % 1000) * 1e-3f; }
  std::vector<float> x(16 * 1536, 0.5f), out(16 * 1536);
  auto run = [&](auto kernel, bool panels, int CBw) {
    auto t0 = std::chrono::steady_clock::now();
    auto body = [&](int t) {
      std::vector<float> o(16 * 1536);
      for (int i = 0; i < (int)W.size(); ++i) {
        int64_t K = shapes[i % 7][0], N = shapes[i % 7][1];
        int64_t units = panels ? N / (CBw * 16) : N / 16;
        int64_t half = units / 2;
        int64_t a = t ? half : 0, b = t ? units : half;
        if (panels) kernel(x.data(), W[i].data(), out.data(), K, N, a, b);
        else kernel(x.data(), W[i].data(), out.data(), K, N, a * 16, b * 16);
      }
    };
    std::thread th(body, 1); body(0); th.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3;
  };
  auto best = [&](const char* name, auto kernel, bool panels, int CBw) {
    std::vector<double> t; for (int r = 0; r < 15; ++r) t.push_back(run(kernel, panels, CBw));
    std::sort(t.begin(), t.end()); printf("%-22s min %.1f q1 %.1f med %.1f ms\n", name, t[0], t[3], t[7]); fflush(stdout);
  };
  for (int rep = 0; rep < 2; ++rep) {
    best("row-major 1", RowMajor<1, 8, 1>, false, 8);
    best("panels 1", Panels<1, 2, 1, 16>, true, 2);
    best("row-major 4", RowMajor<4, 4, 4>, false, 4);
    best("panels 4", Panels<4, 2, 4, 16>, true, 2);
    best("row-major 8", RowMajor<8, 2, 8>, false, 2);
    best("panels 8", Panels<8, 2, 8, 16>, true, 2);
    best("row-major 12", RowMajor<12, 2, 12>, false, 2);
    best("panels 12", Panels<12, 2, 12, 16>, true, 2);
    best("row-major 16 (2 x 8)", RowMajor<16, 2, 8>, false, 2);
    best("panels 16 (2 x 8)", Panels<16, 2, 8, 16>, true, 2);
  }
}
