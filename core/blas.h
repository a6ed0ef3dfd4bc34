// The two BLAS calls the scorers need, row-major fp32. OpenBLAS is loaded at run time with dlopen
// rather than linked: a linked OpenBLAS puts ~60 KB of static TLS into every thread's stack, which
// overflows the 100 KB stacks of the metrics endpoint's (civetweb) threads. Without OpenBLAS the
// same results come from plain loops (slower, same math).
#ifndef REASONALLOC_CORE_BLAS_H_
#define REASONALLOC_CORE_BLAS_H_

namespace reasonalloc {

// C[m x n] = alpha · A[m x k] · B[n x k]^T
void GemmABt(int m, int n, int k, float alpha, const float* a, const float* b, float* c);
// Upper triangle (j >= i) of C[n x n] = A[n x k] · A^T; the lower triangle is left untouched.
void SyrkUpper(int n, int k, const float* a, float* c);
// Whether OpenBLAS was found ("openblas" or "loops").
const char* BlasBackend();

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_BLAS_H_
