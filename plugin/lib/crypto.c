/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The key chain: thin glue over OpenSSL 3, no cryptography of our own.
 *
 *   KDK --HKDF-SHA256(salt = per-VM KEK salt,
 *                     info = "nkp kek v1" 0x00 key_id[16] vm_uuid[16])--> KEK
 *   KDK --HKDF-SHA256(no salt, info = "nkp fingerprint v1")--> fingerprint
 *   DEK --AES-256-GCM under the KEK--> wrapped DEK (see keysafe.c)
 *
 * Every buffer that held key bytes is wiped before it goes out of scope.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "nkp-private.h"

#define SHA256_SIZE 32
#define HKDF_SHA256_MAX_OUT (255 * SHA256_SIZE) /* RFC 5869, section 2.3 */

/* OpenSSL 3's GCM keeps the IV in a 128-byte buffer and refuses longer
 * ones; nkp itself uses 12 bytes. */
#define GCM_IV_MAX 128

#define KEK_INFO_LABEL "nkp kek v1"
#define FINGERPRINT_INFO_LABEL "nkp fingerprint v1"

G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_KDF, EVP_KDF_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_KDF_CTX, EVP_KDF_CTX_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_CIPHER_CTX, EVP_CIPHER_CTX_free)

/* ---- HKDF ----------------------------------------------------------------- */

int nkp_hkdf_sha256(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt, size_t salt_len,
                    const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len)
{
        if (!out || out_len == 0 || out_len > HKDF_SHA256_MAX_OUT)
                return nkp_fail(-EINVAL, "HKDF-SHA256 can derive 1 to %d bytes, not %zu.",
                                HKDF_SHA256_MAX_OUT, out_len);
        if ((!ikm && ikm_len) || (!salt && salt_len) || (!info && info_len))
                return nkp_fail(-EINVAL, "HKDF-SHA256 was given a length without a buffer.");

        g_autoptr(EVP_KDF) kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
        g_autoptr(EVP_KDF_CTX) kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
        if (!kctx)
                return nkp_fail(-ENOMEM, "OpenSSL has no HKDF: %s.", nkp_openssl_error());

        /* OpenSSL wants a non-NULL pointer even for an empty key; an empty
         * salt or info is the same as leaving the parameter out (RFC 5869:
         * no salt = HashLen zero bytes). */
        static const uint8_t empty[1];
        OSSL_PARAM params[5];
        size_t n = 0;
        params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *) "SHA256", 0);
        params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
                                                        (void *) (ikm_len ? ikm : empty), ikm_len);
        if (salt_len)
                params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *) salt,
                                                                salt_len);
        if (info_len)
                params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *) info,
                                                                info_len);
        params[n] = OSSL_PARAM_construct_end();

        if (EVP_KDF_derive(kctx, out, out_len, params) != 1) {
                nkp_wipe(out, out_len);
                return nkp_fail(-EIO, "HKDF-SHA256 failed: %s.", nkp_openssl_error());
        }
        return 0;
}

/* ---- AES-256-GCM ------------------------------------------------------------ */

static int gcm_check_sizes(size_t key_len, size_t iv_len, size_t aad_len, size_t len)
{
        if (key_len != 32)
                return nkp_fail(-EINVAL, "AES-256-GCM needs a 32-byte key, not %zu bytes.", key_len);
        if (iv_len == 0 || iv_len > GCM_IV_MAX)
                return nkp_fail(-EINVAL, "AES-GCM needs an IV of 1 to %d bytes, not %zu.", GCM_IV_MAX,
                                iv_len);
        if (aad_len > INT_MAX || len > INT_MAX)
                return nkp_fail(-EINVAL, "AES-GCM input is too large.");
        return 0;
}

/* Sets up `ctx` for AES-256-GCM with `key` and an IV of any length, then
 * feeds the AAD.  `encrypt` is 1 to seal, 0 to open. */
static int gcm_begin(EVP_CIPHER_CTX *ctx, int encrypt, const uint8_t *key, const uint8_t *iv,
                     size_t iv_len, const uint8_t *aad, size_t aad_len)
{
        int outl;
        if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, encrypt) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, (int) iv_len, NULL) != 1 ||
            EVP_CipherInit_ex(ctx, NULL, NULL, key, iv, encrypt) != 1)
                return -EIO;
        if (aad_len > 0 && EVP_CipherUpdate(ctx, NULL, &outl, aad, (int) aad_len) != 1)
                return -EIO;
        return 0;
}

int nkp_aes256gcm_seal(const uint8_t key[32], const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                       size_t aad_len, const uint8_t *pt, size_t len, uint8_t *ct,
                       uint8_t tag[NKP_GCM_TAG_SIZE])
{
        int r = gcm_check_sizes(32, iv_len, aad_len, len);
        if (r < 0)
                return r;
        if (!key || !iv || !tag || (aad_len && !aad) || (len && (!pt || !ct)))
                return nkp_fail(-EINVAL, "AES-GCM seal was given a missing buffer.");

        g_autoptr(EVP_CIPHER_CTX) ctx = EVP_CIPHER_CTX_new();
        if (!ctx)
                return nkp_fail(-ENOMEM, "Out of memory for an AES-GCM context.");

        int outl = 0, finl = 0;
        if (gcm_begin(ctx, 1, key, iv, iv_len, aad, aad_len) < 0 ||
            (len > 0 && EVP_EncryptUpdate(ctx, ct, &outl, pt, (int) len) != 1) ||
            EVP_EncryptFinal_ex(ctx, ct ? ct + outl : NULL, &finl) != 1 ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, NKP_GCM_TAG_SIZE, tag) != 1) {
                if (len > 0)
                        nkp_wipe(ct, len);
                return nkp_fail(-EIO, "AES-GCM encryption failed: %s.", nkp_openssl_error());
        }
        return 0;
}

int nkp_aes256gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t len,
                       const uint8_t *tag, size_t tag_len, uint8_t *pt)
{
        int r = gcm_check_sizes(key_len, iv_len, aad_len, len);
        if (r < 0)
                return r;
        /* A shorter tag is weaker and nkp never writes one: refuse it rather
         * than verify fewer bits. */
        if (tag_len != NKP_GCM_TAG_SIZE)
                return nkp_fail(-EINVAL, "AES-GCM tag must be %d bytes, not %zu.", NKP_GCM_TAG_SIZE,
                                tag_len);
        if (!key || !iv || !tag || (aad_len && !aad) || (len && (!ct || !pt)))
                return nkp_fail(-EINVAL, "AES-GCM open was given a missing buffer.");

        g_autoptr(EVP_CIPHER_CTX) ctx = EVP_CIPHER_CTX_new();
        if (!ctx)
                return nkp_fail(-ENOMEM, "Out of memory for an AES-GCM context.");

        /* Whatever goes wrong from here, the caller never sees partial
         * plaintext. */
        int outl = 0, finl = 0;
        if (gcm_begin(ctx, 0, key, iv, iv_len, aad, aad_len) < 0 ||
            (len > 0 && EVP_DecryptUpdate(ctx, pt, &outl, ct, (int) len) != 1) ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, (int) tag_len, (void *) tag) != 1) {
                if (len > 0)
                        nkp_wipe(pt, len);
                return nkp_fail(-EIO, "AES-GCM decryption failed: %s.", nkp_openssl_error());
        }
        if (EVP_DecryptFinal_ex(ctx, pt ? pt + outl : NULL, &finl) != 1) {
                if (len > 0)
                        nkp_wipe(pt, len);
                (void) nkp_openssl_error(); /* drop the queue: a bad tag is not an OpenSSL fault */
                return nkp_fail(-EBADMSG, "The encrypted data does not authenticate: it was altered, "
                                          "or the key is wrong.");
        }
        return 0;
}

/* ---- Key chain ------------------------------------------------------------- */

static int check_kdk(const nkp_secret *kdk)
{
        if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A provider key must be %d bytes.", NKP_KDK_SIZE);
        return 0;
}

int nkp_kek_derive(const nkp_secret *kdk, const uint8_t kek_salt[NKP_KEK_SALT_SIZE],
                   const char *key_id, const char *vm_uuid, nkp_secret **ret)
{
        int r = check_kdk(kdk);
        if (r < 0)
                return r;
        if (!kek_salt)
                return nkp_fail(-EINVAL, "The KEK derivation needs a salt.");

        /* info = label 0x00 key_id vm_uuid: fixed length, so unambiguous. */
        uint8_t info[sizeof KEK_INFO_LABEL + 16 + 16];
        memcpy(info, KEK_INFO_LABEL, sizeof KEK_INFO_LABEL); /* includes the 0x00 */
        /* The values are not echoed: they may be anything, and error
         * messages must stay one printable line. */
        if (nkp_uuid_parse(key_id, info + sizeof KEK_INFO_LABEL) < 0)
                return nkp_fail(-EINVAL, "The provider key id given for the KEK is not a UUID.");
        if (nkp_uuid_parse(vm_uuid, info + sizeof KEK_INFO_LABEL + 16) < 0)
                return nkp_fail(-EINVAL, "The VM UUID given for the KEK is not a UUID.");

        g_autoptr(nkp_secret) kek = NULL;
        r = nkp_secret_new(NKP_KEK_SIZE, &kek);
        if (r < 0)
                return r;
        r = nkp_hkdf_sha256(nkp_secret_data(kdk), NKP_KDK_SIZE, kek_salt, NKP_KEK_SALT_SIZE, info,
                            sizeof info, nkp_secret_data_mut(kek), NKP_KEK_SIZE);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&kek);
        return 0;
}

int nkp_kdk_fingerprint(const nkp_secret *kdk, char **ret)
{
        int r = check_kdk(kdk);
        if (r < 0)
                return r;

        uint8_t fp[SHA256_SIZE];
        r = nkp_hkdf_sha256(nkp_secret_data(kdk), NKP_KDK_SIZE, NULL, 0,
                            (const uint8_t *) FINGERPRINT_INFO_LABEL, strlen(FINGERPRINT_INFO_LABEL),
                            fp, sizeof fp);
        if (r < 0)
                return r;

        char *hex = malloc(2 * sizeof fp + 1);
        if (!hex) {
                nkp_wipe(fp, sizeof fp);
                return nkp_fail(-ENOMEM, "Out of memory for a fingerprint.");
        }
        nkp_hex_encode(fp, sizeof fp, hex);
        /* One-way, but it came out of the KDK: no need to leave it around. */
        nkp_wipe(fp, sizeof fp);
        *ret = hex;
        return 0;
}
