/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Files written the crash-safe way, private directories, UUIDs, randomness. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <dirent.h>
#include <string.h>
#include <sys/random.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "nkp-private.h"

/* The base of the base layer: secret.c builds on it, never the reverse. */
void nkp_wipe(void *p, size_t len)
{
        if (p && len)
                OPENSSL_cleanse(p, len);
}

int nkp_write_all(int fd, const void *data, size_t len)
{
        const uint8_t *p = data;
        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -EIO;
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

int nkp_fsync_dir_of(const char *path)
{
        g_autofree char *dir = g_path_get_dirname(path);
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        int r = fsync(fd) < 0 ? -errno : 0;
        close(fd);
        return r;
}

int nkp_write_file_atomic(const char *path, const void *data, size_t len, mode_t mode,
                          bool exclusive)
{
        g_autofree char *tmp = g_strdup_printf("%s.tmp-XXXXXX", path);
        int fd = g_mkstemp_full(tmp, O_WRONLY | O_CLOEXEC, mode);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot create a file next to '%s': %s.", path, strerror(errno));

        int r = fchmod(fd, mode) < 0 ? -errno : 0;
        if (r == 0)
                r = nkp_write_all(fd, data, len);
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        if (r < 0) {
                unlink(tmp);
                return nkp_fail(r, "Cannot write '%s': %s.", path, strerror(-r));
        }

        if (exclusive) {
                /* link() fails if the target exists: no window where an
                 * existing file is replaced. */
                if (link(tmp, path) < 0) {
                        r = -errno;
                        unlink(tmp);
                        if (r == -EEXIST)
                                return nkp_fail(r, "'%s' already exists; refusing to overwrite it.", path);
                        return nkp_fail(r, "Cannot create '%s': %s.", path, strerror(-r));
                }
                unlink(tmp);
        } else if (rename(tmp, path) < 0) {
                r = -errno;
                unlink(tmp);
                return nkp_fail(r, "Cannot replace '%s': %s.", path, strerror(-r));
        }

        r = nkp_fsync_dir_of(path);
        if (r < 0)
                return nkp_fail(r, "Cannot sync the directory of '%s': %s.", path, strerror(-r));
        return 0;
}

int nkp_read_file(const char *path, size_t max, bool private_mode, char **ret, size_t *ret_len)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        if (fd < 0) {
                int r = -errno;
                if (r == -ENOENT)
                        return nkp_fail(r, "'%s' does not exist.", path);
                return nkp_fail(r, "Cannot open '%s': %s.", path, strerror(-r));
        }

        struct stat st;
        int r = 0;
        if (fstat(fd, &st) < 0)
                r = nkp_fail(-errno, "Cannot stat '%s': %s.", path, strerror(errno));
        else if (!S_ISREG(st.st_mode))
                r = nkp_fail(-EPERM, "'%s' is not a regular file.", path);
        else if (private_mode && ((st.st_mode & 07777) != 0600 || st.st_uid != geteuid()))
                r = nkp_fail(-EPERM,
                             "'%s' has mode %04o and owner %u; nkp requires mode 0600 and owner %u "
                             "(check who changed it, then: chmod 600 '%s').",
                             path, (unsigned) (st.st_mode & 07777), (unsigned) st.st_uid,
                             (unsigned) geteuid(), path);
        else if ((uint64_t) st.st_size > max)
                r = nkp_fail(-EFBIG, "'%s' is larger than %zu bytes.", path, max);
        if (r < 0) {
                close(fd);
                return r;
        }

        size_t cap = (size_t) st.st_size;
        char *buf = g_malloc(cap + 1);
        size_t have = 0;
        while (have < cap) {
                ssize_t n = read(fd, buf + have, cap - have);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = nkp_fail(-errno, "Cannot read '%s': %s.", path, strerror(errno));
                        break;
                }
                if (n == 0)
                        break;
                have += (size_t) n;
        }
        close(fd);
        if (r < 0) {
                nkp_wipe(buf, cap);
                g_free(buf);
                return r;
        }
        buf[have] = '\0';
        *ret = buf;
        if (ret_len)
                *ret_len = have;
        return 0;
}

/* ---- removing and renaming without following symlinks ---------------------- */

int nkp_open_parent(const char *path, char **ret_base)
{
        g_autofree char *dir = g_path_get_dirname(path);
        int fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        *ret_base = g_path_get_basename(path);
        return fd;
}

int nkp_unlink_at(int dfd, const char *name)
{
        if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
                return -errno;
        return 0;
}

int nkp_unlink_nofollow(const char *path)
{
        g_autofree char *base = NULL;
        int dfd = nkp_open_parent(path, &base);
        if (dfd < 0)
                return dfd == -ENOENT ? 0 : dfd;
        int r = nkp_unlink_at(dfd, base);
        close(dfd);
        return r;
}

int nkp_rename_nofollow(const char *from, const char *to)
{
        g_autofree char *fb = NULL, *tb = NULL;
        int ffd = nkp_open_parent(from, &fb);
        if (ffd < 0)
                return ffd;
        int tfd = nkp_open_parent(to, &tb);
        if (tfd < 0) {
                close(ffd);
                return tfd;
        }
        int r = renameat(ffd, fb, tfd, tb) < 0 ? -errno : 0;
        close(ffd);
        close(tfd);
        return r;
}

/* Depth-first, every entry by name relative to its directory's fd: a
 * symlink met anywhere is unlinked itself, never entered. */
void nkp_remove_tree_at(int dfd, const char *name)
{
        struct stat st;
        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return;
        if (!S_ISDIR(st.st_mode)) {
                (void) unlinkat(dfd, name, 0);
                return;
        }
        int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
                return;
        DIR *d = fdopendir(fd);
        if (!d) {
                close(fd);
                return;
        }
        struct dirent *e;
        while ((e = readdir(d)))
                if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
                        nkp_remove_tree_at(dirfd(d), e->d_name);
        closedir(d);
        (void) unlinkat(dfd, name, AT_REMOVEDIR);
}

void nkp_remove_tree(const char *path)
{
        g_autofree char *base = NULL;
        int dfd = nkp_open_parent(path, &base);
        if (dfd < 0)
                return;
        nkp_remove_tree_at(dfd, base);
        close(dfd);
}

int nkp_lock_file(const char *path, bool create, int *ret_fd)
{
        int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | (create ? O_CREAT : 0),
                      0600);
        if (fd < 0) {
                int e = errno;
                if (e == ENOENT && !create)
                        return -ENOENT;
                return nkp_fail(-e, "Cannot open the lock '%s': %s.", path, g_strerror(e));
        }
        while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                int e = errno;
                if (e == EINTR)
                        continue;
                close(fd);
                if (e == EWOULDBLOCK)
                        return -EBUSY;
                return nkp_fail(-e, "Cannot lock '%s': %s.", path, g_strerror(e));
        }
        *ret_fd = fd;
        return 0;
}

int nkp_mkdir_private(const char *path)
{
        if (g_mkdir_with_parents(path, 0700) < 0)
                return nkp_fail(-errno, "Cannot create the directory '%s': %s.", path, strerror(errno));
        struct stat st;
        if (stat(path, &st) < 0)
                return nkp_fail(-errno, "Cannot stat '%s': %s.", path, strerror(errno));
        if (!S_ISDIR(st.st_mode))
                return nkp_fail(-ENOTDIR, "'%s' is not a directory.", path);
        if ((st.st_mode & 0077) != 0 || st.st_uid != geteuid())
                return nkp_fail(-EPERM,
                                "The directory '%s' has mode %04o; nkp requires 0700 owned by uid %u "
                                "(check who changed it, then: chmod 700 '%s').",
                                path, (unsigned) (st.st_mode & 07777), (unsigned) geteuid(), path);
        return 0;
}

static int hexval(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

int nkp_uuid_parse(const char *s, uint8_t out[16])
{
        if (!s || strlen(s) != NKP_UUID_STRING_LEN)
                return -EINVAL;
        size_t o = 0;
        for (size_t i = 0; i < NKP_UUID_STRING_LEN;) {
                if (i == 8 || i == 13 || i == 18 || i == 23) {
                        if (s[i] != '-')
                                return -EINVAL;
                        i++;
                        continue;
                }
                int hi = hexval(s[i]), lo = hexval(s[i + 1]);
                if (hi < 0 || lo < 0)
                        return -EINVAL;
                out[o++] = (uint8_t) (hi << 4 | lo);
                i += 2;
        }
        return 0;
}

void nkp_uuid_format(const uint8_t in[16], char out[NKP_UUID_STRING_LEN + 1])
{
        snprintf(out, NKP_UUID_STRING_LEN + 1,
                 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", in[0], in[1],
                 in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9], in[10], in[11], in[12], in[13],
                 in[14], in[15]);
}

void nkp_uuid_random(char out[NKP_UUID_STRING_LEN + 1])
{
        uint8_t b[16];
        if (nkp_random_bytes(b, sizeof b) < 0)
                g_error("no randomness for a UUID");
        b[6] = (b[6] & 0x0f) | 0x40; /* version 4 */
        b[8] = (b[8] & 0x3f) | 0x80; /* RFC 4122 variant */
        nkp_uuid_format(b, out);
}

int nkp_random_bytes(void *buf, size_t len)
{
        uint8_t *p = buf;
        while (len > 0) {
                ssize_t n = getrandom(p, len, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return nkp_fail(-errno, "The kernel gave no random bytes: %s.", strerror(errno));
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

void nkp_hex_encode(const uint8_t *in, size_t len, char *out)
{
        static const char digits[] = "0123456789abcdef";
        for (size_t i = 0; i < len; i++) {
                out[2 * i] = digits[in[i] >> 4];
                out[2 * i + 1] = digits[in[i] & 15];
        }
        out[2 * len] = '\0';
}

/* ---- test-only crash injection (every layer may call it) ----------------------------------------------------- */

void nkp_test_crash_point(const char *step)
{
        static GHashTable *seen;
        const char *want = g_getenv("NKP_TEST_CRASH_AT");
        if (!want || !want[0])
                return;
        /* NKP_TEST_CRASH_AT=step dies at its first occurrence, step#N at its Nth. */
        g_autofree char *name = g_strdup(want);
        char *hash = strchr(name, '#');
        unsigned nth = 1;
        if (hash) {
                *hash = '\0';
                nth = (unsigned) g_ascii_strtoull(hash + 1, NULL, 10);
        }
        if (strcmp(name, step) != 0)
                return;
        /* The table keeps its own copy of each step: callers may build
         * `step` on the heap (hostkey.c's "OP-STEP") and free it. */
        if (!seen)
                seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        unsigned n = GPOINTER_TO_UINT(g_hash_table_lookup(seen, step)) + 1;
        g_hash_table_insert(seen, g_strdup(step), GUINT_TO_POINTER(n));
        if (n != nth)
                return;
        fprintf(stderr, "nkp: test crash at step '%s'\n", want);
        fflush(stderr);
        raise(SIGKILL);
}
