/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_p12_export(const NkpBackupInfo *info, const nkp_secret *kdk, const nkp_secret *password,
                   int iterations, GBytes **ret) { STUB; }
int nkp_p12_import(const void *der, size_t len, const nkp_secret *password, NkpBackupInfo *ret_info,
                   nkp_secret **ret_kdk) { STUB; }
int nkp_provider_backup(nkp_context *ctx, const char *name, const char *path,
                        const nkp_secret *password) { STUB; }
int nkp_provider_restore(nkp_context *ctx, const char *path, const nkp_secret *password,
                         nkp_provider **ret, bool *ret_already) { STUB; }
