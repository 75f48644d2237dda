/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* A new plain vTPM at start (issue 15, enrol.c nkp_vtpm_start_check) and the
 * host key record (host-protect.c) without fscrypt: the refusal lines name
 * the fix and never promise a retry; a recorded but unfinished (plain)
 * directory does not count as protected; a damaged record is refused; vm
 * create refuses a domain without a <uuid> or without a vTPM, nothing
 * defined (libvirt's test driver).  The protected, unlocked case runs with
 * real fscrypt in integration/t-nkp-create.sh. */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nkp-private.h"
#include "testutil.h"

static char *root, *state_dir;

static nkp_context *ctx_with(const char *policy)
{
        g_autofree char *text = g_strdup_printf("[tpm]\ntcti=none\n[vtpm]\npolicy=%s\nstate_dir=%s\n",
                                                policy, state_dir);
        return testutil_context_with_conf(root, text);
}

static const char *vm_xml =
        "<domain type='qemu'><name>vm3</name><uuid>6f1e2a55-1c1e-4b43-9a57-0c1d6c3b9a11</uuid>"
        "<memory>65536</memory><os><type arch='x86_64'>hvm</type></os><devices>"
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>";

static NkpDomain *vm3(void)
{
        NkpDomain *d = NULL;
        g_assert_cmpint(nkp_domain_parse(vm_xml, strlen(vm_xml), &d), ==, 0);
        return d;
}

static void test_refused_unprotected(void)
{
        g_autoptr(nkp_context) ctx = ctx_with("enrol");
        g_autoptr(NkpDomain) d = vm3();
        g_assert_cmpint(nkp_vtpm_start_check(ctx, d), ==, -EPERM);
        const char *m = nkp_error_message();
        g_assert_nonnull(strstr(m, "would write its state in clear"));
        g_assert_nonnull(strstr(m, "nkpctl host protect"));
        g_assert_nonnull(strstr(m, "nkpctl vm create FILE.xml"));
        g_assert_null(strstr(m, "moment"));
}

static void test_require_names_create(void)
{
        g_autoptr(nkp_context) ctx = ctx_with("require");
        g_autoptr(NkpDomain) d = vm3();
        g_assert_cmpint(nkp_vtpm_start_check(ctx, d), ==, -EPERM);
        g_assert_nonnull(strstr(nkp_error_message(), "policy=require"));
        g_assert_nonnull(strstr(nkp_error_message(), "nkpctl vm create FILE.xml"));
}

static void write_record(const char *text)
{
        g_autofree char *dir = g_build_filename(root, "var/lib/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
        g_autofree char *p = g_build_filename(dir, "hostkey.ini", NULL);
        g_assert_true(g_file_set_contents(p, text, -1, NULL));
        g_assert_cmpint(chmod(p, 0600), ==, 0);
}

static void test_record(void)
{
        g_autoptr(nkp_context) ctx = ctx_with("enrol");
        g_autoptr(nkp_hostkey_status) st = NULL;
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st), ==, 0);
        g_assert_null(nkp_hostkey_status_provider(st));
        g_assert_cmpuint(nkp_hostkey_status_n_dirs(st), ==, 0);
        g_assert_cmpint(nkp_host_key_load(ctx), ==, 0); /* nothing protected: nothing to do */

        /* Recorded, but the directory is plain (a protect that never finished). */
        g_autofree char *rec = g_strdup_printf(
                "[hostkey]\nprovider=p1\nkey_id=0b9f6d7e-8f1a-4c2b-9d3e-5f6a7b8c9d0e\n"
                "identifier=00112233445566778899aabbccddeeff\ndirs=%s;\n",
                state_dir);
        write_record(rec);
        g_clear_pointer(&st, nkp_hostkey_status_free);
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st), ==, 0);
        g_assert_cmpstr(nkp_hostkey_status_provider(st), ==, "p1");
        g_assert_cmpuint(nkp_hostkey_status_n_dirs(st), ==, 1);
        g_assert_cmpstr(nkp_hostkey_status_dir(st, 0), ==, state_dir);
        g_assert_true(g_str_has_prefix(nkp_hostkey_status_dir_state(st, 0), "plain"));
        g_assert_cmpint(nkp_hostkey_dir_ready(ctx, state_dir, false), ==, 0);
        g_autoptr(NkpDomain) d = vm3();
        g_assert_cmpint(nkp_vtpm_start_check(ctx, d), ==, -EPERM);

        write_record("[hostkey]\nprovider=p1\nkey_id=nope\n");
        g_clear_pointer(&st, nkp_hostkey_status_free);
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st), ==, -EBADMSG);
        g_assert_cmpint(nkp_host_key_load(ctx), ==, -EBADMSG);
        g_autofree char *p = g_build_filename(root, "var/lib/nkp/hostkey.ini", NULL);
        g_assert_cmpint(unlink(p), ==, 0);
}

static void test_create_refusals(void)
{
        g_autoptr(nkp_context) ctx = ctx_with("enrol");
        g_autoptr(nkp_virt) v = NULL;
        g_assert_cmpint(nkp_virt_open("test:///default", 10, &v), ==, 0);
        nkp_vm_result *res = NULL;
        const char *no_uuid = "<domain type='test'><name>n1</name><memory>65536</memory>"
                              "<os><type>hvm</type></os><devices><tpm model='tpm-crb'>"
                              "<backend type='emulator' version='2.0'/></tpm></devices></domain>";
        g_assert_cmpint(nkp_vm_create(ctx, v, no_uuid, NULL, 0, &res), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "<uuid>"));
        const char *no_tpm = "<domain type='test'><name>n2</name>"
                             "<uuid>1a2b3c4d-1c1e-4b43-9a57-0c1d6c3b9a11</uuid><memory>65536</memory>"
                             "<os><type>hvm</type></os><devices/></domain>";
        g_assert_cmpint(nkp_vm_create(ctx, v, no_tpm, NULL, 0, &res), ==, -ENOENT);
        /* No default provider: refused, nothing defined. */
        g_assert_cmpint(nkp_vm_create(ctx, v, vm_xml, NULL, 0, &res), ==, -ENOENT);
        g_assert_nonnull(strstr(nkp_error_message(), "default provider"));
        g_autofree char *xml = NULL;
        g_assert_cmpint(nkp_virt_domain_xml(v, "vm3", true, &xml), ==, -ENOENT);
        g_assert_null(res);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        root = testutil_mkdtemp();
        state_dir = g_build_filename(root, "swtpm", NULL);
        g_assert_cmpint(g_mkdir_with_parents(state_dir, 0711), ==, 0);
        g_test_add_func("/vtpm-start/refused-unprotected", test_refused_unprotected);
        g_test_add_func("/vtpm-start/require-names-create", test_require_names_create);
        g_test_add_func("/vtpm-start/hostkey-record", test_record);
        g_test_add_func("/vtpm-start/create-refusals", test_create_refusals);
        int r = g_test_run();
        testutil_rmtree(root);
        return r;
}
