/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkp_secret, passwords, atomic files, UUIDs. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "testutil.h"

static void test_secret_random(void)
{
        g_autoptr(nkp_secret) a = NULL, b = NULL;
        g_assert_cmpint(nkp_secret_new_random(32, &a), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(32, &b), ==, 0);
        g_assert_cmpuint(nkp_secret_len(a), ==, 32);
        g_assert_false(nkp_secret_equal(a, b));
        g_autoptr(nkp_secret) c = NULL;
        g_assert_cmpint(nkp_secret_new_copy(nkp_secret_data(a), 32, &c), ==, 0);
        g_assert_true(nkp_secret_equal(a, c));
}

static void test_secret_bad_length(void)
{
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_secret_new(0, &s), ==, -EINVAL);
        g_assert_null(s);
        g_assert_cmpint(nkp_secret_new(1 << 20, &s), ==, -EINVAL);
        g_assert_nonnull(strstr(nkp_error_message(), "out of range"));
}

static void write_text(const char *path, const char *text)
{
        g_assert_true(g_file_set_contents(path, text, -1, NULL));
}

static void test_password_file(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *path = g_build_filename(dir, "pw", NULL);
        g_autoptr(nkp_secret) pw = NULL;

        write_text(path, "correct horse\nsecond line\n");
        g_assert_cmpint(nkp_password_read_file(path, &pw), ==, 0);
        g_assert_cmpuint(nkp_secret_len(pw), ==, 13);
        g_assert_cmpmem(nkp_secret_data(pw), 13, "correct horse", 13);

        nkp_secret *none = NULL;
        write_text(path, "");
        g_assert_cmpint(nkp_password_read_file(path, &none), ==, -EINVAL);
        g_assert_nonnull(strstr(nkp_error_message(), "is empty"));
        write_text(path, "\n");
        g_assert_cmpint(nkp_password_read_file(path, &none), ==, -EINVAL);
        g_assert_null(none);
        g_autofree char *missing = g_build_filename(dir, "missing", NULL);
        g_assert_cmpint(nkp_password_read_file(missing, &none), ==, -ENOENT);
        testutil_rmtree(dir);
}

static void test_atomic_write(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *path = g_build_filename(dir, "f", NULL);
        g_assert_cmpint(nkp_write_file_atomic(path, "one", 3, 0600, true), ==, 0);
        g_assert_cmpint(nkp_write_file_atomic(path, "two", 3, 0600, true), ==, -EEXIST);
        g_autofree char *data = NULL;
        size_t len;
        g_assert_cmpint(nkp_read_file(path, 100, true, &data, &len), ==, 0);
        g_assert_cmpstr(data, ==, "one");
        g_assert_cmpint(nkp_write_file_atomic(path, "three", 5, 0600, false), ==, 0);
        g_free(g_steal_pointer(&data));
        g_assert_cmpint(nkp_read_file(path, 100, true, &data, &len), ==, 0);
        g_assert_cmpstr(data, ==, "three");

        /* Wrong mode: refused, with the fix in the message. */
        g_assert_cmpint(chmod(path, 0644), ==, 0);
        g_free(g_steal_pointer(&data));
        g_assert_cmpint(nkp_read_file(path, 100, true, &data, &len), ==, -EPERM);
        g_assert_nonnull(strstr(nkp_error_message(), "chmod 600"));
        /* No temp files left behind. */
        GDir *d = g_dir_open(dir, 0, NULL);
        int n = 0;
        while (g_dir_read_name(d))
                n++;
        g_dir_close(d);
        g_assert_cmpint(n, ==, 1);
        testutil_rmtree(dir);
}

static void test_uuid(void)
{
        uint8_t b[16];
        char s[37];
        nkp_uuid_random(s);
        g_assert_true(g_uuid_string_is_valid(s));
        g_assert_cmpint(nkp_uuid_parse(s, b), ==, 0);
        char t[37];
        nkp_uuid_format(b, t);
        g_assert_cmpstr(s, ==, t);
        g_assert_cmpint(nkp_uuid_parse("not-a-uuid", b), ==, -EINVAL);
        g_assert_cmpint(nkp_uuid_parse("0123456789abcdef0123456789abcdef0123", b), ==, -EINVAL);
        g_assert_cmpint(nkp_uuid_parse("01234567-89ab-cdef-0123-456789abcdeg", b), ==, -EINVAL);
}

static void test_private_dir(void)
{
        g_autofree char *dir = testutil_mkdtemp();
        g_autofree char *sub = g_build_filename(dir, "a", "b", NULL);
        g_assert_cmpint(nkp_mkdir_private(sub), ==, 0);
        struct stat st;
        g_assert_cmpint(stat(sub, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 07777, ==, 0700);
        g_assert_cmpint(chmod(sub, 0755), ==, 0);
        g_assert_cmpint(nkp_mkdir_private(sub), ==, -EPERM);
        testutil_rmtree(dir);
}

/* A secret with nkp's UUID defined beforehand by someone else is reused
 * only when its XML (as libvirt returns it) says ephemeral and private.
 * libvirt's test:///default driver has no secrets, so the decision is
 * tested on the XML; nkp_virt_secret_define refuses (-EEXIST, one line)
 * whatever it rejects. */
static void test_virt_secret_reusable(void)
{
        static const struct {
                const char *xml;
                bool reuse;
        } rows[] = {
                { "<secret ephemeral='yes' private='yes'><uuid>U</uuid></secret>", true },
                { "<secret ephemeral=\"yes\" private=\"yes\">\n  <uuid>U</uuid>\n  <usage type='vtpm'>"
                  "<name>nkp-vtpm-x</name></usage>\n</secret>\n", true },
                { "<secret ephemeral='no' private='no'><uuid>U</uuid></secret>", false },
                { "<secret ephemeral='yes' private='no'><uuid>U</uuid></secret>", false },
                { "<secret ephemeral='no' private='yes'><uuid>U</uuid></secret>", false },
                { "<secret private='yes'><uuid>U</uuid></secret>", false },
                { "<secret ephemeral='yes'><uuid>U</uuid></secret>", false },
                { "<secret ephemeral='YES' private='yes'/>", false },
                { "<secret ephemeral='yes ' private='yes'/>", false },
                { "<notasecret ephemeral='yes' private='yes'/>", false },
                { "<secret ephemeral='yes' private='yes'", false },
                { "", false },
                { NULL, false },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(rows); i++) {
                g_test_message("row %zu: %s", i, rows[i].xml ? rows[i].xml : "(null)");
                g_assert_cmpint(nkp_virt_secret_xml_reusable(rows[i].xml), ==, rows[i].reuse);
        }
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/secret/random", test_secret_random);
        g_test_add_func("/secret/bad-length", test_secret_bad_length);
        g_test_add_func("/secret/password-file", test_password_file);
        g_test_add_func("/util/atomic-write", test_atomic_write);
        g_test_add_func("/util/uuid", test_uuid);
        g_test_add_func("/util/private-dir", test_private_dir);
        g_test_add_func("/virt/secret-reusable", test_virt_secret_reusable);
        return g_test_run();
}
