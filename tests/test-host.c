/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The host API (host.c): TPM status and the key cache, through nkp.h only.
 * Each body runs isolated (testutil_isolated): its roots' keyrings are
 * flushed and its temp dir removed even when it fails. */
#include <errno.h>
#include <string.h>

#include "testutil-swtpm.h"
#include "testutil.h"

static nkp_provider *backed_up_provider(nkp_context *ctx, const char *tmp, const char *name)
{
        nkp_provider *p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, name, 0, &p), ==, 0);
        g_autofree char *out = g_strdup_printf("%s/%s.p12", tmp, name);
        g_autoptr(nkp_secret) pw = NULL;
        g_assert_cmpint(nkp_secret_new_copy("pw", 2, &pw), ==, 0);
        g_assert_cmpint(nkp_provider_backup(ctx, name, out, pw), ==, 0);
        return p;
}

static void no_tpm_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "h", "none");
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);

        nkp_host_status *st = NULL;
        g_assert_cmpint(nkp_host_status_get(ctx, &st), ==, 0);
        g_assert_false(nkp_host_status_tpm_in_use(st));
        g_assert_false(nkp_host_status_tpm_answers(st));
        g_assert_null(nkp_host_status_tpm_error(st));
        g_assert_cmpuint(nkp_host_status_n_cached(st), ==, 0);
        g_assert_null(nkp_host_status_cached_name(st, 0));
        nkp_host_status_free(st);

        g_autoptr(nkp_provider) a = backed_up_provider(ctx, tmp, "alpha");
        g_autoptr(nkp_provider) b = backed_up_provider(ctx, tmp, "beta");
        g_assert_cmpint(nkp_provider_delete(ctx, "beta", 0, false), ==, 0);
        g_assert_cmpint(nkp_host_status_get(ctx, &st), ==, 0);
        g_assert_cmpuint(nkp_host_status_n_cached(st), ==, 2);
        for (size_t i = 0; i < 2; i++) {
                const char *name = nkp_host_status_cached_name(st, i);
                bool is_beta = strcmp(name, "beta") == 0;
                g_assert_cmpstr(nkp_host_status_cached_key_id(st, i), ==,
                                nkp_provider_key_id(is_beta ? b : a));
                g_assert_cmpint(nkp_host_status_cached_deleted(st, i), ==, is_beta);
        }
        g_assert_false(nkp_host_status_cached_deleted(st, 2));
        nkp_host_status_free(st);

        size_t forgotten = 0;
        g_assert_cmpint(nkp_host_flush_cache(ctx, &forgotten), ==, 0);
        g_assert_cmpuint(forgotten, ==, 2);
        g_assert_cmpint(nkp_host_status_get(ctx, &st), ==, 0);
        g_assert_cmpuint(nkp_host_status_n_cached(st), ==, 0);
        nkp_host_status_free(st);
        g_assert_cmpint(nkp_host_flush_cache(ctx, &forgotten), ==, 0);
        g_assert_cmpuint(forgotten, ==, 0);
}

static void test_host_no_tpm(void)
{
        testutil_isolated(no_tpm_body);
}

/* A configured TPM that is not there (closed port): in use, not answering,
 * the reason names the TCTI; the status itself succeeds. */
static void dead_tpm_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "h", "swtpm:host=127.0.0.1,port=9");
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        nkp_host_status *st = NULL;
        g_assert_cmpint(nkp_host_status_get(ctx, &st), ==, 0);
        g_assert_true(nkp_host_status_tpm_in_use(st));
        g_assert_false(nkp_host_status_tpm_answers(st));
        g_assert_nonnull(nkp_host_status_tpm_error(st));
        g_assert_nonnull(strstr(nkp_host_status_tpm_error(st), "port=9"));
        nkp_host_status_free(st);
}

static void test_host_dead_tpm(void)
{
        testutil_isolated(dead_tpm_body);
}

/* A real (swtpm) TPM answers. */
static void live_tpm_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "tpm", NULL);
        TestSwtpm *t = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "h", testutil_swtpm_tcti(t));
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        nkp_host_status *st = NULL;
        g_assert_cmpint(nkp_host_status_get(ctx, &st), ==, 0);
        g_assert_true(nkp_host_status_tpm_in_use(st));
        g_assert_true(nkp_host_status_tpm_answers(st));
        g_assert_null(nkp_host_status_tpm_error(st));
        nkp_host_status_free(st);
        testutil_swtpm_stop(t);
}

static void test_host_live_tpm(void)
{
        if (!testutil_swtpm_available()) {
                g_test_skip("swtpm is not installed");
                return;
        }
        testutil_isolated(live_tpm_body);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/host/no-tpm", test_host_no_tpm);
        g_test_add_func("/host/dead-tpm", test_host_dead_tpm);
        g_test_add_func("/host/live-tpm", test_host_live_tpm);
        return g_test_run();
}
