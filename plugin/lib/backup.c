/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Provider backups: a standard PKCS#12 file (RFC 7292) that
 * `openssl pkcs12 -info` can read.
 *
 *   PFX (version 3)
 *     authSafe: ContentInfo data → AuthenticatedSafe, exactly as written:
 *       ContentInfo encryptedData
 *         PBES2 (RFC 8018): PBKDF2 with HMAC-SHA256, 16-byte salt from
 *         OpenSSL, `iterations` (NKP_P12_ITERATIONS = 600000); AES-256-CBC
 *         SafeContents:
 *           SafeBag secretBag
 *             secretTypeId  NKP_OID_SECRET_KDK (see p12-internal.h)
 *             secretValue   OCTET STRING, the raw 32-byte KDK
 *             attributes    friendlyName (BMPString) = provider name
 *                           NKP_OID_ATTR_KEY_ID (UTF8String) = key id
 *                           NKP_OID_ATTR_FLAGS (UTF8String) = "" | "require-tpm"
 *     macData: HMAC-SHA256, 8-byte salt, the same `iterations`
 *
 * The MAC key and the encryption key both come from the password; the MAC
 * count is as high as the PBKDF2 count so that the MAC is no cheaper way to
 * test password guesses.
 *
 * Reading (nkp_p12_import) trusts nothing: a size cap, DER that must end
 * where the file ends, every iteration count (MAC, PBMAC1's PBKDF2, each
 * encrypted safe) checked against a cap before any key derivation runs,
 * only PBES2/PBKDF2/AES safes (legacy PBES1/3DES/RC2 and keys or secrets in
 * a clear safe are refused, with how to re-export; PBMAC1 is refused where
 * OpenSSL < 3.4 cannot verify it), the MAC verified
 * before anything is decrypted, exactly one nkp secret bag, and every field
 * of it validated.  Other bags (certificates, keys, foreign secrets) are
 * ignored; a file without an nkp bag is "not an nkp backup".  Decrypted
 * secret values are wiped before OpenSSL frees them; OpenSSL itself wipes
 * the decrypted SafeContents DER and its BMPString copies of the password.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>

#include <libgfshare.h>

#include "nkp-private.h"
#include "p12-internal.h"

#define FLAG_WORD_REQUIRE_TPM "require-tpm"
/* nkp writes one safe; OpenSSL's own files have two.  The work is capped
 * separately: every iteration count <= the cap, their sum <= twice the cap
 * (the MAC and one safe at the maximum). */
#define MAX_SAFES 16

/* ---- small helpers -------------------------------------------------------- */

static bool name_valid(const char *s)
{
        return nkp_provider_name_valid(s);
}

/* The password as a NUL-terminated string (what OpenSSL's PKCS#12 calls
 * take), in a wiped secret.  Empty passwords and NUL bytes are refused. */
static int password_cstr(const nkp_secret *password, nkp_secret **ret)
{
        if (!password || nkp_secret_len(password) == 0)
                return nkp_fail(-EINVAL, "The password is empty; a backup needs a password.");
        size_t len = nkp_secret_len(password);
        if (memchr(nkp_secret_data(password), '\0', len))
                return nkp_fail(-EINVAL, "The password contains a NUL byte; use a password without one.");
        nkp_secret *s;
        int r = nkp_secret_new(len + 1, &s);
        if (r < 0)
                return r;
        memcpy(nkp_secret_data_mut(s), nkp_secret_data(password), len);
        *ret = s;
        return 0;
}

static const char *pw_str(const nkp_secret *pw)
{
        return (const char *) nkp_secret_data(pw);
}

/* OpenSSL's PKCS12_add_secret() wants a NID for the secret type: register
 * our OID once per process (no names, so nothing can clash); `once` and
 * `nid` are the caller's statics for that OID. */
static int oid_nid(const char *oid, gsize *once, int *nid)
{
        if (g_once_init_enter(once)) {
                int n = OBJ_txt2nid(oid);
                if (n == NID_undef)
                        n = OBJ_create(oid, NULL, NULL);
                *nid = n;
                g_once_init_leave(once, 1);
        }
        return *nid;
}

static int secret_nid(void)
{
        static gsize once = 0;
        static int nid = NID_undef;
        return oid_nid(NKP_OID_SECRET_KDK, &once, &nid);
}

static int share_nid(void)
{
        static gsize once = 0;
        static int nid = NID_undef;
        return oid_nid(NKP_OID_SECRET_SHARE, &once, &nid);
}

static bool add_utf8_attr(PKCS12_SAFEBAG *bag, const char *oid, const char *value)
{
        return PKCS12_add1_attr_by_txt(bag, oid, V_ASN1_UTF8STRING, (const unsigned char *) value,
                                       (int) strlen(value)) == 1;
}

/* The share's attributes (p12-internal.h): "I/N", "M", split id, fingerprint. */
static bool add_share_attrs(PKCS12_SAFEBAG *bag, const NkpBackupInfo *info)
{
        char share[32], threshold[16];
        g_snprintf(share, sizeof share, "%u/%u", info->share_index, info->share_count);
        g_snprintf(threshold, sizeof threshold, "%u", info->threshold);
        return add_utf8_attr(bag, NKP_OID_ATTR_SHARE, share) &&
               add_utf8_attr(bag, NKP_OID_ATTR_THRESHOLD, threshold) &&
               add_utf8_attr(bag, NKP_OID_ATTR_SPLIT, info->split_id) &&
               add_utf8_attr(bag, NKP_OID_ATTR_FINGERPRINT, info->fingerprint);
}

/* Wipes the value of every secret bag (ours or not) before the bags are
 * freed: OpenSSL frees ASN.1 strings without clearing them. */
static void wipe_bags(STACK_OF(PKCS12_SAFEBAG) *bags)
{
        for (int i = 0; bags && i < sk_PKCS12_SAFEBAG_num(bags); i++) {
                PKCS12_SAFEBAG *bag = sk_PKCS12_SAFEBAG_value(bags, i);
                if (PKCS12_SAFEBAG_get_nid(bag) != NID_secretBag)
                        continue;
                ASN1_TYPE *v = (ASN1_TYPE *) PKCS12_SAFEBAG_get0_bag_obj(bag);
                if (!v || v->type == V_ASN1_OBJECT || v->type == V_ASN1_BOOLEAN ||
                    v->type == V_ASN1_NULL || !v->value.asn1_string)
                        continue;
                ASN1_STRING *s = v->value.asn1_string;
                if (s->data && s->length > 0)
                        OPENSSL_cleanse(s->data, (size_t) s->length);
        }
}

static void free_bags(STACK_OF(PKCS12_SAFEBAG) *bags)
{
        wipe_bags(bags);
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
}

static void free_safes(STACK_OF(PKCS7) *safes)
{
        sk_PKCS7_pop_free(safes, PKCS7_free);
}

/* ---- export --------------------------------------------------------------- */

int nkp_p12_export(const NkpBackupInfo *info, const nkp_secret *kdk, const nkp_secret *password,
                   int iterations, GBytes **ret)
{
        if (!info || !name_valid(info->name))
                return nkp_fail(-EINVAL, "The provider name is not valid.");
        uint8_t id[16];
        if (nkp_uuid_parse(info->key_id, id) < 0)
                return nkp_fail(-EINVAL, "The provider key id '%s' is not a UUID.", info->key_id);
        char key_id[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_format(id, key_id);
        if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A provider key must be %d bytes.", NKP_KDK_SIZE);
        if (iterations < 1 || (uint64_t) iterations > NKP_P12_MAX_ITERATIONS)
                return nkp_fail(-EINVAL, "The iteration count %d is out of range (1 to %d).", iterations,
                                NKP_P12_MAX_ITERATIONS);

        g_autoptr(nkp_secret) pw = NULL;
        int r = password_cstr(password, &pw);
        if (r < 0)
                return r;
        int nid = secret_nid();
        if (nid == NID_undef)
                return nkp_fail(-ENOMEM, "OpenSSL cannot register nkp's secret type: %s.",
                                nkp_openssl_error());

        const char *flags = (info->flags & NKP_PROVIDER_REQUIRE_TPM) ? FLAG_WORD_REQUIRE_TPM : "";
        bool share = info->share_count > 0;
        if (share && (info->share_index < 1 || info->share_index > info->share_count ||
                      info->share_count > NKP_SHARES_MAX || info->threshold < 2 ||
                      info->threshold > info->share_count || nkp_uuid_parse(info->split_id, id) < 0 ||
                      strlen(info->fingerprint) != 64))
                return nkp_fail(-EINVAL, "The share's numbers, split id or fingerprint are not valid.");
        if (share)
                nid = share_nid();
        if (nid == NID_undef)
                return nkp_fail(-ENOMEM, "OpenSSL cannot register nkp's share type: %s.", nkp_openssl_error());
        STACK_OF(PKCS12_SAFEBAG) *bags = NULL;
        STACK_OF(PKCS7) *safes = NULL;
        PKCS12 *p12 = NULL;
        unsigned char *der = NULL;
        int der_len = 0;

        r = -ENOMEM;
        PKCS12_SAFEBAG *bag = PKCS12_add_secret(&bags, nid, nkp_secret_data(kdk), NKP_KDK_SIZE);
        if (!bag || !PKCS12_add_friendlyname_utf8(bag, info->name, -1) ||
            !PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_KEY_ID, V_ASN1_UTF8STRING,
                                     (const unsigned char *) key_id, (int) strlen(key_id)) ||
            !PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_FLAGS, V_ASN1_UTF8STRING,
                                     (const unsigned char *) flags, (int) strlen(flags)))
                goto fail;
        if (share && !add_share_attrs(bag, info))
                goto fail;
        /* A cipher NID selects PBES2 + PBKDF2; OpenSSL 3's default PRF for
         * it is HMAC-SHA256 (checked by the tests with openssl pkcs12). */
        if (!PKCS12_add_safe(&safes, bags, NID_aes_256_cbc, iterations, pw_str(pw)))
                goto fail;
        p12 = PKCS12_add_safes(safes, 0);
        if (!p12)
                goto fail;
        if (!PKCS12_set_mac(p12, pw_str(pw), -1, NULL, 0, iterations, EVP_sha256()))
                goto fail;
        der_len = i2d_PKCS12(p12, &der);
        if (der_len <= 0)
                goto fail;
        *ret = g_bytes_new(der, (size_t) der_len);
        r = 0;
fail:
        if (r < 0)
                r = nkp_fail(r, "Cannot build the PKCS#12 backup: %s.", nkp_openssl_error());
        OPENSSL_free(der);
        PKCS12_free(p12);
        free_safes(safes);
        free_bags(bags);
        return r;
}

/* ---- import --------------------------------------------------------------- */

static int check_iterations(const ASN1_INTEGER *iter, uint64_t max, uint64_t *total)
{
        int64_t v = 1; /* DER default of MacData.iterations */
        if (iter && !ASN1_INTEGER_get_int64(&v, iter))
                v = -1;
        if (v < 1)
                return nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad iteration count).");
        if ((uint64_t) v > max)
                return nkp_fail(-EBADMSG,
                                "The file asks for %" G_GINT64_FORMAT " password iterations, more than "
                                "the %" G_GUINT64_FORMAT " nkp accepts; it was not made by nkp.",
                                v, max);
        *total += (uint64_t) v;
        if (*total > 2 * max)
                return nkp_fail(-EBADMSG,
                                "The file asks for more than %" G_GUINT64_FORMAT " password iterations "
                                "in all; it was not made by nkp.",
                                2 * max);
        return 0;
}

/* How to make a file nkp accepts, said in every refusal of a weak one. */
#define REEXPORT_HINT                                                                        \
        "re-export it with AES (openssl pkcs12 -export ... -keypbe AES-256-CBC -certpbe "    \
        "AES-256-CBC -macalg sha256, what nkpctl provider backup writes), or make a new "   \
        "backup with nkpctl provider backup"

static int refuse_weak(const char *what)
{
        return nkp_fail(-EBADMSG, "The file is a PKCS#12 file %s, which nkp refuses; %s.", what,
                        REEXPORT_HINT);
}

static bool aes_cbc(int nid)
{
        return nid == NID_aes_128_cbc || nid == NID_aes_192_cbc || nid == NID_aes_256_cbc;
}

/* The iteration count of a password-based encryption algorithm, checked
 * before OpenSSL runs the key derivation.  Only PBES2 (RFC 8018) with PBKDF2
 * (not scrypt, whose cost is not bounded by an iteration count) and AES-CBC
 * is accepted: PBES1 and the PKCS#12 PBEs (3DES, RC2, RC4: `openssl pkcs12
 * -legacy`, OpenSSL 1.x's defaults) are refused by name, before any key
 * derivation, never reported as "damaged". */
static int check_pbe(const X509_ALGOR *alg, uint64_t max, uint64_t *total)
{
        const ASN1_OBJECT *oid;
        int ptype;
        const void *pval;
        X509_ALGOR_get0(&oid, &ptype, &pval, alg);
        int nid = OBJ_obj2nid(oid);
        if (ptype != V_ASN1_SEQUENCE || !pval)
                return nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad encryption parameters).");

        int r;
        if (nid == NID_pbes2) {
                PBE2PARAM *p2 = ASN1_item_unpack(pval, ASN1_ITEM_rptr(PBE2PARAM));
                if (!p2 || !p2->keyfunc) {
                        PBE2PARAM_free(p2);
                        return nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad PBES2 parameters).");
                }
                const ASN1_OBJECT *eoid = NULL;
                if (p2->encryption)
                        X509_ALGOR_get0(&eoid, NULL, NULL, p2->encryption);
                if (!eoid || !aes_cbc(OBJ_obj2nid(eoid))) {
                        char name[80] = "an unknown cipher";
                        if (eoid)
                                OBJ_obj2txt(name, sizeof name, eoid, 0);
                        PBE2PARAM_free(p2);
                        g_autofree char *what = g_strdup_printf(
                                "encrypted with PBES2 and %s instead of AES", name);
                        return refuse_weak(what);
                }
                const ASN1_OBJECT *koid;
                int kptype;
                const void *kpval;
                X509_ALGOR_get0(&koid, &kptype, &kpval, p2->keyfunc);
                if (OBJ_obj2nid(koid) != NID_id_pbkdf2 || kptype != V_ASN1_SEQUENCE || !kpval) {
                        PBE2PARAM_free(p2);
                        return nkp_fail(-EBADMSG,
                                        "The file derives its key with something other than PBKDF2; "
                                        "it was not made by nkp.");
                }
                PBKDF2PARAM *kdf = ASN1_item_unpack(kpval, ASN1_ITEM_rptr(PBKDF2PARAM));
                PBE2PARAM_free(p2);
                if (!kdf || !kdf->iter) {
                        PBKDF2PARAM_free(kdf);
                        return nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad PBKDF2 parameters).");
                }
                r = check_iterations(kdf->iter, max, total);
                PBKDF2PARAM_free(kdf);
                return r;
        }
        if (nid != NID_undef && EVP_PBE_find(EVP_PBE_TYPE_OUTER, nid, NULL, NULL, NULL)) {
                g_autofree char *what = g_strdup_printf(
                        "encrypted with the legacy %s (PBES1 / PKCS#12 v1 PBE, as written by "
                        "openssl pkcs12 -legacy or OpenSSL 1.x)",
                        OBJ_nid2ln(nid));
                return refuse_weak(what);
        }
        return nkp_fail(-EBADMSG, "The file is encrypted with an algorithm nkp does not read; it was "
                                  "not made by nkp.");
}

/* RFC 9579's PBMAC1 MAC (OpenSSL 3.4+ writes it with -pbmac1_pbkdf2): its
 * PBKDF2 count is capped as the classic MAC's is, before anything else;
 * then, where the OpenSSL that runs cannot verify it (before 3.4), the file
 * is refused with a line that says so, not as a wrong password. */
#define OPENSSL_PBMAC1 0x30400000L

static int check_mac_alg(const PKCS12 *p12, uint64_t max, uint64_t *total)
{
        const X509_ALGOR *macalg = NULL;
        PKCS12_get0_mac(NULL, &macalg, NULL, NULL, p12);
        const ASN1_OBJECT *oid = NULL;
        int ptype = 0;
        const void *pval = NULL;
        if (macalg)
                X509_ALGOR_get0(&oid, &ptype, &pval, macalg);
        if (!oid || OBJ_obj2nid(oid) != NID_pbmac1)
                return 0;
        const ASN1_STRING *seq = pval;
        const unsigned char *p = seq && ptype == V_ASN1_SEQUENCE ? seq->data : NULL;
        X509_ALGORS *params = p ? d2i_X509_ALGORS(NULL, &p, seq->length) : NULL;
        int r = 0;
        if (!params || sk_X509_ALGOR_num(params) != 2) {
                r = nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad PBMAC1 "
                                       "parameters).");
                goto out;
        }
        const ASN1_OBJECT *koid;
        int kptype;
        const void *kpval;
        X509_ALGOR_get0(&koid, &kptype, &kpval, sk_X509_ALGOR_value(params, 0));
        PBKDF2PARAM *kdf = OBJ_obj2nid(koid) == NID_id_pbkdf2 && kptype == V_ASN1_SEQUENCE
                                   ? ASN1_item_unpack(kpval, ASN1_ITEM_rptr(PBKDF2PARAM))
                                   : NULL;
        if (!kdf || !kdf->iter) {
                PBKDF2PARAM_free(kdf);
                r = nkp_fail(-EBADMSG, "The file's PBMAC1 MAC does not use PBKDF2; it was not "
                                       "made by nkp.");
                goto out;
        }
        r = check_iterations(kdf->iter, max, total);
        PBKDF2PARAM_free(kdf);
        if (r == 0 && OpenSSL_version_num() < OPENSSL_PBMAC1)
                r = nkp_fail(-EBADMSG,
                             "The file is a PKCS#12 file with a PBMAC1 MAC (RFC 9579), which the "
                             "OpenSSL here (%s) cannot verify; restore it on a host with OpenSSL "
                             "3.4 or later, or re-export it with the classic MAC (openssl pkcs12 "
                             "-export ... -macalg sha256).",
                             OpenSSL_version(OPENSSL_VERSION_STRING));
out:
        sk_X509_ALGOR_pop_free(params, X509_ALGOR_free);
        return r;
}

/* A safe nkp may read without decrypting it (ContentInfo data): it must not
 * hold a key or a secret in the clear (`openssl pkcs12 -keypbe NONE
 * -certpbe NONE`, or an nkp bag moved out of its encrypted safe), and a
 * shrouded key in it must be encrypted as an encrypted safe must be. */
static int check_clear_safe(PKCS7 *p7, uint64_t max, uint64_t *total)
{
        STACK_OF(PKCS12_SAFEBAG) *bags = PKCS12_unpack_p7data(p7);
        if (!bags)
                return nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (a safe cannot be "
                                          "read).");
        int r = 0;
        for (int i = 0; r == 0 && i < sk_PKCS12_SAFEBAG_num(bags); i++) {
                const PKCS12_SAFEBAG *bag = sk_PKCS12_SAFEBAG_value(bags, i);
                int nid = PKCS12_SAFEBAG_get_nid(bag);
                if (nid == NID_secretBag || nid == NID_keyBag || nid == NID_safeContentsBag) {
                        r = refuse_weak("whose keys are not encrypted (made with -keypbe NONE "
                                        "-certpbe NONE, or altered)");
                } else if (nid == NID_pkcs8ShroudedKeyBag) {
                        const X509_ALGOR *alg = NULL;
                        X509_SIG_get0(PKCS12_SAFEBAG_get0_pkcs8(bag), &alg, NULL);
                        r = alg ? check_pbe(alg, max, total)
                                : nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (bad "
                                                     "shrouded key).");
                }
        }
        free_bags(bags);
        return r;
}

/* The single UTF8String value of the bag attribute `oid`, copied into `out`
 * (at most out_size-1 bytes, no NUL inside). */
static int bag_attr_utf8(const PKCS12_SAFEBAG *bag, const ASN1_OBJECT *oid, const char *what,
                         char *out, size_t out_size)
{
        const STACK_OF(X509_ATTRIBUTE) *attrs = PKCS12_SAFEBAG_get0_attrs(bag);
        X509_ATTRIBUTE *found = NULL;
        for (int i = 0; attrs && i < sk_X509_ATTRIBUTE_num(attrs); i++) {
                X509_ATTRIBUTE *a = sk_X509_ATTRIBUTE_value(attrs, i);
                if (OBJ_cmp(X509_ATTRIBUTE_get0_object(a), oid) != 0)
                        continue;
                if (found)
                        return nkp_fail(-EBADMSG, "The backup names its %s twice; it is damaged.", what);
                found = a;
        }
        if (!found)
                return nkp_fail(-EBADMSG, "The backup does not carry the provider's %s; it is damaged.", what);
        if (X509_ATTRIBUTE_count(found) != 1)
                return nkp_fail(-EBADMSG, "The backup's %s is not a single value; it is damaged.", what);
        ASN1_TYPE *t = X509_ATTRIBUTE_get0_type(found, 0);
        if (!t || t->type != V_ASN1_UTF8STRING || !t->value.utf8string)
                return nkp_fail(-EBADMSG, "The backup's %s is not a UTF-8 string; it is damaged.", what);
        const ASN1_STRING *s = t->value.utf8string;
        int len = ASN1_STRING_length(s);
        const unsigned char *data = ASN1_STRING_get0_data(s);
        if (len < 0 || (size_t) len >= out_size || (len > 0 && (!data || memchr(data, '\0', (size_t) len))))
                return nkp_fail(-EBADMSG, "The backup's %s is not valid; it is damaged.", what);
        if (len > 0)
                memcpy(out, data, (size_t) len);
        out[len] = '\0';
        return 0;
}

static int parse_flags(const char *s, unsigned *ret)
{
        unsigned flags = 0;
        g_auto(GStrv) words = g_strsplit(s, ",", -1);
        for (size_t i = 0; words[i]; i++) {
                if (strcmp(words[i], FLAG_WORD_REQUIRE_TPM) == 0)
                        flags |= NKP_PROVIDER_REQUIRE_TPM;
                else
                        return nkp_fail(-EBADMSG,
                                        "The backup carries the provider flag '%s', which this version of "
                                        "nkp does not know; restore it with a newer nkp.",
                                        words[i]);
        }
        *ret = flags;
        return 0;
}

/* A decimal number 1..max, nothing else (no sign, no spaces, no leading 0). */
static bool parse_count(const char *s, unsigned max, unsigned *ret)
{
        guint64 v;
        if (!s[0] || s[0] == '0' || !g_ascii_string_to_unsigned(s, 10, 1, max, &v, NULL))
                return false;
        *ret = (unsigned) v;
        return true;
}

static bool hex64_valid(const char *s)
{
        if (strlen(s) != 64)
                return false;
        for (size_t i = 0; i < 64; i++)
                if (!g_ascii_isxdigit(s[i]) || g_ascii_isupper(s[i]))
                        return false;
        return true;
}

/* The share attributes of a share bag into `out`. */
static int read_share_attrs(const PKCS12_SAFEBAG *bag, NkpBackupInfo *out)
{
        const char *oids[] = { NKP_OID_ATTR_SHARE, NKP_OID_ATTR_THRESHOLD, NKP_OID_ATTR_SPLIT,
                               NKP_OID_ATTR_FINGERPRINT };
        const char *what[] = { "share number", "share threshold", "split id", "key fingerprint" };
        char val[4][80];
        for (size_t i = 0; i < G_N_ELEMENTS(oids); i++) {
                ASN1_OBJECT *oid = OBJ_txt2obj(oids[i], 1);
                if (!oid)
                        return nkp_fail(-ENOMEM, "Out of memory.");
                int r = bag_attr_utf8(bag, oid, what[i], val[i], sizeof val[i]);
                ASN1_OBJECT_free(oid);
                if (r < 0)
                        return r;
        }
        char *slash = strchr(val[0], '/');
        if (slash)
                *slash = '\0';
        if (!slash || !parse_count(slash + 1, NKP_SHARES_MAX, &out->share_count) ||
            !parse_count(val[0], out->share_count, &out->share_index))
                return nkp_fail(-EBADMSG, "The share's number '%s' is not valid; it is damaged.", val[0]);
        if (!parse_count(val[1], out->share_count, &out->threshold) || out->threshold < 2)
                return nkp_fail(-EBADMSG, "The share's threshold '%s' is not valid; it is damaged.", val[1]);
        uint8_t id[16];
        if (nkp_uuid_parse(val[2], id) < 0)
                return nkp_fail(-EBADMSG, "The share's split id is not a UUID; it is damaged.");
        nkp_uuid_format(id, out->split_id);
        if (strcmp(out->split_id, val[2]) != 0)
                return nkp_fail(-EBADMSG, "The share's split id is not in canonical form; it is damaged.");
        if (!hex64_valid(val[3]))
                return nkp_fail(-EBADMSG, "The share's key fingerprint is not valid; it is damaged.");
        g_strlcpy(out->fingerprint, val[3], sizeof out->fingerprint);
        return 0;
}

/* Reads our secret bag: value, name, key id, flags; a share's attributes
 * too when `share`. */
static int read_nkp_bag(const PKCS12_SAFEBAG *bag, bool share, NkpBackupInfo *info, nkp_secret **ret_kdk)
{
        const ASN1_TYPE *v = PKCS12_SAFEBAG_get0_bag_obj(bag);
        if (!v || v->type != V_ASN1_OCTET_STRING || !v->value.octet_string)
                return nkp_fail(-EBADMSG, "The backup's provider key is not an octet string; it is damaged.");
        if (ASN1_STRING_length(v->value.octet_string) != NKP_KDK_SIZE)
                return nkp_fail(-EBADMSG, "The backup's provider key is %d bytes, not %d; it is damaged.",
                                ASN1_STRING_length(v->value.octet_string), NKP_KDK_SIZE);

        NkpBackupInfo out = { 0 };

        /* friendlyName is a BMPString; a valid name is ASCII, so the UTF-8
         * form must be as long as the BMP form has characters. */
        const ASN1_TYPE *fn = PKCS12_get_attr_gen(PKCS12_SAFEBAG_get0_attrs(bag), NID_friendlyName);
        if (!fn || fn->type != V_ASN1_BMPSTRING || !fn->value.bmpstring)
                return nkp_fail(-EBADMSG, "The backup does not carry the provider's name; it is damaged.");
        int blen = ASN1_STRING_length(fn->value.bmpstring);
        if (blen < 2 || blen > 2 * NKP_NAME_MAX || blen % 2 != 0)
                return nkp_fail(-EBADMSG, "The backup's provider name is not valid.");
        char *name = OPENSSL_uni2utf8(ASN1_STRING_get0_data(fn->value.bmpstring), blen);
        bool ok = name && strlen(name) == (size_t) blen / 2 && name_valid(name);
        if (ok)
                g_strlcpy(out.name, name, sizeof out.name);
        OPENSSL_free(name);
        if (!ok)
                return nkp_fail(-EBADMSG, "The backup's provider name is not valid (letters, digits, '.', "
                                          "'_', '-'; 1 to %d).", NKP_NAME_MAX);

        ASN1_OBJECT *oid_key_id = OBJ_txt2obj(NKP_OID_ATTR_KEY_ID, 1);
        ASN1_OBJECT *oid_flags = OBJ_txt2obj(NKP_OID_ATTR_FLAGS, 1);
        char key_id[NKP_UUID_STRING_LEN + 1];
        char flags[64];
        int r = -ENOMEM;
        if (oid_key_id && oid_flags) {
                r = bag_attr_utf8(bag, oid_key_id, "key id", key_id, sizeof key_id);
                if (r == 0)
                        r = bag_attr_utf8(bag, oid_flags, "flags", flags, sizeof flags);
        }
        ASN1_OBJECT_free(oid_key_id);
        ASN1_OBJECT_free(oid_flags);
        if (r == -ENOMEM)
                return nkp_fail(r, "Out of memory.");
        if (r < 0)
                return r;

        uint8_t id[16];
        if (nkp_uuid_parse(key_id, id) < 0)
                return nkp_fail(-EBADMSG, "The backup's key id '%s' is not a UUID; it is damaged.", key_id);
        nkp_uuid_format(id, out.key_id);
        if (strcmp(out.key_id, key_id) != 0)
                return nkp_fail(-EBADMSG, "The backup's key id '%s' is not in canonical form; it is damaged.",
                                key_id);
        r = parse_flags(flags, &out.flags);
        if (r < 0)
                return r;
        if (share) {
                r = read_share_attrs(bag, &out);
                if (r < 0)
                        return r;
        }

        r = nkp_secret_new_copy(ASN1_STRING_get0_data(v->value.octet_string), NKP_KDK_SIZE, ret_kdk);
        if (r < 0)
                return r;
        *info = out;
        return 0;
}

/* Finds our bag in `bags`: none leaves *kdk NULL; a second one is refused. */
static int scan_bags(const STACK_OF(PKCS12_SAFEBAG) *bags, const ASN1_OBJECT *oid_secret,
                     NkpBackupInfo *info, nkp_secret **kdk)
{
        ASN1_OBJECT *oid_share = OBJ_txt2obj(NKP_OID_SECRET_SHARE, 1);
        if (!oid_share)
                return nkp_fail(-ENOMEM, "Out of memory.");
        int r = 0;
        for (int i = 0; r == 0 && i < sk_PKCS12_SAFEBAG_num(bags); i++) {
                const PKCS12_SAFEBAG *bag = sk_PKCS12_SAFEBAG_value(bags, i);
                if (PKCS12_SAFEBAG_get_nid(bag) != NID_secretBag)
                        continue;
                const ASN1_OBJECT *type = PKCS12_SAFEBAG_get0_bag_type(bag);
                bool share = type && OBJ_cmp(type, oid_share) == 0;
                if (!type || (!share && OBJ_cmp(type, oid_secret) != 0))
                        continue;
                if (*kdk)
                        r = nkp_fail(-EBADMSG, "The file holds more than one nkp provider key or share; "
                                               "nkp backups hold exactly one, so it was not made by nkp.");
                else
                        r = read_nkp_bag(bag, share, info, kdk);
        }
        ASN1_OBJECT_free(oid_share);
        return r;
}


int nkp_p12_import_capped(const void *der, size_t len, const nkp_secret *password,
                          uint64_t max_iterations, NkpBackupInfo *ret_info, nkp_secret **ret_kdk)
{
        g_autoptr(nkp_secret) pw = NULL;
        int r = password_cstr(password, &pw);
        if (r < 0)
                return r;
        if (!der || len == 0)
                return nkp_fail(-EBADMSG, "The file is empty; it is not an nkp provider backup.");
        if (len > NKP_P12_MAX_SIZE)
                return nkp_fail(-EFBIG, "The file is larger than %d bytes; it is not an nkp provider backup.",
                                NKP_P12_MAX_SIZE);

        PKCS12 *p12 = NULL;
        STACK_OF(PKCS7) *safes = NULL;
        STACK_OF(PKCS12_SAFEBAG) *bags = NULL;
        ASN1_OBJECT *oid_secret = NULL;
        g_autoptr(nkp_secret) kdk = NULL;
        NkpBackupInfo info = { 0 };

        ERR_clear_error();
        const unsigned char *p = der;
        p12 = d2i_PKCS12(NULL, &p, (long) len);
        if (!p12 || p != (const unsigned char *) der + len) {
                r = nkp_fail(-EBADMSG, "The file is not a PKCS#12 file, or it is truncated or damaged; use an "
                                       "intact copy of the backup.");
                goto out;
        }
        if (!PKCS12_mac_present(p12)) {
                r = nkp_fail(-EBADMSG, "The file has no password MAC; it is not an nkp provider backup.");
                goto out;
        }

        /* Every key derivation's cost, before any of them runs. */
        uint64_t total = 0;
        const ASN1_INTEGER *mac_iter = NULL;
        PKCS12_get0_mac(NULL, NULL, NULL, &mac_iter, p12);
        r = check_iterations(mac_iter, max_iterations, &total);
        if (r == 0)
                r = check_mac_alg(p12, max_iterations, &total);
        if (r < 0)
                goto out;
        safes = PKCS12_unpack_authsafes(p12);
        if (!safes) {
                r = nkp_fail(-EBADMSG, "The file is not a valid PKCS#12 file (its contents cannot be read).");
                goto out;
        }
        if (sk_PKCS7_num(safes) > MAX_SAFES) {
                r = nkp_fail(-EBADMSG, "The file has more than %d safes; it is not an nkp provider backup.",
                             MAX_SAFES);
                goto out;
        }
        for (int i = 0; i < sk_PKCS7_num(safes); i++) {
                PKCS7 *p7 = sk_PKCS7_value(safes, i);
                int nid = OBJ_obj2nid(p7->type);
                if (nid == NID_pkcs7_data) {
                        r = check_clear_safe(p7, max_iterations, &total);
                        if (r < 0)
                                goto out;
                        continue;
                }
                if (nid != NID_pkcs7_encrypted || !p7->d.encrypted || !p7->d.encrypted->enc_data ||
                    !p7->d.encrypted->enc_data->algorithm) {
                        r = nkp_fail(-EBADMSG, "The file holds a kind of safe nkp does not read; it is not "
                                               "an nkp provider backup.");
                        goto out;
                }
                r = check_pbe(p7->d.encrypted->enc_data->algorithm, max_iterations, &total);
                if (r < 0)
                        goto out;
        }

        if (!PKCS12_verify_mac(p12, pw_str(pw), -1)) {
                r = nkp_fail(-EACCES, "The password is wrong or the file was altered.");
                goto out;
        }

        oid_secret = OBJ_txt2obj(NKP_OID_SECRET_KDK, 1);
        if (!oid_secret) {
                r = nkp_fail(-ENOMEM, "Out of memory.");
                goto out;
        }
        for (int i = 0; i < sk_PKCS7_num(safes); i++) {
                PKCS7 *p7 = sk_PKCS7_value(safes, i);
                if (OBJ_obj2nid(p7->type) == NID_pkcs7_data)
                        bags = PKCS12_unpack_p7data(p7);
                else
                        bags = PKCS12_unpack_p7encdata(p7, pw_str(pw), -1);
                if (!bags) {
                        r = nkp_fail(-EBADMSG, "A safe in the file cannot be decrypted or read although the "
                                               "password is right; the file is damaged.");
                        goto out;
                }
                r = scan_bags(bags, oid_secret, &info, &kdk);
                free_bags(bags);
                bags = NULL;
                if (r < 0)
                        goto out;
        }
        if (!kdk) {
                r = nkp_fail(-EBADMSG, "The file is not an nkp provider backup: it holds no nkp provider "
                                       "key (a certificate bundle?).");
                goto out;
        }
        *ret_info = info;
        *ret_kdk = g_steal_pointer(&kdk);
        r = 0;
out:
        ERR_clear_error();
        nkp_wipe(&info, sizeof info);
        ASN1_OBJECT_free(oid_secret);
        free_bags(bags);
        free_safes(safes);
        PKCS12_free(p12);
        return r;
}

int nkp_p12_scan_safecontents(const void *der, size_t len, NkpBackupInfo *ret_info, nkp_secret **ret_kdk)
{
        if (!der || len == 0 || len > NKP_P12_MAX_SIZE)
                return nkp_fail(-EBADMSG, "The safe contents are empty or too large.");
        const unsigned char *p = der;
        STACK_OF(PKCS12_SAFEBAG) *bags =
                (STACK_OF(PKCS12_SAFEBAG) *) ASN1_item_d2i(NULL, &p, (long) len, ASN1_ITEM_rptr(PKCS12_SAFEBAGS));
        ASN1_OBJECT *oid_secret = OBJ_txt2obj(NKP_OID_SECRET_KDK, 1);
        g_autoptr(nkp_secret) kdk = NULL;
        NkpBackupInfo info = { 0 };
        int r;
        if (!bags)
                r = nkp_fail(-EBADMSG, "The safe contents are not valid DER.");
        else if (!oid_secret)
                r = nkp_fail(-ENOMEM, "Out of memory.");
        else
                r = scan_bags(bags, oid_secret, &info, &kdk);
        if (r == 0 && !kdk)
                r = nkp_fail(-EBADMSG, "The safe contents hold no nkp provider key.");
        if (r == 0) {
                *ret_info = info;
                *ret_kdk = g_steal_pointer(&kdk);
        }
        ERR_clear_error();
        nkp_wipe(&info, sizeof info);
        ASN1_OBJECT_free(oid_secret);
        free_bags(bags);
        return r;
}

int nkp_p12_import(const void *der, size_t len, const nkp_secret *password, NkpBackupInfo *ret_info,
                   nkp_secret **ret_kdk)
{
        return nkp_p12_import_capped(der, len, password, NKP_P12_MAX_ITERATIONS, ret_info, ret_kdk);
}

/* ---- the provider level ----------------------------------------------------- */

/* Sets BACKED_UP on the provider `name` under the writers' lock, provided it
 * is still the one with `key_id`. */
static int mark_backed_up(nkp_context *ctx, const char *name, const char *key_id)
{
        int fd = -1;
        int r = nkp_store_lock(ctx, &fd);
        if (r < 0)
                return r;
        g_autoptr(NkpStore) store = NULL;
        r = nkp_store_load(ctx, &store);
        if (r >= 0) {
                NkpStoreEntry *e = nkp_store_find(store, name);
                if (!e || strcmp(e->key_id, key_id) != 0)
                        r = nkp_fail(-ESTALE,
                                     "Provider '%s' was deleted or replaced while it was being backed up; "
                                     "run the backup again.",
                                     name);
                else if (!(e->flags & NKP_PROVIDER_BACKED_UP)) {
                        e->flags |= NKP_PROVIDER_BACKED_UP;
                        r = nkp_store_save(ctx, store);
                }
        }
        nkp_store_unlock(fd);
        return r;
}

static int backup_source(nkp_context *ctx, const char *name, NkpBackupInfo *ret_info, nkp_secret **ret_kdk);

int nkp_provider_backup(nkp_context *ctx, const char *name, const char *path,
                        const nkp_secret *password)
{
        if (!ctx || !name || !path || !path[0])
                return nkp_fail(-EINVAL, "A backup needs a provider name and a file to write.");
        if (!name_valid(name))
                return nkp_fail(-EINVAL, "'%s' is not a valid provider name.", name);
        g_autoptr(nkp_secret) pw = NULL;
        int r = password_cstr(password, &pw); /* refuse a bad password before any key is read */
        if (r < 0)
                return r;
        if (access(path, F_OK) == 0)
                return nkp_fail(-EEXIST, "'%s' already exists; refusing to overwrite it (pick another file).",
                                path);

        NkpBackupInfo info = { 0 };
        g_autoptr(nkp_secret) kdk = NULL;
        r = backup_source(ctx, name, &info, &kdk);
        if (r < 0)
                return r;

        g_autoptr(GBytes) der = NULL;
        r = nkp_p12_export(&info, kdk, password, NKP_P12_ITERATIONS, &der);
        if (r < 0)
                return r;
        r = nkp_write_file_atomic(path, g_bytes_get_data(der, NULL), g_bytes_get_size(der), 0600, true);
        if (r < 0)
                return r;
        r = mark_backed_up(ctx, info.name, info.key_id);
        if (r < 0) {
                /* nothing half done: the file we just created goes too */
                (void) unlink(path);
                return nkp_fail_prefix(r, "Cannot mark provider '%s' as backed up, so '%s' was removed",
                                       name, path);
        }
        return 0;
}

/* What a backup of provider `name` holds: its fields and its KDK, checked
 * against the store's fingerprint. */
static int backup_source(nkp_context *ctx, const char *name, NkpBackupInfo *ret_info, nkp_secret **ret_kdk)
{
        NkpBackupInfo info = { 0 };
        char fingerprint[65];
        int r;
        {
                g_autoptr(NkpStore) store = NULL;
                r = nkp_store_load(ctx, &store);
                if (r < 0)
                        return r;
                const NkpStoreEntry *e = nkp_store_find(store, name);
                if (!e)
                        return nkp_fail(-ENOENT, "There is no provider named '%s' here (see: nkpctl provider list).",
                                        name);
                g_strlcpy(info.name, e->name, sizeof info.name);
                g_strlcpy(info.key_id, e->key_id, sizeof info.key_id);
                g_strlcpy(fingerprint, e->fingerprint, sizeof fingerprint);
                info.flags = e->flags & NKP_PROVIDER_REQUIRE_TPM;
        }

        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_provider_get_kdk(ctx, info.key_id, &kdk);
        if (r < 0)
                return r;
        /* The key may come from the cache: make sure it is the one the
         * store describes before it goes into a file that outlives us. */
        g_autofree char *fp = NULL;
        r = nkp_kdk_fingerprint(kdk, &fp);
        if (r < 0)
                return r;
        if (strcmp(fp, fingerprint) != 0)
                return nkp_fail(-EBADMSG,
                                "The key of provider '%s' does not match its fingerprint; refusing to back "
                                "up a key that may be damaged (flush the key cache: nkpctl host flush-cache).",
                                name);
        g_strlcpy(info.fingerprint, fp, sizeof info.fingerprint);
        *ret_info = info;
        *ret_kdk = g_steal_pointer(&kdk);
        return 0;
}

/* What the store says about restoring `info` with fingerprint `fp`:
 * 1 = the same provider is already here (*ret set when asked), 0 = free,
 * <0 = refused. */
static int restore_check(nkp_context *ctx, const NkpBackupInfo *info, const char *fp, nkp_provider **ret)
{
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *by_name = nkp_store_find(store, info->name);
        const NkpStoreEntry *by_id = nkp_store_find_key_id(store, info->key_id);
        if (by_name && strcmp(by_name->key_id, info->key_id) != 0)
                return nkp_fail(-EEXIST,
                                "A different provider named '%s' (key id %s) already exists here; refusing "
                                "to replace it with the backup's (key id %s).",
                                info->name, by_name->key_id, info->key_id);
        if (!by_name && by_id)
                return nkp_fail(-EEXIST,
                                "The backup's provider (key id %s) is already here under the name '%s'; "
                                "refusing to add it a second time as '%s'.",
                                info->key_id, by_id->name, info->name);
        if (!by_name)
                return 0;
        if (strcmp(by_name->fingerprint, fp) != 0)
                return nkp_fail(-EEXIST,
                                "Provider '%s' (key id %s) is here with a different key than the backup's "
                                "(fingerprints %.16s… and %.16s…); refusing to touch it: find out which "
                                "copy is right before going on.",
                                info->name, info->key_id, by_name->fingerprint, fp);
        if (ret) {
                *ret = nkp_provider_from_entry(by_name);
                if (!*ret)
                        return nkp_fail(-ENOMEM, "Out of memory.");
        }
        return 1;
}

/* 1: the entry for `info` opens here (nothing to do); 0: it was sealed to
 * another TPM and is now sealed to this host's (*p refreshed, reported as a
 * restore, not as "already present"); <0: error, nothing changed. */
static int reseal_if_foreign(nkp_context *ctx, const NkpBackupInfo *info, const nkp_secret *kdk,
                             nkp_provider **p)
{
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *cur = nkp_store_find_key_id(store, info->key_id);
        if (!cur)
                return 1; /* deleted meanwhile: the add below reports it */
        r = nkp_store_entry_opens_here(ctx, cur);
        if (r == 0)
                return 1;
        if (r != -ENXIO && r != -EBADMSG)
                return nkp_fail_prefix(r, "Provider '%s' is here but cannot be checked against "
                                          "this host's TPM; nothing was changed",
                                       info->name);
        NkpStoreEntry *e = NULL;
        r = nkp_store_entry_new(ctx, cur->name, cur->key_id, cur->flags | NKP_PROVIDER_BACKED_UP,
                                cur->created, kdk, &e);
        if (r < 0)
                return r;
        nkp_provider *fresh = nkp_provider_from_entry(e);
        if (!fresh) {
                nkp_store_entry_free(e);
                return nkp_fail(-ENOMEM, "Out of memory.");
        }
        r = nkp_store_replace(ctx, e, kdk);
        if (r < 0) {
                nkp_provider_free(fresh);
                return r;
        }
        nkp_log(NKP_LOG_INFO, "Provider '%s' was sealed to another TPM; it is now sealed to this "
                              "host's.", info->name);
        g_clear_pointer(p, nkp_provider_free);
        *p = fresh;
        return 0;
}

/* Reads and opens one backup file or share (`what`: "restore from",
 * "verify"), into *info and *secret (the KDK, or the share). */
static int open_file(const char *what, const char *path, const nkp_secret *password, NkpBackupInfo *info,
                     nkp_secret **secret)
{
        if (!path || !path[0])
                return nkp_fail(-EINVAL, "A backup file name is empty.");
        g_autoptr(nkp_secret) pw = NULL;
        int r = password_cstr(password, &pw);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot %s '%s'", what, path);
        g_autofree char *der = NULL;
        size_t len = 0;
        /* The admin's own file: a symlink to it is followed (nkp's files
         * are read with O_NOFOLLOW; this one is not nkp's). */
        g_autofree char *real = realpath(path, NULL);
        r = nkp_read_file(real ? real : path, NKP_P12_MAX_SIZE, false, &der, &len);
        if (r == -EFBIG)
                return nkp_fail(-EFBIG, "'%s' is larger than %d bytes; it is not an nkp provider backup.", path,
                                NKP_P12_MAX_SIZE);
        if (r < 0)
                return r;
        r = nkp_p12_import(der, len, password, info, secret);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot %s '%s'", what, path);
        return 0;
}

/* The provider that `paths` hold: one whole backup, or shares of one split
 * (each with its password).  *ret_info carries the KDK's fingerprint and,
 * for shares, the split's numbers; *ret_n_shares = how many shares. */
static int open_backup(const char *what, const char *const *paths, const nkp_secret *const *passwords,
                       size_t n, NkpBackupInfo *ret_info, nkp_secret **ret_kdk)
{
        if (!paths || !passwords || n == 0)
                return nkp_fail(-EINVAL, "No backup file was given.");
        if (n > NKP_SHARES_MAX)
                return nkp_fail(-E2BIG, "%zu files were given; a split has at most %d shares.", n,
                                NKP_SHARES_MAX);
        g_autofree NkpBackupInfo *infos = g_new0(NkpBackupInfo, n);
        nkp_secret **secrets = g_new0(nkp_secret *, n);
        int r = 0;
        for (size_t i = 0; i < n && r == 0; i++) {
                r = open_file(what, paths[i], passwords[i], &infos[i], &secrets[i]);
                if (r == 0 && infos[i].share_count == 0 && n > 1)
                        r = nkp_fail(-EINVAL, "'%s' is a whole backup, not a share of a split; give it "
                                              "alone.", paths[i]);
        }
        NkpBackupInfo info = { 0 };
        g_autoptr(nkp_secret) kdk = NULL;
        if (r == 0 && infos[0].share_count == 0) {
                info = infos[0];
                kdk = g_steal_pointer(&secrets[0]);
                g_autofree char *fp = NULL;
                r = nkp_kdk_fingerprint(kdk, &fp);
                if (r == 0)
                        g_strlcpy(info.fingerprint, fp, sizeof info.fingerprint);
        } else if (r == 0) {
                r = nkp_shares_combine(infos, secrets, n, &info, &kdk);
        }
        nkp_shares_free(secrets, (unsigned) n);
        nkp_wipe(infos, n * sizeof *infos);
        if (r < 0)
                return r;
        *ret_info = info;
        *ret_kdk = g_steal_pointer(&kdk);
        return 0;
}

int nkp_provider_restore(nkp_context *ctx, const char *path, const nkp_secret *password,
                         nkp_provider **ret, bool *ret_already)
{
        return nkp_provider_restore_files(ctx, &path, &password, 1, ret, ret_already);
}

int nkp_provider_restore_files(nkp_context *ctx, const char *const *paths, const nkp_secret *const *passwords,
                               size_t n, nkp_provider **ret, bool *ret_already)
{
        if (!ctx || !paths || n == 0 || !paths[0] || !paths[0][0])
                return nkp_fail(-EINVAL, "A restore needs a backup file.");
        NkpBackupInfo info;
        g_autoptr(nkp_secret) kdk = NULL;
        int r = open_backup("restore from", paths, passwords, n, &info, &kdk);
        if (r < 0)
                return r;
        const char *fp = info.fingerprint;

        /* Checked first without the lock for the clear answers (and so that
         * a restore of what is here never touches the TPM); nkp_store_add
         * checks name and key id again under the lock, and a collision it
         * finds is classified again below. */
        g_autoptr(nkp_provider) p = NULL;
        r = restore_check(ctx, &info, fp, &p);
        if (r < 0)
                return r;
        bool resealed = false;
        if (r == 1) {
                /* Already here, but perhaps in a store copied from another
                 * host, sealed to that host's TPM: then seal it to ours. */
                r = reseal_if_foreign(ctx, &info, kdk, &p);
                if (r < 0)
                        return r;
                resealed = r == 0;
                r = 1;
        }
        if (r == 0) {
                NkpStoreEntry *e = NULL;
                int64_t now = g_get_real_time() / G_USEC_PER_SEC;
                r = nkp_store_entry_new(ctx, info.name, info.key_id, info.flags | NKP_PROVIDER_BACKED_UP, now,
                                        kdk, &e);
                if (r < 0)
                        return r;
                p = nkp_provider_from_entry(e);
                if (!p) {
                        nkp_store_entry_free(e);
                        return nkp_fail(-ENOMEM, "Out of memory.");
                }
                r = nkp_store_add(ctx, e, kdk);
                if (r == -EEXIST) {
                        /* another writer got there first: same answer as above */
                        g_clear_pointer(&p, nkp_provider_free);
                        int q = restore_check(ctx, &info, fp, &p);
                        if (q <= 0)
                                return q < 0 ? q : r;
                        r = 1;
                } else if (r < 0) {
                        return r;
                }
        }
        if (ret_already)
                *ret_already = r == 1 && !resealed;
        if (ret)
                *ret = g_steal_pointer(&p);
        return 0;
}

/* ---- m-of-n shares (libgfshare) ---------------------------------------------- */

/* libgfshare draws its polynomial coefficients through the process-wide
 * gfshare_fill_rand hook, whose default is random(3): nkp points it at
 * OpenSSL's generator before every split, and a generator failure fails the
 * split instead of leaving weak coefficients.  (Its default in Debian's
 * 2.0.0 is NULL, and gfshare_ctx_free calls it to overwrite the buffers:
 * the hook is set before every use.) */
static _Thread_local bool rand_failed;

static void gfshare_rand_openssl(unsigned char *buf, unsigned int len)
{
        if (nkp_random_bytes(buf, len) < 0) {
                rand_failed = true;
                memset(buf, 0, len);
        }
}

void nkp_shares_free(nkp_secret **shares, unsigned n)
{
        for (unsigned i = 0; shares && i < n; i++)
                nkp_secret_free(shares[i]);
        g_free(shares);
}

int nkp_shares_split(const nkp_secret *kdk, unsigned n, unsigned m, nkp_secret ***ret_shares)
{
        if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A provider key must be %d bytes.", NKP_KDK_SIZE);
        if (n < 2 || n > NKP_SHARES_MAX || m < 2 || m > n)
                return nkp_fail(-EINVAL,
                                "A split needs 2 to %d shares and a threshold from 2 to the number of "
                                "shares (asked: %u shares, threshold %u).",
                                NKP_SHARES_MAX, n, m);
        unsigned char sharenrs[NKP_SHARES_MAX];
        for (unsigned i = 0; i < n; i++)
                sharenrs[i] = (unsigned char) (i + 1);
        gfshare_fill_rand = gfshare_rand_openssl;
        rand_failed = false;
        gfshare_ctx *g = gfshare_ctx_init_enc(sharenrs, n, (unsigned char) m, NKP_KDK_SIZE);
        if (!g)
                return nkp_fail(-ENOMEM, "libgfshare cannot start a split.");
        /* setsecret copies the secret into its buffer; gfshare_ctx_free
         * overwrites that buffer before freeing it. */
        g_autoptr(nkp_secret) copy = NULL;
        int r = nkp_secret_new_copy(nkp_secret_data(kdk), NKP_KDK_SIZE, &copy);
        if (r < 0) {
                gfshare_ctx_free(g);
                return r;
        }
        gfshare_ctx_enc_setsecret(g, nkp_secret_data_mut(copy));
        if (rand_failed) {
                gfshare_ctx_free(g);
                return nkp_fail(-EIO, "The random generator failed; no shares were made.");
        }
        nkp_secret **shares = g_new0(nkp_secret *, n);
        for (unsigned i = 0; i < n && r == 0; i++) {
                r = nkp_secret_new(NKP_KDK_SIZE, &shares[i]);
                if (r == 0)
                        gfshare_ctx_enc_getshare(g, (unsigned char) i, nkp_secret_data_mut(shares[i]));
        }
        gfshare_ctx_free(g);
        if (r < 0) {
                nkp_shares_free(shares, n);
                return r;
        }
        *ret_shares = shares;
        return 0;
}

/* The fields every share of one split carries alike. */
static bool same_split_fields(const NkpBackupInfo *a, const NkpBackupInfo *b)
{
        return strcmp(a->name, b->name) == 0 && strcmp(a->key_id, b->key_id) == 0 &&
               a->flags == b->flags && a->share_count == b->share_count &&
               a->threshold == b->threshold && strcmp(a->fingerprint, b->fingerprint) == 0;
}

int nkp_shares_combine(const NkpBackupInfo *infos, nkp_secret *const *shares, size_t n,
                       NkpBackupInfo *ret_info, nkp_secret **ret_kdk)
{
        if (!infos || !shares || n == 0)
                return nkp_fail(-EINVAL, "No shares were given.");
        const NkpBackupInfo *first = &infos[0];
        bool seen[NKP_SHARES_MAX + 1] = { false };
        for (size_t i = 0; i < n; i++) {
                const NkpBackupInfo *in = &infos[i];
                if (in->share_count == 0 || in->share_index < 1 || in->share_index > NKP_SHARES_MAX ||
                    !shares[i] || nkp_secret_len(shares[i]) != NKP_KDK_SIZE)
                        return nkp_fail(-EINVAL, "Share %zu is not a share of a split backup.", i + 1);
                if (strcmp(in->split_id, first->split_id) != 0)
                        return nkp_fail(-EXDEV,
                                        "The shares belong to two different splits (split ids %s and %s); "
                                        "give shares of one split only.",
                                        first->split_id, in->split_id);
                if (!same_split_fields(in, first))
                        return nkp_fail(-EBADMSG,
                                        "The shares of split %s disagree on the provider they hold; one "
                                        "of them is damaged.",
                                        first->split_id);
                if (seen[in->share_index])
                        return nkp_fail(-ENOTUNIQ, "Share %u of %u was given twice; give %u different "
                                                   "shares.",
                                        in->share_index, in->share_count, in->threshold);
                seen[in->share_index] = true;
        }
        if (n < first->threshold)
                return nkp_fail(-ENODATA,
                                "%zu share%s of provider '%s' given, but this split needs %u of its %u; "
                                "nothing was done.",
                                n, n == 1 ? "" : "s", first->name, first->threshold, first->share_count);

        unsigned char sharenrs[NKP_SHARES_MAX];
        for (size_t i = 0; i < n; i++)
                sharenrs[i] = (unsigned char) infos[i].share_index;
        /* gfshare_ctx_free overwrites its buffers through the same hook */
        gfshare_fill_rand = gfshare_rand_openssl;
        gfshare_ctx *g = gfshare_ctx_init_dec(sharenrs, (unsigned) n, NKP_KDK_SIZE);
        if (!g)
                return nkp_fail(-ENOMEM, "libgfshare cannot start combining the shares.");
        g_autoptr(nkp_secret) kdk = NULL;
        int r = nkp_secret_new(NKP_KDK_SIZE, &kdk);
        if (r == 0) {
                for (size_t i = 0; i < n; i++) {
                        /* giveshare copies the share into the context */
                        gfshare_ctx_dec_giveshare(g, (unsigned char) i,
                                                  (unsigned char *) nkp_secret_data(shares[i]));
                }
                gfshare_ctx_dec_extract(g, nkp_secret_data_mut(kdk));
        }
        gfshare_ctx_free(g);
        if (r < 0)
                return r;
        g_autofree char *fp = NULL;
        r = nkp_kdk_fingerprint(kdk, &fp);
        if (r < 0)
                return r;
        if (strcmp(fp, first->fingerprint) != 0)
                return nkp_fail(-EBADMSG,
                                "The shares do not combine into the key of provider '%s' (fingerprint "
                                "%.16s…); one of them is damaged.",
                                first->name, first->fingerprint);
        NkpBackupInfo out = *first;
        out.share_index = 0;
        *ret_info = out;
        *ret_kdk = g_steal_pointer(&kdk);
        return 0;
}

/* ---- m-of-n backups ------------------------------------------------------------ */

int nkp_provider_backup_shares(nkp_context *ctx, const char *name, const char *dir, unsigned n, unsigned m,
                               const nkp_secret *const *passwords, char ***ret_paths)
{
        if (!ctx || !name || !dir || !dir[0] || !passwords)
                return nkp_fail(-EINVAL, "A split backup needs a provider name, a directory and a password "
                                         "per share.");
        if (!name_valid(name))
                return nkp_fail(-EINVAL, "'%s' is not a valid provider name.", name);
        if (n < 2 || n > NKP_SHARES_MAX || m < 2 || m > n)
                return nkp_fail(-EINVAL,
                                "A split backup needs 2 to %d shares and a threshold from 2 to the number "
                                "of shares (asked: %u shares, threshold %u); nothing was written.",
                                NKP_SHARES_MAX, n, m);
        int r;
        for (unsigned i = 0; i < n; i++) {
                g_autoptr(nkp_secret) pw = NULL;
                r = password_cstr(passwords[i], &pw);
                if (r < 0)
                        return nkp_fail_prefix(r, "The password of share %u", i + 1);
        }
        if (!g_file_test(dir, G_FILE_TEST_IS_DIR))
                return nkp_fail(-ENOTDIR, "'%s' is not a directory; create it first (nothing was written).",
                                dir);
        g_auto(GStrv) paths = g_new0(char *, n + 1);
        for (unsigned i = 0; i < n; i++) {
                g_autofree char *base = g_strdup_printf("%s-share-%u-of-%u.p12", name, i + 1, n);
                paths[i] = g_build_filename(dir, base, NULL);
                if (access(paths[i], F_OK) == 0)
                        return nkp_fail(-EEXIST, "'%s' already exists; refusing to overwrite it (pick "
                                                 "another directory; nothing was written).",
                                        paths[i]);
        }

        NkpBackupInfo info = { 0 };
        g_autoptr(nkp_secret) kdk = NULL;
        r = backup_source(ctx, name, &info, &kdk);
        if (r < 0)
                return r;
        nkp_secret **shares = NULL;
        r = nkp_shares_split(kdk, n, m, &shares);
        if (r < 0)
                return r;
        info.share_count = n;
        info.threshold = m;
        nkp_uuid_random(info.split_id);
        unsigned written = 0;
        for (unsigned i = 0; i < n && r == 0; i++) {
                info.share_index = i + 1;
                g_autoptr(GBytes) der = NULL;
                r = nkp_p12_export(&info, shares[i], passwords[i], NKP_P12_ITERATIONS, &der);
                if (r == 0)
                        r = nkp_write_file_atomic(paths[i], g_bytes_get_data(der, NULL),
                                                  g_bytes_get_size(der), 0600, true);
                if (r == 0)
                        written++;
        }
        nkp_shares_free(shares, n);
        if (r == 0)
                r = mark_backed_up(ctx, info.name, info.key_id);
        if (r < 0) {
                /* nothing half done: no split with fewer shares than it says */
                for (unsigned i = 0; i < written; i++)
                        (void) unlink(paths[i]);
                return r;
        }
        if (ret_paths)
                *ret_paths = g_steal_pointer(&paths);
        return 0;
}

/* ---- verify --------------------------------------------------------------------- */

struct nkp_backup_report {
        NkpBackupInfo info;
        unsigned shares_given;
        enum nkp_backup_here here;
        char here_name[NKP_NAME_MAX + 1];
};

void nkp_backup_report_free(nkp_backup_report *rep)
{
        if (rep) {
                nkp_wipe(rep, sizeof *rep);
                g_free(rep);
        }
}

/* Which provider of this host the backup's is, from the store alone (no
 * TPM, no key cache, nothing written). */
static int classify_here(nkp_context *ctx, nkp_backup_report *rep)
{
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *by_name = nkp_store_find(store, rep->info.name);
        const NkpStoreEntry *by_id = nkp_store_find_key_id(store, rep->info.key_id);
        if (by_name) {
                bool same = strcmp(by_name->key_id, rep->info.key_id) == 0 &&
                            strcmp(by_name->fingerprint, rep->info.fingerprint) == 0;
                rep->here = same ? NKP_BACKUP_HERE_SAME : NKP_BACKUP_HERE_DIFFERENT;
                g_strlcpy(rep->here_name, by_name->name, sizeof rep->here_name);
        } else if (by_id) {
                rep->here = NKP_BACKUP_HERE_OTHER_NAME;
                g_strlcpy(rep->here_name, by_id->name, sizeof rep->here_name);
        } else {
                rep->here = NKP_BACKUP_HERE_NONE;
        }
        return 0;
}

int nkp_backup_verify(nkp_context *ctx, const char *const *paths, const nkp_secret *const *passwords, size_t n,
                      nkp_backup_report **ret)
{
        if (!ctx || !ret)
                return nkp_fail(-EINVAL, "A verify needs a context and somewhere to put the report.");
        g_autoptr(nkp_secret) kdk = NULL;
        nkp_backup_report *rep = g_new0(nkp_backup_report, 1);
        int r = open_backup("verify", paths, passwords, n, &rep->info, &kdk);
        if (r == 0) {
                rep->shares_given = rep->info.share_count ? (unsigned) n : 0;
                r = classify_here(ctx, rep);
        }
        if (r < 0) {
                nkp_backup_report_free(rep);
                return r;
        }
        *ret = rep;
        return 0;
}

const char *nkp_backup_report_name(const nkp_backup_report *rep)
{
        return rep->info.name;
}

const char *nkp_backup_report_key_id(const nkp_backup_report *rep)
{
        return rep->info.key_id;
}

const char *nkp_backup_report_fingerprint(const nkp_backup_report *rep)
{
        return rep->info.fingerprint;
}

unsigned nkp_backup_report_flags(const nkp_backup_report *rep)
{
        return rep->info.flags;
}

unsigned nkp_backup_report_shares(const nkp_backup_report *rep, unsigned *ret_threshold,
                                  unsigned *ret_given, const char **ret_split_id)
{
        if (ret_threshold)
                *ret_threshold = rep->info.threshold;
        if (ret_given)
                *ret_given = rep->shares_given;
        if (ret_split_id)
                *ret_split_id = rep->info.share_count ? rep->info.split_id : NULL;
        return rep->info.share_count;
}

enum nkp_backup_here nkp_backup_report_here(const nkp_backup_report *rep, const char **ret_name)
{
        if (ret_name)
                *ret_name = rep->here == NKP_BACKUP_HERE_NONE ? NULL : rep->here_name;
        return rep->here;
}
