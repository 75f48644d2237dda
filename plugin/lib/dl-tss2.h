/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* tpm2-tss (esys, mu, rc, tctildr), loaded on first use (dl.c): only when
 * a TPM is opened, i.e. on a key-cache miss or a seal.  Include after the
 * tss2 headers; each function nkp calls becomes a call through a sym_
 * pointer that nkp_dlopen_tss2() fills, so libnkp.so and the programs carry
 * no DT_NEEDED on libtss2-*.  A tss2 call not listed here is left
 * undefined, and libnkp.so's -Wl,--no-undefined link fails on it: add the
 * function to both lists below.  (Tss2_Tcti_Transmit/Receive are macros
 * over the TCTI context's own function table: nothing to resolve.) */
#ifndef NKP_DL_TSS2_H
#define NKP_DL_TSS2_H

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#define NKP_TSS2_ESYS_SYMBOLS(X)                \
        X(Esys_Create)                          \
        X(Esys_CreatePrimary)                   \
        X(Esys_Create_Async)                    \
        X(Esys_Create_Finish)                   \
        X(Esys_Finalize)                        \
        X(Esys_FlushContext)                    \
        X(Esys_Free)                            \
        X(Esys_GetCapability)                   \
        X(Esys_Initialize)                      \
        X(Esys_Load)                            \
        X(Esys_StartAuthSession)                \
        X(Esys_Startup)                         \
        X(Esys_TRSess_SetAttributes)            \
        X(Esys_TR_GetName)                      \
        X(Esys_Unseal)
#define NKP_TSS2_MU_SYMBOLS(X)                  \
        X(Tss2_MU_TPM2B_PRIVATE_Marshal)        \
        X(Tss2_MU_TPM2B_PRIVATE_Unmarshal)      \
        X(Tss2_MU_TPM2B_PUBLIC_Marshal)         \
        X(Tss2_MU_TPM2B_PUBLIC_Unmarshal)
#define NKP_TSS2_RC_SYMBOLS(X)                  \
        X(Tss2_RC_Decode)
#define NKP_TSS2_TCTILDR_SYMBOLS(X)             \
        X(Tss2_TctiLdr_Finalize)                \
        X(Tss2_TctiLdr_Initialize)

#define NKP_DL_EXTERN(f) extern __typeof__(f) *sym_##f;
NKP_TSS2_ESYS_SYMBOLS(NKP_DL_EXTERN)
NKP_TSS2_MU_SYMBOLS(NKP_DL_EXTERN)
NKP_TSS2_RC_SYMBOLS(NKP_DL_EXTERN)
NKP_TSS2_TCTILDR_SYMBOLS(NKP_DL_EXTERN)

/* Loads libtss2-esys.so.0, libtss2-mu.so.0, libtss2-rc.so.0 and
 * libtss2-tctildr.so.0 and resolves every symbol above, once per process
 * (thread-safe).  0, or -ELIBACC with one line naming the library and the
 * package to install (nkp_error_message()). */
int nkp_dlopen_tss2(void);

#ifndef NKP_DL_NO_REDIRECT
#define Esys_Create sym_Esys_Create
#define Esys_CreatePrimary sym_Esys_CreatePrimary
#define Esys_Create_Async sym_Esys_Create_Async
#define Esys_Create_Finish sym_Esys_Create_Finish
#define Esys_Finalize sym_Esys_Finalize
#define Esys_FlushContext sym_Esys_FlushContext
#define Esys_Free sym_Esys_Free
#define Esys_GetCapability sym_Esys_GetCapability
#define Esys_Initialize sym_Esys_Initialize
#define Esys_Load sym_Esys_Load
#define Esys_StartAuthSession sym_Esys_StartAuthSession
#define Esys_Startup sym_Esys_Startup
#define Esys_TRSess_SetAttributes sym_Esys_TRSess_SetAttributes
#define Esys_TR_GetName sym_Esys_TR_GetName
#define Esys_Unseal sym_Esys_Unseal
#define Tss2_MU_TPM2B_PRIVATE_Marshal sym_Tss2_MU_TPM2B_PRIVATE_Marshal
#define Tss2_MU_TPM2B_PRIVATE_Unmarshal sym_Tss2_MU_TPM2B_PRIVATE_Unmarshal
#define Tss2_MU_TPM2B_PUBLIC_Marshal sym_Tss2_MU_TPM2B_PUBLIC_Marshal
#define Tss2_MU_TPM2B_PUBLIC_Unmarshal sym_Tss2_MU_TPM2B_PUBLIC_Unmarshal
#define Tss2_RC_Decode sym_Tss2_RC_Decode
#define Tss2_TctiLdr_Finalize sym_Tss2_TctiLdr_Finalize
#define Tss2_TctiLdr_Initialize sym_Tss2_TctiLdr_Initialize
#endif

#endif
