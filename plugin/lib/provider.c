/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

bool nkp_provider_name_valid(const char *name) { return false; }
nkp_provider *nkp_provider_from_entry(const NkpStoreEntry *e) { return NULL; }
int nkp_provider_create(nkp_context *ctx, const char *name, unsigned flags, nkp_provider **ret) { STUB; }
int nkp_provider_get(nkp_context *ctx, const char *name, nkp_provider **ret) { STUB; }
int nkp_provider_get_by_key_id(nkp_context *ctx, const char *key_id, nkp_provider **ret) { STUB; }
int nkp_provider_list(nkp_context *ctx, nkp_provider ***ret, size_t *ret_n) { STUB; }
void nkp_provider_list_free(nkp_provider **list, size_t n) { (void) list; }
int nkp_provider_set_default(nkp_context *ctx, const char *name) { STUB; }
int nkp_provider_delete(nkp_context *ctx, const char *name, unsigned in_use, bool force) { STUB; }
const char *nkp_provider_name(const nkp_provider *p) { return NULL; }
const char *nkp_provider_key_id(const nkp_provider *p) { return NULL; }
const char *nkp_provider_fingerprint(const nkp_provider *p) { return NULL; }
unsigned nkp_provider_flags(const nkp_provider *p) { return 0; }
enum nkp_seal nkp_provider_seal(const nkp_provider *p) { return NKP_SEAL_NONE; }
int64_t nkp_provider_created(const nkp_provider *p) { return 0; }
bool nkp_provider_is_active(const nkp_provider *p) { return false; }
void nkp_provider_free(nkp_provider *p) { (void) p; }
int nkp_provider_get_kdk(nkp_context *ctx, const char *key_id, nkp_secret **ret) { STUB; }
int nkp_store_entry_new(nkp_context *ctx, const char *name, const char *key_id, unsigned flags,
                        int64_t created, const nkp_secret *kdk, NkpStoreEntry **ret) { STUB; }
int nkp_store_add(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk) { STUB; }
