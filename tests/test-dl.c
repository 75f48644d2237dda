/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Libraries loaded on first use (dl.c): a process that never opens a
 * libvirt connection or a TPM never maps libvirt or tpm2-tss.  This test
 * program links libnkp's internal library only, like the hook. */
#include <dlfcn.h>
#include <errno.h>

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

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        /* The order matters: each test checks "not loaded" first. */
        g_test_add_func("/dl/libvirt-on-open", test_libvirt_on_open);
        return g_test_run();
}
