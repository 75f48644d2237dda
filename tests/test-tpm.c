/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Sealing KDKs to a TPM: tpm.c against throwaway swtpm instances. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#include "testutil-swtpm.h"
#include "testutil.h"

static nkp_context *ctx_for(const char *root)
{
        nkp_context *ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        return ctx;
}

static double now_s(void)
{
        return (double) g_get_monotonic_time() / G_USEC_PER_SEC;
}

static bool need_swtpm(void)
{
        if (testutil_swtpm_available())
                return true;
        g_test_skip("swtpm is not installed");
        return false;
}

/* Asserts that `hay` holds none of the forms of `key`: raw, hex (both
 * cases), base64. */
static void assert_no_key_bytes(const void *hay, size_t hay_len, const nkp_secret *key)
{
        const uint8_t *k = nkp_secret_data(key);
        size_t n = nkp_secret_len(key);
        g_assert_null(memmem(hay, hay_len, k, n));
        /* any 12-byte window is enough to call it a leak */
        g_assert_null(memmem(hay, hay_len, k + 10, 12));
        char hex[2 * 64 + 1];
        nkp_hex_encode(k, n, hex);
        g_assert_null(g_strstr_len(hay, (gssize) hay_len, hex));
        g_autofree char *upper = g_ascii_strup(hex, -1);
        g_assert_null(g_strstr_len(hay, (gssize) hay_len, upper));
        g_autofree char *b64 = g_base64_encode(k, n);
        b64[40] = '\0'; /* a prefix survives any alignment of a larger encoding */
        g_assert_null(g_strstr_len(hay, (gssize) hay_len, b64));
}

/* ---- no TPM, unreachable TPM ------------------------------------------------ */

static void test_tpm_none(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *root = testutil_make_root(dir, "none", "none");
        g_autoptr(nkp_context) ctx = ctx_for(root);
        NkpTpm *tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, -ENODEV);
        g_assert_null(tpm);

        /* No config and no device under the root: no TPM either. */
        g_autofree char *bare = testutil_make_root(dir, "bare", NULL);
        g_autoptr(nkp_context) ctx2 = ctx_for(bare);
        g_assert_cmpstr(nkp_context_tcti(ctx2), ==, "none");
        g_assert_cmpint(nkp_tpm_open(ctx2, &tpm), ==, -ENODEV);

        /* A device TCTI set explicitly that does not exist: an error naming
         * it, never "no TPM" (which would let keys rest unsealed). */
        g_autofree char *bad = testutil_make_root(dir, "bad", "device:/nonexistent/tpmrm9");
        g_autoptr(nkp_context) ctx3 = ctx_for(bad);
        int r = nkp_tpm_open(ctx3, &tpm);
        g_assert_cmpint(r, <, 0);
        g_assert_cmpint(r, !=, -ENODEV);
        g_assert_nonnull(strstr(nkp_error_message(), "device:/nonexistent/tpmrm9"));
        testutil_rmtree(dir);
}

static void test_tpm_closed_port(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        /* Port 1 on loopback: nothing listens there (and we cannot bind it
         * without privileges we do not use). */
        const char *tcti = "swtpm:host=127.0.0.1,port=1";
        g_autofree char *root = testutil_make_root(dir, "r", tcti);
        g_autoptr(nkp_context) ctx = ctx_for(root);
        NkpTpm *tpm = NULL;
        double t0 = now_s();
        int r = nkp_tpm_open(ctx, &tpm);
        double dt = now_s() - t0;
        g_assert_cmpint(r, ==, -EIO);
        g_assert_null(tpm);
        g_assert_nonnull(strstr(nkp_error_message(), tcti));
        g_assert_cmpfloat(dt, <, 2.0);
        g_test_message("closed port failed in %.3f s: %s", dt, nkp_error_message());
        testutil_rmtree(dir);
}

static void frozen_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "r", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);

        /* Alive: opens. */
        NkpTpm *tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        nkp_tpm_close(tpm);
        tpm = NULL;

        /* Stuck (accepts connections, never answers): bounded failure. */
        g_assert_cmpint(kill(testutil_swtpm_pid(sw), SIGSTOP), ==, 0);
        double t0 = now_s();
        int r = nkp_tpm_open(ctx, &tpm);
        double dt = now_s() - t0;
        kill(testutil_swtpm_pid(sw), SIGCONT);
        g_assert_cmpint(r, ==, -ETIMEDOUT);
        g_assert_null(tpm);
        g_assert_nonnull(strstr(nkp_error_message(), "did not answer"));
        g_assert_nonnull(strstr(nkp_error_message(), testutil_swtpm_tcti(sw)));
        g_assert_cmpfloat(dt, <, 8.0);
        g_test_message("stuck swtpm failed in %.3f s", dt);

        /* Gone: fails at once. */
        g_autofree char *tcti = g_strdup(testutil_swtpm_tcti(sw));
        testutil_swtpm_stop(sw);
        t0 = now_s();
        r = nkp_tpm_open(ctx, &tpm);
        dt = now_s() - t0;
        g_assert_cmpint(r, ==, -EIO);
        g_assert_nonnull(strstr(nkp_error_message(), tcti));
        g_assert_cmpfloat(dt, <, 2.0);
}

static void test_tpm_unreachable(void)
{
        if (need_swtpm())
                testutil_isolated(frozen_body);
}

/* ---- seal / unseal ----------------------------------------------------------- */

static void seal_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "r", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);

        g_autoptr(NkpTpm) tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        g_autoptr(GBytes) blob = NULL;
        g_autofree char *srk = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob, &srk), ==, 0);
        /* SHA-256 name: 2-byte algorithm id + 32-byte digest */
        g_assert_cmpuint(strlen(srk), ==, 68);
        g_assert_true(g_str_has_prefix(srk, "000b"));
        size_t len;
        const uint8_t *b = g_bytes_get_data(blob, &len);
        g_assert_cmpmem(b, 5, "NKPT\x01", 5);
        assert_no_key_bytes(b, len, kdk);

        g_autoptr(nkp_secret) back = NULL;
        g_assert_cmpint(nkp_tpm_unseal(tpm, blob, srk, &back), ==, 0);
        g_assert_true(nkp_secret_equal(kdk, back));

        /* Sealing twice gives different blobs (fresh seed) under the same SRK. */
        g_autoptr(GBytes) blob2 = NULL;
        g_autofree char *srk2 = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob2, &srk2), ==, 0);
        g_assert_cmpstr(srk, ==, srk2);
        g_assert_false(g_bytes_equal(blob, blob2));
        g_clear_pointer(&tpm, nkp_tpm_close);

        /* "Reboot" the TPM: same state, new process. */
        testutil_swtpm_restart(sw);
        testutil_root_set_tcti(root, testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx2 = ctx_for(root);
        g_assert_cmpint(nkp_tpm_open(ctx2, &tpm), ==, 0);
        g_autoptr(nkp_secret) again = NULL;
        g_assert_cmpint(nkp_tpm_unseal(tpm, blob, srk, &again), ==, 0);
        g_assert_true(nkp_secret_equal(kdk, again));
        g_clear_pointer(&tpm, nkp_tpm_close);

        /* Another TPM: a clear "different TPM", not an opaque TPM error. */
        g_autofree char *state_b = g_build_filename(tmp, "tpm-b", NULL);
        TestSwtpm *sw_b = testutil_swtpm_start(state_b);
        g_autofree char *root_b = testutil_make_root(tmp, "b", testutil_swtpm_tcti(sw_b));
        g_autoptr(nkp_context) ctx_b = ctx_for(root_b);
        g_assert_cmpint(nkp_tpm_open(ctx_b, &tpm), ==, 0);
        nkp_secret *none = NULL;
        g_assert_cmpint(nkp_tpm_unseal(tpm, blob, srk, &none), ==, -ENXIO);
        g_assert_null(none);
        g_assert_nonnull(strstr(nkp_error_message(), "sealed to a different TPM"));
        g_assert_nonnull(strstr(nkp_error_message(), "nkpctl provider restore"));
        /* Even with the other TPM's own SRK name, its SRK cannot load the blob. */
        g_autoptr(GBytes) blob_b = NULL;
        g_autofree char *srk_b = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob_b, &srk_b), ==, 0);
        g_assert_cmpstr(srk_b, !=, srk);
        int r = nkp_tpm_unseal(tpm, blob, srk_b, &none);
        g_assert_cmpint(r, <, 0);
        g_assert_null(none);
        g_test_message("foreign blob under the local SRK: %s", nkp_error_message());
        g_clear_pointer(&tpm, nkp_tpm_close);

        testutil_swtpm_stop(sw_b);
        testutil_swtpm_stop(sw);
}

static void test_tpm_seal_unseal(void)
{
        if (need_swtpm())
                testutil_isolated(seal_body);
}

/* ---- malformed blobs ---------------------------------------------------------- */

static GBytes *mutate(GBytes *in, size_t off, uint8_t xor_with)
{
        size_t len;
        const uint8_t *p = g_bytes_get_data(in, &len);
        uint8_t *c = g_memdup2(p, len);
        c[off] ^= xor_with;
        return g_bytes_new_take(c, len);
}

static void expect_bad(NkpTpm *tpm, GBytes *blob, const char *srk, int err)
{
        nkp_secret *none = NULL;
        int r = nkp_tpm_unseal(tpm, blob, srk, &none);
        g_test_message("-> %d %s", r, nkp_error_message());
        g_assert_cmpint(r, ==, err);
        g_assert_null(none);
        g_assert_cmpstr(nkp_error_message(), !=, "");
}

static void bad_blob_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "r", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_autoptr(NkpTpm) tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        g_autoptr(GBytes) blob = NULL;
        g_autofree char *srk = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob, &srk), ==, 0);
        size_t len;
        const uint8_t *p = g_bytes_get_data(blob, &len);

        expect_bad(tpm, NULL, srk, -EBADMSG);
        for (size_t cut = 0; cut < len; cut += 7) {
                g_autoptr(GBytes) t = g_bytes_new(p, cut);
                expect_bad(tpm, t, srk, -EBADMSG);
        }
        g_autofree uint8_t *longer = g_malloc0(len + 1);
        memcpy(longer, p, len);
        g_autoptr(GBytes) trailing = g_bytes_new(longer, len + 1);
        expect_bad(tpm, trailing, srk, -EBADMSG);
        g_autofree uint8_t *huge = g_malloc0(1 << 20);
        memcpy(huge, p, len);
        g_autoptr(GBytes) big = g_bytes_new(huge, 1 << 20);
        expect_bad(tpm, big, srk, -EBADMSG);

        g_autoptr(GBytes) magic = mutate(blob, 0, 0x20);
        expect_bad(tpm, magic, srk, -EBADMSG);
        g_autoptr(GBytes) version = mutate(blob, 4, 0x03);
        expect_bad(tpm, version, srk, -EPROTONOSUPPORT);
        g_autoptr(GBytes) reserved = mutate(blob, 6, 0x01);
        expect_bad(tpm, reserved, srk, -EBADMSG);
        g_autoptr(GBytes) publen = mutate(blob, 8, 0x01);
        expect_bad(tpm, publen, srk, -EBADMSG);
        g_autoptr(GBytes) publen_huge = mutate(blob, 11, 0x80);
        expect_bad(tpm, publen_huge, srk, -EBADMSG);
        /* a bit flipped in the private part: the TPM's integrity check */
        g_autoptr(GBytes) priv = mutate(blob, len - 5, 0x01);
        expect_bad(tpm, priv, srk, -EBADMSG);
        /* the public part's attributes altered: the TPM refuses the load */
        nkp_secret *none = NULL;
        g_autoptr(GBytes) pub = mutate(blob, 16 + 2 + 2 + 2 + 3, 0x01);
        g_assert_cmpint(nkp_tpm_unseal(tpm, pub, srk, &none), <, 0);
        g_assert_null(none);
        /* a bad SRK name */
        expect_bad(tpm, blob, NULL, -EBADMSG);
        expect_bad(tpm, blob, "", -EBADMSG);
        g_autofree char *longname = g_strnfill(200, 'a');
        expect_bad(tpm, blob, longname, -EBADMSG);
        g_autofree char *other = g_strdup(srk);
        other[10] = other[10] == '0' ? '1' : '0';
        expect_bad(tpm, blob, other, -ENXIO);
        /* upper-case hex of the right name is the same name */
        g_autofree char *upper = g_ascii_strup(srk, -1);
        g_autoptr(nkp_secret) ok = NULL;
        g_assert_cmpint(nkp_tpm_unseal(tpm, blob, upper, &ok), ==, 0);
        g_assert_true(nkp_secret_equal(ok, kdk));

        g_clear_pointer(&tpm, nkp_tpm_close);
        testutil_swtpm_stop(sw);
}

static void test_tpm_bad_blobs(void)
{
        if (need_swtpm())
                testutil_isolated(bad_blob_body);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/tpm/none", test_tpm_none);
        g_test_add_func("/tpm/closed-port", test_tpm_closed_port);
        g_test_add_func("/tpm/unreachable", test_tpm_unreachable);
        g_test_add_func("/tpm/seal-unseal", test_tpm_seal_unseal);
        g_test_add_func("/tpm/bad-blobs", test_tpm_bad_blobs);
        return g_test_run();
}
