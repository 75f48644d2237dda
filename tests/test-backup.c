/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* PKCS#12 provider backups: export/import (pure), bad files, and the
 * provider-level backup/restore round trip between two roots. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>

#include "p12-internal.h"
#include "testutil-swtpm.h"
#include "testutil.h"

#define LOW_ITER 1000
#define PASSWORD "correct horse battery staple"

static nkp_secret *pw_new(const char *s)
{
        nkp_secret *pw = NULL;
        g_assert_cmpint(nkp_secret_new_copy(s, strlen(s), &pw), ==, 0);
        return pw;
}

static void info_init(NkpBackupInfo *info, const char *name, unsigned flags)
{
        memset(info, 0, sizeof *info);
        g_strlcpy(info->name, name, sizeof info->name);
        nkp_uuid_random(info->key_id);
        info->flags = flags;
}

static GBytes *export_low(const NkpBackupInfo *info, const nkp_secret *kdk, const char *password)
{
        g_autoptr(nkp_secret) pw = pw_new(password);
        GBytes *der = NULL;
        g_assert_cmpint(nkp_p12_export(info, kdk, pw, LOW_ITER, &der), ==, 0);
        g_assert_nonnull(der);
        return der;
}

static int import(GBytes *der, const char *password, NkpBackupInfo *info, nkp_secret **kdk)
{
        g_autoptr(nkp_secret) pw = pw_new(password);
        gsize len;
        const void *data = g_bytes_get_data(der, &len);
        return nkp_p12_import(data, len, pw, info, kdk);
}

static void assert_error(const char *needle)
{
        if (!strstr(nkp_error_message(), needle))
                g_error("error message '%s' does not contain '%s'", nkp_error_message(), needle);
}

/* ---- pure export / import -------------------------------------------------- */

static void test_round_trip(void)
{
        for (unsigned flags = 0; flags <= NKP_PROVIDER_REQUIRE_TPM; flags += NKP_PROVIDER_REQUIRE_TPM) {
                NkpBackupInfo in, out;
                info_init(&in, "prod-1.eu_west", flags);
                g_autoptr(nkp_secret) kdk = NULL, got = NULL;
                g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
                g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
                g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, 0);
                g_assert_cmpstr(out.name, ==, in.name);
                g_assert_cmpstr(out.key_id, ==, in.key_id);
                g_assert_cmpuint(out.flags, ==, flags);
                g_assert_true(nkp_secret_equal(kdk, got));
        }
}

static void test_round_trip_host_flags_dropped(void)
{
        /* default and backed_up belong to one host; only require-tpm travels */
        NkpBackupInfo in, out;
        info_init(&in, "p", NKP_PROVIDER_DEFAULT | NKP_PROVIDER_BACKED_UP);
        g_autoptr(nkp_secret) kdk = NULL, got = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
        g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, 0);
        g_assert_cmpuint(out.flags, ==, 0);
        g_assert_cmpstr(out.name, ==, "p");
}

static void test_export_bad_input(void)
{
        NkpBackupInfo in;
        g_autoptr(nkp_secret) kdk = NULL, short_kdk = NULL, pw = pw_new(PASSWORD);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(16, &short_kdk), ==, 0);
        GBytes *der = NULL;

        info_init(&in, "bad name", 0);
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, LOW_ITER, &der), ==, -EINVAL);
        info_init(&in, "", 0);
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, LOW_ITER, &der), ==, -EINVAL);
        info_init(&in, "ok", 0);
        g_strlcpy(in.key_id, "not-a-uuid", sizeof in.key_id);
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, LOW_ITER, &der), ==, -EINVAL);
        info_init(&in, "ok", 0);
        g_assert_cmpint(nkp_p12_export(&in, short_kdk, pw, LOW_ITER, &der), ==, -EINVAL);
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, 0, &der), ==, -EINVAL);
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, NKP_P12_MAX_ITERATIONS + 1, &der), ==, -EINVAL);
        g_assert_cmpint(nkp_p12_export(&in, kdk, NULL, LOW_ITER, &der), ==, -EINVAL);
        assert_error("password is empty");
        g_autoptr(nkp_secret) nul = NULL;
        g_assert_cmpint(nkp_secret_new_copy("a\0b", 3, &nul), ==, 0);
        g_assert_cmpint(nkp_p12_export(&in, kdk, nul, LOW_ITER, &der), ==, -EINVAL);
        g_assert_null(der);
}

static void test_wrong_password(void)
{
        NkpBackupInfo in, out;
        info_init(&in, "p", 0);
        g_autoptr(nkp_secret) kdk = NULL;
        nkp_secret *got = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
        g_assert_cmpint(import(der, "correct horse battery stapl", &out, &got), ==, -EACCES);
        g_assert_cmpstr(nkp_error_message(), ==, "The password is wrong or the file was altered.");
        g_assert_cmpint(import(der, PASSWORD "e", &out, &got), ==, -EACCES);
        g_assert_cmpint(import(der, "x", &out, &got), ==, -EACCES);
        g_assert_null(got);
}

static void test_empty_password(void)
{
        NkpBackupInfo in, out;
        info_init(&in, "p", 0);
        g_autoptr(nkp_secret) kdk = NULL;
        nkp_secret *got = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
        gsize len;
        const void *data = g_bytes_get_data(der, &len);
        g_assert_cmpint(nkp_p12_import(data, len, NULL, &out, &got), ==, -EINVAL);
        assert_error("password is empty");
        g_autoptr(nkp_secret) nul = NULL;
        g_assert_cmpint(nkp_secret_new_copy("\0", 1, &nul), ==, 0);
        g_assert_cmpint(nkp_p12_import(data, len, nul, &out, &got), ==, -EINVAL);
        g_assert_null(got);
}

/* Passwords are bytes: UTF-8 (what `openssl pkcs12` reads too) and even
 * invalid UTF-8 round-trip, and one byte off is the wrong password. */
static void test_password_bytes(void)
{
        static const char *const passwords[] = { "p\xc3\xa4ssw\xc3\xb6rd \xe2\x82\xac", "bad\xff\xfe", "x" };
        for (size_t i = 0; i < G_N_ELEMENTS(passwords); i++) {
                NkpBackupInfo in, out;
                info_init(&in, "p", 0);
                g_autoptr(nkp_secret) kdk = NULL, got = NULL;
                g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
                g_autoptr(GBytes) der = export_low(&in, kdk, passwords[i]);
                g_assert_cmpint(import(der, passwords[i], &out, &got), ==, 0);
                g_assert_true(nkp_secret_equal(kdk, got));
                g_autofree char *off = g_strdup(passwords[i]);
                off[strlen(off) - 1] ^= 1;
                nkp_secret *none = NULL;
                g_assert_cmpint(import(der, off, &out, &none), ==, -EACCES);
                g_assert_null(none);
        }
}

static void test_truncated(void)
{
        NkpBackupInfo in, out;
        info_init(&in, "p", 0);
        g_autoptr(nkp_secret) kdk = NULL, pw = pw_new(PASSWORD);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
        gsize len;
        const uint8_t *data = g_bytes_get_data(der, &len);
        /* every prefix (each is its own allocation, so ASan sees overreads) */
        for (gsize n = 0; n < len; n++) {
                g_autofree uint8_t *copy = g_memdup2(data, n ? n : 1);
                nkp_secret *got = NULL;
                int r = nkp_p12_import(copy, n, pw, &out, &got);
                if (r != -EBADMSG)
                        g_error("prefix of %zu/%zu bytes: %d (%s)", n, len, r, nkp_error_message());
                g_assert_null(got);
        }
        /* trailing bytes after the DER */
        g_autofree uint8_t *longer = g_malloc(len + 1);
        memcpy(longer, data, len);
        longer[len] = 0;
        nkp_secret *got = NULL;
        g_assert_cmpint(nkp_p12_import(longer, len + 1, pw, &out, &got), ==, -EBADMSG);
        g_assert_cmpint(nkp_p12_import(longer, NKP_P12_MAX_SIZE + 1, pw, &out, &got), ==, -EFBIG);
}

static void test_bit_flips(void)
{
        NkpBackupInfo in, out;
        info_init(&in, "flip", NKP_PROVIDER_REQUIRE_TPM);
        g_autoptr(nkp_secret) kdk = NULL, pw = pw_new(PASSWORD);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&in, kdk, PASSWORD);
        gsize len;
        const uint8_t *data = g_bytes_get_data(der, &len);
        unsigned accepted = 0, refused = 0;
        /* every byte, a different bit each time, plus all 8 bits of the
         * first 64 bytes (the outer headers) */
        for (gsize i = 0; i < len + 64 * 8; i++) {
                gsize pos = i < len ? i : (i - len) / 8;
                unsigned bit = i < len ? i % 8 : (i - len) % 8;
                g_autofree uint8_t *copy = g_memdup2(data, len);
                copy[pos] ^= (uint8_t) (1u << bit);
                nkp_secret *got = NULL;
                int r = nkp_p12_import(copy, len, pw, &out, &got);
                if (r == 0) {
                        /* only fields outside the MAC that change nothing
                         * that matters (the PFX version number) */
                        g_assert_cmpstr(out.name, ==, in.name);
                        g_assert_cmpstr(out.key_id, ==, in.key_id);
                        g_assert_cmpuint(out.flags, ==, in.flags);
                        g_assert_true(nkp_secret_equal(got, kdk));
                        nkp_secret_free(got);
                        g_test_message("accepted flip of bit %u at %zu", bit, pos);
                        accepted++;
                        continue;
                }
                g_assert_null(got);
                g_assert_true(r == -EBADMSG || r == -EACCES);
                refused++;
        }
        g_test_message("bit flips: %u refused, %u harmless ones accepted", refused, accepted);
        g_assert_cmpuint(accepted, <=, 16);
}

/* ---- hand-made files ---------------------------------------------------------- */

typedef struct {
        const char *name;   /* NULL: no friendlyName */
        const char *key_id; /* NULL: no key id attribute */
        const char *flags;  /* NULL: no flags attribute */
        size_t kdk_len;
        int n_bags;
        int safe_iter, mac_iter;
        bool setup_mac_only; /* MacData without computing the MAC */
        int safe_nid;        /* 0: NID_aes_256_cbc; -1: no encryption */
} P12Spec;

static int our_nid(void)
{
        int nid = OBJ_txt2nid(NKP_OID_SECRET_KDK);
        if (nid == NID_undef)
                nid = OBJ_create(NKP_OID_SECRET_KDK, NULL, NULL);
        g_assert_cmpint(nid, !=, NID_undef);
        return nid;
}

static GBytes *p12_to_bytes(PKCS12 *p12)
{
        unsigned char *der = NULL;
        int n = i2d_PKCS12(p12, &der);
        g_assert_cmpint(n, >, 0);
        GBytes *b = g_bytes_new(der, (size_t) n);
        OPENSSL_free(der);
        return b;
}

static GBytes *make_p12(const P12Spec *spec)
{
        STACK_OF(PKCS12_SAFEBAG) *bags = NULL;
        uint8_t value[64];
        g_assert_cmpuint(spec->kdk_len, <=, sizeof value);
        memset(value, 0x5a, sizeof value);
        for (int i = 0; i < spec->n_bags; i++) {
                PKCS12_SAFEBAG *bag = PKCS12_add_secret(&bags, our_nid(), value, (int) spec->kdk_len);
                g_assert_nonnull(bag);
                if (spec->name)
                        g_assert_true(PKCS12_add_friendlyname_utf8(bag, spec->name, -1));
                if (spec->key_id)
                        g_assert_true(PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_KEY_ID, V_ASN1_UTF8STRING,
                                                              (const unsigned char *) spec->key_id,
                                                              (int) strlen(spec->key_id)));
                if (spec->flags)
                        g_assert_true(PKCS12_add1_attr_by_txt(bag, NKP_OID_ATTR_FLAGS, V_ASN1_UTF8STRING,
                                                              (const unsigned char *) spec->flags,
                                                              (int) strlen(spec->flags)));
        }
        if (spec->n_bags == 0) /* someone else's secret: ignored */
                g_assert_nonnull(PKCS12_add_secret(&bags, NID_data, value, (int) spec->kdk_len));
        STACK_OF(PKCS7) *safes = NULL;
        g_assert_true(PKCS12_add_safe(&safes, bags, spec->safe_nid ? spec->safe_nid : NID_aes_256_cbc,
                                      spec->safe_iter, PASSWORD));
        PKCS12 *p12 = PKCS12_add_safes(safes, 0);
        g_assert_nonnull(p12);
        if (spec->setup_mac_only)
                g_assert_true(PKCS12_setup_mac(p12, spec->mac_iter, NULL, 0, EVP_sha256()));
        else
                g_assert_true(PKCS12_set_mac(p12, PASSWORD, -1, NULL, 0, spec->mac_iter, EVP_sha256()));
        GBytes *b = p12_to_bytes(p12);
        PKCS12_free(p12);
        sk_PKCS7_pop_free(safes, PKCS7_free);
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
        return b;
}

#define GOOD_UUID "0b7c3b9e-1d7a-4a57-9c35-9f4b0d3c2e11"

static void expect_refused(const P12Spec *spec, int err, const char *needle)
{
        g_autoptr(GBytes) der = make_p12(spec);
        NkpBackupInfo out;
        nkp_secret *got = NULL;
        int r = import(der, PASSWORD, &out, &got);
        if (r != err)
                g_error("expected %d, got %d (%s)", err, r, nkp_error_message());
        g_assert_null(got);
        assert_error(needle);
}

static void test_hand_made(void)
{
        P12Spec good = { "hand", GOOD_UUID, "", NKP_KDK_SIZE, 1, LOW_ITER, LOW_ITER, false };
        g_autoptr(GBytes) der = make_p12(&good);
        NkpBackupInfo out;
        g_autoptr(nkp_secret) got = NULL;
        g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, 0);
        g_assert_cmpstr(out.name, ==, "hand");
        g_assert_cmpstr(out.key_id, ==, GOOD_UUID);

        P12Spec s = good;
        s.n_bags = 2;
        expect_refused(&s, -EBADMSG, "more than one nkp provider");
        s = good;
        s.n_bags = 0;
        expect_refused(&s, -EBADMSG, "not an nkp provider backup");
        s = good;
        s.kdk_len = 31;
        expect_refused(&s, -EBADMSG, "31 bytes");
        s.kdk_len = 33;
        expect_refused(&s, -EBADMSG, "33 bytes");
        s = good;
        s.name = "two words";
        expect_refused(&s, -EBADMSG, "name is not valid");
        s.name = "0123456789012345678901234567890123456789012345678901234567890123456789";
        expect_refused(&s, -EBADMSG, "name is not valid");
        s.name = "caf\xc3\xa9";
        expect_refused(&s, -EBADMSG, "name is not valid");
        s.name = NULL;
        expect_refused(&s, -EBADMSG, "name");
        s = good;
        s.key_id = "not-a-uuid";
        expect_refused(&s, -EBADMSG, "not a UUID");
        s.key_id = "0B7C3B9E-1D7A-4A57-9C35-9F4B0D3C2E11";
        expect_refused(&s, -EBADMSG, "canonical");
        s.key_id = NULL;
        expect_refused(&s, -EBADMSG, "key id");
        s = good;
        s.flags = "require-tpm,teleport";
        expect_refused(&s, -EBADMSG, "'teleport'");
        s.flags = NULL;
        expect_refused(&s, -EBADMSG, "flags");

        s = good;
        s.flags = "require-tpm";
        g_autoptr(GBytes) der2 = make_p12(&s);
        g_autoptr(nkp_secret) got2 = NULL;
        g_assert_cmpint(import(der2, PASSWORD, &out, &got2), ==, 0);
        g_assert_cmpuint(out.flags, ==, NKP_PROVIDER_REQUIRE_TPM);
}

static void test_iterations_capped(void)
{
        /* A MAC asking for more than the cap is refused before any work:
         * PKCS12_setup_mac writes the MacData without computing it. */
        P12Spec s = { "p", GOOD_UUID, "", NKP_KDK_SIZE, 1, LOW_ITER, NKP_P12_MAX_ITERATIONS + 1, true };
        gint64 t0 = g_get_monotonic_time();
        expect_refused(&s, -EBADMSG, "password iterations");
        s.mac_iter = INT32_MAX;
        expect_refused(&s, -EBADMSG, "password iterations");
        gint64 dt = g_get_monotonic_time() - t0;
        g_test_message("refused two over-cap files in %" G_GINT64_FORMAT " µs", dt);
        g_assert_cmpint(dt, <, G_USEC_PER_SEC / 2);

        /* The PBKDF2 count of the safe is checked too (with a low cap here,
         * so that the test does not run 10 million iterations to make it). */
        g_autoptr(nkp_secret) pw = pw_new(PASSWORD);
        s = (P12Spec) { "p", GOOD_UUID, "", NKP_KDK_SIZE, 1, 5000, 100, false };
        g_autoptr(GBytes) der = make_p12(&s);
        gsize len;
        const void *data = g_bytes_get_data(der, &len);
        NkpBackupInfo out;
        nkp_secret *got = NULL;
        g_assert_cmpint(nkp_p12_import_capped(data, len, pw, 4000, &out, &got), ==, -EBADMSG);
        assert_error("5000 password iterations");
        g_assert_cmpint(nkp_p12_import_capped(data, len, pw, 5000, &out, &got), ==, 0);
        nkp_secret_free(got);
}

static GBytes *make_cert_bundle(void)
{
        EVP_PKEY *key = EVP_EC_gen("P-256");
        g_assert_nonnull(key);
        X509 *x = X509_new();
        g_assert_nonnull(x);
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
        X509_gmtime_adj(X509_getm_notBefore(x), 0);
        X509_gmtime_adj(X509_getm_notAfter(x), 3600);
        X509_set_pubkey(x, key);
        X509_NAME *n = X509_get_subject_name(x);
        X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *) "nkp test", -1, -1, 0);
        X509_set_issuer_name(x, n);
        g_assert_cmpint(X509_sign(x, key, EVP_sha256()), >, 0);
        /* OpenSSL 3 defaults: PBES2 AES-256-CBC for key and certs */
        PKCS12 *p12 = PKCS12_create(PASSWORD, "a certificate", key, x, NULL, 0, 0, LOW_ITER, LOW_ITER, 0);
        g_assert_nonnull(p12);
        GBytes *b = p12_to_bytes(p12);
        PKCS12_free(p12);
        X509_free(x);
        EVP_PKEY_free(key);
        return b;
}

static void test_cert_bundle(void)
{
        g_autoptr(GBytes) der = make_cert_bundle();
        NkpBackupInfo out;
        nkp_secret *got = NULL;
        g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, -EBADMSG);
        assert_error("not an nkp provider backup");
        g_assert_cmpint(import(der, "wrong", &out, &got), ==, -EACCES);
        g_assert_null(got);
}

/* `openssl pkcs12 -info` reads a backup made with the real iteration count,
 * and shows PBES2/AES-256-CBC/PBKDF2-SHA256, a SHA-256 MAC and our bag. */
static void test_openssl_reads_it(void)
{
        g_autofree char *openssl = g_find_program_in_path("openssl");
        if (!openssl) {
                g_test_skip("no openssl program");
                return;
        }
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *file = g_build_filename(dir, "b.p12", NULL);
        g_autofree char *pwfile = g_build_filename(dir, "pw", NULL);
        g_assert_true(g_file_set_contents(pwfile, PASSWORD "\n", -1, NULL));

        NkpBackupInfo in, out;
        info_init(&in, "openssl-check", NKP_PROVIDER_REQUIRE_TPM);
        g_autoptr(nkp_secret) kdk = NULL, pw = pw_new(PASSWORD), got = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = NULL;
        gint64 t0 = g_get_monotonic_time();
        g_assert_cmpint(nkp_p12_export(&in, kdk, pw, NKP_P12_ITERATIONS, &der), ==, 0);
        gint64 t1 = g_get_monotonic_time();
        g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, 0);
        gint64 t2 = g_get_monotonic_time();
        g_test_message("%d iterations: export %.3f s, import %.3f s, %zu bytes", NKP_P12_ITERATIONS,
                       (t1 - t0) / 1e6, (t2 - t1) / 1e6, g_bytes_get_size(der));
        g_assert_true(nkp_secret_equal(kdk, got));
        g_assert_true(g_file_set_contents(file, g_bytes_get_data(der, NULL), (gssize) g_bytes_get_size(der),
                                          NULL));

        const char *argv[] = { openssl, "pkcs12", "-info", "-in", file, "-passin", NULL, "-nokeys", NULL };
        g_autofree char *passin = g_strconcat("file:", pwfile, NULL);
        argv[6] = passin;
        g_autofree char *sout = NULL, *serr = NULL;
        int status = 0;
        g_autoptr(GError) error = NULL;
        g_assert_true(g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL, &sout, &serr,
                                   &status, &error));
        g_assert_no_error(error);
        g_autofree char *all = g_strconcat(sout, serr, NULL);
        g_test_message("openssl pkcs12 -info:\n%s", all);
        g_assert_true(g_spawn_check_wait_status(status, NULL));
        g_assert_nonnull(strstr(all, "MAC: sha256, Iteration 600000"));
        g_assert_nonnull(strstr(all, "PBES2, PBKDF2, AES-256-CBC, Iteration 600000, PRF hmacWithSHA256"));
        g_assert_nonnull(strstr(all, "friendlyName: openssl-check"));
        g_assert_nonnull(strstr(all, in.key_id));
        g_assert_nonnull(strstr(all, "require-tpm"));
        g_assert_nonnull(strstr(all, NKP_OID_SECRET_KDK));
        testutil_rmtree(dir);
}

/* ---- m-of-n shares (pure) ---------------------------------------------------- */

/* `n` share infos of one split of `kdk` (threshold m), as export writes them. */
static void shares_make(const nkp_secret *kdk, unsigned n, unsigned m, NkpBackupInfo *infos,
                        nkp_secret ***shares)
{
        g_assert_cmpint(nkp_shares_split(kdk, n, m, shares), ==, 0);
        g_autofree char *fp = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk, &fp), ==, 0);
        char split[NKP_UUID_STRING_LEN + 1], key_id[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(split);
        nkp_uuid_random(key_id);
        for (unsigned i = 0; i < n; i++) {
                info_init(&infos[i], "prod", 0);
                g_strlcpy(infos[i].key_id, key_id, sizeof infos[i].key_id);
                infos[i].share_index = i + 1;
                infos[i].share_count = n;
                infos[i].threshold = m;
                g_strlcpy(infos[i].split_id, split, sizeof infos[i].split_id);
                g_strlcpy(infos[i].fingerprint, fp, sizeof infos[i].fingerprint);
        }
}

static int combine_subset(const NkpBackupInfo *infos, nkp_secret **shares, const unsigned *pick, size_t k,
                          nkp_secret **kdk)
{
        NkpBackupInfo in[NKP_SHARES_MAX];
        nkp_secret *sh[NKP_SHARES_MAX];
        for (size_t i = 0; i < k; i++) {
                in[i] = infos[pick[i]];
                sh[i] = shares[pick[i]];
        }
        NkpBackupInfo out;
        return nkp_shares_combine(in, sh, k, &out, kdk);
}

/* Every 3-subset of a 3-of-5 split gives the KDK back; every 2-subset is
 * refused before anything is combined. */
static void test_shares_every_subset(void)
{
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        NkpBackupInfo infos[5];
        nkp_secret **shares = NULL;
        shares_make(kdk, 5, 3, infos, &shares);
        for (unsigned i = 0; i < 5; i++) {
                g_assert_cmpuint(nkp_secret_len(shares[i]), ==, NKP_KDK_SIZE);
                g_assert_false(nkp_secret_equal(shares[i], kdk));
        }
        unsigned subsets = 0;
        for (unsigned a = 0; a < 5; a++)
                for (unsigned b = a + 1; b < 5; b++) {
                        unsigned pair[2] = { b, a };
                        nkp_secret *none = NULL;
                        g_assert_cmpint(combine_subset(infos, shares, pair, 2, &none), ==, -ENODATA);
                        g_assert_null(none);
                        assert_error("needs 3 of its 5");
                        for (unsigned c = b + 1; c < 5; c++) {
                                unsigned pick[3] = { c, a, b };
                                g_autoptr(nkp_secret) got = NULL;
                                g_assert_cmpint(combine_subset(infos, shares, pick, 3, &got), ==, 0);
                                g_assert_true(nkp_secret_equal(got, kdk));
                                subsets++;
                        }
                }
        g_assert_cmpuint(subsets, ==, 10);
        nkp_shares_free(shares, 5);
}

static void test_shares_refused(void)
{
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        NkpBackupInfo a[3], b[3];
        nkp_secret **sa = NULL, **sb = NULL;
        shares_make(kdk, 3, 2, a, &sa);
        shares_make(kdk, 3, 2, b, &sb);
        g_autoptr(nkp_secret) got = NULL;

        /* two splits of the same key */
        NkpBackupInfo mixed[2] = { a[0], b[1] };
        nkp_secret *mixed_sh[2] = { sa[0], sb[1] };
        NkpBackupInfo out;
        g_assert_cmpint(nkp_shares_combine(mixed, mixed_sh, 2, &out, &got), ==, -EXDEV);
        assert_error("two different splits");
        /* the same share twice */
        unsigned twice[2] = { 1, 1 };
        g_assert_cmpint(combine_subset(a, sa, twice, 2, &got), ==, -ENOTUNIQ);
        /* one byte of a share changed: the fingerprint catches it */
        nkp_secret_data_mut(sa[1])[7] ^= 0x01;
        unsigned pick[2] = { 0, 1 };
        g_assert_cmpint(combine_subset(a, sa, pick, 2, &got), ==, -EBADMSG);
        assert_error("one of them is damaged");
        nkp_secret_data_mut(sa[1])[7] ^= 0x01;
        /* fields that disagree within one split */
        a[1].threshold = 3;
        g_assert_cmpint(combine_subset(a, sa, pick, 2, &got), ==, -EBADMSG);
        a[1].threshold = 2;
        g_assert_cmpint(combine_subset(a, sa, pick, 2, &got), ==, 0);
        g_assert_true(nkp_secret_equal(got, kdk));
        /* bad counts */
        nkp_secret **none = NULL;
        g_assert_cmpint(nkp_shares_split(kdk, 3, 1, &none), ==, -EINVAL);
        g_assert_cmpint(nkp_shares_split(kdk, 2, 3, &none), ==, -EINVAL);
        g_assert_cmpint(nkp_shares_split(kdk, NKP_SHARES_MAX + 1, 2, &none), ==, -EINVAL);
        g_assert_null(none);
        nkp_shares_free(sa, 3);
        nkp_shares_free(sb, 3);
}

/* A share survives export/import with every field, and an import of a
 * share never passes for a whole backup. */
static void test_share_p12_round_trip(void)
{
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        NkpBackupInfo infos[3];
        nkp_secret **shares = NULL;
        shares_make(kdk, 3, 2, infos, &shares);
        g_autoptr(GBytes) der = export_low(&infos[2], shares[2], PASSWORD);
        NkpBackupInfo out;
        g_autoptr(nkp_secret) got = NULL;
        g_assert_cmpint(import(der, PASSWORD, &out, &got), ==, 0);
        g_assert_true(nkp_secret_equal(got, shares[2]));
        g_assert_cmpuint(out.share_index, ==, 3);
        g_assert_cmpuint(out.share_count, ==, 3);
        g_assert_cmpuint(out.threshold, ==, 2);
        g_assert_cmpstr(out.split_id, ==, infos[2].split_id);
        g_assert_cmpstr(out.fingerprint, ==, infos[2].fingerprint);
        g_assert_cmpstr(out.key_id, ==, infos[2].key_id);
        /* a whole backup carries no share fields */
        NkpBackupInfo whole;
        info_init(&whole, "prod", 0);
        g_autoptr(GBytes) der2 = export_low(&whole, kdk, PASSWORD);
        g_autoptr(nkp_secret) got2 = NULL;
        g_assert_cmpint(import(der2, PASSWORD, &out, &got2), ==, 0);
        g_assert_cmpuint(out.share_count, ==, 0);
        /* export refuses nonsense share numbers */
        infos[0].share_index = 4;
        g_autoptr(nkp_secret) pw = pw_new(PASSWORD);
        GBytes *bad = NULL;
        g_assert_cmpint(nkp_p12_export(&infos[0], shares[0], pw, LOW_ITER, &bad), ==, -EINVAL);
        g_assert_null(bad);
        nkp_shares_free(shares, 3);
}

/* ---- provider backup / restore between two roots ---------------------------- */

typedef struct {
        char *dir;   /* holds the roots and the backup files */
        char *root1, *root2;
        nkp_context *ctx1, *ctx2;
        nkp_secret *pw;
} Hosts;

static char *make_root(const char *dir, const char *name)
{
        char *root = g_build_filename(dir, name, NULL);
        g_autofree char *etc = g_build_filename(root, "etc", "nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        g_autofree char *conf = g_build_filename(etc, "nkp.conf", NULL);
        g_assert_true(g_file_set_contents(conf, "[tpm]\ntcti=none\n", -1, NULL));
        return root;
}

static void hosts_init(Hosts *h)
{
        h->dir = testutil_mkdtemp();
        h->root1 = make_root(h->dir, "host1");
        h->root2 = make_root(h->dir, "host2");
        g_assert_cmpint(nkp_context_new(h->root1, &h->ctx1), ==, 0);
        g_assert_cmpint(nkp_context_new(h->root2, &h->ctx2), ==, 0);
        h->pw = pw_new(PASSWORD);
}

static void hosts_done(Hosts *h)
{
        /* forget what the tests put into the key caches */
        (void) nkp_cache_flush(h->ctx1);
        (void) nkp_cache_flush(h->ctx2);
        nkp_context_free(h->ctx1);
        nkp_context_free(h->ctx2);
        nkp_secret_free(h->pw);
        testutil_rmtree(h->dir);
        g_free(h->root1);
        g_free(h->root2);
        g_free(h->dir);
}

static char *host_file(const Hosts *h, const char *name)
{
        return g_build_filename(h->dir, name, NULL);
}

/* Restore must fail with `err` (and the message must contain `needle`),
 * leaving the root exactly as it was. */
static void restore_refused(nkp_context *ctx, const char *root, const char *path, const nkp_secret *pw,
                            int err, const char *needle)
{
        g_autoptr(GHashTable) before = testutil_snapshot_tree(root);
        nkp_provider *p = NULL;
        bool already = false;
        int r = nkp_provider_restore(ctx, path, pw, &p, &already);
        if (r != err)
                g_error("restore of '%s': expected %d, got %d (%s)", path, err, r, nkp_error_message());
        g_assert_null(p);
        if (needle)
                assert_error(needle);
        testutil_assert_same_tree(before, root);
}

static void test_provider_round_trip(void)
{
        Hosts h;
        hosts_init(&h);
        g_autoptr(nkp_provider) p1 = NULL;
        g_assert_cmpint(nkp_provider_create(h.ctx1, "prod", 0, &p1), ==, 0);
        g_assert_false(nkp_provider_is_active(p1));

        /* a VM's DEK wrapped on the first host */
        char vm[NKP_UUID_STRING_LEN + 1], secret_uuid[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(vm);
        nkp_uuid_random(secret_uuid);
        g_autoptr(nkp_keysafe) ks = NULL;
        g_autoptr(nkp_secret) kdk1 = NULL, kek1 = NULL, dek = NULL;
        g_autofree char *xml = NULL;
        g_assert_cmpint(nkp_keysafe_new_for(vm, nkp_provider_name(p1), nkp_provider_key_id(p1),
                                            nkp_provider_fingerprint(p1), &ks),
                        ==, 0);
        g_assert_cmpint(nkp_provider_get_kdk(h.ctx1, nkp_provider_key_id(p1), &kdk1), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk1, nkp_keysafe_kek_salt(ks), nkp_provider_key_id(p1), vm, &kek1), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &dek), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek1, NKP_OBJECT_VTPM, "tpm0", secret_uuid, dek), ==, 0);
        g_assert_cmpint(nkp_keysafe_format(ks, &xml), ==, 0);

        /* backup: a 0600 file, the provider becomes active */
        g_autofree char *file = host_file(&h, "prod.p12");
        gint64 t0 = g_get_monotonic_time();
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", file, h.pw), ==, 0);
        gint64 t1 = g_get_monotonic_time();
        struct stat st;
        g_assert_cmpint(stat(file, &st), ==, 0);
        g_assert_cmpuint(st.st_mode & 07777, ==, 0600);
        g_autoptr(nkp_provider) p1b = NULL;
        g_assert_cmpint(nkp_provider_get(h.ctx1, "prod", &p1b), ==, 0);
        g_assert_true(nkp_provider_flags(p1b) & NKP_PROVIDER_BACKED_UP);
        g_assert_true(nkp_provider_is_active(p1b));

        /* restore on the second host: same name, key id, fingerprint */
        g_autoptr(nkp_provider) p2 = NULL;
        bool already = true;
        gint64 t2 = g_get_monotonic_time();
        g_assert_cmpint(nkp_provider_restore(h.ctx2, file, h.pw, &p2, &already), ==, 0);
        gint64 t3 = g_get_monotonic_time();
        g_test_message("backup %.3f s, restore %.3f s (%d iterations)", (t1 - t0) / 1e6, (t3 - t2) / 1e6,
                       NKP_P12_ITERATIONS);
        g_assert_false(already);
        g_assert_cmpstr(nkp_provider_name(p2), ==, "prod");
        g_assert_cmpstr(nkp_provider_key_id(p2), ==, nkp_provider_key_id(p1));
        g_assert_cmpstr(nkp_provider_fingerprint(p2), ==, nkp_provider_fingerprint(p1));
        g_assert_true(nkp_provider_is_active(p2));
        g_autoptr(nkp_provider) p2b = NULL;
        g_assert_cmpint(nkp_provider_get(h.ctx2, "prod", &p2b), ==, 0);
        g_assert_cmpstr(nkp_provider_fingerprint(p2b), ==, nkp_provider_fingerprint(p1));
        g_assert_true(nkp_provider_flags(p2b) & NKP_PROVIDER_BACKED_UP);
        g_assert_false(nkp_provider_flags(p2b) & NKP_PROVIDER_DEFAULT);

        /* the second host unwraps the DEK wrapped on the first (from the
         * store: the cache is flushed first) */
        g_assert_cmpint(nkp_cache_flush(h.ctx2), ==, 0);
        g_autoptr(nkp_keysafe) ks2 = NULL;
        g_autoptr(nkp_secret) kdk2 = NULL, kek2 = NULL, dek2 = NULL;
        g_assert_cmpint(nkp_keysafe_parse(xml, strlen(xml), &ks2), ==, 0);
        g_assert_cmpstr(nkp_keysafe_provider_key_id(ks2), ==, nkp_provider_key_id(p1));
        g_assert_cmpstr(nkp_keysafe_provider_fingerprint(ks2), ==, nkp_provider_fingerprint(p2));
        g_assert_cmpint(nkp_provider_get_kdk(h.ctx2, nkp_keysafe_provider_key_id(ks2), &kdk2), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk2, nkp_keysafe_kek_salt(ks2), nkp_keysafe_provider_key_id(ks2),
                                       nkp_keysafe_vm_uuid(ks2), &kek2),
                        ==, 0);
        g_assert_cmpint(nkp_keysafe_get_dek(ks2, kek2, NKP_OBJECT_VTPM, "tpm0", &dek2), ==, 0);
        g_assert_true(nkp_secret_equal(dek, dek2));
        /* and a provider that only shares the name cannot */
        g_autoptr(nkp_secret) kek_other = NULL, none = NULL;
        g_autoptr(nkp_secret) kdk_other = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk_other), ==, 0);
        g_assert_cmpint(nkp_kek_derive(kdk_other, nkp_keysafe_kek_salt(ks2), nkp_keysafe_provider_key_id(ks2),
                                       nkp_keysafe_vm_uuid(ks2), &kek_other),
                        ==, 0);
        g_assert_cmpint(nkp_keysafe_get_dek(ks2, kek_other, NKP_OBJECT_VTPM, "tpm0", &none), ==, -EBADMSG);

        /* restoring again is a no-op that says so */
        g_autoptr(GHashTable) before = testutil_snapshot_tree(h.root2);
        g_autoptr(nkp_provider) p3 = NULL;
        g_assert_cmpint(nkp_provider_restore(h.ctx2, file, h.pw, &p3, &already), ==, 0);
        g_assert_true(already);
        g_assert_cmpstr(nkp_provider_key_id(p3), ==, nkp_provider_key_id(p1));
        testutil_assert_same_tree(before, h.root2);
        /* and on the host that made it too */
        g_autoptr(nkp_provider) p4 = NULL;
        g_assert_cmpint(nkp_provider_restore(h.ctx1, file, h.pw, &p4, &already), ==, 0);
        g_assert_true(already);

        /* a backup of the restored provider restores on the first host as
         * "already": it is the same provider */
        g_autofree char *file2 = host_file(&h, "prod-again.p12");
        g_assert_cmpint(nkp_provider_backup(h.ctx2, "prod", file2, h.pw), ==, 0);
        g_assert_cmpint(nkp_provider_restore(h.ctx1, file2, h.pw, NULL, &already), ==, 0);
        g_assert_true(already);
        hosts_done(&h);
}

static void test_provider_restore_refused(void)
{
        Hosts h;
        hosts_init(&h);
        g_autoptr(nkp_provider) p1 = NULL, other = NULL;
        g_assert_cmpint(nkp_provider_create(h.ctx1, "prod", 0, &p1), ==, 0);
        g_autofree char *file = host_file(&h, "prod.p12");
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", file, h.pw), ==, 0);
        g_autofree char *der = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(file, &der, &len, NULL));

        /* host2 holds another provider called "prod" (and one more) */
        g_assert_cmpint(nkp_provider_create(h.ctx2, "prod", 0, &other), ==, 0);
        g_assert_cmpint(nkp_provider_create(h.ctx2, "test", 0, NULL), ==, 0);
        restore_refused(h.ctx2, h.root2, file, h.pw, -EEXIST, "A different provider named 'prod'");
        assert_error(nkp_provider_key_id(other));

        /* bad files, each refused with nothing changed */
        g_autoptr(nkp_secret) wrong = pw_new("wrong password");
        restore_refused(h.ctx2, h.root2, file, wrong, -EACCES, "The password is wrong or the file was altered.");
        restore_refused(h.ctx2, h.root2, file, NULL, -EINVAL, "password is empty");

        g_autofree char *trunc = host_file(&h, "truncated.p12");
        for (gsize n = 0; n < len; n += len / 7 + 1) {
                g_assert_true(g_file_set_contents(trunc, der, (gssize) n, NULL));
                restore_refused(h.ctx2, h.root2, trunc, h.pw, -EBADMSG, trunc);
        }
        g_autofree char *flipped = host_file(&h, "flipped.p12");
        for (gsize i = 16; i < len; i += len / 5) {
                g_autofree char *copy = g_memdup2(der, len);
                copy[i] ^= 0x10;
                g_assert_true(g_file_set_contents(flipped, copy, (gssize) len, NULL));
                nkp_provider *p = NULL;
                g_autoptr(GHashTable) before = testutil_snapshot_tree(h.root2);
                int r = nkp_provider_restore(h.ctx2, flipped, h.pw, &p, NULL);
                g_assert_true(r == -EBADMSG || r == -EACCES);
                g_assert_null(p);
                testutil_assert_same_tree(before, h.root2);
        }
        g_autofree char *certs = host_file(&h, "certs.p12");
        g_autoptr(GBytes) bundle = make_cert_bundle();
        g_assert_true(g_file_set_contents(certs, g_bytes_get_data(bundle, NULL), (gssize) g_bytes_get_size(bundle),
                                          NULL));
        restore_refused(h.ctx2, h.root2, certs, h.pw, -EBADMSG, "not an nkp provider backup");
        g_autofree char *missing = host_file(&h, "missing.p12");
        restore_refused(h.ctx2, h.root2, missing, h.pw, -ENOENT, "does not exist");
        g_autofree char *big = host_file(&h, "big.p12");
        g_autofree char *zeros = g_malloc0(NKP_P12_MAX_SIZE + 1);
        g_assert_true(g_file_set_contents(big, zeros, NKP_P12_MAX_SIZE + 1, NULL));
        restore_refused(h.ctx2, h.root2, big, h.pw, -EFBIG, "larger than");
        g_autofree char *empty = host_file(&h, "empty.p12");
        g_assert_true(g_file_set_contents(empty, "", 0, NULL));
        restore_refused(h.ctx2, h.root2, empty, h.pw, -EBADMSG, "empty");

        /* hand-made backups of host1's provider: its key id under another
         * name, and its name and key id with another key */
        g_autoptr(nkp_secret) kdk = NULL, other_kdk = NULL;
        g_assert_cmpint(nkp_provider_get_kdk(h.ctx1, nkp_provider_key_id(p1), &kdk), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &other_kdk), ==, 0);
        NkpBackupInfo info = { 0 };
        g_strlcpy(info.name, "renamed", sizeof info.name);
        g_strlcpy(info.key_id, nkp_provider_key_id(p1), sizeof info.key_id);
        g_autoptr(GBytes) renamed = export_low(&info, kdk, PASSWORD);
        g_autofree char *renamed_file = host_file(&h, "renamed.p12");
        g_assert_true(g_file_set_contents(renamed_file, g_bytes_get_data(renamed, NULL),
                                          (gssize) g_bytes_get_size(renamed), NULL));
        restore_refused(h.ctx1, h.root1, renamed_file, h.pw, -EEXIST, "already here under the name 'prod'");

        g_strlcpy(info.name, "prod", sizeof info.name);
        g_autoptr(GBytes) drift = export_low(&info, other_kdk, PASSWORD);
        g_autofree char *drift_file = host_file(&h, "drift.p12");
        g_assert_true(g_file_set_contents(drift_file, g_bytes_get_data(drift, NULL),
                                          (gssize) g_bytes_get_size(drift), NULL));
        restore_refused(h.ctx1, h.root1, drift_file, h.pw, -EEXIST, "different key");

        /* require-tpm on a host without a TPM */
        g_strlcpy(info.name, "tpm-only", sizeof info.name);
        nkp_uuid_random(info.key_id);
        info.flags = NKP_PROVIDER_REQUIRE_TPM;
        g_autoptr(GBytes) tpm_only = export_low(&info, other_kdk, PASSWORD);
        g_autofree char *tpm_file = host_file(&h, "tpm-only.p12");
        g_assert_true(g_file_set_contents(tpm_file, g_bytes_get_data(tpm_only, NULL),
                                          (gssize) g_bytes_get_size(tpm_only), NULL));
        restore_refused(h.ctx2, h.root2, tpm_file, h.pw, -ENODEV, "requires a TPM");
        hosts_done(&h);
}

static void test_provider_backup_refused(void)
{
        Hosts h;
        hosts_init(&h);
        g_assert_cmpint(nkp_provider_create(h.ctx1, "prod", 0, NULL), ==, 0);
        g_autofree char *file = host_file(&h, "prod.p12");
        g_autoptr(GHashTable) before = testutil_snapshot_tree(h.dir);

        g_assert_cmpint(nkp_provider_backup(h.ctx1, "nope", file, h.pw), ==, -ENOENT);
        assert_error("no provider named 'nope'");
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "bad name", file, h.pw), ==, -EINVAL);
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", file, NULL), ==, -EINVAL);
        g_autofree char *nodir = g_build_filename(h.dir, "no", "such", "dir.p12", NULL);
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", nodir, h.pw), ==, -ENOENT);
        testutil_assert_same_tree(before, h.dir);
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_get(h.ctx1, "prod", &p), ==, 0);
        g_assert_false(nkp_provider_is_active(p));

        /* an existing file is never overwritten */
        g_assert_true(g_file_set_contents(file, "precious", -1, NULL));
        g_autoptr(GHashTable) before2 = testutil_snapshot_tree(h.dir);
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", file, h.pw), ==, -EEXIST);
        assert_error("already exists");
        testutil_assert_same_tree(before2, h.dir);
        hosts_done(&h);
}

/* A provider created on a host with a TPM (sealed there) restores on a
 * host without one and the other way round; a require-tpm provider restores
 * only where there is a TPM; the restored copy unseals to the same key. */
static void tpm_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "swtpm-state", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *tpm_root = testutil_make_root(tmp, "tpm-host", testutil_swtpm_tcti(sw));
        g_autofree char *bare_root = testutil_make_root(tmp, "bare-host", "none");
        g_autoptr(nkp_context) tpm_ctx = NULL, bare_ctx = NULL;
        g_assert_cmpint(nkp_context_new(tpm_root, &tpm_ctx), ==, 0);
        g_assert_cmpint(nkp_context_new(bare_root, &bare_ctx), ==, 0);
        g_autoptr(nkp_secret) pw = pw_new(PASSWORD);

        /* sealed on the TPM host → backup → restore on the bare host */
        g_autoptr(nkp_provider) sealed = NULL;
        g_assert_cmpint(nkp_provider_create(tpm_ctx, "sealed", 0, &sealed), ==, 0);
        g_assert_cmpint(nkp_provider_seal(sealed), ==, NKP_SEAL_TPM);
        g_assert_cmpint(nkp_cache_flush(tpm_ctx), ==, 0); /* backup must unseal */
        g_autofree char *f1 = g_build_filename(tmp, "sealed.p12", NULL);
        g_assert_cmpint(nkp_provider_backup(tpm_ctx, "sealed", f1, pw), ==, 0);
        g_autoptr(nkp_provider) plain = NULL;
        g_assert_cmpint(nkp_provider_restore(bare_ctx, f1, pw, &plain, NULL), ==, 0);
        g_assert_cmpint(nkp_provider_seal(plain), ==, NKP_SEAL_NONE);
        g_assert_cmpstr(nkp_provider_fingerprint(plain), ==, nkp_provider_fingerprint(sealed));

        /* require-tpm, made by hand: refused on the bare host, sealed on
         * the TPM host, and unsealed from the store to the same key */
        NkpBackupInfo info;
        info_init(&info, "tpm-only", NKP_PROVIDER_REQUIRE_TPM);
        g_autoptr(nkp_secret) kdk = NULL, back = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(GBytes) der = export_low(&info, kdk, PASSWORD);
        g_autofree char *f2 = g_build_filename(tmp, "tpm-only.p12", NULL);
        g_assert_true(g_file_set_contents(f2, g_bytes_get_data(der, NULL), (gssize) g_bytes_get_size(der), NULL));
        restore_refused(bare_ctx, bare_root, f2, pw, -ENODEV, "requires a TPM");
        g_autoptr(nkp_provider) tp = NULL;
        bool already = true;
        g_assert_cmpint(nkp_provider_restore(tpm_ctx, f2, pw, &tp, &already), ==, 0);
        g_assert_false(already);
        g_assert_cmpint(nkp_provider_seal(tp), ==, NKP_SEAL_TPM);
        g_assert_true(nkp_provider_flags(tp) & NKP_PROVIDER_REQUIRE_TPM);
        g_assert_cmpint(nkp_cache_flush(tpm_ctx), ==, 0);
        g_assert_cmpint(nkp_provider_get_kdk(tpm_ctx, info.key_id, &back), ==, 0);
        g_assert_true(nkp_secret_equal(kdk, back));
        /* the flag travels on: a backup of it still says require-tpm */
        g_autofree char *f3 = g_build_filename(tmp, "tpm-only-again.p12", NULL);
        g_assert_cmpint(nkp_provider_backup(tpm_ctx, "tpm-only", f3, pw), ==, 0);
        restore_refused(bare_ctx, bare_root, f3, pw, -ENODEV, "requires a TPM");
        testutil_swtpm_stop(sw);
}

static void test_provider_tpm(void)
{
        if (!testutil_swtpm_available()) {
                g_test_skip("swtpm is not installed");
                return;
        }
        testutil_isolated(tpm_body);
}

/* ---- files nkp must not accept: weak or unverifiable protection ------------- */

/* A DER header (tag, definite length) and `body`, appended to `out`. */
static void der_put(GByteArray *out, uint8_t tag, const GByteArray *body)
{
        uint8_t h[6] = { tag };
        size_t n = 1;
        guint len = body->len;
        if (len < 0x80) {
                h[n++] = (uint8_t) len;
        } else if (len < 0x100) {
                h[n++] = 0x81;
                h[n++] = (uint8_t) len;
        } else {
                g_assert_cmpuint(len, <, 0x10000);
                h[n++] = 0x82;
                h[n++] = (uint8_t) (len >> 8);
                h[n++] = (uint8_t) len;
        }
        g_byte_array_append(out, h, (guint) n);
        g_byte_array_append(out, body->data, body->len);
}

/* `der` and `n`: what an i2d_*() call with a NULL buffer returned. */
static void i2d_put(GByteArray *out, int n, unsigned char **der)
{
        g_assert_cmpint(n, >, 0);
        g_byte_array_append(out, *der, (guint) n);
        OPENSSL_free(*der);
        *der = NULL;
}

/* An nkp backup whose MacData is replaced by a PBMAC1 one (RFC 9579:
 * PBKDF2 with `iter`, HMAC-SHA256), as OpenSSL 3.4 writes it; the MAC value
 * is zeros (checked, if ever, after the count). */
static GBytes *make_pbmac1(int iter)
{
        P12Spec spec = { "p", GOOD_UUID, "", NKP_KDK_SIZE, 1, LOW_ITER, LOW_ITER, false, 0 };
        g_autoptr(GBytes) good = make_p12(&spec);
        gsize len;
        const unsigned char *der = g_bytes_get_data(good, &len), *p = der;
        long inner;
        int tag, cls;
        g_assert_cmpint(ASN1_get_object(&p, &inner, &tag, &cls, (long) len) & 0x80, ==, 0);
        const unsigned char *first = p; /* version INTEGER, authSafe ContentInfo */
        for (int i = 0; i < 2; i++) {
                const unsigned char *q = p;
                long l;
                g_assert_cmpint(ASN1_get_object(&q, &l, &tag, &cls, (long) (der + len - p)) & 0x80, ==, 0);
                p = q + l;
        }
        g_autoptr(GByteArray) kdf = g_byte_array_new(), params = g_byte_array_new();
        unsigned char salt[16] = { 1 }, *out = NULL;
        int n;
        X509_ALGOR *pbkdf2 = PKCS5_pbkdf2_set(iter, salt, sizeof salt, NID_hmacWithSHA256, 32);
        g_assert_nonnull(pbkdf2);
        n = i2d_X509_ALGOR(pbkdf2, &out);
        i2d_put(kdf, n, &out);
        X509_ALGOR_free(pbkdf2);
        X509_ALGOR *hmac = X509_ALGOR_new();
        X509_ALGOR_set0(hmac, OBJ_nid2obj(NID_hmacWithSHA256), V_ASN1_NULL, NULL);
        n = i2d_X509_ALGOR(hmac, &out);
        i2d_put(kdf, n, &out);
        X509_ALGOR_free(hmac);
        der_put(params, 0x30, kdf); /* PBMAC1-params */
        g_autoptr(GByteArray) alg_body = g_byte_array_new(), alg = g_byte_array_new();
        n = i2d_ASN1_OBJECT(OBJ_nid2obj(NID_pbmac1), &out);
        i2d_put(alg_body, n, &out);
        g_byte_array_append(alg_body, params->data, params->len);
        der_put(alg, 0x30, alg_body);
        g_autoptr(GByteArray) zeros = g_byte_array_new(), digest_info = g_byte_array_new();
        g_autoptr(GByteArray) di_body = g_byte_array_new(), mac_body = g_byte_array_new();
        g_byte_array_set_size(zeros, 32);
        memset(zeros->data, 0, 32);
        g_byte_array_append(di_body, alg->data, alg->len);
        der_put(di_body, 0x04, zeros);
        der_put(digest_info, 0x30, di_body);
        g_byte_array_append(mac_body, digest_info->data, digest_info->len);
        g_byte_array_set_size(zeros, 8);
        der_put(mac_body, 0x04, zeros);                        /* macSalt */
        g_byte_array_append(mac_body, (const guint8 *) "\x02\x01\x01", 3); /* iterations 1 */
        g_autoptr(GByteArray) pfx_body = g_byte_array_new(), pfx = g_byte_array_new();
        g_byte_array_append(pfx_body, first, (guint) (p - first));
        der_put(pfx_body, 0x30, mac_body);
        der_put(pfx, 0x30, pfx_body);
        return g_bytes_new(pfx->data, pfx->len);
}

/* `openssl pkcs12 -export` of a throwaway key and certificate, with `opts`. */
static GBytes *openssl_export(const char *dir, const char *opts)
{
        g_autofree char *cmd = g_strdup_printf(
                "cd '%s' && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                "-keyout k.pem -out c.pem -subj /CN=nkp-test -days 1 2>/dev/null && "
                "openssl pkcs12 -export -inkey k.pem -in c.pem -passout 'pass:" PASSWORD "' "
                "-out f.p12 %s",
                dir, opts);
        int status = 0;
        g_autofree char *err = NULL;
        const char *argv[] = { "/bin/sh", "-c", cmd, NULL };
        g_assert_true(g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL,
                                   NULL, &err, &status, NULL));
        if (!g_spawn_check_wait_status(status, NULL))
                g_error("openssl pkcs12 %s failed: %s", opts, err);
        g_autofree char *f = g_build_filename(dir, "f.p12", NULL);
        g_autofree char *data = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(f, &data, &len, NULL));
        return g_bytes_new(data, len);
}

/* Each file is refused with one line that says what it is and how to
 * re-export it (never "damaged"), by the import and by a restore, which
 * leaves the root as it was. */
static void test_weak_files(void)
{
        Hosts h;
        hosts_init(&h);
        g_assert_cmpint(nkp_provider_create(h.ctx2, "other", 0, NULL), ==, 0);
        P12Spec clear = { "p", GOOD_UUID, "", NKP_KDK_SIZE, 1, LOW_ITER, LOW_ITER, false, -1 };
        P12Spec des3 = clear;
        des3.safe_nid = NID_pbe_WithSHA1And3_Key_TripleDES_CBC;
        struct {
                const char *what;
                GBytes *der;
                const char *needle;
        } rows[] = {
                { "nkp bag in a clear safe", make_p12(&clear), "keys are not encrypted" },
                { "nkp bag under PBE-SHA1-3DES", make_p12(&des3), "legacy pbeWithSHA1And3-KeyTripleDES-CBC" },
                { "openssl -keypbe NONE -certpbe NONE", openssl_export(h.dir, "-keypbe NONE -certpbe NONE"),
                  "keys are not encrypted" },
                { "openssl -keypbe PBE-SHA1-3DES -certpbe PBE-SHA1-3DES",
                  openssl_export(h.dir, "-keypbe PBE-SHA1-3DES -certpbe PBE-SHA1-3DES"), "legacy pbeWithSHA1And3" },
                { "openssl -certpbe PBE-SHA1-3DES only",
                  openssl_export(h.dir, "-certpbe PBE-SHA1-3DES"), "legacy pbeWithSHA1And3" },
                { "openssl -keypbe PBE-SHA1-3DES only (shrouded key in a clear safe)",
                  openssl_export(h.dir, "-keypbe PBE-SHA1-3DES"), "legacy pbeWithSHA1And3" },
                { "openssl -legacy (RC2-40 certificates)", openssl_export(h.dir, "-legacy"), "legacy pbeWithSHA1And40BitRC2-CBC" },
                { "openssl PBES2 with DES-EDE3-CBC", openssl_export(h.dir, "-keypbe DES-EDE3-CBC -certpbe DES-EDE3-CBC"),
                  "PBES2 and des-ede3-cbc instead of AES" },
                { "PBMAC1 asking for too many iterations", make_pbmac1(NKP_P12_MAX_ITERATIONS + 1), "password iterations" },
                { "PBMAC1 (unverifiable before OpenSSL 3.4)", make_pbmac1(LOW_ITER),
                  OpenSSL_version_num() < 0x30400000L ? "PBMAC1 MAC (RFC 9579)" : "password is wrong" },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(rows); i++) {
                g_test_message("row: %s", rows[i].what);
                NkpBackupInfo out;
                nkp_secret *got = NULL;
                int err = strstr(rows[i].needle, "wrong") ? -EACCES : -EBADMSG;
                g_assert_cmpint(import(rows[i].der, PASSWORD, &out, &got), ==, err);
                g_assert_null(got);
                const char *msg = nkp_error_message();
                g_test_message("refused: %s", msg);
                assert_error(rows[i].needle);
                g_assert_null(strchr(msg, '\n'));
                g_assert_null(strstr(msg, "damaged"));
                if (strstr(rows[i].needle, "legacy") || strstr(rows[i].needle, "not encrypted") ||
                    strstr(rows[i].needle, "instead of AES"))
                        assert_error("-keypbe AES-256-CBC -certpbe AES-256-CBC");
                g_autofree char *file = host_file(&h, "weak.p12");
                gsize len;
                const void *data = g_bytes_get_data(rows[i].der, &len);
                g_assert_true(g_file_set_contents(file, data, (gssize) len, NULL));
                restore_refused(h.ctx2, h.root2, file, h.pw, err, rows[i].needle);
                g_bytes_unref(rows[i].der);
        }
        hosts_done(&h);
}

/* nkp_provider_backup_shares + nkp_provider_restore_files + nkp_backup_verify
 * between two roots; verify changes nothing in either root. */
static void test_provider_shares_verify(void)
{
        Hosts h;
        hosts_init(&h);
        g_autoptr(nkp_provider) p1 = NULL;
        g_assert_cmpint(nkp_provider_create(h.ctx1, "prod", 0, &p1), ==, 0);
        g_autoptr(nkp_secret) pw1 = pw_new("share one"), pw2 = pw_new("share two"), pw3 = pw_new("share 3");
        const nkp_secret *pws[3] = { pw1, pw2, pw3 };
        g_auto(GStrv) paths = NULL;
        g_assert_cmpint(nkp_provider_backup_shares(h.ctx1, "prod", h.dir, 3, 2, pws, &paths), ==, 0);
        g_assert_cmpuint(g_strv_length(paths), ==, 3);
        g_assert_true(g_str_has_suffix(paths[1], "/prod-share-2-of-3.p12"));
        g_autoptr(nkp_provider) p1b = NULL;
        g_assert_cmpint(nkp_provider_get(h.ctx1, "prod", &p1b), ==, 0);
        g_assert_true(nkp_provider_is_active(p1b));
        /* a second run refuses before writing anything */
        g_assert_cmpint(nkp_provider_backup_shares(h.ctx1, "prod", h.dir, 3, 2, pws, NULL), ==, -EEXIST);

        /* verify: on the first host the same provider, on the second none */
        const char *two[2] = { paths[2], paths[0] };
        const nkp_secret *two_pw[2] = { pw3, pw1 };
        g_autoptr(GHashTable) before1 = testutil_snapshot_tree(h.root1);
        g_autoptr(GHashTable) before2 = testutil_snapshot_tree(h.root2);
        g_autoptr(nkp_backup_report) rep1 = NULL, rep2 = NULL;
        g_assert_cmpint(nkp_backup_verify(h.ctx1, two, two_pw, 2, &rep1), ==, 0);
        g_assert_cmpint(nkp_backup_verify(h.ctx2, two, two_pw, 2, &rep2), ==, 0);
        testutil_assert_same_tree(before1, h.root1);
        testutil_assert_same_tree(before2, h.root2);
        const char *here = NULL, *split = NULL;
        g_assert_cmpint(nkp_backup_report_here(rep1, &here), ==, NKP_BACKUP_HERE_SAME);
        g_assert_cmpstr(here, ==, "prod");
        g_assert_cmpint(nkp_backup_report_here(rep2, &here), ==, NKP_BACKUP_HERE_NONE);
        g_assert_null(here);
        g_assert_cmpstr(nkp_backup_report_fingerprint(rep2), ==, nkp_provider_fingerprint(p1));
        g_assert_cmpstr(nkp_backup_report_key_id(rep2), ==, nkp_provider_key_id(p1));
        unsigned threshold = 0, given = 0;
        g_assert_cmpuint(nkp_backup_report_shares(rep2, &threshold, &given, &split), ==, 3);
        g_assert_cmpuint(threshold, ==, 2);
        g_assert_cmpuint(given, ==, 2);
        g_assert_nonnull(split);

        /* one share: refused, nothing written */
        g_autoptr(GHashTable) snap = testutil_snapshot_tree(h.root2);
        nkp_provider *none = NULL;
        g_assert_cmpint(nkp_provider_restore_files(h.ctx2, two, two_pw, 1, &none, NULL), ==, -ENODATA);
        g_assert_null(none);
        testutil_assert_same_tree(snap, h.root2);
        /* a wrong password on one share: refused */
        const nkp_secret *wrong_pw[2] = { pw3, pw2 };
        g_assert_cmpint(nkp_provider_restore_files(h.ctx2, two, wrong_pw, 2, &none, NULL), ==, -EACCES);
        testutil_assert_same_tree(snap, h.root2);

        /* two shares restore the provider on the second host */
        g_autoptr(nkp_provider) p2 = NULL;
        bool already = true;
        g_assert_cmpint(nkp_provider_restore_files(h.ctx2, two, two_pw, 2, &p2, &already), ==, 0);
        g_assert_false(already);
        g_assert_cmpstr(nkp_provider_key_id(p2), ==, nkp_provider_key_id(p1));
        g_assert_cmpstr(nkp_provider_fingerprint(p2), ==, nkp_provider_fingerprint(p1));

        /* another prod on a third host: verify says different */
        g_autofree char *root3 = make_root(h.dir, "host3");
        g_autoptr(nkp_context) ctx3 = NULL;
        g_assert_cmpint(nkp_context_new(root3, &ctx3), ==, 0);
        g_autoptr(nkp_provider) p3 = NULL;
        g_assert_cmpint(nkp_provider_create(ctx3, "prod", 0, &p3), ==, 0);
        g_autoptr(nkp_backup_report) rep3 = NULL;
        g_assert_cmpint(nkp_backup_verify(ctx3, two, two_pw, 2, &rep3), ==, 0);
        g_assert_cmpint(nkp_backup_report_here(rep3, NULL), ==, NKP_BACKUP_HERE_DIFFERENT);
        (void) nkp_cache_flush(ctx3);
        hosts_done(&h);
}

/* nkp_backup_verify on a whole backup: good (same here, none there), wrong
 * password, truncated, a foreign PKCS#12 (certificate bundle); the roots
 * unchanged every time. */
static void verify_refused(nkp_context *ctx, const char *root, const char *path, const nkp_secret *pw, int err,
                           const char *needle)
{
        g_autoptr(GHashTable) before = testutil_snapshot_tree(root);
        nkp_backup_report *rep = NULL;
        int r = nkp_backup_verify(ctx, &path, &pw, 1, &rep);
        if (r != err)
                g_error("verify of '%s': expected %d, got %d (%s)", path, err, r, nkp_error_message());
        g_assert_null(rep);
        assert_error(needle);
        testutil_assert_same_tree(before, root);
}

static void test_provider_verify_whole(void)
{
        Hosts h;
        hosts_init(&h);
        g_autoptr(nkp_provider) p1 = NULL;
        g_assert_cmpint(nkp_provider_create(h.ctx1, "prod", 0, &p1), ==, 0);
        g_autofree char *file = host_file(&h, "prod.p12");
        g_assert_cmpint(nkp_provider_backup(h.ctx1, "prod", file, h.pw), ==, 0);
        const char *path = file;
        const nkp_secret *pw = h.pw;

        g_autoptr(GHashTable) before = testutil_snapshot_tree(h.root1);
        g_autoptr(nkp_backup_report) rep = NULL;
        g_assert_cmpint(nkp_backup_verify(h.ctx1, &path, &pw, 1, &rep), ==, 0);
        testutil_assert_same_tree(before, h.root1);
        g_assert_cmpint(nkp_backup_report_here(rep, NULL), ==, NKP_BACKUP_HERE_SAME);
        g_assert_cmpstr(nkp_backup_report_name(rep), ==, "prod");
        g_assert_cmpstr(nkp_backup_report_fingerprint(rep), ==, nkp_provider_fingerprint(p1));
        g_assert_cmpuint(nkp_backup_report_shares(rep, NULL, NULL, NULL), ==, 0);
        g_autoptr(nkp_backup_report) rep2 = NULL;
        g_assert_cmpint(nkp_backup_verify(h.ctx2, &path, &pw, 1, &rep2), ==, 0);
        g_assert_cmpint(nkp_backup_report_here(rep2, NULL), ==, NKP_BACKUP_HERE_NONE);

        g_autoptr(nkp_secret) wrong = pw_new("not the password");
        verify_refused(h.ctx2, h.root2, file, wrong, -EACCES, "password is wrong");
        g_autofree char *der = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(file, &der, &len, NULL));
        g_autofree char *cut = host_file(&h, "cut.p12");
        g_assert_true(g_file_set_contents(cut, der, (gssize) (len / 2), NULL));
        verify_refused(h.ctx2, h.root2, cut, h.pw, -EBADMSG, "truncated");
        g_autoptr(GBytes) bundle = make_cert_bundle();
        g_autofree char *foreign = host_file(&h, "certs.p12");
        g_assert_true(g_file_set_contents(foreign, g_bytes_get_data(bundle, NULL),
                                          (gssize) g_bytes_get_size(bundle), NULL));
        verify_refused(h.ctx2, h.root2, foreign, h.pw, -EBADMSG, "not an nkp provider backup");
        hosts_done(&h);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/p12/round-trip", test_round_trip);
        g_test_add_func("/p12/host-flags-dropped", test_round_trip_host_flags_dropped);
        g_test_add_func("/p12/export-bad-input", test_export_bad_input);
        g_test_add_func("/p12/wrong-password", test_wrong_password);
        g_test_add_func("/p12/empty-password", test_empty_password);
        g_test_add_func("/p12/password-bytes", test_password_bytes);
        g_test_add_func("/p12/truncated", test_truncated);
        g_test_add_func("/p12/bit-flips", test_bit_flips);
        g_test_add_func("/p12/hand-made", test_hand_made);
        g_test_add_func("/p12/iterations-capped", test_iterations_capped);
        g_test_add_func("/p12/cert-bundle", test_cert_bundle);
        g_test_add_func("/p12/openssl-reads-it", test_openssl_reads_it);
        g_test_add_func("/p12/weak-files", test_weak_files);
        g_test_add_func("/shares/every-subset", test_shares_every_subset);
        g_test_add_func("/shares/refused", test_shares_refused);
        g_test_add_func("/shares/p12-round-trip", test_share_p12_round_trip);
        g_test_add_func("/provider/round-trip", test_provider_round_trip);
        g_test_add_func("/provider/restore-refused", test_provider_restore_refused);
        g_test_add_func("/provider/backup-refused", test_provider_backup_refused);
        g_test_add_func("/provider/tpm", test_provider_tpm);
        g_test_add_func("/provider/shares-verify", test_provider_shares_verify);
        g_test_add_func("/provider/verify-whole", test_provider_verify_whole);
        return g_test_run();
}
