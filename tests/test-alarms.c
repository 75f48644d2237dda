/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Alarms: recorded (raise/refresh/clear, file modes, damaged file) and
 * derived (provider-inactive, provider-deleted). */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "testutil.h"

/* A throwaway root without a TPM (testutil.c). */
typedef TestutilRoot Fixture;
#define setup testutil_root_setup
#define teardown testutil_root_teardown

/* The alarms as "kind/subject" strings, in list order. */
static char *alarms_text(Fixture *f)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        int r = nkp_alarm_list(f->ctx, &list, &n);
        if (r < 0)
                g_error("alarm list: %s", nkp_error_message());
        g_autoptr(GString) s = g_string_new(NULL);
        for (size_t i = 0; i < n; i++)
                g_string_append_printf(s, "%s%s/%s", i ? " " : "", nkp_alarm_kind(list[i]),
                                       nkp_alarm_subject(list[i]));
        nkp_alarm_list_free(list, n);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

static const nkp_alarm *find(nkp_alarm **list, size_t n, const char *kind, const char *subject)
{
        for (size_t i = 0; i < n; i++)
                if (strcmp(nkp_alarm_kind(list[i]), kind) == 0 &&
                    strcmp(nkp_alarm_subject(list[i]), subject) == 0)
                        return list[i];
        return NULL;
}

static void test_empty(Fixture *f, gconstpointer data)
{
        (void) data;
        /* Listing writes nothing, not even the store directory. */
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
        g_autofree char *t = alarms_text(f);
        g_assert_cmpstr(t, ==, "");
        testutil_assert_same_tree(before, f->root);
        /* Clearing nothing creates no alarm file. */
        g_assert_cmpint(nkp_alarm_clear(f->ctx, NULL, NULL), ==, 0);
        g_assert_false(g_file_test(f->ctx->alarms_path, G_FILE_TEST_EXISTS));
}

static void test_raise_refresh_clear(Fixture *f, gconstpointer data)
{
        (void) data;
        int64_t t0 = g_get_real_time() / G_USEC_PER_SEC;
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web01",
                                        "Provider 'prod' is missing; restore it, then: nkpctl host unlock"),
                        ==, 0);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "db [1] = \"x\"", "Subject with odd characters."),
                        ==, 0);

        struct stat st;
        g_assert_cmpint(stat(f->ctx->alarms_path, &st), ==, 0);
        g_assert_cmpuint(st.st_mode & 07777, ==, 0600);

        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, 0);
        g_assert_cmpuint(n, ==, 2);
        const nkp_alarm *a = find(list, n, "vm-locked", "web01");
        g_assert_nonnull(a);
        g_assert_true(g_str_has_prefix(nkp_alarm_message(a), "Provider 'prod' is missing"));
        int64_t since = nkp_alarm_since(a);
        g_assert_cmpint(since, >=, t0);
        g_assert_nonnull(find(list, n, "vm-locked", "db [1] = \"x\""));
        nkp_alarm_list_free(list, n);

        /* Raising again refreshes the message, keeps `since`, adds nothing. */
        g_usleep(1100 * 1000);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web01", "Still locked."), ==, 0);
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, 0);
        g_assert_cmpuint(n, ==, 2);
        a = find(list, n, "vm-locked", "web01");
        g_assert_cmpstr(nkp_alarm_message(a), ==, "Still locked.");
        g_assert_cmpint(nkp_alarm_since(a), ==, since);
        nkp_alarm_list_free(list, n);

        /* Clear one subject, then the kind. */
        g_assert_cmpint(nkp_alarm_clear(f->ctx, "vm-locked", "web01"), ==, 0);
        g_autofree char *t1 = alarms_text(f);
        g_assert_cmpstr(t1, ==, "vm-locked/db [1] = \"x\"");
        g_assert_cmpint(nkp_alarm_clear(f->ctx, "other-kind", NULL), ==, 0);
        g_autofree char *t2 = alarms_text(f);
        g_assert_cmpstr(t2, ==, "vm-locked/db [1] = \"x\"");
        g_assert_cmpint(nkp_alarm_clear(f->ctx, "vm-locked", NULL), ==, 0);
        g_autofree char *t3 = alarms_text(f);
        g_assert_cmpstr(t3, ==, "");

        /* No temp files left. */
        GDir *d = g_dir_open(f->ctx->store_dir, 0, NULL);
        const char *name;
        while ((name = g_dir_read_name(d)))
                g_assert_null(strstr(name, ".tmp-"));
        g_dir_close(d);
}

static void test_bad_input(Fixture *f, gconstpointer data)
{
        (void) data;
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web01", "fine"), ==, 0);
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "Bad Kind", "x", "m"), ==, -EINVAL);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "", "x", "m"), ==, -EINVAL);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "k", "", "m"), ==, -EINVAL);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "k", "x", "two\nlines"), ==, -EINVAL);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "k", "x", NULL), ==, -EINVAL);
        testutil_assert_same_tree(before, f->root);

        /* A damaged or non-private alarm file is refused, not rewritten. */
        g_assert_cmpint(chmod(f->ctx->alarms_path, 0644), ==, 0);
        before = (g_hash_table_unref(before), testutil_snapshot_tree(f->root));
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, -EPERM);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web02", "m"), ==, -EPERM);
        testutil_assert_same_tree(before, f->root);

        const char junk[] = "[nkp]\nversion=1\n[alarm x\n";
        g_assert_cmpint(nkp_write_file_atomic(f->ctx->alarms_path, junk, strlen(junk), 0600, false), ==, 0);
        before = (g_hash_table_unref(before), testutil_snapshot_tree(f->root));
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), f->ctx->alarms_path));
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web02", "m"), ==, -EBADMSG);
        g_assert_cmpint(nkp_alarm_clear(f->ctx, NULL, NULL), ==, -EBADMSG);
        testutil_assert_same_tree(before, f->root);
}

static void mark_backed_up(Fixture *f, const char *name)
{
        int fd = -1;
        g_autoptr(NkpStore) s = NULL;
        g_assert_cmpint(nkp_store_lock(f->ctx, &fd), ==, 0);
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, 0);
        nkp_store_find(s, name)->flags |= NKP_PROVIDER_BACKED_UP;
        g_assert_cmpint(nkp_store_save(f->ctx, s), ==, 0);
        nkp_store_unlock(fd);
}

static void test_derived(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_provider) a = NULL, b = NULL;
        g_assert_cmpint(nkp_provider_create(f->ctx, "a", 0, &a), ==, 0);
        g_assert_cmpint(nkp_provider_create(f->ctx, "b", 0, &b), ==, 0);
        g_assert_cmpint(nkp_alarm_raise(f->ctx, "vm-locked", "web01", "m"), ==, 0);

        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(f->ctx, &list, &n), ==, 0);
        g_assert_cmpuint(n, ==, 3);
        /* Derived first (since 0), then recorded, oldest first. */
        g_assert_cmpstr(nkp_alarm_kind(list[0]), ==, "provider-inactive");
        g_assert_cmpstr(nkp_alarm_subject(list[0]), ==, "a");
        g_assert_cmpint(nkp_alarm_since(list[0]), ==, 0);
        g_assert_nonnull(strstr(nkp_alarm_message(list[0]), "nkpctl provider backup a"));
        g_assert_cmpstr(nkp_alarm_subject(list[1]), ==, "b");
        g_assert_cmpstr(nkp_alarm_kind(list[2]), ==, "vm-locked");
        nkp_alarm_list_free(list, n);

        mark_backed_up(f, "a");
        g_autofree char *t1 = alarms_text(f);
        g_assert_cmpstr(t1, ==, "provider-inactive/b vm-locked/web01");

        /* Deleted from the store while its key is cached. */
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_provider_get_kdk(f->ctx, nkp_provider_key_id(a), &kdk), ==, 0);
        g_autoptr(GArray) cached = NULL;
        g_assert_cmpint(nkp_cache_list(f->ctx, &cached), ==, 0);
        bool cache_works = cached->len > 0;
        g_assert_cmpint(nkp_provider_delete(f->ctx, "a", 0, false), ==, 0);
        g_autofree char *t2 = alarms_text(f);
        if (cache_works) {
                g_assert_cmpstr(t2, ==, "provider-deleted/a provider-inactive/b vm-locked/web01");
                nkp_cache_flush(f->ctx);
                g_autofree char *t3 = alarms_text(f);
                g_assert_cmpstr(t3, ==, "provider-inactive/b vm-locked/web01");
        } else {
                g_test_message("no key cache here: provider-deleted not checked");
                g_assert_cmpstr(t2, ==, "provider-inactive/b vm-locked/web01");
        }
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(path, fn) g_test_add(path, Fixture, NULL, setup, fn, teardown)
        ADD("/alarms/empty", test_empty);
        ADD("/alarms/raise-refresh-clear", test_raise_refresh_clear);
        ADD("/alarms/bad-input", test_bad_input);
        ADD("/alarms/derived", test_derived);
        return g_test_run();
}
