/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The provider's EK CA: signs the EK and platform certificates of the vTPMs
 * of a provider's VMs (swtpm_setup's create_certs_tool, swtpm-hooks/), so
 * that every host holding the provider issues certificates that chain to
 * the same CA.
 *
 * The CA is derived from the KDK, so it travels in the provider's backup
 * without changing the store or the backup format:
 *
 *   okm  = HKDF-SHA256(ikm = KDK, no salt,
 *                      info = "nkp ek-ca v1" 0x00 key_id[16]), 64 bytes
 *   d    = (okm as a big-endian integer mod (n - 1)) + 1      (P-384 order n)
 *
 * 512 bits reduced modulo a 384-bit order: the bias is below 2^-128.  The
 * scalar and the public point are computed with OpenSSL's BIGNUM/EC_POINT
 * functions (no EC arithmetic of our own); the scalar lives in BN_secure_new
 * memory and every buffer that held it is wiped.
 *
 * The CA certificate (X.509 v3, self-signed, ecdsa-with-SHA384):
 *   subject = issuer   O=nkp, CN=nkp EK CA <provider name>
 *   serial             the first 16 bytes of SHA-256("nkp ek-ca serial v1"
 *                      0x00 key_id[16]), top bit cleared (positive), never 0
 *   validity           2025-01-01T00:00:00Z .. 2055-01-01T00:00:00Z
 *   extensions         basicConstraints critical CA:TRUE, pathlen:0;
 *                      keyUsage critical keyCertSign, cRLSign;
 *                      subjectKeyIdentifier = SHA-1 of the public key;
 *                      authorityKeyIdentifier = keyid (the same)
 *
 * Why not "validity from the provider's creation time": the creation time is
 * not in the backup (a restored provider's creation time is the restore
 * time), so it would differ between hosts; a fixed v1 epoch keeps every
 * field the same everywhere.
 *
 * Why ECDSA P-384 and what differs between hosts: TPM verifiers (tpm2-tools,
 * Windows, Keylime, go-attestation) accept RSA and ECDSA issuers, not
 * Ed25519.  Deriving an RSA key deterministically needs a seeded prime
 * search, which OpenSSL 3.0 does not offer; an EC scalar is just a number.
 * ECDSA signatures in OpenSSL 3.0 use a random nonce (RFC 6979 arrived in
 * 3.2), so the self-signature of the CA certificate -- and thus its PEM and
 * its SHA-256 fingerprint -- differs between hosts and between calls.  That
 * does not matter for chain validation: a verifier uses the CA certificate's
 * subject, public key and key identifier, which are identical everywhere;
 * an EK certificate issued on host A verifies against the CA certificate
 * printed on host B (tests/test-ekca.c and integration/t-nkp-enrol.sh check
 * exactly that).  Whoever pins the CA should pin its public key (SPKI) or
 * its subject key identifier, not the certificate's hash.
 *
 * EK and platform certificates follow the TCG EK Credential Profile the way
 * swtpm_cert (swtpm 0.7.1) writes them: subject CN=<vmid>; subjectAltName
 * (critical) directoryName with tcg-at-tpmManufacturer/-Model/-Version
 * (2.23.133.2.1/2/3), or for the platform certificate the platform
 * manufacturer/model/version (2.23.133.5.1.1/4/5); basicConstraints
 * critical CA:FALSE; subjectDirectoryAttributes with tcg-at-tpmSpecification
 * (2.23.133.2.16: family, level, revision; EK only); authorityKeyIdentifier;
 * keyUsage critical keyEncipherment (RSA) or keyAgreement (ECC), plus
 * digitalSignature with --allow-signing; extKeyUsage tcg-kp-EKCertificate
 * (2.23.133.8.1) or tcg-kp-PlatformCertificate (2.23.133.8.2); validity from
 * now to 9999-12-31 (no expiry, RFC 5280 4.1.2.5); a random positive
 * 128-bit serial; signed ecdsa-with-SHA384.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "nkp-private.h"

#define EKCA_INFO_LABEL "nkp ek-ca v1"
#define EKCA_SERIAL_LABEL "nkp ek-ca serial v1"
#define EKCA_CURVE "secp384r1"
#define EKCA_NOT_BEFORE "20250101000000Z"
#define EKCA_NOT_AFTER "20550101000000Z"
#define EK_NOT_AFTER "99991231235959Z"
#define EK_PARAM_MAX 2048

G_DEFINE_AUTOPTR_CLEANUP_FUNC(X509, X509_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(X509_NAME, X509_NAME_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_PKEY, EVP_PKEY_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EVP_PKEY_CTX, EVP_PKEY_CTX_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EC_GROUP, EC_GROUP_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EC_POINT, EC_POINT_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(BN_CTX, BN_CTX_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(BIGNUM, BN_clear_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(OSSL_PARAM_BLD, OSSL_PARAM_BLD_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(OSSL_PARAM, OSSL_PARAM_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ASN1_INTEGER, ASN1_INTEGER_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ASN1_OBJECT, ASN1_OBJECT_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ASN1_OCTET_STRING, ASN1_OCTET_STRING_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(X509_EXTENSION, X509_EXTENSION_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(GENERAL_NAMES, GENERAL_NAMES_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EXTENDED_KEY_USAGE, EXTENDED_KEY_USAGE_free)

struct NkpEkCa {
        EVP_PKEY *key; /* the CA key pair (private part in OpenSSL's memory) */
        X509 *cert;
        char name[NKP_NAME_MAX + 1];
};

void nkp_ekca_free(NkpEkCa *ca)
{
        if (!ca)
                return;
        EVP_PKEY_free(ca->key);
        X509_free(ca->cert);
        g_free(ca);
}

/* ---- the key ------------------------------------------------------------- */

static int derive_key(const nkp_secret *kdk, const uint8_t key_id[16], EVP_PKEY **ret)
{
        uint8_t info[sizeof EKCA_INFO_LABEL + 16];
        uint8_t okm[64];
        memcpy(info, EKCA_INFO_LABEL, sizeof EKCA_INFO_LABEL); /* with its NUL */
        memcpy(info + sizeof EKCA_INFO_LABEL, key_id, 16);
        int r = nkp_hkdf_sha256(nkp_secret_data(kdk), nkp_secret_len(kdk), NULL, 0, info,
                                sizeof info, okm, sizeof okm);
        if (r < 0)
                return r;

        g_autoptr(EC_GROUP) grp = EC_GROUP_new_by_curve_name(NID_secp384r1);
        g_autoptr(BN_CTX) bnctx = BN_CTX_secure_new();
        g_autoptr(BIGNUM) x = BN_secure_new();
        g_autoptr(BIGNUM) d = BN_secure_new();
        g_autoptr(BIGNUM) nm1 = NULL;
        g_autoptr(EC_POINT) pub = NULL;
        uint8_t pubbuf[1 + 2 * 48];
        size_t publen = 0;
        bool ok = grp && bnctx && x && d;
        if (ok)
                ok = BN_bin2bn(okm, sizeof okm, x) != NULL;
        nkp_wipe(okm, sizeof okm);
        if (ok) {
                nm1 = BN_dup(EC_GROUP_get0_order(grp));
                ok = nm1 && BN_sub_word(nm1, 1) && BN_nnmod(d, x, nm1, bnctx) && BN_add_word(d, 1);
        }
        if (ok) {
                pub = EC_POINT_new(grp);
                ok = pub && EC_POINT_mul(grp, pub, d, NULL, NULL, bnctx);
        }
        if (ok) {
                publen = EC_POINT_point2oct(grp, pub, POINT_CONVERSION_UNCOMPRESSED, pubbuf,
                                            sizeof pubbuf, bnctx);
                ok = publen == sizeof pubbuf;
        }
        if (!ok)
                return nkp_fail(-EIO, "Cannot derive the EK CA key: %s.", nkp_openssl_error());

        g_autoptr(OSSL_PARAM_BLD) bld = OSSL_PARAM_BLD_new();
        g_autoptr(OSSL_PARAM) params = NULL;
        if (bld && OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, EKCA_CURVE, 0) &&
            OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, d) &&
            OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pubbuf, publen))
                params = OSSL_PARAM_BLD_to_param(bld); /* d goes to its secure, cleared part */
        g_autoptr(EVP_PKEY_CTX) pctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
        EVP_PKEY *pkey = NULL;
        if (!params || !pctx || EVP_PKEY_fromdata_init(pctx) != 1 ||
            EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_KEYPAIR, params) != 1)
                return nkp_fail(-EIO, "Cannot load the EK CA key: %s.", nkp_openssl_error());
        *ret = pkey;
        return 0;
}

/* ---- certificate helpers --------------------------------------------------- */

static int add_ext_conf(X509 *cert, X509 *issuer, int nid, const char *value)
{
        X509V3_CTX v3;
        X509V3_set_ctx(&v3, issuer, cert, NULL, NULL, 0);
        g_autoptr(X509_EXTENSION) ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
        if (!ext || !X509_add_ext(cert, ext, -1))
                return nkp_fail(-EIO, "Cannot add the certificate extension %s: %s.",
                                OBJ_nid2sn(nid), nkp_openssl_error());
        return 0;
}

static int add_ext_der(X509 *cert, const char *oid, bool critical, const uint8_t *der, size_t len)
{
        g_autoptr(ASN1_OBJECT) obj = OBJ_txt2obj(oid, 1);
        g_autoptr(ASN1_OCTET_STRING) os = ASN1_OCTET_STRING_new();
        g_autoptr(X509_EXTENSION) ext = NULL;
        if (obj && os && ASN1_OCTET_STRING_set(os, der, (int) len))
                ext = X509_EXTENSION_create_by_OBJ(NULL, obj, critical, os);
        if (!ext || !X509_add_ext(cert, ext, -1))
                return nkp_fail(-EIO, "Cannot add the certificate extension %s: %s.", oid,
                                nkp_openssl_error());
        return 0;
}

/* A name entry with a UTF8String value, as its own RDN, no length table
 * (RFC 5280's upper bounds are for display names; swtpm does not apply them
 * either). */
static bool name_add(X509_NAME *n, const char *oid_or_sn, const char *value)
{
        g_autoptr(ASN1_OBJECT) obj = OBJ_txt2obj(oid_or_sn, 0);
        return obj && X509_NAME_add_entry_by_OBJ(n, obj, V_ASN1_UTF8STRING,
                                                 (const unsigned char *) value, (int) strlen(value),
                                                 -1, 0) == 1;
}

static bool set_time(ASN1_TIME *t, const char *s)
{
        return ASN1_TIME_set_string_X509(t, s) == 1;
}

/* ---- the CA ------------------------------------------------------------------ */

int nkp_ekca_new(const nkp_secret *kdk, const char *provider_name, const char *key_id,
                 NkpEkCa **ret)
{
        uint8_t kid[16];
        if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A provider key must be %d bytes.", NKP_KDK_SIZE);
        if (!nkp_provider_name_valid(provider_name))
                return nkp_fail(-EINVAL, "'%s' is not a valid provider name.",
                                provider_name ? provider_name : "");
        if (nkp_uuid_parse(key_id, kid) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a valid key id (a UUID).",
                                key_id ? key_id : "");

        g_autoptr(NkpEkCa) ca = g_new0(NkpEkCa, 1);
        g_strlcpy(ca->name, provider_name, sizeof ca->name);
        int r = derive_key(kdk, kid, &ca->key);
        if (r < 0)
                return r;

        /* Serial: from the key id, positive, not zero. */
        uint8_t sin[sizeof EKCA_SERIAL_LABEL + 16], dig[SHA256_DIGEST_LENGTH];
        memcpy(sin, EKCA_SERIAL_LABEL, sizeof EKCA_SERIAL_LABEL);
        memcpy(sin + sizeof EKCA_SERIAL_LABEL, kid, 16);
        SHA256(sin, sizeof sin, dig);
        dig[0] = (dig[0] & 0x7f) | 0x40;

        g_autoptr(X509) x = X509_new();
        g_autoptr(X509_NAME) n = X509_NAME_new();
        g_autoptr(BIGNUM) sbn = BN_bin2bn(dig, 16, NULL);
        g_autoptr(ASN1_INTEGER) serial = sbn ? BN_to_ASN1_INTEGER(sbn, NULL) : NULL;
        g_autofree char *cn = g_strdup_printf("nkp EK CA %s", provider_name);
        if (!x || !n || !serial || !X509_set_version(x, 2) || !X509_set_serialNumber(x, serial) ||
            !name_add(n, "O", "nkp") || !name_add(n, "CN", cn) || !X509_set_subject_name(x, n) ||
            !X509_set_issuer_name(x, n) || !set_time(X509_getm_notBefore(x), EKCA_NOT_BEFORE) ||
            !set_time(X509_getm_notAfter(x), EKCA_NOT_AFTER) || !X509_set_pubkey(x, ca->key))
                return nkp_fail(-EIO, "Cannot build the EK CA certificate: %s.",
                                nkp_openssl_error());
        if ((r = add_ext_conf(x, x, NID_basic_constraints, "critical,CA:TRUE,pathlen:0")) < 0 ||
            (r = add_ext_conf(x, x, NID_key_usage, "critical,keyCertSign,cRLSign")) < 0 ||
            (r = add_ext_conf(x, x, NID_subject_key_identifier, "hash")) < 0 ||
            (r = add_ext_conf(x, x, NID_authority_key_identifier, "keyid:always")) < 0)
                return r;
        if (X509_sign(x, ca->key, EVP_sha384()) <= 0)
                return nkp_fail(-EIO, "Cannot sign the EK CA certificate: %s.", nkp_openssl_error());
        ca->cert = g_steal_pointer(&x);
        *ret = g_steal_pointer(&ca);
        return 0;
}

int nkp_ekca_for_provider(nkp_context *ctx, const char *key_id, NkpEkCa **ret)
{
        g_autoptr(nkp_provider) p = NULL;
        int r = nkp_provider_get_by_key_id(ctx, key_id, &p);
        if (r < 0)
                return r;
        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_provider_get_kdk(ctx, nkp_provider_key_id(p), &kdk);
        if (r < 0)
                return r;
        return nkp_ekca_new(kdk, nkp_provider_name(p), nkp_provider_key_id(p), ret);
}

int nkp_ekca_cert_pem(const NkpEkCa *ca, char **ret)
{
        BIO *bio = BIO_new(BIO_s_mem());
        if (!bio || PEM_write_bio_X509(bio, ca->cert) != 1) {
                BIO_free(bio);
                return nkp_fail(-EIO, "Cannot write the EK CA certificate: %s.", nkp_openssl_error());
        }
        char *data = NULL;
        long len = BIO_get_mem_data(bio, &data);
        *ret = g_strndup(data, (gsize) len);
        BIO_free(bio);
        return 0;
}

int nkp_provider_ca_cert_pem(nkp_context *ctx, const char *key_id, char **ret)
{
        g_autoptr(NkpEkCa) ca = NULL;
        int r = nkp_ekca_for_provider(ctx, key_id, &ca);
        if (r < 0)
                return r;
        g_autofree char *pem = NULL;
        if ((r = nkp_ekca_cert_pem(ca, &pem)) < 0)
                return r;
        *ret = strdup(pem); /* the caller frees with free(), as nkp.h promises */
        return *ret ? 0 : nkp_fail(-ENOMEM, "Out of memory.");
}

int nkp_ekca_cert_der(const NkpEkCa *ca, GBytes **ret)
{
        unsigned char *der = NULL;
        int len = i2d_X509(ca->cert, &der);
        if (len <= 0)
                return nkp_fail(-EIO, "Cannot encode the EK CA certificate: %s.", nkp_openssl_error());
        *ret = g_bytes_new(der, (gsize) len);
        OPENSSL_free(der);
        return 0;
}

/* ---- the EK's public key from swtpm_setup's --ek ---------------------------- */

static int hex_to_bn(const char *hex, size_t want_bytes, uint8_t *out)
{
        size_t n = strlen(hex);
        if (n != 2 * want_bytes)
                return -EINVAL;
        for (size_t i = 0; i < want_bytes; i++) {
                int hi = g_ascii_xdigit_value(hex[2 * i]), lo = g_ascii_xdigit_value(hex[2 * i + 1]);
                if (hi < 0 || lo < 0)
                        return -EINVAL;
                out[i] = (uint8_t) (hi << 4 | lo);
        }
        return 0;
}

static int ek_public_key(const char *ek, bool *ret_ecc, EVP_PKEY **ret)
{
        if (!ek || strlen(ek) > EK_PARAM_MAX)
                return nkp_fail(-EINVAL, "The EK public key parameter is missing or too long.");
        g_autoptr(OSSL_PARAM_BLD) bld = OSSL_PARAM_BLD_new();
        g_autoptr(OSSL_PARAM) params = NULL;
        const char *alg;
        bool ecc = g_str_has_prefix(ek, "x=");
        if (ecc) {
                /* x=<hex>,y=<hex>[,id=<curve>] (no id: secp256r1) */
                g_auto(GStrv) parts = g_strsplit(ek, ",", 4);
                const char *xs = NULL, *ys = NULL, *id = "secp256r1";
                for (char **p = parts; *p; p++) {
                        if (g_str_has_prefix(*p, "x="))
                                xs = *p + 2;
                        else if (g_str_has_prefix(*p, "y="))
                                ys = *p + 2;
                        else if (g_str_has_prefix(*p, "id="))
                                id = *p + 3;
                        else
                                return nkp_fail(-EINVAL, "Unknown part '%s' in the ECC EK parameter.", *p);
                }
                size_t clen;
                if (strcmp(id, "secp384r1") == 0)
                        clen = 48;
                else if (strcmp(id, "secp256r1") == 0)
                        clen = 32;
                else if (strcmp(id, "secp521r1") == 0)
                        clen = 66;
                else
                        return nkp_fail(-EINVAL, "Unsupported ECC EK curve '%s'.", id);
                uint8_t pt[1 + 2 * 66];
                pt[0] = 0x04;
                if (!xs || !ys || hex_to_bn(xs, clen, pt + 1) < 0 ||
                    hex_to_bn(ys, clen, pt + 1 + clen) < 0)
                        return nkp_fail(-EINVAL, "The ECC EK parameter needs x= and y= of %zu hex bytes "
                                                 "each for curve %s.",
                                        clen, id);
                alg = "EC";
                if (!bld || !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, id, 0) ||
                    !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, 1 + 2 * clen))
                        return nkp_fail(-ENOMEM, "Out of memory.");
                params = OSSL_PARAM_BLD_to_param(bld);
        } else {
                size_t hl = strlen(ek);
                if (hl < 256 || hl > 1024 || hl % 2)
                        return nkp_fail(-EINVAL, "The RSA EK modulus must be 1024 to 4096 bits of hex.");
                g_autofree uint8_t *mod = g_malloc(hl / 2);
                if (hex_to_bn(ek, hl / 2, mod) < 0)
                        return nkp_fail(-EINVAL, "The RSA EK modulus is not hex.");
                g_autoptr(BIGNUM) nbn = BN_bin2bn(mod, (int) (hl / 2), NULL);
                g_autoptr(BIGNUM) ebn = BN_new();
                alg = "RSA";
                if (!nbn || !ebn || !BN_set_word(ebn, 65537) || !bld ||
                    !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, nbn) ||
                    !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, ebn))
                        return nkp_fail(-ENOMEM, "Out of memory.");
                params = OSSL_PARAM_BLD_to_param(bld);
        }
        g_autoptr(EVP_PKEY_CTX) pctx = EVP_PKEY_CTX_new_from_name(NULL, alg, NULL);
        EVP_PKEY *pkey = NULL;
        if (!params || !pctx || EVP_PKEY_fromdata_init(pctx) != 1 ||
            EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
                return nkp_fail(-EINVAL, "The EK public key is not a valid %s key: %s.", alg,
                                nkp_openssl_error());
        *ret_ecc = ecc;
        *ret = pkey;
        return 0;
}

/* ---- tiny DER writer (subjectDirectoryAttributes, EKU) -------------------- */

static void der_hdr(GByteArray *out, uint8_t tag, size_t len)
{
        uint8_t h[6];
        size_t n = 0;
        h[n++] = tag;
        if (len < 0x80) {
                h[n++] = (uint8_t) len;
        } else if (len < 0x100) {
                h[n++] = 0x81;
                h[n++] = (uint8_t) len;
        } else {
                h[n++] = 0x82;
                h[n++] = (uint8_t) (len >> 8);
                h[n++] = (uint8_t) len;
        }
        g_byte_array_append(out, h, (guint) n);
}

static GByteArray *der_wrap(uint8_t tag, GByteArray *inner)
{
        GByteArray *out = g_byte_array_new();
        der_hdr(out, tag, inner->len);
        g_byte_array_append(out, inner->data, inner->len);
        g_byte_array_unref(inner);
        return out;
}

static void der_int(GByteArray *out, unsigned long v)
{
        uint8_t b[9];
        size_t n = 0;
        do {
                b[8 - n++] = (uint8_t) (v & 0xff);
                v >>= 8;
        } while (v);
        if (b[9 - n] & 0x80)
                b[8 - n++] = 0;
        der_hdr(out, 0x02, n);
        g_byte_array_append(out, b + 9 - n, (guint) n);
}

static bool der_oid(GByteArray *out, const char *oid)
{
        g_autoptr(ASN1_OBJECT) obj = OBJ_txt2obj(oid, 1);
        if (!obj)
                return false;
        size_t len = OBJ_length(obj);
        der_hdr(out, 0x06, len);
        g_byte_array_append(out, OBJ_get0_data(obj), (guint) len);
        return true;
}

/* SEQUENCE { SEQUENCE { tcg-at-tpmSpecification, SET { SEQUENCE {
 *   family UTF8String, level INTEGER, revision INTEGER } } } } */
static GByteArray *tpm_spec_der(const char *family, unsigned long level, unsigned long revision)
{
        GByteArray *spec = g_byte_array_new();
        der_hdr(spec, 0x0c, strlen(family));
        g_byte_array_append(spec, (const guint8 *) family, (guint) strlen(family));
        der_int(spec, level);
        der_int(spec, revision);
        spec = der_wrap(0x30, spec);
        spec = der_wrap(0x31, spec);
        GByteArray *attr = g_byte_array_new();
        der_oid(attr, "2.23.133.2.16");
        g_byte_array_append(attr, spec->data, spec->len);
        g_byte_array_unref(spec);
        attr = der_wrap(0x30, attr);
        return der_wrap(0x30, attr);
}

/* ---- issuing ------------------------------------------------------------------ */

static bool attr_ok(const char *s)
{
        return s && s[0] && strlen(s) <= 128 && g_utf8_validate(s, -1, NULL);
}

static bool parse_ulong(const char *s, unsigned long max, unsigned long *ret)
{
        if (!s || !g_ascii_isdigit(s[0]))
                return false;
        char *end = NULL;
        guint64 v = g_ascii_strtoull(s, &end, 10);
        if (*end || v > max)
                return false;
        *ret = (unsigned long) v;
        return true;
}

int nkp_ekca_issue(const NkpEkCa *ca, const NkpEkCertRequest *req, GBytes **ret)
{
        bool platform;
        if (g_strcmp0(req->type, "ek") == 0)
                platform = false;
        else if (g_strcmp0(req->type, "platform") == 0)
                platform = true;
        else
                return nkp_fail(-EINVAL, "Unknown certificate type '%s' (ek or platform).",
                                req->type ? req->type : "");
        if (!attr_ok(req->vmid))
                return nkp_fail(-EINVAL, "The VM id is missing or not printable.");
        const char *tm = req->tpm_manufacturer, *tmo = req->tpm_model, *tv = req->tpm_version;
        if (!attr_ok(tm) || !attr_ok(tmo) || !attr_ok(tv))
                return nkp_fail(-EINVAL, "The TPM manufacturer, model and version are needed.");
        unsigned long level = 0, revision = 0;
        if (!platform && (!attr_ok(req->tpm_spec_family) ||
                          !parse_ulong(req->tpm_spec_level, 0xffff, &level) ||
                          !parse_ulong(req->tpm_spec_revision, 0xffffff, &revision)))
                return nkp_fail(-EINVAL, "The TPM specification family, level and revision are "
                                         "needed for an EK certificate.");
        const char *pm = req->platform_manufacturer, *pmo = req->platform_model,
                   *pv = req->platform_version;
        if (platform && (!attr_ok(pm) || !attr_ok(pmo) || !attr_ok(pv)))
                return nkp_fail(-EINVAL, "The platform manufacturer, model and version are needed "
                                         "for a platform certificate.");

        bool ecc = false;
        g_autoptr(EVP_PKEY) ekpub = NULL;
        int r = ek_public_key(req->ek, &ecc, &ekpub);
        if (r < 0)
                return r;

        uint8_t sb[16];
        r = nkp_random_bytes(sb, sizeof sb);
        if (r < 0)
                return r;
        sb[0] = (sb[0] & 0x7f) | 0x40;
        g_autoptr(BIGNUM) sbn = BN_bin2bn(sb, sizeof sb, NULL);
        g_autoptr(ASN1_INTEGER) serial = sbn ? BN_to_ASN1_INTEGER(sbn, NULL) : NULL;

        g_autoptr(X509) x = X509_new();
        g_autoptr(X509_NAME) subj = X509_NAME_new();
        if (!x || !subj || !serial || !X509_set_version(x, 2) || !X509_set_serialNumber(x, serial) ||
            !name_add(subj, "CN", req->vmid) || !X509_set_subject_name(x, subj) ||
            !X509_set_issuer_name(x, X509_get_subject_name(ca->cert)) ||
            !X509_gmtime_adj(X509_getm_notBefore(x), 0) ||
            !set_time(X509_getm_notAfter(x), EK_NOT_AFTER) || !X509_set_pubkey(x, ekpub))
                return nkp_fail(-EIO, "Cannot build the %s certificate: %s.", req->type,
                                nkp_openssl_error());

        /* subjectAltName: directoryName with the TCG attributes. */
        g_autoptr(X509_NAME) dir = X509_NAME_new();
        bool ok = dir != NULL;
        if (ok && !platform)
                ok = name_add(dir, "2.23.133.2.1", tm) && name_add(dir, "2.23.133.2.2", tmo) &&
                     name_add(dir, "2.23.133.2.3", tv);
        else if (ok)
                ok = name_add(dir, "2.23.133.5.1.1", pm) && name_add(dir, "2.23.133.5.1.4", pmo) &&
                     name_add(dir, "2.23.133.5.1.5", pv);
        g_autoptr(GENERAL_NAMES) gens = ok ? GENERAL_NAMES_new() : NULL;
        GENERAL_NAME *gn = gens ? GENERAL_NAME_new() : NULL;
        if (gn) {
                GENERAL_NAME_set0_value(gn, GEN_DIRNAME, g_steal_pointer(&dir));
                if (!sk_GENERAL_NAME_push(gens, gn)) {
                        GENERAL_NAME_free(gn);
                        gn = NULL;
                }
        }
        if (!gn || X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 1, X509V3_ADD_DEFAULT) != 1)
                return nkp_fail(-EIO, "Cannot add the TCG subject alternative name: %s.",
                                nkp_openssl_error());

        if ((r = add_ext_conf(x, ca->cert, NID_basic_constraints, "critical,CA:FALSE")) < 0)
                return r;
        if (!platform) {
                g_autoptr(GByteArray) sda = tpm_spec_der(req->tpm_spec_family, level, revision);
                if ((r = add_ext_der(x, "2.5.29.9", false, sda->data, sda->len)) < 0)
                        return r;
        }
        if ((r = add_ext_conf(x, ca->cert, NID_authority_key_identifier, "keyid:always")) < 0)
                return r;

        GString *ku = g_string_new("critical");
        if (req->allow_signing)
                g_string_append(ku, ",digitalSignature");
        if (!req->allow_signing || req->decryption)
                g_string_append(ku, ecc ? ",keyAgreement" : ",keyEncipherment");
        r = add_ext_conf(x, ca->cert, NID_key_usage, ku->str);
        g_string_free(ku, TRUE);
        if (r < 0)
                return r;

        g_autoptr(GByteArray) eku = g_byte_array_new();
        der_oid(eku, platform ? "2.23.133.8.2" : "2.23.133.8.1");
        eku = der_wrap(0x30, g_steal_pointer(&eku));
        if ((r = add_ext_der(x, "2.5.29.37", false, eku->data, eku->len)) < 0)
                return r;

        if (X509_sign(x, ca->key, EVP_sha384()) <= 0)
                return nkp_fail(-EIO, "Cannot sign the %s certificate: %s.", req->type,
                                nkp_openssl_error());
        unsigned char *der = NULL;
        int len = i2d_X509(x, &der);
        if (len <= 0)
                return nkp_fail(-EIO, "Cannot encode the %s certificate: %s.", req->type,
                                nkp_openssl_error());
        *ret = g_bytes_new(der, (gsize) len);
        OPENSSL_free(der);
        return 0;
}

/* ---- who may have a certificate: the hook's tickets ------------------------ */
/* The prepare hook (root, before swtpm_setup) writes ROOT/run/nkp/ekca/<vm
 * uuid> for an nkp VM whose vTPM has no state yet (0600 root in a 0700
 * directory, no key bytes):
 *
 *   [ticket]
 *   key_id=<provider key id>
 *   name=<VM name>
 *   expires=<unix time>
 *   issued=<kinds already issued, ";"-separated>   (absent at first)
 *
 * It says "this VM's vTPM is being manufactured now, by this provider".
 * swtpm_setup asks for three certificates at a vTPM's first start, one of
 * each kind: the RSA EK ("ek" with a modulus), the ECC EK ("ek" with x=,y=)
 * and the platform certificate.  The signer issues each kind once per
 * ticket, for the VM the ticket names (the requester's --vmid must agree;
 * the subject is built from the ticket), and removes the ticket when all
 * three were issued; release removes it too (a start that failed half-way).
 * So the signer is no oracle: per VM start, at most three certificates,
 * within the ticket's lifetime.  No ticket: not nkp's VM, swtpm's own local
 * CA applies. */

#define TICKET_MAX 8192
#define TICKET_GROUP "ticket"

/* how many kinds a ticket can cover (only its size is used) */
G_GNUC_UNUSED static const char *const ticket_kinds[] = { "ek-rsa", "ek-ecc", "platform" };

static char *ticket_dir(const nkp_context *ctx)
{
        return g_build_filename(ctx->run_dir, "ekca", NULL);
}

static int canonical_uuid(const char *vm_uuid, char canon[NKP_UUID_STRING_LEN + 1])
{
        uint8_t u[16];
        if (nkp_uuid_parse(vm_uuid, u) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a VM UUID.", vm_uuid ? vm_uuid : "");
        nkp_uuid_format(u, canon);
        return 0;
}

static int ticket_path(const nkp_context *ctx, const char *vm_uuid, char **ret)
{
        char canon[NKP_UUID_STRING_LEN + 1];
        int r = canonical_uuid(vm_uuid, canon);
        if (r < 0)
                return r;
        g_autofree char *dir = ticket_dir(ctx);
        *ret = g_build_filename(dir, canon, NULL);
        return 0;
}

static int ticket_save(const char *path, GKeyFile *kf)
{
        gsize len = 0;
        g_autofree char *text = g_key_file_to_data(kf, &len, NULL);
        return nkp_write_file_atomic(path, text, len, 0600, false);
}

int nkp_ekca_ticket_write(nkp_context *ctx, const char *vm_uuid, const char *vm_name,
                          const char *key_id, unsigned ttl_seconds)
{
        uint8_t k[16];
        g_autofree char *path = NULL;
        int r = ticket_path(ctx, vm_uuid, &path);
        if (r < 0)
                return r;
        if (nkp_uuid_parse(key_id, k) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a valid key id.", key_id ? key_id : "");
        if (!vm_name || !vm_name[0] || !g_utf8_validate(vm_name, -1, NULL))
                return nkp_fail(-EINVAL, "A certificate ticket needs the VM's name.");
        g_autofree char *dir = ticket_dir(ctx);
        r = nkp_mkdir_private(dir);
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_key_file_set_string(kf, TICKET_GROUP, "key_id", key_id);
        g_key_file_set_string(kf, TICKET_GROUP, "name", vm_name);
        g_key_file_set_int64(kf, TICKET_GROUP, "expires",
                             g_get_real_time() / G_USEC_PER_SEC + ttl_seconds);
        return ticket_save(path, kf);
}

void nkp_ekca_ticket_remove(nkp_context *ctx, const char *vm_uuid)
{
        g_autofree char *path = NULL;
        if (ticket_path(ctx, vm_uuid, &path) == 0)
                (void) unlink(path);
        nkp_error_clear();
}

/* The ticket of `vm_uuid`, checked (fields, expiry).  -ENOENT none,
 * -ETIMEDOUT expired, -EBADMSG damaged. */
static int ticket_load(nkp_context *ctx, const char *vm_uuid, char **ret_path, GKeyFile **ret)
{
        g_autofree char *path = NULL;
        int r = ticket_path(ctx, vm_uuid, &path);
        if (r < 0)
                return r;
        g_autofree char *text = NULL;
        size_t len = 0;
        r = nkp_read_file(path, TICKET_MAX, true, &text, &len);
        if (r == -ENOENT)
                return nkp_fail(-ENOENT, "No nkp certificate ticket for VM %s.", vm_uuid);
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = g_key_file_new();
        if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, NULL))
                return nkp_fail(-EBADMSG, "The certificate ticket '%s' is damaged.", path);
        g_autofree char *key_id = g_key_file_get_string(kf, TICKET_GROUP, "key_id", NULL);
        g_autofree char *name = g_key_file_get_string(kf, TICKET_GROUP, "name", NULL);
        gint64 expires = g_key_file_get_int64(kf, TICKET_GROUP, "expires", NULL);
        uint8_t k[16];
        if (!key_id || nkp_uuid_parse(key_id, k) < 0 || !name || !name[0] || expires <= 0)
                return nkp_fail(-EBADMSG, "The certificate ticket '%s' is damaged.", path);
        if (expires < g_get_real_time() / G_USEC_PER_SEC)
                return nkp_fail(-ETIMEDOUT,
                                "The certificate ticket of VM %s has expired; start the VM again.",
                                vm_uuid);
        if (ret_path)
                *ret_path = g_steal_pointer(&path);
        *ret = g_steal_pointer(&kf);
        return 0;
}

int nkp_ekca_ticket_read(nkp_context *ctx, const char *vm_uuid, char **ret_key_id)
{
        g_autoptr(GKeyFile) kf = NULL;
        int r = ticket_load(ctx, vm_uuid, NULL, &kf);
        if (r < 0)
                return r;
        *ret_key_id = g_key_file_get_string(kf, TICKET_GROUP, "key_id", NULL);
        return 0;
}

int nkp_ekca_vmid_uuid(const char *vmid, char ret[NKP_UUID_STRING_LEN + 1])
{
        uint8_t u[16];
        const char *colon = vmid ? strrchr(vmid, ':') : NULL;
        const char *s = colon ? colon + 1 : vmid;
        if (!s || nkp_uuid_parse(s, u) < 0)
                return nkp_fail(-EINVAL, "The VM id '%s' does not end in a UUID.", vmid ? vmid : "");
        nkp_uuid_format(u, ret);
        return 0;
}

/* Which of swtpm_setup's three calls `req` is (see the tickets above). */
static int request_kind(const NkpEkCertRequest *req, const char **ret)
{
        if (g_strcmp0(req->type, "platform") == 0)
                *ret = "platform";
        else if (g_strcmp0(req->type, "ek") == 0)
                *ret = req->ek && g_str_has_prefix(req->ek, "x=") ? "ek-ecc" : "ek-rsa";
        else
                return nkp_fail(-EINVAL, "Unknown certificate type '%s' (ek or platform).",
                                req->type ? req->type : "");
        return 0;
}

/* Holds the tickets' lock (flock on their directory) while `fd` is open:
 * one request at a time decides and records, nkpd's or a root tool's. */
static int ticket_lock(nkp_context *ctx, int *ret_fd)
{
        g_autofree char *dir = ticket_dir(ctx);
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT)
                return nkp_fail(-ENOENT, "No nkp certificate tickets on this host.");
        if (fd < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot open '%s': %s.", dir, g_strerror(e));
        }
        while (flock(fd, LOCK_EX) < 0)
                if (errno != EINTR) {
                        int e = errno;
                        close(fd);
                        return nkp_fail(-e, "Cannot lock '%s': %s.", dir, g_strerror(e));
                }
        *ret_fd = fd;
        return 0;
}

/* Records `kind` as issued in the ticket at `path`; the last kind removes
 * it.  Done before the certificate leaves: a ticket that cannot be updated
 * issues nothing. */
static int ticket_consume(const char *path, GKeyFile *kf, const char *kind)
{
        gsize n = 0;
        g_auto(GStrv) issued = g_key_file_get_string_list(kf, TICKET_GROUP, "issued", &n, NULL);
        g_autoptr(GPtrArray) now = g_ptr_array_new();
        for (gsize i = 0; i < n; i++)
                g_ptr_array_add(now, issued[i]);
        g_ptr_array_add(now, (gpointer) kind);
        if (now->len >= G_N_ELEMENTS(ticket_kinds)) {
                if (unlink(path) < 0 && errno != ENOENT) {
                        int e = errno;
                        return nkp_fail(-e, "Cannot remove the certificate ticket '%s': %s.",
                                        path, g_strerror(e));
                }
                return 0;
        }
        g_key_file_set_string_list(kf, TICKET_GROUP, "issued",
                                   (const char *const *) now->pdata, now->len);
        return ticket_save(path, kf);
}

/* The ticket's verdict on `req` for VM `uuid`: its provider key id and the
 * subject (CN) to use.  The caller holds ticket_lock. */
static int ticket_admit(nkp_context *ctx, const NkpEkCertRequest *req, const char *uuid,
                        const char *kind, char **ret_path, GKeyFile **ret_kf, char **ret_cn)
{
        g_autoptr(GKeyFile) kf = NULL;
        g_autofree char *path = NULL;
        int r = ticket_load(ctx, uuid, &path, &kf);
        if (r < 0)
                return r;
        g_autofree char *name = g_key_file_get_string(kf, TICKET_GROUP, "name", NULL);
        g_autofree char *cn = g_strdup_printf("%s:%s", name, uuid);
        /* swtpm_setup's --vmid is libvirt's "<name>:<uuid>". */
        char want_uuid[NKP_UUID_STRING_LEN + 1];
        const char *colon = strrchr(req->vmid, ':');
        if (!colon || (size_t) (colon - req->vmid) != strlen(name) ||
            strncmp(req->vmid, name, strlen(name)) != 0 ||
            nkp_ekca_vmid_uuid(req->vmid, want_uuid) < 0 || strcmp(want_uuid, uuid) != 0)
                return nkp_fail(-EACCES,
                                "The VM id '%s' is not the VM whose vTPM is being made ('%s'); "
                                "nothing was issued.",
                                req->vmid, cn);
        g_auto(GStrv) issued = g_key_file_get_string_list(kf, TICKET_GROUP, "issued", NULL, NULL);
        if (issued && g_strv_contains((const char *const *) issued, kind))
                return nkp_fail(-EALREADY,
                                "The %s certificate of VM '%s' was already issued at this start "
                                "(one of each kind per start); nothing was issued.",
                                kind, cn);
        *ret_path = g_steal_pointer(&path);
        *ret_kf = g_steal_pointer(&kf);
        *ret_cn = g_steal_pointer(&cn);
        return 0;
}

static int sign_admitted(nkp_context *ctx, const NkpEkCertRequest *req, const char *uuid,
                         const char *kind, GBytes **ret, char **ret_provider)
{
        g_autoptr(GKeyFile) kf = NULL;
        g_autofree char *path = NULL, *cn = NULL;
        int r = ticket_admit(ctx, req, uuid, kind, &path, &kf, &cn);
        if (r < 0)
                return r;
        g_autofree char *key_id = g_key_file_get_string(kf, TICKET_GROUP, "key_id", NULL);
        g_autoptr(NkpEkCa) ca = NULL;
        r = nkp_ekca_for_provider(ctx, key_id, &ca);
        if (r == -ENOENT)
                return nkp_fail(-ENOKEY,
                                "The provider (key id %s) of VM %s is not on this host, so its "
                                "vTPM certificates cannot be issued; restore it (nkpctl provider "
                                "restore FILE.p12).",
                                key_id, uuid);
        if (r < 0)
                return r;
        NkpEkCertRequest subject = *req;
        subject.vmid = cn; /* the ticket's VM, not the requester's word */
        g_autoptr(GBytes) der = NULL;
        if ((r = nkp_ekca_issue(ca, &subject, &der)) < 0 ||
            (r = ticket_consume(path, kf, kind)) < 0)
                return r;
        *ret = g_steal_pointer(&der);
        if (ret_provider)
                *ret_provider = g_strdup(ca->name);
        return 0;
}

int nkp_ekca_sign_request(nkp_context *ctx, const NkpEkCertRequest *req, GBytes **ret,
                          char **ret_provider)
{
        char uuid[NKP_UUID_STRING_LEN + 1];
        const char *kind = NULL;
        int r = nkp_ekca_vmid_uuid(req->vmid, uuid);
        if (r < 0 || (r = request_kind(req, &kind)) < 0)
                return r;
        int lock = -1;
        if ((r = ticket_lock(ctx, &lock)) < 0)
                return r;
        r = sign_admitted(ctx, req, uuid, kind, ret, ret_provider);
        close(lock);
        return r;
}

/* ---- the signer service (nkpd; the wire format of the tool) --------------- */
/* Request: "key=value\n" lines (keys as the tool's options without "--":
 * type, ek, vmid, tpm-spec-family, …, platform-model, allow-signing,
 * decryption), then an empty line; at most NKP_EKCA_REQ_MAX bytes.
 * Answer: "OK <n>\n" and n bytes of DER, or "NOTICKET\n" (not an nkp VM:
 * use swtpm's local CA), or "ERR <one line>\n". */

struct req_field {
        const char *key;
        size_t off;
};
#define F(k, m) { k, G_STRUCT_OFFSET(NkpEkCertRequest, m) }
static const struct req_field req_fields[] = {
        F("type", type),
        F("ek", ek),
        F("vmid", vmid),
        F("tpm-spec-family", tpm_spec_family),
        F("tpm-spec-level", tpm_spec_level),
        F("tpm-spec-revision", tpm_spec_revision),
        F("tpm-manufacturer", tpm_manufacturer),
        F("tpm-model", tpm_model),
        F("tpm-version", tpm_version),
        F("platform-manufacturer", platform_manufacturer),
        F("platform-model", platform_model),
        F("platform-version", platform_version),
};
#undef F

char *nkp_ekca_request_format(const NkpEkCertRequest *req)
{
        GString *s = g_string_new(NULL);
        for (size_t i = 0; i < G_N_ELEMENTS(req_fields); i++) {
                const char *v = G_STRUCT_MEMBER(const char *, req, req_fields[i].off);
                if (v && !strchr(v, '\n'))
                        g_string_append_printf(s, "%s=%s\n", req_fields[i].key, v);
        }
        if (req->allow_signing)
                g_string_append(s, "allow-signing=1\n");
        if (req->decryption)
                g_string_append(s, "decryption=1\n");
        g_string_append_c(s, '\n');
        return g_string_free(s, FALSE);
}

/* Parses into `req`, whose strings point into `text` (modified in place). */
int nkp_ekca_request_parse(char *text, NkpEkCertRequest *req)
{
        memset(req, 0, sizeof *req);
        char *save = NULL;
        for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                char *eq = strchr(line, '=');
                if (!eq)
                        return nkp_fail(-EBADMSG, "Malformed certificate request line.");
                *eq = '\0';
                const char *v = eq + 1;
                if (strcmp(line, "allow-signing") == 0) {
                        req->allow_signing = strcmp(v, "1") == 0;
                        continue;
                }
                if (strcmp(line, "decryption") == 0) {
                        req->decryption = strcmp(v, "1") == 0;
                        continue;
                }
                bool known = false;
                for (size_t i = 0; i < G_N_ELEMENTS(req_fields); i++)
                        if (strcmp(line, req_fields[i].key) == 0) {
                                G_STRUCT_MEMBER(const char *, req, req_fields[i].off) = v;
                                known = true;
                        }
                if (!known)
                        return nkp_fail(-EBADMSG, "Unknown certificate request field '%s'.", line);
        }
        return 0;
}

int nkp_ekca_peer_check(int fd, uid_t allowed_uid)
{
        struct ucred cred;
        socklen_t cl = sizeof cred;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot identify the certificate client: %s.", g_strerror(e));
        }
        if (cred.uid != 0 && cred.uid != allowed_uid)
                return nkp_fail(-EPERM, "Refused a certificate client of uid %u (pid %d): only "
                                        "root and libvirt's swtpm user may ask for vTPM "
                                        "certificates.",
                                (unsigned) cred.uid, (int) cred.pid);
        return 0;
}

void nkp_ekca_send_line(int fd, const char *head, const char *message)
{
        g_autofree char *line = g_strdup_printf("%s%s\n", head, message ? message : "");
        for (char *p = line; p[0] && p[1]; p++)
                if (*p == '\n')
                        *p = ' ';
        /* Never waits: an answer this small fits the empty socket buffer. */
        (void) send(fd, line, strlen(line), MSG_DONTWAIT | MSG_NOSIGNAL);
}

bool nkp_ekca_request_complete(const char *buf, size_t len)
{
        return (len == 1 && buf[0] == '\n') ||
               (len >= 2 && buf[len - 1] == '\n' && buf[len - 2] == '\n');
}

int nkp_ekca_answer(nkp_context *ctx, char *buf, size_t len, GBytes **ret_answer,
                    char **ret_note)
{
        g_autofree char *text = g_strndup(buf, len); /* NUL-terminated, no NUL inside */
        if (!nkp_ekca_request_complete(buf, len) || strlen(text) != len) {
                *ret_answer = g_bytes_new_static("ERR nkp: incomplete certificate request.\n",
                                                 41);
                return nkp_fail(-EBADMSG, "An incomplete certificate request was refused.");
        }
        NkpEkCertRequest req;
        g_autoptr(GBytes) der = NULL;
        g_autofree char *provider = NULL;
        int r = nkp_ekca_request_parse(text, &req);
        if (r == 0)
                r = nkp_ekca_sign_request(ctx, &req, &der, &provider);
        if (r == -ENOENT) {
                *ret_answer = g_bytes_new_static("NOTICKET\n", 9);
                if (ret_note)
                        *ret_note = g_strdup_printf("no ticket for '%s': swtpm's local CA",
                                                    req.vmid ? req.vmid : "?");
                return 0;
        }
        if (r < 0) {
                g_autofree char *line = g_strdup_printf("ERR nkp: %s\n", nkp_error_message());
                for (char *p = line; p[0] && p[1]; p++)
                        if (*p == '\n')
                                *p = ' ';
                *ret_answer = g_bytes_new(line, strlen(line));
                return r;
        }
        gsize dl = 0;
        const void *dd = g_bytes_get_data(der, &dl);
        GByteArray *out = g_byte_array_new();
        g_autofree char *hdr = g_strdup_printf("OK %zu\n", (size_t) dl);
        g_byte_array_append(out, (const guint8 *) hdr, (guint) strlen(hdr));
        g_byte_array_append(out, dd, (guint) dl);
        *ret_answer = g_byte_array_free_to_bytes(out);
        if (ret_note)
                *ret_note = g_strdup_printf("issued the %s certificate of '%s' (provider '%s')",
                                            req.type, req.vmid, provider);
        return 0;
}
