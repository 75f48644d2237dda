/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <glib/gstdio.h>

#include "testutil.h"

char *testutil_mkdtemp(void)
{
        g_autoptr(GError) error = NULL;
        char *dir = g_dir_make_tmp("nkp-test-XXXXXX", &error);
        g_assert_no_error(error);
        return dir;
}

void testutil_rmtree(const char *path)
{
        if (!path)
                return;
        GDir *d = g_dir_open(path, 0, NULL);
        if (d) {
                const char *name;
                while ((name = g_dir_read_name(d))) {
                        g_autofree char *child = g_build_filename(path, name, NULL);
                        struct stat st;
                        if (lstat(child, &st) == 0 && S_ISDIR(st.st_mode)) {
                                chmod(child, 0700);
                                testutil_rmtree(child);
                        } else {
                                unlink(child);
                        }
                }
                g_dir_close(d);
        }
        rmdir(path);
}

char *testutil_vector_path(const char *file)
{
        const char *dir = g_getenv("NKP_VECTORS_DIR");
        g_autofree char *path = g_build_filename(dir ? dir : "tests/vectors", file, NULL);
        /* The vectors are part of the tree: a missing one is a failure, not a skip. */
        if (!g_file_test(path, G_FILE_TEST_IS_REGULAR))
                g_error("known-answer vectors not found at %s (tests/vectors/ in the source tree)",
                        path);
        return g_steal_pointer(&path);
}

static void snapshot_walk(GHashTable *snap, const char *base, const char *rel)
{
        g_autofree char *dir = rel[0] ? g_build_filename(base, rel, NULL) : g_strdup(base);
        GDir *d = g_dir_open(dir, 0, NULL);
        if (!d)
                return;
        const char *name;
        while ((name = g_dir_read_name(d))) {
                g_autofree char *crel = rel[0] ? g_build_filename(rel, name, NULL) : g_strdup(name);
                g_autofree char *full = g_build_filename(base, crel, NULL);
                struct stat st;
                g_assert_cmpint(lstat(full, &st), ==, 0);
                if (S_ISDIR(st.st_mode)) {
                        g_hash_table_insert(snap, g_strdup(crel),
                                            g_strdup_printf("dir %o", st.st_mode & 07777));
                        snapshot_walk(snap, base, crel);
                } else {
                        g_autofree char *data = NULL;
                        gsize len = 0;
                        g_file_get_contents(full, &data, &len, NULL);
                        g_autofree char *sum = g_compute_checksum_for_data(G_CHECKSUM_SHA256,
                                                                           (const guchar *) (data ? data : ""), len);
                        g_hash_table_insert(snap, g_strdup(crel),
                                            g_strdup_printf("file %o %s", st.st_mode & 07777, sum));
                }
        }
        g_dir_close(d);
}

GHashTable *testutil_snapshot_tree(const char *dir)
{
        GHashTable *snap = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        snapshot_walk(snap, dir, "");
        return snap;
}

void testutil_assert_same_tree(GHashTable *before, const char *dir)
{
        g_autoptr(GHashTable) after = testutil_snapshot_tree(dir);
        GHashTableIter it;
        gpointer k, v;
        g_hash_table_iter_init(&it, before);
        while (g_hash_table_iter_next(&it, &k, &v)) {
                const char *now = g_hash_table_lookup(after, k);
                if (!now)
                        g_error("%s: removed by an operation that should change nothing", (char *) k);
                g_assert_cmpstr(now, ==, v);
        }
        g_hash_table_iter_init(&it, after);
        while (g_hash_table_iter_next(&it, &k, &v))
                if (!g_hash_table_contains(before, k))
                        g_error("%s: created by an operation that should change nothing", (char *) k);
}

GBytes *testutil_unhex(const char *hex)
{
        size_t n = strlen(hex);
        g_assert_true(n % 2 == 0);
        guint8 *buf = g_malloc(n / 2 + 1);
        for (size_t i = 0; i < n / 2; i++) {
                unsigned v;
                g_assert_true(sscanf(hex + 2 * i, "%2x", &v) == 1);
                buf[i] = (guint8) v;
        }
        return g_bytes_new_take(buf, n / 2);
}

int testutil_run_tool(const char *const *argv, char **out)
{
        g_autofree char *o = NULL, *e = NULL;
        int status = 0;
        g_assert_true(g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL,
                                   &o, &e, &status, NULL));
        bool ok = g_spawn_check_wait_status(status, NULL);
        if (!ok)
                g_test_message("%s: %s%s", argv[0], o, e);
        if (out)
                *out = g_strconcat(o, e, NULL);
        return ok ? 0 : 1;
}

int testutil_run_luks_create(const char *const *argv)
{
        int r = 1;
        for (int attempt = 0; attempt < 6 && r != 0; attempt++) {
                if (attempt > 0)
                        g_usleep((gulong) (100000 << attempt)); /* 0.2 s … 3.2 s */
                g_autofree char *out = NULL;
                r = testutil_run_tool(argv, &out);
                if (r != 0 && !strstr(out, "accurate CPU usage"))
                        break;
        }
        return r;
}

bool testutil_have_qemu_tools(void)
{
        g_autofree char *img = g_find_program_in_path("qemu-img");
        g_autofree char *io = g_find_program_in_path("qemu-io");
        return img && io;
}

nkp_context *testutil_context_with_conf(const char *root, const char *conf)
{
        g_autofree char *etc = g_build_filename(root, "etc/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(etc, 0700), ==, 0);
        g_autofree char *path = g_build_filename(etc, "nkp.conf", NULL);
        g_assert_true(g_file_set_contents(path, conf ? conf : "[tpm]\ntcti=none\n", -1, NULL));
        nkp_context *ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        return ctx;
}

void testutil_default_provider(nkp_context *ctx, const char *name)
{
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, name, 0, &p), ==, 0);
        int fd = -1;
        g_autoptr(NkpStore) store = NULL;
        g_assert_cmpint(nkp_store_lock(ctx, &fd), ==, 0);
        g_assert_cmpint(nkp_store_load(ctx, &store), ==, 0);
        nkp_store_find(store, name)->flags |= NKP_PROVIDER_BACKED_UP | NKP_PROVIDER_DEFAULT;
        g_assert_cmpint(nkp_store_save(ctx, store), ==, 0);
        nkp_store_unlock(fd);
}

void testutil_root_setup(TestutilRoot *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        f->ctx = testutil_context_with_conf(f->root, NULL);
        nkp_cache_flush(f->ctx);
}

void testutil_root_teardown(TestutilRoot *f, gconstpointer data)
{
        (void) data;
        nkp_cache_flush(f->ctx);
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
}

nkp_virt *testutil_test_driver_vm1(const char *root, const char *uuid, const char *disk)
{
        g_autofree char *node = g_strdup_printf(
                "<node>\n"
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n"
                "  <name>vm1</name>\n"
                "  <uuid>%s</uuid>\n"
                "  <memory>262144</memory>\n"
                "  <os><type>hvm</type></os>\n"
                "  <devices>\n"
                "    <disk type='file' device='disk'>\n"
                "      <driver name='qemu' type='qcow2'/>\n"
                "      <source file='%s'/>\n"
                "      <target dev='vda' bus='virtio'/>\n"
                "    </disk>\n"
                "  </devices>\n"
                "  <test:runstate>5</test:runstate>\n"
                "</domain>\n"
                "</node>\n",
                uuid, disk);
        g_autofree char *node_path = g_build_filename(root, "node.xml", NULL);
        g_assert_true(g_file_set_contents(node_path, node, -1, NULL));
        g_autofree char *uri = g_strdup_printf("test://%s", node_path);
        nkp_virt *v = NULL;
        g_assert_cmpint(nkp_virt_open(uri, 0, &v), ==, 0);
        return v;
}
