/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Sealing KDKs to a TPM: tpm.c against throwaway swtpm instances. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_tctildr.h>

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

/* ---- a TPM without resource manager (swtpm): concurrency, dead clients --------- */

static void concurrent_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "r", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        NkpTpm *tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        g_autoptr(GBytes) blob = NULL;
        g_autofree char *srk = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob, &srk), ==, 0);
        nkp_tpm_close(tpm);

        /* A client dies holding objects and a session: with no resource
         * manager they would stay loaded and exhaust the TPM's slots. */
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                TSS2_TCTI_CONTEXT *tcti = NULL;
                ESYS_CONTEXT *esys = NULL;
                if (Tss2_TctiLdr_Initialize(testutil_swtpm_tcti(sw), &tcti) != 0 ||
                    Esys_Initialize(&esys, tcti, NULL) != 0)
                        _exit(2);
                TPM2B_SENSITIVE_CREATE sens = { 0 };
                TPM2B_PUBLIC pub = { .publicArea = {
                        .type = TPM2_ALG_KEYEDHASH, .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                            TPMA_OBJECT_SENSITIVEDATAORIGIN |
                                            TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_SIGN_ENCRYPT,
                        .parameters.keyedHashDetail.scheme = { .scheme = TPM2_ALG_HMAC,
                                .details.hmac.hashAlg = TPM2_ALG_SHA256 } } };
                TPM2B_DATA outside = { 0 };
                TPML_PCR_SELECTION pcrs = { 0 };
                int loaded = 0;
                for (int i = 0; i < 8; i++) {
                        ESYS_TR h;
                        pub.publicArea.unique.keyedHash.size = 1;
                        pub.publicArea.unique.keyedHash.buffer[0] = (BYTE) i;
                        if (Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD,
                                               ESYS_TR_NONE, ESYS_TR_NONE, &sens, &pub, &outside,
                                               &pcrs, &h, NULL, NULL, NULL, NULL) == 0)
                                loaded++;
                }
                _exit(loaded > 0 ? 0 : 3); /* no flush, no finalize */
        }
        int status;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);

        /* Many cold unseals at once, as concurrent VM starts after a reboot. */
        enum { N = 8 };
        pid_t kids[N];
        for (int i = 0; i < N; i++) {
                kids[i] = fork();
                g_assert_cmpint(kids[i], >=, 0);
                if (kids[i] == 0) {
                        NkpTpm *t = NULL;
                        nkp_secret *k = NULL;
                        int ok = nkp_tpm_open(ctx, &t) == 0 && nkp_tpm_unseal(t, blob, srk, &k) == 0 &&
                                 nkp_secret_equal(k, kdk);
                        if (!ok)
                                g_printerr("child %d: %s\n", i, nkp_error_message());
                        _exit(ok ? 0 : 1);
                }
        }
        for (int i = 0; i < N; i++) {
                g_assert_cmpint(waitpid(kids[i], &status, 0), ==, kids[i]);
                g_assert_true(WIFEXITED(status));
                g_assert_cmpint(WEXITSTATUS(status), ==, 0);
        }
        testutil_swtpm_stop(sw);
}

static void test_tpm_concurrent(void)
{
        if (need_swtpm())
                testutil_isolated(concurrent_body);
}

/* ---- no stray copies ---------------------------------------------------------- */

/* Counts the places in this process's [heap] and [stack] that hold
 * `needle` (which must live elsewhere, e.g. in an nkp_secret). */
static int heap_count(const void *needle, size_t len)
{
        g_autofree char *maps = NULL;
        g_assert_true(g_file_get_contents("/proc/self/maps", &maps, NULL, NULL));
        int fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
        g_assert_cmpint(fd, >=, 0);
        int found = 0;
        g_auto(GStrv) lines = g_strsplit(maps, "\n", -1);
        for (char **l = lines; *l; l++) {
                if (!strstr(*l, "[heap]") && !strstr(*l, "[stack]"))
                        continue;
                unsigned long lo, hi;
                g_assert_cmpint(sscanf(*l, "%lx-%lx", &lo, &hi), ==, 2);
                g_autofree uint8_t *buf = g_malloc(hi - lo);
                ssize_t n = pread(fd, buf, hi - lo, (off_t) lo);
                g_assert_cmpint(n, ==, (ssize_t) (hi - lo));
                for (const uint8_t *p = buf; (p = memmem(p, (size_t) (buf + n - p), needle, len));
                     p++)
                        found++;
                nkp_wipe(buf, hi - lo);
        }
        close(fd);
        return found;
}

static void heap_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "r", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        /* the needle: the KDK with its first byte flipped, so that the
         * needle itself (on the stack) is not the KDK */
        uint8_t needle[16];
        memcpy(needle, nkp_secret_data(kdk), sizeof needle);
        needle[0] ^= 0xff;

        NkpTpm *tpm = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        g_autoptr(GBytes) blob = NULL;
        g_autofree char *srk = NULL;
        g_assert_cmpint(nkp_tpm_seal(tpm, kdk, &blob, &srk), ==, 0);
        nkp_tpm_close(tpm);
        nkp_secret *back = NULL;
        g_assert_cmpint(nkp_tpm_open(ctx, &tpm), ==, 0);
        g_assert_cmpint(nkp_tpm_unseal(tpm, blob, srk, &back), ==, 0);
        nkp_tpm_close(tpm);
        g_assert_true(nkp_secret_equal(back, kdk));
        nkp_secret_free(back);

        g_autoptr(nkp_secret) real = NULL; /* own mapping: not scanned */
        g_assert_cmpint(nkp_secret_new_copy(needle, sizeof needle, &real), ==, 0);
        nkp_wipe(needle, sizeof needle);
        nkp_secret_data_mut(real)[0] ^= 0xff;
        int n = heap_count(nkp_secret_data(real), nkp_secret_len(real));
        g_test_message("copies of the KDK left in the heap or on the stack: %d", n);
        g_assert_cmpint(n, ==, 0);
        testutil_swtpm_stop(sw);
}

static void test_tpm_no_heap_copies(void)
{
#if defined(__SANITIZE_ADDRESS__)
        g_test_skip("AddressSanitizer replaces the heap");
        return;
#endif
        if (need_swtpm())
                testutil_isolated(heap_body);
}

/* ---- provider level: provider.c, the store, the cache and the TPM together -- */

/* Every file under `dir` must hold no form of `kdk`. */
static void assert_tree_has_no_key(const char *dir, const nkp_secret *kdk)
{
        GDir *d = g_dir_open(dir, 0, NULL);
        g_assert_nonnull(d);
        const char *name;
        while ((name = g_dir_read_name(d))) {
                g_autofree char *path = g_build_filename(dir, name, NULL);
                if (g_file_test(path, G_FILE_TEST_IS_DIR)) {
                        assert_tree_has_no_key(path, kdk);
                        continue;
                }
                g_autofree char *data = NULL;
                gsize len = 0;
                g_assert_true(g_file_get_contents(path, &data, &len, NULL));
                assert_no_key_bytes(data, len, kdk);
        }
        g_dir_close(d);
}

typedef struct {
        uint8_t salt[NKP_KEK_SALT_SIZE];
        uint8_t iv[NKP_GCM_IV_SIZE];
        uint8_t wrapped[NKP_DEK_SIZE];
        uint8_t tag[NKP_GCM_TAG_SIZE];
} WrappedDek;

#define VM_UUID "5f0c2a8e-3b1d-4c6e-9f7a-2d4b6c8e0a13"

static void wrap_dek(const nkp_secret *kdk, const char *key_id, const nkp_secret *dek, WrappedDek *w)
{
        g_assert_cmpint(nkp_random_bytes(w->salt, sizeof w->salt), ==, 0);
        g_assert_cmpint(nkp_random_bytes(w->iv, sizeof w->iv), ==, 0);
        g_autoptr(nkp_secret) kek = NULL;
        g_assert_cmpint(nkp_kek_derive(kdk, w->salt, key_id, VM_UUID, &kek), ==, 0);
        g_assert_cmpint(nkp_aes256gcm_seal(nkp_secret_data(kek), w->iv, sizeof w->iv,
                                           (const uint8_t *) VM_UUID, strlen(VM_UUID),
                                           nkp_secret_data(dek), NKP_DEK_SIZE, w->wrapped, w->tag),
                        ==, 0);
}

static nkp_secret *unwrap_dek(const nkp_secret *kdk, const char *key_id, const WrappedDek *w)
{
        g_autoptr(nkp_secret) kek = NULL;
        g_assert_cmpint(nkp_kek_derive(kdk, w->salt, key_id, VM_UUID, &kek), ==, 0);
        nkp_secret *dek = NULL;
        g_assert_cmpint(nkp_secret_new(NKP_DEK_SIZE, &dek), ==, 0);
        g_assert_cmpint(nkp_aes256gcm_open(nkp_secret_data(kek), NKP_KEK_SIZE, w->iv, sizeof w->iv,
                                           (const uint8_t *) VM_UUID, strlen(VM_UUID), w->wrapped,
                                           NKP_DEK_SIZE, w->tag, NKP_GCM_TAG_SIZE,
                                           nkp_secret_data_mut(dek)),
                        ==, 0);
        return dek;
}

static nkp_secret *get_kdk_ok(nkp_context *ctx, const char *key_id)
{
        nkp_secret *kdk = NULL;
        int r = nkp_provider_get_kdk(ctx, key_id, &kdk);
        if (r < 0)
                g_error("get_kdk %s: %s", key_id, nkp_error_message());
        return kdk;
}

static bool cached(nkp_context *ctx, const char *key_id)
{
        nkp_secret *s = NULL;
        int r = nkp_cache_get(ctx, key_id, &s, NULL);
        nkp_secret_free(s);
        return r == 0;
}

static void provider_reboot_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "host", testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx = ctx_for(root);

        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, "prod", NKP_PROVIDER_REQUIRE_TPM, &p), ==, 0);
        g_assert_cmpint(nkp_provider_seal(p), ==, NKP_SEAL_TPM);
        const char *key_id = nkp_provider_key_id(p);
        g_assert_true(cached(ctx, key_id)); /* create warms the cache */
        g_autoptr(nkp_secret) kdk = get_kdk_ok(ctx, key_id);

        g_autoptr(nkp_secret) dek = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_DEK_SIZE, &dek), ==, 0);
        WrappedDek w;
        wrap_dek(kdk, key_id, dek, &w);

        /* The store holds no form of the KDK. */
        g_autofree char *store = g_build_filename(root, "var/lib/nkp", NULL);
        assert_tree_has_no_key(store, kdk);

        /* "Reboot": the cache is gone, the TPM restarts on its state. */
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        testutil_swtpm_restart(sw);
        testutil_root_set_tcti(root, testutil_swtpm_tcti(sw));
        g_autoptr(nkp_context) ctx2 = ctx_for(root);
        g_assert_false(cached(ctx2, key_id));

        g_autoptr(nkp_secret) kdk2 = get_kdk_ok(ctx2, key_id); /* unsealed */
        g_assert_true(nkp_secret_equal(kdk, kdk2));
        g_assert_true(cached(ctx2, key_id));
        g_autoptr(nkp_secret) dek2 = unwrap_dek(kdk2, key_id, &w);
        g_assert_true(nkp_secret_equal(dek, dek2));
        assert_tree_has_no_key(store, kdk);

        /* Deleted from the store: still in the cache, flagged, until flush. */
        g_assert_cmpint(nkp_provider_delete(ctx2, "prod", 0, false), ==, 0);
        g_autoptr(nkp_secret) kdk3 = get_kdk_ok(ctx2, key_id);
        g_assert_true(nkp_secret_equal(kdk, kdk3));
        NkpCacheInfo info;
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_cache_get(ctx2, key_id, &s, &info), ==, 0);
        nkp_secret_free(s);
        g_assert_true(info.deleted);
        g_assert_cmpint(nkp_cache_flush(ctx2), ==, 0);
        g_assert_cmpint(nkp_provider_get_kdk(ctx2, key_id, &s), ==, -ENOENT);

        testutil_swtpm_stop(sw);
}

static void test_tpm_provider_reboot(void)
{
        if (need_swtpm())
                testutil_isolated(provider_reboot_body);
}

static void copy_tree(const char *from, const char *to)
{
        /* argv, not a shell: temp paths are never re-parsed. */
        const char *argv[] = { "cp", "-a", from, to, NULL };
        int status = -1;
        g_autoptr(GError) error = NULL;
        g_assert_true(g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                                   NULL, NULL, &status, &error));
        g_assert_no_error(error);
        g_assert_true(g_spawn_check_wait_status(status, NULL));
}

static void stolen_disk_restore(const char *tmp, nkp_context *ca, nkp_context *cb, nkp_context *cc,
                                const char *rb,
                                const char *rc, const char *key_id, const nkp_secret *kdk)
{
        /* The backup restored on a host with that TPM works and is sealed
         * to it. */
        g_autofree char *p12 = g_build_filename(tmp, "prod.p12", NULL);
        g_autoptr(nkp_secret) pw = NULL;
        g_assert_cmpint(nkp_secret_new_copy("correct horse", 13, &pw), ==, 0);
        int r = nkp_provider_backup(ca, "prod", p12, pw);
        if (r == -ENOSYS) {
                testutil_incomplete("provider backup/restore are not implemented yet");
                return;
        }
        g_assert_cmpint(r, ==, 0);
        g_autoptr(nkp_provider) q = NULL;
        bool already = true;
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_provider_restore(cc, p12, pw, &q, &already), ==, 0);
        g_assert_false(already);
        g_assert_cmpint(nkp_provider_seal(q), ==, NKP_SEAL_TPM);
        g_assert_cmpstr(nkp_provider_key_id(q), ==, key_id);
        g_autofree char *store_c = g_build_filename(rc, "var/lib/nkp", NULL);
        assert_tree_has_no_key(store_c, kdk);
        g_assert_cmpint(nkp_cache_flush(cc), ==, 0);
        g_autoptr(nkp_secret) kc = get_kdk_ok(cc, key_id);
        g_assert_true(nkp_secret_equal(kc, kdk));

        /* Restored over the copied store on host B: it must end up sealed
         * to B's TPM (reported as restored, not "already present"), and
         * the store must still hold no key bytes. */
        g_autoptr(nkp_provider) q2 = NULL;
        r = nkp_provider_restore(cb, p12, pw, &q2, &already);
        g_test_message("restore over the stolen store: %d already=%d %s", r, already,
                       nkp_error_message());
        g_assert_cmpint(r, ==, 0);
        g_assert_false(already);
        g_assert_cmpint(nkp_provider_seal(q2), ==, NKP_SEAL_TPM);
        g_assert_cmpint(nkp_cache_flush(cb), ==, 0);
        g_autofree char *store_b = g_build_filename(rb, "var/lib/nkp", NULL);
        assert_tree_has_no_key(store_b, kdk);
        g_assert_cmpint(nkp_provider_get_kdk(cb, key_id, &s), ==, 0);
        g_assert_true(nkp_secret_equal(s, kdk));
        nkp_secret_free(s);
        /* A second restore is now a plain "already present". */
        g_autoptr(nkp_provider) q3 = NULL;
        g_assert_cmpint(nkp_provider_restore(cb, p12, pw, &q3, &already), ==, 0);
        g_assert_true(already);
        g_assert_cmpint(nkp_cache_flush(cb), ==, 0);
}

static void stolen_disk_body(const char *tmp)
{
        g_autofree char *state_a = g_build_filename(tmp, "tpm-a", NULL);
        g_autofree char *state_b = g_build_filename(tmp, "tpm-b", NULL);
        TestSwtpm *sw_a = testutil_swtpm_start(state_a);
        TestSwtpm *sw_b = testutil_swtpm_start(state_b);
        g_autofree char *ra = testutil_make_root(tmp, "host-a", testutil_swtpm_tcti(sw_a));
        g_autofree char *rb = testutil_make_root(tmp, "host-b", testutil_swtpm_tcti(sw_b));
        g_autofree char *rc = testutil_make_root(tmp, "host-c", testutil_swtpm_tcti(sw_b));
        g_autoptr(nkp_context) ca = ctx_for(ra), cb = ctx_for(rb), cc = ctx_for(rc);

        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(ca, "prod", 0, &p), ==, 0);
        const char *key_id = nkp_provider_key_id(p);
        g_autoptr(nkp_secret) kdk = get_kdk_ok(ca, key_id);

        /* The disk is stolen: host A's store lands on host B, whose TPM is
         * another one. */
        g_autofree char *store_a = g_build_filename(ra, "var/lib/nkp", NULL);
        g_autofree char *var_b = g_build_filename(rb, "var/lib", NULL);
        g_assert_cmpint(g_mkdir_with_parents(var_b, 0755), ==, 0);
        copy_tree(store_a, var_b);
        g_autoptr(GHashTable) before = testutil_snapshot_tree(rb);
        nkp_secret *s = NULL;
        double t0 = now_s();
        int r = nkp_provider_get_kdk(cb, key_id, &s);
        g_test_message("stolen disk: %d %s (%.3f s)", r, nkp_error_message(), now_s() - t0);
        g_assert_cmpint(r, ==, -ENXIO);
        g_assert_null(s);
        g_assert_nonnull(strstr(nkp_error_message(), "'prod'"));
        g_assert_nonnull(strstr(nkp_error_message(), "different TPM"));
        g_assert_false(cached(cb, key_id));
        testutil_assert_same_tree(before, rb);

        stolen_disk_restore(tmp, ca, cb, cc, rb, rc, key_id, kdk);
        testutil_swtpm_stop(sw_b);
        testutil_swtpm_stop(sw_a);
}

static void test_tpm_provider_stolen_disk(void)
{
        if (need_swtpm())
                testutil_isolated(stolen_disk_body);
}

static void require_tpm_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "notpm", "none");
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(GHashTable) before = testutil_snapshot_tree(root);
        nkp_provider *p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, "secure", NKP_PROVIDER_REQUIRE_TPM, &p), ==, -ENODEV);
        g_assert_null(p);
        g_assert_nonnull(strstr(nkp_error_message(), "TPM"));
        testutil_assert_same_tree(before, root);
        g_autoptr(GArray) list = NULL;
        g_assert_cmpint(nkp_cache_list(ctx, &list), ==, 0);
        g_assert_cmpuint(list->len, ==, 0);

        /* A configured TPM that is not there is not "no TPM": refused too,
         * even without require-tpm (never a silent fallback to the clear
         * store). */
        g_autofree char *root2 = testutil_make_root(tmp, "tpm-down", "swtpm:host=127.0.0.1,port=1");
        g_autoptr(nkp_context) ctx2 = ctx_for(root2);
        g_autoptr(GHashTable) before2 = testutil_snapshot_tree(root2);
        g_assert_cmpint(nkp_provider_create(ctx2, "plain", 0, &p), <, 0);
        g_assert_null(p);
        g_assert_nonnull(strstr(nkp_error_message(), "swtpm:host=127.0.0.1,port=1"));
        testutil_assert_same_tree(before2, root2);

        /* Without require-tpm on a host without a TPM: sealed none. */
        g_assert_cmpint(nkp_provider_create(ctx, "plain", 0, &p), ==, 0);
        g_assert_cmpint(nkp_provider_seal(p), ==, NKP_SEAL_NONE);
        nkp_provider_free(p);
}

static void test_tpm_provider_require_tpm(void)
{
        testutil_isolated(require_tpm_body);
}

static void tpm_gone_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *sw = testutil_swtpm_start(state);
        g_autofree char *tcti = g_strdup(testutil_swtpm_tcti(sw));
        g_autofree char *root = testutil_make_root(tmp, "host", tcti);
        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_provider) warm = NULL, cold = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, "warm", 0, &warm), ==, 0);
        g_assert_cmpint(nkp_provider_create(ctx, "cold", 0, &cold), ==, 0);
        g_autoptr(nkp_secret) kw = get_kdk_ok(ctx, nkp_provider_key_id(warm));
        g_autoptr(nkp_secret) kc = get_kdk_ok(ctx, nkp_provider_key_id(cold));
        g_assert_nonnull(kc);

        /* After a "reboot" only `warm` was needed again. */
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        g_autoptr(nkp_secret) kw2 = get_kdk_ok(ctx, nkp_provider_key_id(warm));
        g_assert_nonnull(kw2);

        /* The TPM hangs, then goes away. */
        g_assert_cmpint(kill(testutil_swtpm_pid(sw), SIGSTOP), ==, 0);
        double t0 = now_s();
        g_autoptr(nkp_secret) kw3 = get_kdk_ok(ctx, nkp_provider_key_id(warm));
        g_assert_cmpfloat(now_s() - t0, <, 0.5);
        g_assert_true(nkp_secret_equal(kw, kw3));
        nkp_secret *s = NULL;
        t0 = now_s();
        int r = nkp_provider_get_kdk(ctx, nkp_provider_key_id(cold), &s);
        double dt = now_s() - t0;
        g_test_message("cold provider, stuck TPM: %d %s (%.3f s)", r, nkp_error_message(), dt);
        g_assert_cmpint(r, <, 0);
        g_assert_null(s);
        g_assert_nonnull(strstr(nkp_error_message(), "'cold'"));
        g_assert_nonnull(strstr(nkp_error_message(), tcti));
        g_assert_cmpfloat(dt, <, 8.0);

        testutil_swtpm_stop(sw);
        t0 = now_s();
        r = nkp_provider_get_kdk(ctx, nkp_provider_key_id(cold), &s);
        dt = now_s() - t0;
        g_test_message("cold provider, TPM gone: %d %s (%.3f s)", r, nkp_error_message(), dt);
        g_assert_cmpint(r, <, 0);
        g_assert_nonnull(strstr(nkp_error_message(), "'cold'"));
        g_assert_nonnull(strstr(nkp_error_message(), tcti));
        g_assert_cmpfloat(dt, <, 2.0);
        g_autoptr(nkp_secret) kw4 = get_kdk_ok(ctx, nkp_provider_key_id(warm));
        g_assert_true(nkp_secret_equal(kw, kw4));
}

static void test_tpm_provider_tpm_gone(void)
{
        if (need_swtpm())
                testutil_isolated(tpm_gone_body);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/tpm/none", test_tpm_none);
        g_test_add_func("/tpm/closed-port", test_tpm_closed_port);
        g_test_add_func("/tpm/unreachable", test_tpm_unreachable);
        g_test_add_func("/tpm/seal-unseal", test_tpm_seal_unseal);
        g_test_add_func("/tpm/bad-blobs", test_tpm_bad_blobs);
        g_test_add_func("/tpm/no-heap-copies", test_tpm_no_heap_copies);
        g_test_add_func("/tpm/concurrent", test_tpm_concurrent);
        g_test_add_func("/tpm/provider/reboot", test_tpm_provider_reboot);
        g_test_add_func("/tpm/provider/stolen-disk", test_tpm_provider_stolen_disk);
        g_test_add_func("/tpm/provider/require-tpm", test_tpm_provider_require_tpm);
        g_test_add_func("/tpm/provider/tpm-gone", test_tpm_provider_tpm_gone);
        return g_test_run();
}
