/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_tpm_open(const nkp_context *ctx, NkpTpm **ret) { return nkp_fail(-ENODEV, "No TPM (stub)."); }
void nkp_tpm_close(NkpTpm *tpm) { (void) tpm; }
int nkp_tpm_seal(NkpTpm *tpm, const nkp_secret *kdk, GBytes **ret_blob, char **ret_srk_name) { STUB; }
int nkp_tpm_unseal(NkpTpm *tpm, GBytes *blob, const char *srk_name, nkp_secret **ret) { STUB; }
