/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Libraries loaded on first use (dl.c): a process that never opens a
 * libvirt connection or a TPM never maps libvirt or tpm2-tss.  This test
 * program links libnkp's internal library only, like the hook. */
#include <dlfcn.h>
#include <errno.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil-swtpm.h"
#include "testutil.h"

static bool loaded(const char *soname)
{
        void *dl = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
        if (!dl)
                return false;
        dlclose(dl);
        return true;
}

static void test_libvirt_on_open(void)
{
        g_assert_false(loaded("libvirt.so.0"));
        nkp_virt *v = NULL;
        g_assert_cmpint(nkp_virt_open("test:///default", 0, &v), ==, 0);
        g_assert_true(loaded("libvirt.so.0"));
        g_assert_true(nkp_virt_secret_exists(v, "00000000-0000-0000-0000-000000000000") == false);
        g_autoptr(GPtrArray) names = NULL;
        g_assert_cmpint(nkp_virt_domain_list(v, &names), ==, 0);
        g_assert_cmpuint(names->len, ==, 1); /* the test driver's "test" domain */
        nkp_virt_close(v);
        /* Loaded once per process: a second open resolves nothing again. */
        g_assert_cmpint(nkp_virt_open("test:///default", 0, &v), ==, 0);
        nkp_virt_close(v);
}

/* A fresh process (testutil_isolated) with a provider sealed to an swtpm by
 * another process: the KDK from the key cache needs no TPM, so tpm2-tss
 * stays unloaded; after a flush the unseal loads it. */
static void tss2_body(const char *tmp)
{
        g_autofree char *state = g_build_filename(tmp, "swtpm", NULL);
        TestSwtpm *tpm = testutil_swtpm_start(state);
        g_autofree char *root = testutil_make_root(tmp, "root", testutil_swtpm_tcti(tpm));
        g_assert_false(loaded("libtss2-esys.so.0"));

        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                nkp_context *c = NULL;
                nkp_provider *p = NULL;
                int ok = nkp_context_new(root, &c) == 0 &&
                         nkp_provider_create(c, "p1", NKP_PROVIDER_REQUIRE_TPM, &p) == 0 &&
                         loaded("libtss2-esys.so.0") && loaded("libtss2-tctildr.so.0");
                _exit(ok ? 0 : 1);
        }
        int status = 0;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);

        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_get(ctx, "p1", &p), ==, 0);
        g_autoptr(nkp_secret) cached = NULL;
        g_assert_cmpint(nkp_provider_get_kdk(ctx, nkp_provider_key_id(p), &cached), ==, 0);
        g_assert_false(loaded("libtss2-esys.so.0"));

        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        g_autoptr(nkp_secret) unsealed = NULL;
        g_assert_cmpint(nkp_provider_get_kdk(ctx, nkp_provider_key_id(p), &unsealed), ==, 0);
        g_assert_true(loaded("libtss2-esys.so.0"));
        g_assert_true(loaded("libtss2-mu.so.0"));
        g_assert_true(nkp_secret_equal(cached, unsealed));
        testutil_swtpm_stop(tpm);
}

static void test_tss2_on_cache_miss(void)
{
        if (!testutil_swtpm_available()) {
                g_test_skip("swtpm is not installed");
                return;
        }
        testutil_isolated(tss2_body);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        /* The order matters: each test checks "not loaded" first. */
        g_test_add_func("/dl/libvirt-on-open", test_libvirt_on_open);
        g_test_add_func("/dl/tss2-on-cache-miss", test_tss2_on_cache_miss);
        return g_test_run();
}
