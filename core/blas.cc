#include "core/blas.h"

#include <dlfcn.h>

namespace reasonalloc {
namespace {

// CBLAS enum values (cblas.h): RowMajor 101, NoTrans 111, Trans 112, Upper 121.
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using SsyrkFn = void (*)(int, int, int, int, int, float, const float*, int, float, float*, int);
using SetThreadsFn = void (*)(int);

struct Blas {
  SgemmFn sgemm = nullptr;
  SsyrkFn ssyrk = nullptr;

  Blas() {
    void* lib = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return;
    auto set_threads = reinterpret_cast<SetThreadsFn>(dlsym(lib, "openblas_set_num_threads"));
    sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "cblas_sgemm"));
    ssyrk = reinterpret_cast<SsyrkFn>(dlsym(lib, "cblas_ssyrk"));
    if (sgemm == nullptr || ssyrk == nullptr) {
      sgemm = nullptr;
      ssyrk = nullptr;
      return;
    }
    // The engine runs heads on its own pool; OpenBLAS threads inside a head would oversubscribe.
    if (set_threads != nullptr) set_threads(1);
  }
};

const Blas& GetBlas() {
  static const Blas* blas = new Blas();
  return *blas;
}

}  // namespace

void GemmABt(int m, int n, int k, float alpha, const float* a, const float* b, float* c) {
  if (const Blas& blas = GetBlas(); blas.sgemm != nullptr) {
    blas.sgemm(101, 111, 112, m, n, k, alpha, a, k, b, k, 0.0f, c, n);
    return;
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      float dot = 0;
      for (int t = 0; t < k; ++t) dot += a[i * k + t] * b[j * k + t];
      c[i * n + j] = alpha * dot;
    }
  }
}

void SyrkUpper(int n, int k, const float* a, float* c) {
  if (const Blas& blas = GetBlas(); blas.ssyrk != nullptr) {
    blas.ssyrk(101, 121, 111, n, k, 1.0f, a, k, 0.0f, c, n);
    return;
  }
  for (int i = 0; i < n; ++i) {
    for (int j = i; j < n; ++j) {
      float dot = 0;
      for (int t = 0; t < k; ++t) dot += a[i * k + t] * a[j * k + t];
      c[i * n + j] = dot;
    }
  }
}

const char* BlasBackend() { return GetBlas().sgemm != nullptr ? "openblas" : "loops"; }

}  // namespace reasonalloc
