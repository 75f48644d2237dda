/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The provider store file: round trip, modes, lock, strict loading of
 * damaged files (each refused with a clear sentence, nothing changed). */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "testutil.h"

typedef struct {
        char *root;
        nkp_context *ctx;
} Fixture;

static void setup(Fixture *f, gconstpointer data)
{
        (void) data;
        f->root = testutil_mkdtemp();
        g_assert_cmpint(nkp_context_new(f->root, &f->ctx), ==, 0);
}

static void teardown(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_context_free(f->ctx);
        testutil_rmtree(f->root);
        g_free(f->root);
}

static NkpStoreEntry *entry(const char *name, unsigned flags, bool tpm)
{
        NkpStoreEntry *e = g_new0(NkpStoreEntry, 1);
        g_strlcpy(e->name, name, sizeof e->name);
        nkp_uuid_random(e->key_id);
        memset(e->fingerprint, 'a', 64);
        e->fingerprint[0] = name[0] >= 'a' && name[0] <= 'f' ? name[0] : '0';
        e->flags = flags;
        e->created = 1700000000;
        if (tpm) {
                e->seal = NKP_SEAL_TPM;
                e->tpm_blob = g_bytes_new("\x00\x01sealed-blob\xff", 14);
                e->tpm_srk_name = g_strdup("000b1234abcd");
        } else {
                e->seal = NKP_SEAL_NONE;
                g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &e->kdk), ==, 0);
        }
        return e;
}

static void save_store(Fixture *f, NkpStore *s)
{
        int fd = -1;
        g_assert_cmpint(nkp_store_lock(f->ctx, &fd), ==, 0);
        g_assert_cmpint(nkp_store_save(f->ctx, s), ==, 0);
        nkp_store_unlock(fd);
}

static NkpStore *two_entries(void)
{
        NkpStore *s = g_new0(NkpStore, 1);
        s->entries = g_ptr_array_new_with_free_func((GDestroyNotify) nkp_store_entry_free);
        g_ptr_array_add(s->entries, entry("alpha", NKP_PROVIDER_BACKED_UP | NKP_PROVIDER_DEFAULT, false));
        g_ptr_array_add(s->entries, entry("beta.2_x-y", NKP_PROVIDER_REQUIRE_TPM, true));
        return s;
}

static void assert_mode(const char *path, unsigned mode)
{
        struct stat st;
        g_assert_cmpint(stat(path, &st), ==, 0);
        g_assert_cmpuint(st.st_mode & 07777, ==, mode);
}

static void assert_no_temp_files(const char *dir)
{
        GDir *d = g_dir_open(dir, 0, NULL);
        g_assert_nonnull(d);
        const char *name;
        while ((name = g_dir_read_name(d)))
                if (strstr(name, ".tmp-"))
                        g_error("temp file '%s' left in %s", name, dir);
        g_dir_close(d);
}

static void test_missing_is_empty(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
        g_autoptr(NkpStore) s = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, 0);
        g_assert_cmpuint(s->entries->len, ==, 0);
        testutil_assert_same_tree(before, f->root);
}

static void test_round_trip(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpStore) s = two_entries();
        save_store(f, s);

        assert_mode(f->ctx->store_dir, 0700);
        assert_mode(f->ctx->store_path, 0600);
        assert_no_temp_files(f->ctx->store_dir);

        g_autoptr(NkpStore) back = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &back), ==, 0);
        g_assert_cmpuint(back->entries->len, ==, 2);
        for (guint i = 0; i < 2; i++) {
                NkpStoreEntry *a = s->entries->pdata[i], *b = back->entries->pdata[i];
                g_assert_cmpstr(a->name, ==, b->name);
                g_assert_cmpstr(a->key_id, ==, b->key_id);
                g_assert_cmpstr(a->fingerprint, ==, b->fingerprint);
                g_assert_cmpuint(a->flags, ==, b->flags);
                g_assert_cmpint(a->created, ==, b->created);
                g_assert_cmpint(a->seal, ==, b->seal);
                if (a->seal == NKP_SEAL_NONE) {
                        g_assert_nonnull(b->kdk);
                        g_assert_true(nkp_secret_equal(a->kdk, b->kdk));
                        g_assert_null(b->tpm_blob);
                } else {
                        g_assert_null(b->kdk);
                        g_assert_true(g_bytes_equal(a->tpm_blob, b->tpm_blob));
                        g_assert_cmpstr(a->tpm_srk_name, ==, b->tpm_srk_name);
                }
        }
        g_assert_true(nkp_store_find(back, "alpha") == back->entries->pdata[0]);
        g_assert_null(nkp_store_find(back, "gamma"));
        NkpStoreEntry *b1 = back->entries->pdata[1];
        g_autofree char *upper = g_ascii_strup(b1->key_id, -1);
        g_assert_true(nkp_store_find_key_id(back, upper) == b1);

        /* The file is readable as a plain GKeyFile with the documented keys. */
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_assert_true(g_key_file_load_from_file(kf, f->ctx->store_path, 0, NULL));
        g_assert_cmpint(g_key_file_get_integer(kf, "nkp", "version", NULL), ==, 1);
        g_autofree char *flags = g_key_file_get_string(kf, "provider alpha", "flags", NULL);
        g_assert_cmpstr(flags, ==, "default;backed-up;");
        g_autofree char *sealed = g_key_file_get_string(kf, "provider beta.2_x-y", "sealed", NULL);
        g_assert_cmpstr(sealed, ==, "tpm");
        g_autofree char *created = g_key_file_get_string(kf, "provider alpha", "created", NULL);
        g_assert_cmpstr(created, ==, "2023-11-14T22:13:20Z");
}

static void test_lock_exclusive(Fixture *f, gconstpointer data)
{
        (void) data;
        int fd = -1;
        g_assert_cmpint(nkp_store_lock(f->ctx, &fd), ==, 0);
        assert_mode(f->ctx->lock_path, 0600);
        int other = open(f->ctx->lock_path, O_RDWR | O_CLOEXEC);
        g_assert_cmpint(other, >=, 0);
        g_assert_cmpint(flock(other, LOCK_EX | LOCK_NB), ==, -1);
        g_assert_cmpint(errno, ==, EWOULDBLOCK);
        nkp_store_unlock(fd);
        g_assert_cmpint(flock(other, LOCK_EX | LOCK_NB), ==, 0);
        close(other);
}

static void test_stale_temp_file(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpStore) s = two_entries();
        save_store(f, s);
        /* A writer "crashed" between creating its temp file and the rename. */
        g_autofree char *stale = g_strconcat(f->ctx->store_path, ".tmp-Ab12Cd", NULL);
        g_assert_true(g_file_set_contents(stale, "[nkp]\nversion=1\n[provider half", -1, NULL));
        g_assert_cmpint(chmod(stale, 0600), ==, 0);

        g_autoptr(NkpStore) back = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &back), ==, 0);
        g_assert_cmpuint(back->entries->len, ==, 2);

        /* The next writer removes it. */
        save_store(f, back);
        g_assert_false(g_file_test(stale, G_FILE_TEST_EXISTS));
        assert_no_temp_files(f->ctx->store_dir);
}

static char *valid_text(Fixture *f)
{
        g_autoptr(NkpStore) s = two_entries();
        save_store(f, s);
        char *text = NULL;
        g_assert_true(g_file_get_contents(f->ctx->store_path, &text, NULL, NULL));
        return text;
}

static void write_store(Fixture *f, const char *text)
{
        g_assert_cmpint(nkp_write_file_atomic(f->ctx->store_path, text, strlen(text), 0600, false), ==, 0);
}

/* Loads the store, expects `err` and a message naming the file and the
 * fix, and proves the load changed nothing. */
static void expect_refused(Fixture *f, int err, const char *needle)
{
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
        NkpStore *s = NULL;
        int r = nkp_store_load(f->ctx, &s);
        if (r != err)
                g_error("expected %d, got %d (%s)", err, r, nkp_error_message());
        g_assert_null(s);
        const char *msg = nkp_error_message();
        g_assert_nonnull(strstr(msg, f->ctx->store_path));
        if (needle && !strstr(msg, needle))
                g_error("message '%s' lacks '%s'", msg, needle);
        g_test_message("refused: %s", msg);
        testutil_assert_same_tree(before, f->root);
}

static char *replace(const char *text, const char *from, const char *to)
{
        g_assert_nonnull(strstr(text, from));
        g_autoptr(GString) s = g_string_new(text);
        g_string_replace(s, from, to, 1);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

static void test_corrupted(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *good = valid_text(f);
        g_autofree char *alpha_id = NULL, *beta_id = NULL;
        {
                g_autoptr(GKeyFile) kf = g_key_file_new();
                g_assert_true(g_key_file_load_from_data(kf, good, (gsize) -1, 0, NULL));
                alpha_id = g_key_file_get_string(kf, "provider alpha", "key_id", NULL);
                beta_id = g_key_file_get_string(kf, "provider beta.2_x-y", "key_id", NULL);
        }
        g_autofree char *alpha_key = g_strconcat("key_id=", alpha_id, NULL);
        g_autofree char *beta_key = g_strconcat("key_id=", beta_id, NULL);
        g_autofree char *upper_id = g_ascii_strup(alpha_id, -1);
        g_autofree char *upper_key = g_strconcat("key_id=", upper_id, NULL);

        const struct {
                const char *what;
                char *text;
                int err;
                const char *needle;
        } cases[] = {
                { "garbage", g_strdup("this is not a key file\n\x01\x02"), -EBADMSG, "damaged" },
                { "empty", g_strdup(""), -EBADMSG, "version" },
                { "truncated", g_strndup(good, strlen(good) / 2), -EBADMSG, "damaged" },
                { "no version", replace(good, "version=1\n", ""), -EBADMSG, "version" },
                { "future version", replace(good, "version=1", "version=2"), -EPROTONOSUPPORT, "version" },
                { "duplicate group", g_strconcat(good, "\n[provider alpha]\nname=alpha\n", NULL), -EBADMSG,
                  "twice" },
                { "duplicate key", replace(good, "sealed=none", "sealed=none\nsealed=none"), -EBADMSG,
                  "twice" },
                { "unknown key", replace(good, "sealed=none", "sealed=none\ncolour=blue"), -EBADMSG,
                  "colour" },
                { "unknown group", g_strconcat(good, "\n[other]\nx=1\n", NULL), -EBADMSG, "other" },
                { "bad name", replace(good, "name=alpha", "name=al pha"), -EBADMSG, "name" },
                { "group/name mismatch", replace(good, "[provider alpha]", "[provider alpha2]"), -EBADMSG,
                  "name" },
                { "bad uuid", replace(good, alpha_key, "key_id=not-a-uuid"), -EBADMSG, "UUID" },
                { "upper-case uuid", replace(good, alpha_key, upper_key), -EBADMSG, "UUID" },
                { "duplicate key id", replace(good, beta_key, alpha_key), -EBADMSG, "twice" },
                { "bad fingerprint", replace(good, "fingerprint=a", "fingerprint=Z"), -EBADMSG,
                  "fingerprint" },
                { "short kdk", NULL, -EBADMSG, "kdk" },
                { "kdk not base64", NULL, -EBADMSG, "kdk" },
                { "unknown flag", replace(good, "flags=default;", "flags=deafult;"), -EBADMSG, "deafult" },
                { "two defaults", replace(good, "flags=require-tpm;", "flags=default;require-tpm;"),
                  -EBADMSG, "default" },
                { "sealed tpm with kdk", replace(good, "sealed=none", "sealed=tpm"), -EBADMSG, "tpm" },
                { "sealed unknown", replace(good, "sealed=none", "sealed=maybe"), -EBADMSG, "maybe" },
                { "bad created", replace(good, "created=2023-11-14T22:13:20Z", "created=yesterday"),
                  -EBADMSG, "yesterday" },
                { "no blob", replace(good, "tpm_blob=", "tpm_blab="), -EBADMSG, "tpm" },
                /* Found by fuzz-store: both loaded, then saved differently. */
                { "created not as nkp writes it",
                  replace(good, "created=2023-11-14T22:13:20Z", "created=2023-11-14T23:13:20+01:00"),
                  -EBADMSG, "creation time" },
                { "flags not UTF-8", replace(good, "flags=default;", "flags=def\xe8ult;"), -EBADMSG,
                  "flags" },
        };

        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                char *text = cases[i].text;
                if (!text) {
                        /* Replace the kdk line with a 31-byte key or non-base64. */
                        const char *k = strstr(good, "\nkdk=");
                        g_assert_nonnull(k);
                        const char *end = strchr(k + 1, '\n');
                        g_autofree char *line = g_strndup(k, (size_t) (end - k));
                        const char *repl = strcmp(cases[i].what, "short kdk") == 0
                                                   ? "\nkdk=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
                                                   : "\nkdk=!!!!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
                        text = replace(good, line, repl);
                }
                g_test_message("case: %s", cases[i].what);
                write_store(f, text);
                expect_refused(f, cases[i].err, cases[i].needle);
                g_free(text);
        }
        /* The good text still loads (the cases above did not depend on
         * leftover state). */
        write_store(f, good);
        g_autoptr(NkpStore) s = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, 0);
}

static void test_too_many(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(NkpStore) s = g_new0(NkpStore, 1);
        s->entries = g_ptr_array_new_with_free_func((GDestroyNotify) nkp_store_entry_free);
        for (int i = 0; i < NKP_MAX_PROVIDERS + 1; i++) {
                g_autofree char *name = g_strdup_printf("p%02d", i);
                g_ptr_array_add(s->entries, entry(name, 0, false));
        }
        /* The writer does not check the limit (provider.c does); a file with
         * 33 providers must still be refused by the reader. */
        save_store(f, s);
        expect_refused(f, -EBADMSG, "more than 32");
}

static void test_wrong_mode(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *good = valid_text(f);
        g_assert_nonnull(good);
        g_assert_cmpint(chmod(f->ctx->store_path, 0644), ==, 0);
        g_autoptr(GHashTable) before = testutil_snapshot_tree(f->root);
        NkpStore *s = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, -EPERM);
        g_assert_nonnull(strstr(nkp_error_message(), f->ctx->store_path));
        g_assert_nonnull(strstr(nkp_error_message(), "chmod 600"));
        testutil_assert_same_tree(before, f->root);

        g_assert_cmpint(chmod(f->ctx->store_path, 0600), ==, 0);
        g_assert_cmpint(chmod(f->ctx->store_dir, 0755), ==, 0);
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, -EPERM);
        g_assert_nonnull(strstr(nkp_error_message(), "chmod 700"));
        /* A writer refuses too, and writes nothing. */
        int fd = -1;
        g_assert_cmpint(nkp_store_lock(f->ctx, &fd), ==, -EPERM);
        g_assert_cmpint(chmod(f->ctx->store_dir, 0700), ==, 0);

        /* Owned by someone else (needs root to arrange). */
        if (geteuid() == 0) {
                g_assert_cmpint(chown(f->ctx->store_path, 65534, 65534), ==, 0);
                g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, -EPERM);
                g_assert_nonnull(strstr(nkp_error_message(), "owner 65534"));
                g_assert_cmpint(chown(f->ctx->store_path, 0, 0), ==, 0);
                g_assert_cmpint(chown(f->ctx->store_dir, 65534, 65534), ==, 0);
                g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, -EPERM);
                g_assert_cmpint(chown(f->ctx->store_dir, 0, 0), ==, 0);
        } else {
                g_test_message("not root: foreign owner not checked");
        }

        /* A symlink in place of the store is refused. */
        g_autofree char *elsewhere = g_build_filename(f->root, "elsewhere", NULL);
        g_assert_cmpint(rename(f->ctx->store_path, elsewhere), ==, 0);
        g_assert_cmpint(symlink(elsewhere, f->ctx->store_path), ==, 0);
        g_assert_cmpint(nkp_store_load(f->ctx, &s), <, 0);
        g_assert_null(s);
}

/* Network-bound providers (tang.c): bind=, bind_servers=, bind_threshold=,
 * bind_jwe= instead of kdk= (sealed=none) or tpm_blob= (sealed=tpm). */
#define BOUND_STORE                                                                                   \
        "[nkp]\nversion=1\n\n"                                                                          \
        "[provider alpha]\nname=alpha\nkey_id=0078ab59-615e-467b-bdd0-04569f8e3549\n"                   \
        "fingerprint=617fa06c6957e2b94b98442593f7bdee3dc83c0dfc364a23f7c6c85028e454bf\nflags=\n"          \
        "created=2026-11-23T16:13:04Z\nsealed=none\nbind=tang\n"                                         \
        "bind_servers=http://10.0.0.1:7500;http://10.0.0.2:7500;\nbind_threshold=2\n"                    \
        "bind_jwe=eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn\n\n"                                              \
        "[provider beta]\nname=beta\nkey_id=5b3e4f8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b\n"                      \
        "fingerprint=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\nflags=\n"          \
        "created=2026-01-02T03:04:05Z\nsealed=tpm\n"                                                     \
        "tpm_srk_name=000b0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"            \
        "bind=tang\nbind_servers=https://tang.example;\nbind_threshold=1\n"                              \
        "bind_jwe=eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn\n"

static void test_bound(Fixture *f, gconstpointer data)
{
        (void) data;
        g_assert_cmpint(g_mkdir_with_parents(f->ctx->store_dir, 0700), ==, 0);
        write_store(f, BOUND_STORE);
        g_autoptr(NkpStore) s = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &s), ==, 0);
        NkpStoreEntry *a = nkp_store_find(s, "alpha"), *b = nkp_store_find(s, "beta");
        g_assert_nonnull(a);
        g_assert_nonnull(b);
        g_assert_null(a->kdk);
        g_assert_null(b->tpm_blob);
        g_assert_cmpint(a->seal, ==, NKP_SEAL_NONE);
        g_assert_cmpint(b->seal, ==, NKP_SEAL_TPM);
        g_assert_cmpuint(a->bind->threshold, ==, 2);
        g_assert_cmpuint(g_strv_length(a->bind->servers), ==, 2);
        g_assert_cmpstr(b->bind->servers[0], ==, "https://tang.example");
        g_assert_cmpstr(a->bind_jwe, ==, "eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn");
        /* saved and loaded again: the same entries, no kdk= or tpm_blob= */
        int fd = -1;
        g_assert_cmpint(nkp_store_lock(f->ctx, &fd), ==, 0);
        g_assert_cmpint(nkp_store_save(f->ctx, s), ==, 0);
        nkp_store_unlock(fd);
        g_autofree char *text = NULL;
        g_assert_true(g_file_get_contents(f->ctx->store_path, &text, NULL, NULL));
        g_assert_null(strstr(text, "kdk="));
        g_assert_null(strstr(text, "tpm_blob="));
        g_autoptr(NkpStore) s2 = NULL;
        g_assert_cmpint(nkp_store_load(f->ctx, &s2), ==, 0);
        g_assert_cmpstr(nkp_store_find(s2, "beta")->bind_jwe, ==, b->bind_jwe);
        g_assert_cmpuint(nkp_store_find(s2, "alpha")->bind->threshold, ==, 2);

        const struct {
                const char *what, *from, *to, *needle;
        } cases[] = {
                { "no bind_jwe", "bind_threshold=2\nbind_jwe=eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn\n",
                  "bind_threshold=2\n", "incomplete" },
                { "bind not tang", "sealed=none\nbind=tang", "sealed=none\nbind=nfs", "incomplete" },
                { "threshold 0", "bind_threshold=2", "bind_threshold=0", "incomplete" },
                { "threshold above the servers", "bind_threshold=2", "bind_threshold=3", "not valid" },
                { "a server that is no URL", "http://10.0.0.1:7500;", "ftp://x;", "not valid" },
                { "not a compact JWE", "bind_jwe=eyJhbGciOiJkaXIifQ..aXY.Y2lwaGVy.dGFn\n\n",
                  "bind_jwe=eyJhbGciOiJkaXIifQ\n\n", "compact JWE" },
                { "bound none with a kdk", "sealed=none\n",
                  "sealed=none\nkdk=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", "kdk" },
                { "bound tpm with a tpm_blob", "sealed=tpm\n",
                  "sealed=tpm\ntpm_blob=AE4ACAALAAAAUgAAABAAIAQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gIQ==\n", "tpm_blob" },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_test_message("case: %s", cases[i].what);
                g_autofree char *bad = replace(BOUND_STORE, cases[i].from, cases[i].to);
                write_store(f, bad);
                expect_refused(f, -EBADMSG, cases[i].needle);
        }
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(path, fn) g_test_add(path, Fixture, NULL, setup, fn, teardown)
        ADD("/store/missing-is-empty", test_missing_is_empty);
        ADD("/store/round-trip", test_round_trip);
        ADD("/store/lock-exclusive", test_lock_exclusive);
        ADD("/store/stale-temp-file", test_stale_temp_file);
        ADD("/store/corrupted", test_corrupted);
        ADD("/store/too-many", test_too_many);
        ADD("/store/wrong-mode", test_wrong_mode);
        ADD("/store/bound", test_bound);
        return g_test_run();
}
