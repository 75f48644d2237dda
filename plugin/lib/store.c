/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

void nkp_store_entry_free(NkpStoreEntry *e) { (void) e; }
void nkp_store_free(NkpStore *store) { (void) store; }
int nkp_store_lock(nkp_context *ctx, int *ret_fd) { STUB; }
void nkp_store_unlock(int fd) { (void) fd; }
int nkp_store_load(nkp_context *ctx, NkpStore **ret) { STUB; }
int nkp_store_save(nkp_context *ctx, const NkpStore *store) { STUB; }
NkpStoreEntry *nkp_store_find(const NkpStore *store, const char *name) { return NULL; }
NkpStoreEntry *nkp_store_find_key_id(const NkpStore *store, const char *key_id) { return NULL; }
