/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The provider's EK CA (ekca.c): the derivation is the documented one and
 * the same everywhere, the CA certificate's fields, EK (RSA-2048, ECC P-384)
 * and platform certificates in the TCG profile that verify against the CA
 * of "another host" (a second derivation), bad requests. */
#include <errno.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "testutil.h"

#define KEY_ID "6f1c2a9e-3b7d-4c55-9a0e-1d2b3c4d5e6f"

static nkp_secret *kdk_fill(uint8_t v)
{
        uint8_t b[NKP_KDK_SIZE];
        for (size_t i = 0; i < sizeof b; i++)
                b[i] = (uint8_t) (v + i);
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_secret_new_copy(b, sizeof b, &s), ==, 0);
        return s;
}

static X509 *ca_x509(const NkpEkCa *ca)
{
        g_autoptr(GBytes) der = NULL;
        g_assert_cmpint(nkp_ekca_cert_der(ca, &der), ==, 0);
        gsize len;
        const unsigned char *p = g_bytes_get_data(der, &len);
        X509 *x = d2i_X509(NULL, &p, (long) len);
        g_assert_nonnull(x);
        return x;
}

static X509 *der_x509(GBytes *der)
{
        gsize len;
        const unsigned char *p = g_bytes_get_data(der, &len);
        X509 *x = d2i_X509(NULL, &p, (long) len);
        g_assert_nonnull(x);
        return x;
}

static GBytes *spki(X509 *x)
{
        unsigned char *der = NULL;
        int len = i2d_PUBKEY(X509_get0_pubkey(x), &der);
        g_assert_cmpint(len, >, 0);
        GBytes *b = g_bytes_new(der, (gsize) len);
        OPENSSL_free(der);
        return b;
}

static char *name_text(const X509_NAME *n)
{
        BIO *bio = BIO_new(BIO_s_mem());
        X509_NAME_print_ex(bio, n, 0, XN_FLAG_RFC2253);
        char *d = NULL;
        long len = BIO_get_mem_data(bio, &d);
        char *s = g_strndup(d, (gsize) len);
        BIO_free(bio);
        return s;
}

static char *ext_text(X509 *x, int nid)
{
        int i = X509_get_ext_by_NID(x, nid, -1);
        if (i < 0)
                return NULL;
        BIO *bio = BIO_new(BIO_s_mem());
        X509V3_EXT_print(bio, X509_get_ext(x, i), 0, 0);
        char *d = NULL;
        long len = BIO_get_mem_data(bio, &d);
        char *s = g_strndup(d, (gsize) len);
        BIO_free(bio);
        return s;
}

static bool ext_critical(X509 *x, int nid)
{
        int i = X509_get_ext_by_NID(x, nid, -1);
        g_assert_cmpint(i, >=, 0);
        return X509_EXTENSION_get_critical(X509_get_ext(x, i)) == 1;
}

static void test_derivation(void)
{
        g_autoptr(nkp_secret) kdk = kdk_fill(1);
        g_autoptr(nkp_secret) other = kdk_fill(2);
        g_autoptr(NkpEkCa) a = NULL, b = NULL, c = NULL;
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", KEY_ID, &a), ==, 0);
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", KEY_ID, &b), ==, 0);
        g_assert_cmpint(nkp_ekca_new(other, "p1", KEY_ID, &c), ==, 0);
        X509 *xa = ca_x509(a), *xb = ca_x509(b), *xc = ca_x509(c);

        g_autoptr(GBytes) ka = spki(xa), kb = spki(xb), kc = spki(xc);
        g_assert_true(g_bytes_equal(ka, kb));
        g_assert_false(g_bytes_equal(ka, kc));
        g_assert_cmpint(X509_NAME_cmp(X509_get_subject_name(xa), X509_get_subject_name(xb)), ==, 0);
        g_assert_cmpint(ASN1_INTEGER_cmp(X509_get0_serialNumber(xa), X509_get0_serialNumber(xb)),
                        ==, 0);
        g_assert_cmpint(ASN1_OCTET_STRING_cmp(X509_get0_subject_key_id(xa),
                                              X509_get0_subject_key_id(xb)),
                        ==, 0);
        g_assert_cmpint(ASN1_TIME_compare(X509_get0_notBefore(xa), X509_get0_notBefore(xb)), ==, 0);

        /* The documented derivation, rebuilt here: d = (HKDF(...) mod (n-1)) + 1. */
        uint8_t info[sizeof "nkp ek-ca v1" + 16], okm[64], kid[16];
        memcpy(info, "nkp ek-ca v1", sizeof "nkp ek-ca v1");
        g_assert_cmpint(nkp_uuid_parse(KEY_ID, kid), ==, 0);
        memcpy(info + sizeof "nkp ek-ca v1", kid, 16);
        g_assert_cmpint(nkp_hkdf_sha256(nkp_secret_data(kdk), NKP_KDK_SIZE, NULL, 0, info,
                                        sizeof info, okm, sizeof okm),
                        ==, 0);
        EC_GROUP *grp = EC_GROUP_new_by_curve_name(NID_secp384r1);
        BN_CTX *bc = BN_CTX_new();
        BIGNUM *x = BN_bin2bn(okm, sizeof okm, NULL), *nm1 = BN_dup(EC_GROUP_get0_order(grp));
        BIGNUM *d = BN_new(), *got = NULL;
        g_assert_true(BN_sub_word(nm1, 1) && BN_nnmod(d, x, nm1, bc) && BN_add_word(d, 1));
        g_assert_cmpint(EVP_PKEY_get_bn_param(X509_get0_pubkey(xa), OSSL_PKEY_PARAM_PRIV_KEY, &got),
                        ==, 0); /* the certificate's key is public only */
        EC_POINT *pub = EC_POINT_new(grp);
        g_assert_true(EC_POINT_mul(grp, pub, d, NULL, NULL, bc));
        uint8_t want[97], have[97];
        size_t wl = EC_POINT_point2oct(grp, pub, POINT_CONVERSION_UNCOMPRESSED, want, sizeof want, bc);
        size_t hl = 0;
        g_assert_cmpint(EVP_PKEY_get_octet_string_param(X509_get0_pubkey(xa),
                                                        OSSL_PKEY_PARAM_PUB_KEY, have, sizeof have,
                                                        &hl),
                        ==, 1);
        g_assert_cmpuint(wl, ==, 97);
        g_assert_cmpmem(want, wl, have, hl);
        EC_POINT_free(pub);
        BN_clear_free(d);
        BN_free(x);
        BN_free(nm1);
        BN_CTX_free(bc);
        EC_GROUP_free(grp);
        nkp_wipe(okm, sizeof okm);

        /* Another key id: another key. */
        g_autoptr(NkpEkCa) e = NULL;
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", "00000000-0000-4000-8000-000000000001", &e), ==, 0);
        X509 *xe = ca_x509(e);
        g_autoptr(GBytes) ke = spki(xe);
        g_assert_false(g_bytes_equal(ka, ke));
        X509_free(xe);
        X509_free(xa);
        X509_free(xb);
        X509_free(xc);
}

static void test_ca_fields(void)
{
        g_autoptr(nkp_secret) kdk = kdk_fill(7);
        g_autoptr(NkpEkCa) ca = NULL;
        g_assert_cmpint(nkp_ekca_new(kdk, "prod-1", KEY_ID, &ca), ==, 0);
        X509 *x = ca_x509(ca);
        g_autofree char *subj = name_text(X509_get_subject_name(x));
        g_assert_cmpstr(subj, ==, "CN=nkp EK CA prod-1,O=nkp");
        g_assert_cmpint(X509_NAME_cmp(X509_get_subject_name(x), X509_get_issuer_name(x)), ==, 0);
        g_assert_cmpint(X509_verify(x, X509_get0_pubkey(x)), ==, 1);
        g_assert_true(X509_check_ca(x) >= 1);
        g_assert_true(ext_critical(x, NID_basic_constraints));
        g_assert_true(ext_critical(x, NID_key_usage));
        g_assert_true(X509_get_key_usage(x) & KU_KEY_CERT_SIGN);
        g_assert_cmpint(EVP_PKEY_get_base_id(X509_get0_pubkey(x)), ==, EVP_PKEY_EC);
        g_assert_cmpint(EVP_PKEY_get_bits(X509_get0_pubkey(x)), ==, 384);
        g_assert_nonnull(X509_get0_subject_key_id(x));
        g_assert_cmpint(ASN1_OCTET_STRING_cmp(X509_get0_subject_key_id(x),
                                              X509_get0_authority_key_id(x)),
                        ==, 0);
        g_assert_cmpint(ASN1_TIME_cmp_time_t(X509_get0_notBefore(x), 1735689600), ==, 0);
        g_assert_cmpint(ASN1_TIME_cmp_time_t(X509_get0_notAfter(x), 2682374400), ==, 0);
        g_autofree char *pem = NULL;
        g_assert_cmpint(nkp_ekca_cert_pem(ca, &pem), ==, 0);
        g_assert_true(g_str_has_prefix(pem, "-----BEGIN CERTIFICATE-----\n"));
        X509_free(x);
}

static char *hex(const uint8_t *b, size_t n)
{
        char *s = g_malloc(2 * n + 1);
        nkp_hex_encode(b, n, s);
        return s;
}

static char *rsa_ek_param(void)
{
        EVP_PKEY *k = EVP_RSA_gen(2048);
        g_assert_nonnull(k);
        BIGNUM *n = NULL;
        g_assert_cmpint(EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_RSA_N, &n), ==, 1);
        uint8_t buf[256];
        g_assert_cmpint(BN_bn2binpad(n, buf, sizeof buf), ==, 256);
        BN_free(n);
        EVP_PKEY_free(k);
        return hex(buf, sizeof buf);
}

static char *ecc_ek_param(void)
{
        EVP_PKEY *k = EVP_EC_gen("secp384r1");
        g_assert_nonnull(k);
        uint8_t pt[97];
        size_t len = 0;
        g_assert_cmpint(EVP_PKEY_get_octet_string_param(k, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof pt,
                                                        &len),
                        ==, 1);
        g_assert_cmpuint(len, ==, 97);
        EVP_PKEY_free(k);
        g_autofree char *x = hex(pt + 1, 48), *y = hex(pt + 49, 48);
        return g_strdup_printf("x=%s,y=%s,id=secp384r1", x, y);
}

static NkpEkCertRequest base_request(const char *type, const char *ek)
{
        NkpEkCertRequest r = {
                .type = type,
                .ek = ek,
                .vmid = "vm1:5b3e4f8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b",
                .tpm_spec_family = "2.0",
                .tpm_spec_level = "0",
                .tpm_spec_revision = "164",
                .tpm_manufacturer = "id:00001014",
                .tpm_model = "swtpm",
                .tpm_version = "id:20191023",
                .platform_manufacturer = "Debian",
                .platform_model = "QEMU",
                .platform_version = "7.2",
        };
        return r;
}

/* Verifies `leaf` against a trust store holding only `root`. */
static int verify(X509 *leaf, X509 *root)
{
        X509_STORE *st = X509_STORE_new();
        X509_STORE_add_cert(st, root);
        X509_STORE_CTX *c = X509_STORE_CTX_new();
        X509_STORE_CTX_init(c, st, leaf, NULL);
        /* EK certificates carry a TCG EKU and a critical SAN that OpenSSL
         * does not interpret as a purpose: check the chain only. */
        X509_STORE_CTX_set_purpose(c, X509_PURPOSE_ANY);
        int ok = X509_verify_cert(c);
        if (ok != 1)
                g_test_message("verify: %s",
                               X509_verify_cert_error_string(X509_STORE_CTX_get_error(c)));
        X509_STORE_CTX_free(c);
        X509_STORE_free(st);
        return ok;
}

static void check_issued(const char *type, const char *ek, bool ecc)
{
        g_autoptr(nkp_secret) kdk = kdk_fill(9);
        g_autoptr(NkpEkCa) host_a = NULL, host_b = NULL;
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", KEY_ID, &host_a), ==, 0);
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", KEY_ID, &host_b), ==, 0);
        NkpEkCertRequest req = base_request(type, ek);
        g_autoptr(GBytes) der = NULL;
        int r = nkp_ekca_issue(host_a, &req, &der);
        if (r < 0)
                g_error("issue %s: %s", type, nkp_error_message());
        X509 *leaf = der_x509(der);
        X509 *root_b = ca_x509(host_b);
        g_assert_cmpint(verify(leaf, root_b), ==, 1);

        g_autofree char *subj = name_text(X509_get_subject_name(leaf));
        g_assert_cmpstr(subj, ==, "CN=vm1:5b3e4f8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
        g_autofree char *san = ext_text(leaf, NID_subject_alt_name);
        g_assert_nonnull(san);
        g_assert_true(ext_critical(leaf, NID_subject_alt_name));
        g_autofree char *eku = ext_text(leaf, NID_ext_key_usage);
        g_assert_nonnull(eku);
        g_assert_false(X509_check_ca(leaf) >= 1);
        g_assert_true(ext_critical(leaf, NID_basic_constraints));
        g_assert_cmpint(ASN1_OCTET_STRING_cmp(X509_get0_authority_key_id(leaf),
                                              X509_get0_subject_key_id(root_b)),
                        ==, 0);
        uint32_t ku = X509_get_key_usage(leaf);
        if (strcmp(type, "ek") == 0) {
                g_assert_nonnull(strstr(san, "2.23.133.2.1=id:00001014"));
                g_assert_nonnull(strstr(san, "2.23.133.2.2=swtpm"));
                g_assert_nonnull(strstr(san, "2.23.133.2.3=id:20191023"));
                g_assert_nonnull(strstr(eku, "2.23.133.8.1"));
                ASN1_OBJECT *sda = OBJ_txt2obj("2.5.29.9", 1);
                int i = X509_get_ext_by_OBJ(leaf, sda, -1);
                ASN1_OBJECT_free(sda);
                g_assert_cmpint(i, >=, 0);
                const ASN1_OCTET_STRING *v = X509_EXTENSION_get_data(X509_get_ext(leaf, i));
                /* 30 19 30 17 06 05 67 81 05 02 10 31 0e 30 0c 0c 03 "2.0" 02 01 00 02 02 00 a4 */
                static const uint8_t want[] = { 0x30, 0x19, 0x30, 0x17, 0x06, 0x05, 0x67, 0x81, 0x05,
                                                0x02, 0x10, 0x31, 0x0e, 0x30, 0x0c, 0x0c, 0x03, '2',
                                                '.',  '0',  0x02, 0x01, 0x00, 0x02, 0x02, 0x00, 0xa4 };
                g_assert_cmpmem(ASN1_STRING_get0_data(v), ASN1_STRING_length(v), want, sizeof want);
        } else {
                g_assert_nonnull(strstr(san, "2.23.133.5.1.1=Debian"));
                g_assert_nonnull(strstr(san, "2.23.133.5.1.4=QEMU"));
                g_assert_nonnull(strstr(san, "2.23.133.5.1.5=7.2"));
                g_assert_nonnull(strstr(eku, "2.23.133.8.2"));
        }
        if (ecc) {
                g_assert_true(ku & KU_KEY_AGREEMENT);
                g_assert_cmpint(EVP_PKEY_get_bits(X509_get0_pubkey(leaf)), ==, 384);
        } else {
                g_assert_true(ku & KU_KEY_ENCIPHERMENT);
                g_assert_cmpint(EVP_PKEY_get_bits(X509_get0_pubkey(leaf)), ==, 2048);
        }
        g_assert_false(ku & KU_DIGITAL_SIGNATURE);

        /* Not by another provider's CA. */
        g_autoptr(nkp_secret) other = kdk_fill(10);
        g_autoptr(NkpEkCa) foreign = NULL;
        g_assert_cmpint(nkp_ekca_new(other, "p1", KEY_ID, &foreign), ==, 0);
        X509 *froot = ca_x509(foreign);
        g_assert_cmpint(verify(leaf, froot), !=, 1);
        X509_free(froot);
        X509_free(root_b);
        X509_free(leaf);
}

static void test_ek_rsa(void)
{
        g_autofree char *ek = rsa_ek_param();
        check_issued("ek", ek, false);
}

static void test_ek_ecc(void)
{
        g_autofree char *ek = ecc_ek_param();
        check_issued("ek", ek, true);
}

static void test_platform(void)
{
        g_autofree char *ek = rsa_ek_param();
        check_issued("platform", ek, false);
}

static void test_bad_requests(void)
{
        g_autoptr(nkp_secret) kdk = kdk_fill(3);
        g_autoptr(NkpEkCa) ca = NULL;
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", KEY_ID, &ca), ==, 0);
        g_autofree char *ek = rsa_ek_param();
        g_autofree char *ecc = ecc_ek_param();
        GBytes *der = NULL;
        NkpEkCertRequest r = base_request("aik", ek);
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        r = base_request("ek", "abcd");
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        g_autofree char *nothex = g_strdup(ek);
        nothex[10] = 'g';
        r = base_request("ek", nothex);
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        g_autofree char *shortx = g_strdup(ecc);
        shortx[4] = ',';
        r = base_request("ek", shortx);
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        /* A point that is not on the curve. */
        g_autofree char *offcurve = g_strdup(ecc);
        char *y = strstr(offcurve, "y=") + 2;
        y[0] = y[0] == '0' ? '1' : '0';
        r = base_request("ek", offcurve);
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        r = base_request("ek", ek);
        r.tpm_spec_revision = "x";
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        r = base_request("ek", ek);
        r.tpm_model = NULL;
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        r = base_request("platform", ek);
        r.platform_model = NULL;
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        r = base_request("ek", ek);
        r.vmid = NULL;
        g_assert_cmpint(nkp_ekca_issue(ca, &r, &der), ==, -EINVAL);
        g_assert_null(der);
        g_assert_cmpint(nkp_ekca_new(kdk, "bad name", KEY_ID, &ca), ==, -EINVAL);
        g_assert_cmpint(nkp_ekca_new(kdk, "p1", "not-a-uuid", &ca), ==, -EINVAL);
}

static void test_for_provider(void)
{
        g_autofree char *root = testutil_mkdtemp();
        g_autofree char *etc = g_build_filename(root, "etc/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        g_autofree char *conf = g_build_filename(etc, "nkp.conf", NULL);
        g_assert_true(g_file_set_contents(conf, "[tpm]\ntcti=none\n", -1, NULL));
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        nkp_cache_flush(ctx);
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, "ekp", 0, &p), ==, 0);
        g_autoptr(NkpEkCa) ca = NULL, again = NULL;
        g_assert_cmpint(nkp_ekca_for_provider(ctx, nkp_provider_key_id(p), &ca), ==, 0);
        nkp_cache_flush(ctx); /* from the store this time */
        g_assert_cmpint(nkp_ekca_for_provider(ctx, nkp_provider_key_id(p), &again), ==, 0);
        X509 *a = ca_x509(ca), *b = ca_x509(again);
        g_autoptr(GBytes) ka = spki(a), kb = spki(b);
        g_assert_true(g_bytes_equal(ka, kb));
        X509_free(a);
        X509_free(b);
        NkpEkCa *none = NULL;
        g_assert_cmpint(nkp_ekca_for_provider(ctx, "00000000-0000-4000-8000-0000000000aa", &none),
                        ==, -ENOENT);
        g_assert_null(none);
        nkp_cache_flush(ctx);
        testutil_rmtree(root);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/ekca/derivation", test_derivation);
        g_test_add_func("/ekca/ca-fields", test_ca_fields);
        g_test_add_func("/ekca/ek-rsa", test_ek_rsa);
        g_test_add_func("/ekca/ek-ecc", test_ek_ecc);
        g_test_add_func("/ekca/platform", test_platform);
        g_test_add_func("/ekca/bad-requests", test_bad_requests);
        g_test_add_func("/ekca/for-provider", test_for_provider);
        return g_test_run();
}
