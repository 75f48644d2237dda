/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* PKCS#12 provider backups: export/import (pure), bad files, and the
 * provider-level backup/restore round trip between two roots. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>
#include <openssl/evp.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>

#include "p12-internal.h"
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
        g_assert_true(PKCS12_add_safe(&safes, bags, NID_aes_256_cbc, spec->safe_iter, PASSWORD));
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

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/p12/round-trip", test_round_trip);
        g_test_add_func("/p12/host-flags-dropped", test_round_trip_host_flags_dropped);
        g_test_add_func("/p12/export-bad-input", test_export_bad_input);
        g_test_add_func("/p12/wrong-password", test_wrong_password);
        g_test_add_func("/p12/empty-password", test_empty_password);
        g_test_add_func("/p12/truncated", test_truncated);
        g_test_add_func("/p12/bit-flips", test_bit_flips);
        g_test_add_func("/p12/hand-made", test_hand_made);
        g_test_add_func("/p12/iterations-capped", test_iterations_capped);
        g_test_add_func("/p12/cert-bundle", test_cert_bundle);
        g_test_add_func("/p12/openssl-reads-it", test_openssl_reads_it);
        return g_test_run();
}
