/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_keysafe_new(const char *vm_uuid, const nkp_provider *provider, nkp_keysafe **ret) { STUB; }
int nkp_keysafe_parse(const char *xml, size_t len, nkp_keysafe **ret) { STUB; }
int nkp_keysafe_format(const nkp_keysafe *ks, char **ret) { STUB; }
void nkp_keysafe_free(nkp_keysafe *ks) { (void) ks; }
const char *nkp_keysafe_vm_uuid(const nkp_keysafe *ks) { return NULL; }
const char *nkp_keysafe_provider_name(const nkp_keysafe *ks) { return NULL; }
const char *nkp_keysafe_provider_key_id(const nkp_keysafe *ks) { return NULL; }
const char *nkp_keysafe_provider_fingerprint(const nkp_keysafe *ks) { return NULL; }
const uint8_t *nkp_keysafe_kek_salt(const nkp_keysafe *ks) { return NULL; }
int nkp_keysafe_put_dek(nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, const char *secret_uuid, const nkp_secret *dek) { STUB; }
int nkp_keysafe_get_dek(const nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, nkp_secret **ret) { STUB; }
size_t nkp_keysafe_n_entries(const nkp_keysafe *ks) { return 0; }
const char *nkp_keysafe_entry_kind(const nkp_keysafe *ks, size_t i) { return NULL; }
const char *nkp_keysafe_entry_id(const nkp_keysafe *ks, size_t i) { return NULL; }
const char *nkp_keysafe_entry_secret_uuid(const nkp_keysafe *ks, size_t i) { return NULL; }
int nkp_keysafe_remove_dek(nkp_keysafe *ks, const char *kind, const char *object_id) { STUB; }
int nkp_keysafe_rewrap(nkp_keysafe *ks, const nkp_secret *old_kek, const nkp_provider *new_provider,
                       const nkp_secret *new_kdk) { STUB; }
int nkp_keysafe_new_for(const char *vm_uuid, const char *provider_name, const char *key_id,
                        const char *fingerprint, nkp_keysafe **ret) { STUB; }
