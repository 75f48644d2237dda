/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_hkdf_sha256(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt, size_t salt_len,
                    const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len) { STUB; }
int nkp_aes256gcm_seal(const uint8_t key[32], const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                       size_t aad_len, const uint8_t *pt, size_t len, uint8_t *ct,
                       uint8_t tag[NKP_GCM_TAG_SIZE]) { STUB; }
int nkp_aes256gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t len,
                       const uint8_t *tag, size_t tag_len, uint8_t *pt) { STUB; }
int nkp_kdk_fingerprint(const nkp_secret *kdk, char **ret) { STUB; }
int nkp_kek_derive(const nkp_secret *kdk, const uint8_t kek_salt[NKP_KEK_SALT_SIZE],
                   const char *key_id, const char *vm_uuid, nkp_secret **ret) { STUB; }
