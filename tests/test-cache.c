/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The key cache in the kernel keyring.  Every test runs isolated: its roots'
 * keyrings are flushed and its temp dir removed even when it fails. */
#include <errno.h>
#include <keyutils.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil-swtpm.h"
#include "testutil.h"

static nkp_context *ctx_for(const char *root)
{
        nkp_context *ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        return ctx;
}

static NkpCacheInfo info_for(const char *name)
{
        NkpCacheInfo info = { 0 };
        g_strlcpy(info.name, name, sizeof info.name);
        nkp_uuid_random(info.key_id);
        return info;
}

static nkp_secret *random_kdk(void)
{
        nkp_secret *k = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &k), ==, 0);
        return k;
}

static void mkstore(const char *root)
{
        g_autofree char *store = g_build_filename(root, "var/lib/nkp", NULL);
        g_assert_cmpint(g_mkdir_with_parents(store, 0700), ==, 0);
}

static void assert_miss(nkp_context *ctx, const char *key_id)
{
        nkp_secret *none = NULL;
        g_assert_cmpint(nkp_cache_get(ctx, key_id, &none, NULL), ==, -ENOENT);
        g_assert_null(none);
}

/* ---- basics ----------------------------------------------------------------- */

static void roundtrip_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "h", "none");
        g_autoptr(nkp_context) ctx = ctx_for(root);
        NkpCacheInfo a = info_for("alpha"), b = info_for("beta");
        g_autoptr(nkp_secret) ka = random_kdk(), kb = random_kdk();

        /* No store directory yet: a miss, an empty list, a no-op flush. */
        assert_miss(ctx, a.key_id);
        g_autoptr(GArray) empty = NULL;
        g_assert_cmpint(nkp_cache_list(ctx, &empty), ==, 0);
        g_assert_cmpuint(empty->len, ==, 0);
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        g_assert_cmpint(nkp_cache_mark_deleted(ctx, a.key_id), ==, 0);
        g_autofree char *store = g_build_filename(root, "var/lib/nkp", NULL);
        g_assert_false(g_file_test(store, G_FILE_TEST_EXISTS));

        /* put creates the store directory (0700) when needed */
        g_assert_cmpint(nkp_cache_put(ctx, &b, kb), ==, 0);
        g_assert_cmpint(nkp_cache_put(ctx, &a, ka), ==, 0);
        struct stat st;
        g_assert_cmpint(stat(store, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 0777, ==, 0700);

        g_autoptr(nkp_secret) got = NULL;
        NkpCacheInfo gi;
        g_assert_cmpint(nkp_cache_get(ctx, a.key_id, &got, &gi), ==, 0);
        g_assert_true(nkp_secret_equal(got, ka));
        g_assert_cmpstr(gi.name, ==, "alpha");
        g_assert_cmpstr(gi.key_id, ==, a.key_id);
        g_assert_false(gi.deleted);
        g_clear_pointer(&got, nkp_secret_free);
        g_assert_cmpint(nkp_cache_get(ctx, b.key_id, &got, NULL), ==, 0);
        g_assert_true(nkp_secret_equal(got, kb));
        g_clear_pointer(&got, nkp_secret_free);

        /* put again replaces */
        g_autoptr(nkp_secret) ka2 = random_kdk();
        g_assert_cmpint(nkp_cache_put(ctx, &a, ka2), ==, 0);
        g_assert_cmpint(nkp_cache_get(ctx, a.key_id, &got, NULL), ==, 0);
        g_assert_true(nkp_secret_equal(got, ka2));
        g_clear_pointer(&got, nkp_secret_free);

        /* list: sorted by name, no duplicates */
        g_autoptr(GArray) list = NULL;
        g_assert_cmpint(nkp_cache_list(ctx, &list), ==, 0);
        g_assert_cmpuint(list->len, ==, 2);
        g_assert_cmpstr(g_array_index(list, NkpCacheInfo, 0).name, ==, "alpha");
        g_assert_cmpstr(g_array_index(list, NkpCacheInfo, 1).name, ==, "beta");
        g_assert_cmpstr(g_array_index(list, NkpCacheInfo, 1).key_id, ==, b.key_id);

        /* unknown key id: a miss; malformed: -EINVAL */
        NkpCacheInfo c = info_for("gamma");
        assert_miss(ctx, c.key_id);
        nkp_secret *none = NULL;
        g_assert_cmpint(nkp_cache_get(ctx, "not-a-uuid", &none, NULL), ==, -EINVAL);
        g_assert_cmpint(nkp_cache_get(ctx, NULL, &none, NULL), ==, -EINVAL);
        NkpCacheInfo bad = { .name = "x", .key_id = "nope" };
        g_assert_cmpint(nkp_cache_put(ctx, &bad, ka), ==, -EINVAL);
        NkpCacheInfo noname = info_for("");
        g_assert_cmpint(nkp_cache_put(ctx, &noname, ka), ==, -EINVAL);
        g_autoptr(nkp_secret) short_key = NULL;
        g_assert_cmpint(nkp_secret_new_random(16, &short_key), ==, 0);
        g_assert_cmpint(nkp_cache_put(ctx, &c, short_key), ==, -EINVAL);
        assert_miss(ctx, c.key_id);

        /* a 64-character name survives */
        char longname[NKP_NAME_MAX + 1];
        memset(longname, 'n', NKP_NAME_MAX);
        longname[NKP_NAME_MAX] = '\0';
        NkpCacheInfo l = info_for(longname);
        g_assert_cmpint(nkp_cache_put(ctx, &l, ka), ==, 0);
        g_assert_cmpint(nkp_cache_get(ctx, l.key_id, &got, &gi), ==, 0);
        g_assert_cmpstr(gi.name, ==, longname);
        g_clear_pointer(&got, nkp_secret_free);

        /* flush: everything gone, as after a reboot */
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        assert_miss(ctx, a.key_id);
        assert_miss(ctx, b.key_id);
        g_autoptr(GArray) after = NULL;
        g_assert_cmpint(nkp_cache_list(ctx, &after), ==, 0);
        g_assert_cmpuint(after->len, ==, 0);
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        /* and usable again */
        g_assert_cmpint(nkp_cache_put(ctx, &a, ka), ==, 0);
        g_assert_cmpint(nkp_cache_get(ctx, a.key_id, &got, NULL), ==, 0);
}

static void test_cache_roundtrip(void)
{
        testutil_isolated(roundtrip_body);
}

/* ---- deleted flag ------------------------------------------------------------- */

static void deleted_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "h", "none");
        g_autoptr(nkp_context) ctx = ctx_for(root);
        NkpCacheInfo a = info_for("alpha"), b = info_for("beta");
        g_autoptr(nkp_secret) ka = random_kdk(), kb = random_kdk();
        g_assert_cmpint(nkp_cache_put(ctx, &a, ka), ==, 0);
        g_assert_cmpint(nkp_cache_put(ctx, &b, kb), ==, 0);

        g_assert_cmpint(nkp_cache_mark_deleted(ctx, a.key_id), ==, 0);
        g_assert_cmpint(nkp_cache_mark_deleted(ctx, a.key_id), ==, 0); /* idempotent */
        NkpCacheInfo other = info_for("other");
        g_assert_cmpint(nkp_cache_mark_deleted(ctx, other.key_id), ==, 0); /* not cached */
        g_assert_cmpint(nkp_cache_mark_deleted(ctx, "bad"), ==, -EINVAL);

        /* still usable (running VMs keep working), flagged */
        g_autoptr(nkp_secret) got = NULL;
        NkpCacheInfo gi;
        g_assert_cmpint(nkp_cache_get(ctx, a.key_id, &got, &gi), ==, 0);
        g_assert_true(nkp_secret_equal(got, ka));
        g_assert_true(gi.deleted);
        g_assert_cmpstr(gi.name, ==, "alpha");

        g_autoptr(GArray) list = NULL;
        g_assert_cmpint(nkp_cache_list(ctx, &list), ==, 0);
        g_assert_cmpuint(list->len, ==, 2);
        g_assert_true(g_array_index(list, NkpCacheInfo, 0).deleted);
        g_assert_false(g_array_index(list, NkpCacheInfo, 1).deleted);

        /* gone at the flush */
        g_assert_cmpint(nkp_cache_flush(ctx), ==, 0);
        assert_miss(ctx, a.key_id);
}

static void test_cache_deleted(void)
{
        testutil_isolated(deleted_body);
}

/* ---- scope: per store ------------------------------------------------------------ */

static void scope_body(const char *tmp)
{
        g_autofree char *ra = testutil_make_root(tmp, "host-a", "none");
        g_autofree char *rb = testutil_make_root(tmp, "host-b", "none");
        mkstore(ra);
        mkstore(rb);
        g_autoptr(nkp_context) ca = ctx_for(ra), cb = ctx_for(rb);
        NkpCacheInfo p = info_for("shared");
        g_autoptr(nkp_secret) k = random_kdk();

        g_assert_cmpint(nkp_cache_put(ca, &p, k), ==, 0);
        assert_miss(cb, p.key_id); /* host B lacks it, for the right reason */
        g_autoptr(GArray) lb = NULL;
        g_assert_cmpint(nkp_cache_list(cb, &lb), ==, 0);
        g_assert_cmpuint(lb->len, ==, 0);

        /* The same key id on B holds B's own KDK. */
        g_autoptr(nkp_secret) k2 = random_kdk();
        g_assert_cmpint(nkp_cache_put(cb, &p, k2), ==, 0);
        g_autoptr(nkp_secret) ga = NULL, gb = NULL;
        g_assert_cmpint(nkp_cache_get(ca, p.key_id, &ga, NULL), ==, 0);
        g_assert_cmpint(nkp_cache_get(cb, p.key_id, &gb, NULL), ==, 0);
        g_assert_true(nkp_secret_equal(ga, k));
        g_assert_true(nkp_secret_equal(gb, k2));

        /* Flushing B leaves A alone. */
        g_assert_cmpint(nkp_cache_flush(cb), ==, 0);
        assert_miss(cb, p.key_id);
        g_clear_pointer(&ga, nkp_secret_free);
        g_assert_cmpint(nkp_cache_get(ca, p.key_id, &ga, NULL), ==, 0);

        /* The same store reached by another path (a symlinked root) is the
         * same cache: it is keyed by the directory, not its spelling. */
        g_autofree char *link = g_build_filename(tmp, "alias", NULL);
        g_assert_cmpint(symlink(ra, link), ==, 0);
        g_autoptr(nkp_context) alias = ctx_for(link);
        g_clear_pointer(&ga, nkp_secret_free);
        g_assert_cmpint(nkp_cache_get(alias, p.key_id, &ga, NULL), ==, 0);
        g_assert_true(nkp_secret_equal(ga, k));
        unlink(link);

        /* A store directory removed and made again does not inherit the
         * old cache (same path, new directory). */
        g_autofree char *rc = testutil_make_root(tmp, "host-c", "none");
        g_autoptr(nkp_context) cc = ctx_for(rc);
        g_assert_cmpint(nkp_cache_put(cc, &p, k), ==, 0);
        g_autofree char *store_c = g_build_filename(rc, "var/lib/nkp", NULL);
        g_autofree char *moved = g_build_filename(tmp, "old-store-c", NULL);
        g_assert_cmpint(rename(store_c, moved), ==, 0);
        mkstore(rc);
        assert_miss(cc, p.key_id);
        /* clean up the old directory's keyring through a root that sees it */
        g_autofree char *rc_old = testutil_make_root(tmp, "host-c-old", "none");
        g_autofree char *old_parent = g_build_filename(rc_old, "var/lib", NULL);
        g_assert_cmpint(g_mkdir_with_parents(old_parent, 0700), ==, 0);
        g_autofree char *old_store = g_build_filename(old_parent, "nkp", NULL);
        g_assert_cmpint(rename(moved, old_store), ==, 0);
        g_autoptr(nkp_context) cold = ctx_for(rc_old);
        g_autoptr(nkp_secret) gold = NULL;
        g_assert_cmpint(nkp_cache_get(cold, p.key_id, &gold, NULL), ==, 0);
}

static void test_cache_scope(void)
{
        testutil_isolated(scope_body);
}

/* ---- lifetime and permissions ------------------------------------------------------ */

static void process_body(const char *tmp)
{
        g_autofree char *root = testutil_make_root(tmp, "h", "none");
        NkpCacheInfo a = info_for("alpha");
        g_autoptr(nkp_secret) k = random_kdk();

        /* Another process puts, and exits: the entry outlives it. */
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                nkp_context *c = NULL;
                int ok = nkp_context_new(root, &c) == 0 && nkp_cache_put(c, &a, k) == 0;
                _exit(ok ? 0 : 1);
        }
        int status;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);

        g_autoptr(nkp_context) ctx = ctx_for(root);
        g_autoptr(nkp_secret) got = NULL;
        g_assert_cmpint(nkp_cache_get(ctx, a.key_id, &got, NULL), ==, 0);
        g_assert_true(nkp_secret_equal(got, k));

        /* A process with a fresh session keyring (no possession of @u, like a
         * daemon started elsewhere) still finds it as root. */
        pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                if (keyctl_join_session_keyring(NULL) < 0)
                        _exit(2);
                nkp_context *c = NULL;
                nkp_secret *s = NULL;
                int ok = nkp_context_new(root, &c) == 0 && nkp_cache_get(c, a.key_id, &s, NULL) == 0 &&
                         nkp_secret_equal(s, k);
                _exit(ok ? 0 : 1);
        }
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        g_assert_true(WIFEXITED(status));
        g_assert_cmpint(WEXITSTATUS(status), ==, 0);

        /* Permissions: no group or other bits on the key and its keyring. */
        g_autofree char *desc = g_strconcat("nkp-kdk:", a.key_id, NULL);
        key_serial_t id = keyctl_search(KEY_SPEC_USER_KEYRING, "user", desc, 0);
        g_assert_cmpint(id, >, 0);
        char *d = NULL;
        g_assert_cmpint(keyctl_describe_alloc(id, &d), >, 0);
        g_auto(GStrv) f = g_strsplit(d, ";", 5);
        free(d);
        g_assert_cmpstr(f[0], ==, "user");
        g_assert_cmpstr(f[1], ==, "0");
        unsigned long perm = strtoul(f[3], NULL, 16);
        g_assert_cmphex(perm & 0x0000ffff, ==, 0);

        /* Another uid cannot read it, even given its serial. */
        if (geteuid() == 0) {
                pid = fork();
                g_assert_cmpint(pid, >=, 0);
                if (pid == 0) {
                        if (setresgid(65534, 65534, 65534) < 0 || setresuid(65534, 65534, 65534) < 0)
                                _exit(2);
                        char buf[256];
                        long n = keyctl_read(id, buf, sizeof buf);
                        if (n >= 0)
                                _exit(1);
                        nkp_context *c = NULL;
                        nkp_secret *s = NULL;
                        if (nkp_context_new(root, &c) == 0 &&
                            nkp_cache_get(c, a.key_id, &s, NULL) == 0)
                                _exit(1);
                        _exit(0);
                }
                g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
                g_assert_true(WIFEXITED(status));
                g_assert_cmpint(WEXITSTATUS(status), ==, 0);
        }
}

static void test_cache_process(void)
{
        testutil_isolated(process_body);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/cache/roundtrip", test_cache_roundtrip);
        g_test_add_func("/cache/deleted", test_cache_deleted);
        g_test_add_func("/cache/scope", test_cache_scope);
        g_test_add_func("/cache/process", test_cache_process);
        return g_test_run();
}
