/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_cache_get(nkp_context *ctx, const char *key_id, nkp_secret **ret, NkpCacheInfo *ret_info) { return -ENOENT; }
int nkp_cache_put(nkp_context *ctx, const NkpCacheInfo *info, const nkp_secret *kdk) { return 0; }
int nkp_cache_mark_deleted(nkp_context *ctx, const char *key_id) { return 0; }
int nkp_cache_list(nkp_context *ctx, GArray **ret) { *ret = g_array_new(FALSE, TRUE, sizeof(NkpCacheInfo)); return 0; }
int nkp_cache_flush(nkp_context *ctx) { return 0; }
