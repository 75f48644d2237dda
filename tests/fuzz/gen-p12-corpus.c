/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Writes the seed corpus of fuzz-p12 (not installed, not a test):
 *
 *   ninja -C build-fuzz tests/fuzz/gen-p12-corpus
 *   build-fuzz/tests/fuzz/gen-p12-corpus tests/fuzz/corpus/fuzz-p12
 *
 * Real nkp backups from nkp_p12_export(), with the fuzz target's password
 * and only 1000 iterations so that the fuzzer is not stuck in PBKDF2, plus
 * the files nkp must refuse: a certificate bundle, a backup with two nkp
 * bags, one under another password, one with an unknown flag.  And bare
 * SafeContents (safe-*.der: what the encrypted safe holds), for the part of
 * the import that runs after the MAC.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>

#include "p12-internal.h"

#define PASSWORD "nkp-fuzz-password"
#define ITER 1000

static int write_bytes(const char *dir, const char *name, const void *data, size_t len)
{
        g_autofree char *path = g_build_filename(dir, name, NULL);
        g_autoptr(GError) error = NULL;
        if (!g_file_set_contents(path, data, (gssize) len, &error)) {
                fprintf(stderr, "%s\n", error->message);
                return -EIO;
        }
        printf("%s (%zu bytes)\n", path, len);
        return 0;
}

static int write_p12(const char *dir, const char *name, PKCS12 *p12)
{
        unsigned char *der = NULL;
        int n = p12 ? i2d_PKCS12(p12, &der) : -1;
        PKCS12_free(p12);
        if (n <= 0)
                return -EINVAL;
        int r = write_bytes(dir, name, der, (size_t) n);
        OPENSSL_free(der);
        return r;
}

static int export(const char *dir, const char *file, const char *name, unsigned flags,
                  const char *password)
{
        NkpBackupInfo info = { 0 };
        g_strlcpy(info.name, name, sizeof info.name);
        nkp_uuid_random(info.key_id);
        info.flags = flags;
        g_autoptr(nkp_secret) kdk = NULL, pw = NULL;
        g_autoptr(GBytes) der = NULL;
        if (nkp_secret_new_random(NKP_KDK_SIZE, &kdk) < 0 ||
            nkp_secret_new_copy(password, strlen(password), &pw) < 0 ||
            nkp_p12_export(&info, kdk, pw, ITER, &der) < 0) {
                fprintf(stderr, "%s\n", nkp_error_message());
                return -EINVAL;
        }
        return write_bytes(dir, file, g_bytes_get_data(der, NULL), g_bytes_get_size(der));
}

/* n_bags nkp secret bags with the given flags. */
static STACK_OF(PKCS12_SAFEBAG) *nkp_bags(int n_bags, const char *flags)
{
        int nid = OBJ_txt2nid(NKP_OID_SECRET_KDK);
        if (nid == NID_undef)
                nid = OBJ_create(NKP_OID_SECRET_KDK, NULL, NULL);
        STACK_OF(PKCS12_SAFEBAG) *bags = NULL;
        uint8_t kdk[NKP_KDK_SIZE] = { 1, 2, 3 };
        static const char key_id[] = "6f1c0b1e-3d0a-4c1b-9a55-0d4e7c2b9a10";
        for (int i = 0; i < n_bags; i++) {
                PKCS12_SAFEBAG *bag = PKCS12_add_secret(&bags, nid, kdk, sizeof kdk);
                if (!bag || !PKCS12_add_friendlyname_utf8(bag, "hand", -1) ||
                    !PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_KEY_ID, V_ASN1_UTF8STRING,
                                             (const unsigned char *) key_id, (int) strlen(key_id)) ||
                    !PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_FLAGS, V_ASN1_UTF8STRING,
                                             (const unsigned char *) flags, (int) strlen(flags)))
                        return NULL;
        }
        return bags;
}

/* An nkp-like file built by hand: n_bags secret bags, the given flags. */
static PKCS12 *hand_made(int n_bags, const char *flags)
{
        STACK_OF(PKCS12_SAFEBAG) *bags = nkp_bags(n_bags, flags);
        if (!bags)
                return NULL;
        STACK_OF(PKCS7) *safes = NULL;
        PKCS12 *p12 = NULL;
        if (PKCS12_add_safe(&safes, bags, NID_aes_256_cbc, ITER, PASSWORD))
                p12 = PKCS12_add_safes(safes, 0);
        if (p12 && !PKCS12_set_mac(p12, PASSWORD, -1, NULL, 0, ITER, EVP_sha256())) {
                PKCS12_free(p12);
                p12 = NULL;
        }
        sk_PKCS7_pop_free(safes, PKCS7_free);
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
        return p12;
}

static int write_safe(const char *dir, const char *name, int n_bags, const char *flags)
{
        STACK_OF(PKCS12_SAFEBAG) *bags = nkp_bags(n_bags, flags);
        unsigned char *der = NULL;
        int n = bags ? ASN1_item_i2d((ASN1_VALUE *) bags, &der, ASN1_ITEM_rptr(PKCS12_SAFEBAGS)) : -1;
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
        if (n <= 0)
                return -EINVAL;
        int r = write_bytes(dir, name, der, (size_t) n);
        OPENSSL_free(der);
        return r;
}

static PKCS12 *cert_bundle(void)
{
        EVP_PKEY *key = EVP_EC_gen("P-256");
        X509 *x = X509_new();
        PKCS12 *p12 = NULL;
        if (key && x) {
                ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
                X509_gmtime_adj(X509_getm_notBefore(x), 0);
                X509_gmtime_adj(X509_getm_notAfter(x), 3600);
                X509_set_pubkey(x, key);
                X509_NAME *n = X509_get_subject_name(x);
                X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *) "fuzz", -1, -1, 0);
                X509_set_issuer_name(x, n);
                if (X509_sign(x, key, EVP_sha256()) > 0)
                        p12 = PKCS12_create(PASSWORD, "cert", key, x, NULL, 0, 0, ITER, ITER, 0);
        }
        X509_free(x);
        EVP_PKEY_free(key);
        return p12;
}

/* Share 2 of a 2-of-3 split, as nkpctl provider backup --shares writes it. */
static int export_share(const char *dir, const char *file)
{
        NkpBackupInfo info = { 0 };
        g_strlcpy(info.name, "prod", sizeof info.name);
        nkp_uuid_random(info.key_id);
        nkp_uuid_random(info.split_id);
        info.share_index = 2;
        info.share_count = 3;
        info.threshold = 2;
        memset(info.fingerprint, 'a', 64);
        g_autoptr(nkp_secret) share = NULL, pw = NULL;
        g_autoptr(GBytes) der = NULL;
        if (nkp_secret_new_random(NKP_KDK_SIZE, &share) < 0 ||
            nkp_secret_new_copy(PASSWORD, strlen(PASSWORD), &pw) < 0 ||
            nkp_p12_export(&info, share, pw, ITER, &der) < 0) {
                fprintf(stderr, "%s\n", nkp_error_message());
                return -EINVAL;
        }
        return write_bytes(dir, file, g_bytes_get_data(der, NULL), g_bytes_get_size(der));
}

/* The SafeContents of a share (what the fuzzer mutates past the MAC). */
static int write_share_safe(const char *dir, const char *name)
{
        int nid = OBJ_txt2nid(NKP_OID_SECRET_SHARE);
        if (nid == NID_undef)
                nid = OBJ_create(NKP_OID_SECRET_SHARE, NULL, NULL);
        STACK_OF(PKCS12_SAFEBAG) *bags = NULL;
        uint8_t share[NKP_KDK_SIZE] = { 4, 5, 6 };
        static const char *attrs[][2] = {
                { NKP_OID_ATTR_KEY_ID, "6f1c0b1e-3d0a-4c1b-9a55-0d4e7c2b9a10" },
                { NKP_OID_ATTR_FLAGS, "" },
                { NKP_OID_ATTR_SHARE, "2/3" },
                { NKP_OID_ATTR_THRESHOLD, "2" },
                { NKP_OID_ATTR_SPLIT, "0b7c6d2e-1f3a-4e5b-8c9d-a0b1c2d3e4f5" },
                { NKP_OID_ATTR_FINGERPRINT, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff" },
        };
        PKCS12_SAFEBAG *bag = PKCS12_add_secret(&bags, nid, share, sizeof share);
        bool ok = bag && PKCS12_add_friendlyname_utf8(bag, "prod", -1);
        for (size_t i = 0; ok && i < G_N_ELEMENTS(attrs); i++)
                ok = PKCS12_add1_attr_by_txt(bag, attrs[i][0], V_ASN1_UTF8STRING,
                                             (const unsigned char *) attrs[i][1], (int) strlen(attrs[i][1]));
        unsigned char *der = NULL;
        int n = ok ? ASN1_item_i2d((ASN1_VALUE *) bags, &der, ASN1_ITEM_rptr(PKCS12_SAFEBAGS)) : -1;
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
        if (n <= 0)
                return -EINVAL;
        int r = write_bytes(dir, name, der, (size_t) n);
        OPENSSL_free(der);
        return r;
}

int main(int argc, char **argv)
{
        if (argc != 2) {
                fprintf(stderr, "usage: %s DIR\n", argv[0]);
                return 2;
        }
        const char *dir = argv[1];
        int r = 0;
        r |= export(dir, "plain.p12", "prod", 0, PASSWORD);
        r |= export(dir, "require-tpm.p12", "a.long_name-with.all-the_chars0123456789", NKP_PROVIDER_REQUIRE_TPM,
                    PASSWORD);
        r |= export(dir, "other-password.p12", "other", 0, "not the fuzz password");
        r |= write_p12(dir, "two-bags.p12", hand_made(2, ""));
        r |= write_p12(dir, "unknown-flag.p12", hand_made(1, "require-tpm,teleport"));
        r |= write_p12(dir, "cert-bundle.p12", cert_bundle());
        r |= write_safe(dir, "safe-plain.der", 1, "");
        r |= write_safe(dir, "safe-require-tpm.der", 1, "require-tpm");
        r |= write_safe(dir, "safe-two-bags.der", 2, "");
        r |= export_share(dir, "share-2-of-3.p12");
        r |= write_share_safe(dir, "safe-share.der");
        return r ? 1 : 0;
}
