// The Fortran BLAS entry points libtorch_cpu exports (MKL is linked into it). setup.py defines
// FASTRES_BLAS_SYMBOLS only after checking that the installed torch exports them. Calling them
// directly saves the ~5 us of tensor wrapping per call that at::mm costs, which matters at the
// small shapes of batch-1 inference and of a streaming step.
#pragma once

#ifdef FASTRES_BLAS_SYMBOLS
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif
