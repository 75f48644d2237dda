/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* hostkey.c against the kernel's real fscrypt: loop-mounted ext4 images made
 * here (one with the encrypt feature, one without) and a tmpfs.  Root only;
 * skipped with the reason otherwise.  The mounts are made by the parent
 * process and the tests run in a child, so the parent unmounts everything
 * whatever happens to the child (a failed assertion aborts it). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "testutil.h"

#define KEY_ID "11111111-2222-4333-8444-555555555555"
#define HOST_ID "66666666-7777-4888-9999-aaaaaaaaaaaa"

static char *work;       /* the test's directory (images, mount points) */
static char *enc_img;    /* ext4 -O encrypt image */
static char *enc_mnt;
static char *noenc_mnt;  /* ext4 without the feature */
static char *tmpfs_mnt;

/* ---- helpers ---------------------------------------------------------------- */

static nkp_secret *test_kdk(uint8_t seed)
{
        uint8_t b[NKP_KDK_SIZE];
        for (size_t i = 0; i < sizeof b; i++)
                b[i] = (uint8_t) (seed + i);
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_secret_new_copy(b, sizeof b, &s), ==, 0);
        return s;
}

/* The host key of test_kdk(seed), added to the encrypting filesystem. */
static void add_test_key(uint8_t seed, uint8_t id[NKP_FSCRYPT_ID_SIZE])
{
        g_autoptr(nkp_secret) kdk = test_kdk(seed);
        g_autoptr(nkp_secret) key = NULL;
        g_assert_cmpint(nkp_hostkey_derive(kdk, KEY_ID, HOST_ID, &key), ==, 0);
        g_assert_cmpint(nkp_fscrypt_add_key(enc_mnt, key, id), ==, 0);
}

static void put(const char *path, const void *data, size_t len)
{
        g_assert_true(g_file_set_contents(path, data, (gssize) len, NULL));
}

static void sync_fs(const char *path)
{
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        g_assert_cmpint(fd, >=, 0);
        g_assert_cmpint(syncfs(fd), ==, 0);
        close(fd);
}

static bool image_contains(const char *needle)
{
        g_autofree char *data = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(enc_img, &data, &len, NULL));
        return memmem(data, len, needle, strlen(needle)) != NULL;
}

static int cmp_names(gconstpointer a, gconstpointer b)
{
        return strcmp(*(char *const *) a, *(char *const *) b);
}

/* Every entry under `dir`: type, mode, owner, size, times, contents or link
 * target, the user.nkp attribute.  More than testutil_snapshot_tree: protect
 * promises owners, attributes and times too. */
static void tree_walk(GString *out, const char *base, const char *rel)
{
        g_autofree char *dir = rel[0] ? g_build_filename(base, rel, NULL) : g_strdup(base);
        g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
        g_assert_nonnull(d);
        g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
        const char *n;
        while ((n = g_dir_read_name(d)))
                g_ptr_array_add(names, g_strdup(n));
        g_ptr_array_sort(names, cmp_names); /* encrypted directories list in hash order */
        for (guint i = 0; i < names->len; i++) {
                const char *name = names->pdata[i];
                g_autofree char *crel = rel[0] ? g_build_filename(rel, name, NULL) : g_strdup(name);
                g_autofree char *full = g_build_filename(base, crel, NULL);
                struct stat st;
                g_assert_cmpint(lstat(full, &st), ==, 0);
                char xattr[64] = "";
                ssize_t xl = lgetxattr(full, "user.nkp", xattr, sizeof xattr - 1);
                if (xl > 0)
                        xattr[xl] = '\0';
                g_string_append_printf(out, "%s %o %u:%u %lld %lld.%09ld x=%s ", crel,
                                       st.st_mode, st.st_uid, st.st_gid, (long long) st.st_size,
                                       (long long) st.st_mtim.tv_sec, st.st_mtim.tv_nsec, xattr);
                if (S_ISDIR(st.st_mode)) {
                        g_string_append(out, "dir\n");
                        tree_walk(out, base, crel);
                } else if (S_ISLNK(st.st_mode)) {
                        g_autofree char *t = g_file_read_link(full, NULL);
                        g_string_append_printf(out, "-> %s\n", t);
                } else {
                        g_autofree char *data = NULL;
                        gsize len = 0;
                        g_assert_true(g_file_get_contents(full, &data, &len, NULL));
                        g_autofree char *sum = g_compute_checksum_for_data(
                                G_CHECKSUM_SHA256, (const guchar *) data, len);
                        g_string_append_printf(out, "%s\n", sum);
                }
        }
}

static char *tree(const char *dir)
{
        GString *s = g_string_new(NULL);
        tree_walk(s, dir, "");
        return g_string_free(s, FALSE);
}

/* A directory like libvirt's swtpm state: nested, owned by another user,
 * a private mode, an attribute, a link, a large file with a hole. */
static void fill_dir(const char *dir)
{
        g_assert_cmpint(g_mkdir_with_parents(dir, 0711), ==, 0);
        g_autofree char *vm = g_build_filename(dir, "6f1c1a8e-1d0e-4b57-9b44-0d9a3c1f2e77", NULL);
        g_autofree char *tpm2 = g_build_filename(vm, "tpm2", NULL);
        g_assert_cmpint(g_mkdir_with_parents(tpm2, 0700), ==, 0);
        g_autofree char *permall = g_build_filename(tpm2, "tpm2-00.permall", NULL);
        put(permall, "PERMALL-STATE-MARKER", 20);
        g_assert_cmpint(chown(permall, 123, 456), ==, 0);
        g_assert_cmpint(chmod(permall, 0600), ==, 0);
        g_assert_cmpint(chown(tpm2, 123, 456), ==, 0);
        g_assert_cmpint(setxattr(permall, "user.nkp", "kept", 4, 0), ==, 0);
        g_autofree char *link = g_build_filename(vm, "current", NULL);
        g_assert_cmpint(symlink("tpm2/tpm2-00.permall", link), ==, 0);
        g_autofree char *empty = g_build_filename(dir, "empty", NULL);
        put(empty, "", 0);
        /* 3 MiB: 1 MiB data, 1 MiB hole, 1 MiB data (crosses the copy chunk). */
        g_autofree char *big = g_build_filename(dir, "vm1.save", NULL);
        int fd = open(big, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
        g_assert_cmpint(fd, >=, 0);
        g_autofree char *chunk = g_malloc(1024 * 1024);
        memset(chunk, 'S', 1024 * 1024);
        g_assert_cmpint(pwrite(fd, chunk, 1024 * 1024, 0), ==, 1024 * 1024);
        g_assert_cmpint(pwrite(fd, chunk, 1024 * 1024, 2 * 1024 * 1024), ==, 1024 * 1024);
        close(fd);
        g_autofree char *sub = g_build_filename(dir, "nvram", NULL);
        g_assert_cmpint(mkdir(sub, 0755), ==, 0);
        g_autofree char *vars = g_build_filename(sub, "vm1_VARS.fd", NULL);
        put(vars, "NVRAM", 5);
}

static void assert_no_siblings(const char *dir)
{
        const char *suffixes[] = { ".nkp-tmp",       ".nkp-new",       ".nkp-old",
                                   ".nkp-clear-tmp", ".nkp-clear-new", ".nkp-clear-old" };
        for (size_t i = 0; i < G_N_ELEMENTS(suffixes); i++) {
                g_autofree char *p = g_strconcat(dir, suffixes[i], NULL);
                g_assert_false(g_file_test(p, G_FILE_TEST_EXISTS));
        }
}

static void assert_protected(const char *dir, const uint8_t id[NKP_FSCRYPT_ID_SIZE])
{
        NkpFscryptState state;
        uint8_t got[NKP_FSCRYPT_ID_SIZE];
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, got), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_UNLOCKED);
        g_assert_cmpmem(got, sizeof got, id, NKP_FSCRYPT_ID_SIZE);
}

/* ---- derivation and host id ---------------------------------------------------------- */

static void test_derive(void)
{
        g_autoptr(nkp_secret) kdk = NULL;
        uint8_t b[NKP_KDK_SIZE];
        for (size_t i = 0; i < sizeof b; i++)
                b[i] = (uint8_t) i;
        g_assert_cmpint(nkp_secret_new_copy(b, sizeof b, &kdk), ==, 0);
        g_autoptr(nkp_secret) key = NULL;
        g_assert_cmpint(nkp_hostkey_derive(kdk, KEY_ID, HOST_ID, &key), ==, 0);
        g_assert_cmpuint(nkp_secret_len(key), ==, NKP_HOSTKEY_SIZE);
        /* Computed with Python's hmac (RFC 5869 by hand): the info layout is
         * "nkp host key v1" 0x00 key_id[16] host_id[16]. */
        g_autoptr(GBytes) want = testutil_unhex(
                "0ab340e2a5cad520673e5ec74fc763736bf84b0fd260a917448d69d741a5d93d"
                "b38cdf7e67434d39aaf48946e75823fe00450a270505393bfe122736ccce0b7c");
        g_assert_cmpmem(nkp_secret_data(key), NKP_HOSTKEY_SIZE, g_bytes_get_data(want, NULL),
                        g_bytes_get_size(want));

        /* Another host, another key. */
        g_autoptr(nkp_secret) other = NULL;
        g_assert_cmpint(nkp_hostkey_derive(kdk, KEY_ID, "66666666-7777-4888-9999-aaaaaaaaaaab",
                                           &other), ==, 0);
        g_assert_false(nkp_secret_equal(key, other));

        nkp_secret *none = NULL;
        g_assert_cmpint(nkp_hostkey_derive(kdk, "not-a-uuid", HOST_ID, &none), ==, -EINVAL);
        g_assert_cmpint(nkp_hostkey_derive(kdk, KEY_ID, NULL, &none), ==, -EINVAL);
        g_autoptr(nkp_secret) short_kdk = NULL;
        g_assert_cmpint(nkp_secret_new_copy(b, 16, &short_kdk), ==, 0);
        g_assert_cmpint(nkp_hostkey_derive(short_kdk, KEY_ID, HOST_ID, &none), ==, -EINVAL);
        g_assert_null(none);
}

static void test_host_id(void)
{
        g_autofree char *root = testutil_mkdtemp();
        g_autoptr(nkp_context) ctx = NULL;
        g_assert_cmpint(nkp_context_new(root, &ctx), ==, 0);
        char a[NKP_UUID_STRING_LEN + 1], b[NKP_UUID_STRING_LEN + 1];
        g_assert_cmpint(nkp_hostkey_host_id(ctx, false, a), ==, -ENOENT);
        g_assert_cmpint(nkp_hostkey_host_id(ctx, true, a), ==, 0);
        g_assert_cmpint(nkp_hostkey_host_id(ctx, false, b), ==, 0);
        g_assert_cmpstr(a, ==, b);
        g_autofree char *path = g_build_filename(root, "var/lib/nkp/host-id", NULL);
        put(path, "garbage\n", 8);
        g_assert_cmpint(nkp_hostkey_host_id(ctx, true, b), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), path));
        testutil_rmtree(root);
}

/* ---- real fscrypt ------------------------------------------------------------------------ */

static void test_at_rest_and_lock(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        g_autofree char *dir = g_build_filename(enc_mnt, "swtpm", NULL);
        g_autofree char *plain = g_build_filename(enc_mnt, "control", NULL);
        g_assert_cmpint(mkdir(dir, 0711), ==, 0);
        g_assert_cmpint(mkdir(plain, 0711), ==, 0);
        g_assert_cmpint(nkp_fscrypt_set_policy(dir, id), ==, 0);
        assert_protected(dir, id);
        NkpFscryptState state;
        g_assert_cmpint(nkp_fscrypt_status(plain, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_PLAIN);

        /* The same marker many times (a whole data block and more), and a
         * file name that is a marker too; another pair in the control. */
        const char *secret = "NKP-AT-REST-MARKER-7f3a9c";
        const char *secret_name = "NKP-NAME-MARKER-51c2e8";
        const char *clear = "NKP-CONTROL-MARKER-b804d1";
        GString *content = g_string_new(NULL);
        for (int i = 0; i < 400; i++)
                g_string_append(content, secret);
        g_autofree char *f = g_build_filename(dir, secret_name, NULL);
        put(f, content->str, content->len);
        g_string_truncate(content, 0);
        for (int i = 0; i < 400; i++)
                g_string_append(content, clear);
        g_autofree char *c = g_build_filename(plain, "control-file", NULL);
        put(c, content->str, content->len);
        g_string_free(content, TRUE);
        sync_fs(enc_mnt);
        g_assert_true(image_contains(clear));
        g_assert_false(image_contains(secret));
        g_assert_false(image_contains(secret_name));

        /* Remove the key: locked. */
        bool busy = true;
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id, &busy), ==, 0);
        g_assert_false(busy);
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_LOCKED);
        g_assert_cmpstr(nkp_fscrypt_state_name(state), ==, "locked");
        g_assert_cmpint(open(f, O_RDONLY | O_CLOEXEC), ==, -1); /* the clear name is gone */
        g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
        g_assert_nonnull(d);
        const char *nokey = g_dir_read_name(d);
        g_assert_nonnull(nokey);
        g_assert_cmpstr(nokey, !=, secret_name);
        g_assert_null(strstr(nokey, "MARKER"));
        g_autofree char *nokey_path = g_build_filename(dir, nokey, NULL);
        errno = 0;
        g_assert_cmpint(open(nokey_path, O_RDONLY | O_CLOEXEC), ==, -1);
        g_assert_cmpint(errno, ==, ENOKEY);
        g_autofree char *newf = g_build_filename(dir, "new", NULL);
        errno = 0;
        g_assert_cmpint(open(newf, O_WRONLY | O_CREAT | O_CLOEXEC, 0600), ==, -1);
        g_assert_cmpint(errno, ==, ENOKEY);
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id, NULL), ==, -ENOKEY);
        /* Protecting while locked: refused. */
        g_autofree char *other = g_build_filename(enc_mnt, "other", NULL);
        fill_dir(other);
        g_assert_cmpint(nkp_hostkey_protect_dir(other, id), ==, -ENOKEY);
        g_assert_nonnull(strstr(nkp_error_message(), "host unlock"));
        assert_no_siblings(other);

        /* The key again: readable, same identifier. */
        uint8_t id2[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id2);
        g_assert_cmpmem(id, sizeof id, id2, sizeof id2);
        assert_protected(dir, id);
        g_autofree char *back = NULL;
        gsize len = 0;
        g_assert_true(g_file_get_contents(f, &back, &len, NULL));
        g_assert_cmpuint(len, ==, 400 * strlen(secret));
        g_assert_true(g_str_has_prefix(back, secret));

        /* Another provider's key cannot take over the directory. */
        uint8_t id3[NKP_FSCRYPT_ID_SIZE];
        add_test_key(2, id3);
        g_assert_true(memcmp(id, id3, sizeof id) != 0);
        g_assert_cmpint(nkp_fscrypt_set_policy(dir, id3), ==, -EEXIST);
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id3), ==, -EEXIST);
        g_assert_nonnull(strstr(nkp_error_message(), dir));
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id3, NULL), ==, 0);
}

/* ---- protect: empty, non-empty, killed at every step --------------------------------- */

static void test_protect_empty(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        g_autofree char *dir = g_build_filename(enc_mnt, "empty-dir", NULL);
        g_assert_cmpint(mkdir(dir, 0711), ==, 0);
        struct stat before;
        g_assert_cmpint(stat(dir, &before), ==, 0);
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, 0);
        assert_protected(dir, id);
        /* In place: the same inode, no sibling ever made. */
        struct stat after;
        g_assert_cmpint(stat(dir, &after), ==, 0);
        g_assert_cmpuint(before.st_ino, ==, after.st_ino);
        assert_no_siblings(dir);
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, 0); /* idempotent */

        g_autofree char *with_slash = g_strconcat(dir, "/", NULL);
        g_assert_cmpint(nkp_hostkey_protect_dir(with_slash, id), ==, -EINVAL);
        g_assert_cmpint(nkp_hostkey_protect_dir("relative", id), ==, -EINVAL);
}

/* Runs protect in a child that dies by SIGKILL at `step` (NKP_TEST_CRASH_AT);
 * asserts it really died there. */
static void protect_killed_at(const char *dir, const uint8_t id[NKP_FSCRYPT_ID_SIZE],
                              const char *step)
{
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                g_setenv("NKP_TEST_CRASH_AT", step, TRUE);
                int r = nkp_hostkey_protect_dir(dir, id);
                _exit(r == 0 ? 0 : 1);
        }
        int status;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
                g_error("protect was not killed at '%s' (status %d)", step, status);
}

static void test_protect_crash(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        /* Every step where a kill leaves a different state (hostkey.c's table). */
        const char *steps[] = {
                "protect-file-copied",   /* the first file of the copy */
                "protect-file-copied#4", /* the copy half done */
                "protect-copied",        /* copy synced, still .nkp-tmp */
                "protect-new-ready",     /* .nkp-new complete */
                "protect-exchanged",     /* D encrypted, plain original at .nkp-new */
                "protect-old-named",     /* plain original at .nkp-old */
                "protect-old-removing",  /* .nkp-old partly removed */
                "protect-old-removing#3",
                NULL, /* no crash */
        };
        for (size_t i = 0; i < G_N_ELEMENTS(steps); i++) {
                g_autofree char *dir = g_strdup_printf("%s/crash%zu", enc_mnt, i);
                fill_dir(dir);
                g_autofree char *want = tree(dir);
                if (steps[i]) {
                        protect_killed_at(dir, id, steps[i]);
                        /* D itself never lacks a file, whatever the instant. */
                        g_autofree char *mid = tree(dir);
                        g_assert_cmpstr(mid, ==, want);
                }
                g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, 0);
                assert_protected(dir, id);
                assert_no_siblings(dir);
                g_autofree char *got = tree(dir);
                g_assert_cmpstr(got, ==, want);
                /* The subdirectories are encrypted too (inherited policy). */
                g_autofree char *sub = g_build_filename(dir, "nvram", NULL);
                assert_protected(sub, id);
        }
}

/* ---- unprotect: back to plain, killed at every step ------------------------------------ */

static void unprotect_killed_at(const char *dir, const uint8_t id[NKP_FSCRYPT_ID_SIZE],
                                const char *step)
{
        pid_t pid = fork();
        g_assert_cmpint(pid, >=, 0);
        if (pid == 0) {
                g_setenv("NKP_TEST_CRASH_AT", step, TRUE);
                int r = nkp_hostkey_unprotect_dir(dir, id);
                _exit(r == 0 ? 0 : 1);
        }
        int status;
        g_assert_cmpint(waitpid(pid, &status, 0), ==, pid);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
                g_error("unprotect was not killed at '%s' (status %d)", step, status);
}

static void assert_plain(const char *dir)
{
        NkpFscryptState state;
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_PLAIN);
}

static void test_unprotect_crash(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        /* Every step where a kill leaves a different state (hostkey.c's
         * second table). */
        const char *steps[] = {
                "unprotect-file-copied",   /* the first file of the plain copy */
                "unprotect-file-copied#4", /* the copy half done */
                "unprotect-copied",        /* copy synced, still .nkp-clear-tmp */
                "unprotect-new-ready",     /* .nkp-clear-new complete */
                "unprotect-exchanged",     /* D plain, encrypted original at .nkp-clear-new */
                "unprotect-old-named",     /* encrypted original at .nkp-clear-old */
                "unprotect-old-removing",  /* .nkp-clear-old partly removed */
                "unprotect-old-removing#3",
                NULL, /* no crash */
        };
        for (size_t i = 0; i < G_N_ELEMENTS(steps); i++) {
                g_autofree char *dir = g_strdup_printf("%s/uncrash%zu", enc_mnt, i);
                fill_dir(dir);
                g_autofree char *want = tree(dir);
                g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, 0);
                assert_protected(dir, id);
                if (steps[i]) {
                        unprotect_killed_at(dir, id, steps[i]);
                        /* D itself never lacks a file, whatever the instant. */
                        g_autofree char *mid = tree(dir);
                        g_assert_cmpstr(mid, ==, want);
                        /* protect refuses to run over an interrupted unprotect. */
                        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, -EUCLEAN);
                        g_assert_nonnull(strstr(nkp_error_message(), "host unprotect"));
                }
                g_assert_cmpint(nkp_hostkey_unprotect_dir(dir, id), ==, 0);
                assert_plain(dir);
                g_autofree char *sub = g_build_filename(dir, "nvram", NULL);
                assert_plain(sub);
                assert_no_siblings(dir);
                g_autofree char *got = tree(dir);
                g_assert_cmpstr(got, ==, want);
                g_assert_cmpint(nkp_hostkey_unprotect_dir(dir, id), ==, 0); /* idempotent */
        }
        /* The files written now land in clear: protection is really off. */
        g_autofree char *f = g_build_filename(enc_mnt, "uncrash0", "after-unprotect", NULL);
        const char *marker = "NKP-UNPROTECTED-MARKER-4e81a0";
        put(f, marker, strlen(marker));
        sync_fs(enc_mnt);
        g_assert_true(image_contains(marker));
}

static void test_unprotect_refusals(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        g_autofree char *dir = g_build_filename(enc_mnt, "unprot-refuse", NULL);
        fill_dir(dir);
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, 0);
        g_autofree char *want = tree(dir);

        /* Another key's identifier: not nkp's directory. */
        uint8_t other[NKP_FSCRYPT_ID_SIZE];
        memcpy(other, id, sizeof other);
        other[0] ^= 1;
        g_assert_cmpint(nkp_hostkey_unprotect_dir(dir, other), ==, -EEXIST);

        /* Locked: refused, nothing touched. */
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id, NULL), ==, 0);
        g_assert_cmpint(nkp_hostkey_unprotect_dir(dir, id), ==, -ENOKEY);
        g_assert_nonnull(strstr(nkp_error_message(), "host unlock"));
        assert_no_siblings(dir);
        add_test_key(1, id);
        g_autofree char *got = tree(dir);
        g_assert_cmpstr(got, ==, want);
        assert_protected(dir, id);

        /* An interrupted protect of this directory: finish that first. */
        g_autofree char *dir2 = g_build_filename(enc_mnt, "unprot-half", NULL);
        fill_dir(dir2);
        protect_killed_at(dir2, id, "protect-new-ready");
        g_assert_cmpint(nkp_hostkey_unprotect_dir(dir2, id), ==, -EUCLEAN);
        g_assert_nonnull(strstr(nkp_error_message(), "host protect"));
        g_assert_cmpint(nkp_hostkey_protect_dir(dir2, id), ==, 0);
        g_assert_cmpint(nkp_hostkey_unprotect_dir(dir2, id), ==, 0);
        assert_plain(dir2);
        assert_no_siblings(dir2);

        /* An empty protected directory also comes back plain. */
        g_autofree char *empty = g_build_filename(enc_mnt, "unprot-empty", NULL);
        g_assert_cmpint(mkdir(empty, 0711), ==, 0);
        g_assert_cmpint(nkp_hostkey_protect_dir(empty, id), ==, 0);
        g_assert_cmpint(nkp_hostkey_unprotect_dir(empty, id), ==, 0);
        assert_plain(empty);
        struct stat st;
        g_assert_cmpint(stat(empty, &st), ==, 0);
        g_assert_cmpint(st.st_mode & 07777, ==, 0711);
}

/* ---- host-protect.c: the record, running VMs, the hook's check -------------------------- */

static bool has_alarm(nkp_context *ctx, const char *kind, const char *subject)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        g_assert_cmpint(nkp_alarm_list(ctx, &list, &n), ==, 0);
        bool found = false;
        for (size_t i = 0; i < n; i++)
                found = found || (strcmp(nkp_alarm_kind(list[i]), kind) == 0 &&
                                  g_strcmp0(nkp_alarm_subject(list[i]), subject) == 0);
        nkp_alarm_list_free(list, n);
        return found;
}

static void test_host_protect_record(TestutilRoot *f, gconstpointer data)
{
        (void) data;
        nkp_context *ctx = f->ctx;
        g_autoptr(nkp_provider) p = NULL;
        g_assert_cmpint(nkp_provider_create(ctx, "hk", 0, &p), ==, 0);
        g_autofree char *p12 = g_build_filename(f->root, "hk.p12", NULL);
        g_autoptr(nkp_secret) pw = NULL;
        g_assert_cmpint(nkp_secret_new_copy("pw for hk", 9, &pw), ==, 0);
        g_assert_cmpint(nkp_provider_backup(ctx, "hk", p12, pw), ==, 0);
        g_assert_cmpint(nkp_provider_set_default(ctx, "hk"), ==, 0);

        g_autofree char *dir = g_build_filename(enc_mnt, "host-save", NULL);
        fill_dir(dir);
        g_autofree char *want = tree(dir);
        g_assert_cmpint(nkp_host_protect(ctx, NULL, "relative/dir"), ==, -EINVAL);

        /* A running VM (libvirt's status file): a conversion is refused. */
        g_autofree char *run = g_build_filename(f->root, "run/libvirt/qemu", NULL);
        g_assert_cmpint(g_mkdir_with_parents(run, 0700), ==, 0);
        g_autofree char *status = g_build_filename(run, "vm9.xml", NULL);
        put(status, "<domstatus/>", 12);
        g_assert_cmpint(nkp_host_protect(ctx, NULL, dir), ==, -EBUSY);
        g_assert_nonnull(strstr(nkp_error_message(), "(vm9)"));
        g_autofree char *got = tree(dir);
        g_assert_cmpstr(got, ==, want);
        assert_plain(dir);
        assert_no_siblings(dir);
        g_autoptr(nkp_hostkey_status) st0 = NULL;
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st0), ==, 0);
        g_assert_cmpuint(nkp_hostkey_status_n_dirs(st0), ==, 0);

        /* No VM: converted, recorded, fstrim said once. */
        g_assert_cmpint(unlink(status), ==, 0);
        g_assert_cmpint(nkp_host_protect(ctx, NULL, dir), ==, 0);
        g_autoptr(nkp_hostkey_status) st1 = NULL;
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st1), ==, 0);
        g_assert_cmpuint(nkp_hostkey_status_n_dirs(st1), ==, 1);
        g_assert_cmpstr(nkp_hostkey_status_dir_state(st1, 0), ==, "unlocked");
        g_assert_nonnull(nkp_hostkey_status_fstrim(st1));
        g_assert_nonnull(strstr(nkp_hostkey_status_fstrim(st1), dir));
        g_assert_cmpint(nkp_hostkey_fstrim_said(ctx), ==, 0);
        g_autoptr(nkp_hostkey_status) st2 = NULL;
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st2), ==, 0);
        g_assert_null(nkp_hostkey_status_fstrim(st2));

        /* The hook's check: unlocked, nothing to say. */
        g_assert_cmpint(nkp_hostkey_start_check(ctx, "anyvm"), ==, 0);
        /* Locked, provider here: the check adds the key itself. */
        NkpFscryptState state;
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, id), ==, 0);
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id, NULL), ==, 0);
        g_assert_cmpint(nkp_hostkey_start_check(ctx, "anyvm"), ==, 0);
        assert_protected(dir, id);
        /* Locked, provider gone: every start refused, alarm, nothing deleted. */
        g_assert_cmpint(nkp_provider_delete(ctx, "hk", 0, true), ==, 0);
        nkp_cache_flush(ctx);
        g_assert_cmpint(nkp_fscrypt_remove_key(enc_mnt, id, NULL), ==, 0);
        g_assert_cmpint(nkp_hostkey_start_check(ctx, "plainvm"), ==, -ENOKEY);
        const char *msg = nkp_error_message();
        g_test_message("refusal: %s", msg);
        g_assert_true(g_str_has_prefix(msg, "VM 'plainvm' cannot start: the host key's directories are locked ("));
        g_assert_nonnull(strstr(msg, dir));
        g_assert_nonnull(strstr(msg, "nkpctl provider restore"));
        g_assert_nonnull(strstr(msg, "nkpctl host unlock"));
        g_assert_true(has_alarm(ctx, "hostkey-locked", "plainvm"));
        g_assert_cmpint(nkp_host_key_load(ctx), ==, -ENOKEY);
        /* Unprotect cannot run either (no key to read the files with). */
        g_assert_cmpint(nkp_host_unprotect(ctx, dir), ==, -ENOKEY);
        assert_no_siblings(dir);
        /* Restore + unlock: open again, the alarm gone. */
        g_autoptr(nkp_provider) back = NULL;
        g_assert_cmpint(nkp_provider_restore(ctx, p12, pw, &back, NULL), ==, 0);
        g_assert_cmpint(nkp_host_key_load(ctx), ==, 1);
        g_assert_false(has_alarm(ctx, "hostkey-locked", "plainvm"));
        g_assert_cmpint(nkp_hostkey_start_check(ctx, "plainvm"), ==, 0);
        g_autofree char *again = tree(dir);
        g_assert_cmpstr(again, ==, want);

        /* Unprotect: refused while a VM runs, then back to plain, record gone. */
        put(status, "<domstatus/>", 12);
        g_assert_cmpint(nkp_host_unprotect(ctx, dir), ==, -EBUSY);
        assert_protected(dir, id);
        g_assert_cmpint(unlink(status), ==, 0);
        g_autofree char *other = g_build_filename(enc_mnt, "not-protected", NULL);
        g_assert_cmpint(nkp_host_unprotect(ctx, other), ==, -ENOENT);
        g_assert_cmpint(nkp_host_unprotect(ctx, NULL), ==, 0);
        assert_plain(dir);
        assert_no_siblings(dir);
        g_autofree char *after = tree(dir);
        g_assert_cmpstr(after, ==, want);
        g_autoptr(nkp_hostkey_status) st3 = NULL;
        g_assert_cmpint(nkp_hostkey_status_get(ctx, &st3), ==, 0);
        g_assert_null(nkp_hostkey_status_provider(st3));
        g_assert_cmpint(nkp_hostkey_start_check(ctx, "plainvm"), ==, 0);
        g_assert_cmpint(nkp_host_unprotect(ctx, NULL), ==, -ENOENT);
}

/* ---- refusals: nothing changed ------------------------------------------------------------ */

static void assert_refused_unchanged(const char *dir, const char *fix)
{
        g_autofree char *want = tree(dir);
        uint8_t id[NKP_FSCRYPT_ID_SIZE] = { 1 };
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, -EOPNOTSUPP);
        const char *msg = nkp_error_message();
        g_test_message("refusal: %s", msg);
        g_assert_nonnull(strstr(msg, dir));
        g_assert_nonnull(strstr(msg, fix));
        g_assert_null(strchr(msg, '\n'));
        g_autofree char *got = tree(dir);
        g_assert_cmpstr(got, ==, want);
        assert_no_siblings(dir);
        g_assert_cmpint(nkp_fscrypt_check_supported(dir), ==, -EOPNOTSUPP);
        NkpFscryptState state;
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_PLAIN);
}

static void test_refuse_ext4_without_encrypt(void)
{
        g_autofree char *dir = g_build_filename(noenc_mnt, "swtpm", NULL);
        fill_dir(dir);
        assert_refused_unchanged(dir, "tune2fs -O encrypt /dev/loop");
        g_autoptr(nkp_secret) kdk = test_kdk(1);
        g_autoptr(nkp_secret) key = NULL;
        g_assert_cmpint(nkp_hostkey_derive(kdk, KEY_ID, HOST_ID, &key), ==, 0);
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        g_assert_cmpint(nkp_fscrypt_add_key(dir, key, id), ==, -EOPNOTSUPP);
        g_autofree char *empty = g_build_filename(noenc_mnt, "empty", NULL);
        g_assert_cmpint(mkdir(empty, 0700), ==, 0);
        g_assert_cmpint(nkp_fscrypt_set_policy(empty, id), ==, -EOPNOTSUPP);
}

static void test_refuse_tmpfs(void)
{
        g_autofree char *dir = g_build_filename(tmpfs_mnt, "swtpm", NULL);
        fill_dir(dir);
        assert_refused_unchanged(dir, "tmpfs");
}

static void test_refuse_mixed_state(void)
{
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        add_test_key(1, id);
        g_autofree char *dir = g_build_filename(enc_mnt, "mixed", NULL);
        fill_dir(dir);
        g_autofree char *old = g_strconcat(dir, ".nkp-old", NULL);
        fill_dir(old);
        g_autofree char *want = tree(dir);
        g_autofree char *want_old = tree(old);
        g_assert_cmpint(nkp_hostkey_protect_dir(dir, id), ==, -EUCLEAN);
        g_assert_nonnull(strstr(nkp_error_message(), "nothing was changed"));
        g_autofree char *got = tree(dir);
        g_autofree char *got_old = tree(old);
        g_assert_cmpstr(got, ==, want);
        g_assert_cmpstr(got_old, ==, want_old);
        NkpFscryptState state;
        g_assert_cmpint(nkp_fscrypt_status(dir, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_PLAIN);

        /* A socket inside: refused, and the partial copy removed. */
        g_autofree char *sockdir = g_build_filename(enc_mnt, "with-socket", NULL);
        fill_dir(sockdir);
        g_autofree char *sock = g_build_filename(sockdir, "zz.sock", NULL);
        g_assert_cmpint(mknod(sock, S_IFSOCK | 0600, 0), ==, 0);
        g_assert_cmpint(nkp_hostkey_protect_dir(sockdir, id), ==, -EBUSY);
        assert_no_siblings(sockdir);
        g_assert_cmpint(nkp_fscrypt_status(sockdir, &state, NULL), ==, 0);
        g_assert_cmpint(state, ==, NKP_FSCRYPT_PLAIN);
}

/* ---- setup: images and mounts, made and removed by the parent ------------------------- */

static bool run(const char *cmdline, char **ret_err)
{
        g_auto(GStrv) argv = NULL;
        g_assert_true(g_shell_parse_argv(cmdline, NULL, &argv, NULL));
        g_autofree char *err = NULL;
        int status = 0;
        if (!g_spawn_sync(NULL, argv, NULL, G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL, NULL,
                          NULL, NULL, &err, &status, NULL) ||
            !g_spawn_check_wait_status(status, NULL)) {
                if (ret_err)
                        *ret_err = g_strdup_printf("%s: %s", cmdline, err ? g_strstrip(err) : "");
                return false;
        }
        return true;
}

static void unmount_all(void)
{
        const char *mnts[] = { enc_mnt, noenc_mnt, tmpfs_mnt };
        for (size_t i = 0; i < G_N_ELEMENTS(mnts); i++)
                if (mnts[i] && umount2(mnts[i], 0) < 0 && errno != EINVAL)
                        (void) umount2(mnts[i], MNT_DETACH); /* loop devices autoclear */
        testutil_rmtree(work);
}

/* NULL when everything is mounted, else why the test cannot run here. */
static char *set_up(void)
{
        if (geteuid() != 0)
                return g_strdup("needs root (loop mounts and fscrypt keys)");
        g_autofree char *mkfs = g_find_program_in_path("mkfs.ext4");
        if (!mkfs && access("/sbin/mkfs.ext4", X_OK) == 0)
                mkfs = g_strdup("/sbin/mkfs.ext4");
        if (!mkfs)
                return g_strdup("mkfs.ext4 is not installed");
        work = testutil_mkdtemp();
        enc_img = g_build_filename(work, "enc.img", NULL);
        enc_mnt = g_build_filename(work, "enc", NULL);
        noenc_mnt = g_build_filename(work, "noenc", NULL);
        tmpfs_mnt = g_build_filename(work, "tmpfs", NULL);
        g_autofree char *noenc_img = g_build_filename(work, "noenc.img", NULL);
        char *err = NULL;
        g_autofree char *c1 = g_strdup_printf("truncate -s 64M %s %s", enc_img, noenc_img);
        g_autofree char *c2 = g_strdup_printf("%s -q -F -O encrypt %s", mkfs, enc_img);
        g_autofree char *c3 = g_strdup_printf("%s -q -F %s", mkfs, noenc_img);
        g_autofree char *c4 = g_strdup_printf("mount -o loop %s %s", enc_img, enc_mnt);
        g_autofree char *c5 = g_strdup_printf("mount -o loop %s %s", noenc_img, noenc_mnt);
        g_autofree char *c6 = g_strdup_printf("mount -t tmpfs -o size=16M nkp-test %s", tmpfs_mnt);
        if (mkdir(enc_mnt, 0700) < 0 || mkdir(noenc_mnt, 0700) < 0 || mkdir(tmpfs_mnt, 0700) < 0 ||
            !run(c1, &err) || !run(c2, &err) || !run(c3, &err)) {
                unmount_all();
                return err ? err : g_strdup("cannot make the test images");
        }
        if (!run(c4, &err) || !run(c5, &err) || !run(c6, &err)) {
                unmount_all();
                return g_strdup_printf("loop/tmpfs mounts are unavailable here (%s)", err);
        }
        return NULL;
}

/* For bench/bench-hostkey-io.sh only: `test-hostkey --protect-empty DIR`
 * adds the test host key (a fixed, public test KDK: never a real one) to
 * DIR's filesystem and encrypts the empty DIR under it. */
static int protect_empty(const char *dir)
{
        g_autoptr(nkp_secret) kdk = test_kdk(1);
        g_autoptr(nkp_secret) key = NULL;
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        if (nkp_hostkey_derive(kdk, KEY_ID, HOST_ID, &key) < 0 ||
            nkp_fscrypt_add_key(dir, key, id) < 0 || nkp_fscrypt_set_policy(dir, id) < 0) {
                fprintf(stderr, "test-hostkey: %s\n", nkp_error_message());
                return 1;
        }
        return 0;
}

int main(int argc, char **argv)
{
        if (argc == 3 && strcmp(argv[1], "--protect-empty") == 0)
                return protect_empty(argv[2]);
        bool tap = false;
        for (int i = 1; i < argc; i++)
                tap = tap || strcmp(argv[i], "--tap") == 0;
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/hostkey/derive", test_derive);
        g_test_add_func("/hostkey/host-id", test_host_id);
        g_test_add_func("/hostkey/fscrypt/at-rest-and-lock", test_at_rest_and_lock);
        g_test_add_func("/hostkey/protect/empty", test_protect_empty);
        g_test_add_func("/hostkey/protect/crash-at-every-step", test_protect_crash);
        g_test_add_func("/hostkey/unprotect/crash-at-every-step", test_unprotect_crash);
        g_test_add_func("/hostkey/unprotect/refusals", test_unprotect_refusals);
        g_test_add("/hostkey/host/protect-record-lock-unprotect", TestutilRoot, NULL,
                   testutil_root_setup, test_host_protect_record, testutil_root_teardown);
        g_test_add_func("/hostkey/refuse/ext4-without-encrypt", test_refuse_ext4_without_encrypt);
        g_test_add_func("/hostkey/refuse/tmpfs", test_refuse_tmpfs);
        g_test_add_func("/hostkey/refuse/mixed-state", test_refuse_mixed_state);

        g_autofree char *why = set_up();
        if (why) {
                /* TAP's whole-file skip for meson; 77 for a direct run. */
                printf("1..0 # SKIP %s\n", why);
                return tap ? 0 : 77;
        }
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0)
                _exit(g_test_run());
        int status = 0;
        int rc = 1;
        if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status))
                rc = WEXITSTATUS(status);
        else
                printf("Bail out! the tests died (status %d)\n", status);
        unmount_all();
        return rc;
}
