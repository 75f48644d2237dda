/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkp_secret: the one type for key bytes.  Locked in memory where the
 * process may lock it, excluded from core dumps, wiped before it is freed. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "nkp-private.h"

#define NKP_SECRET_MAX 65536
#define PASSWORD_MAX 4096

struct nkp_secret {
        size_t len;
        size_t map_len;
        uint8_t *data; /* its own anonymous mapping: lockable, MADV_DONTDUMP */
};

int nkp_secret_new(size_t len, nkp_secret **ret)
{
        if (len == 0 || len > NKP_SECRET_MAX)
                return nkp_fail(-EINVAL, "Secret length %zu is out of range.", len);

        nkp_secret *s = g_new0(nkp_secret, 1);
        long page = sysconf(_SC_PAGESIZE);
        s->len = len;
        s->map_len = (len + (size_t) page - 1) & ~((size_t) page - 1);
        void *p = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
                g_free(s);
                return nkp_fail(-ENOMEM, "Out of memory for a secret.");
        }
        s->data = p;
        (void) mlock(s->data, s->map_len);        /* best effort: RLIMIT_MEMLOCK */
        (void) madvise(s->data, s->map_len, MADV_DONTDUMP);
        *ret = s;
        return 0;
}

int nkp_secret_new_random(size_t len, nkp_secret **ret)
{
        nkp_secret *s;
        int r = nkp_secret_new(len, &s);
        if (r < 0)
                return r;
        r = nkp_random_bytes(s->data, len);
        if (r < 0) {
                nkp_secret_free(s);
                return r;
        }
        *ret = s;
        return 0;
}

int nkp_secret_new_copy(const void *data, size_t len, nkp_secret **ret)
{
        nkp_secret *s;
        int r = nkp_secret_new(len, &s);
        if (r < 0)
                return r;
        memcpy(s->data, data, len);
        *ret = s;
        return 0;
}

const uint8_t *nkp_secret_data(const nkp_secret *s)
{
        return s->data;
}

uint8_t *nkp_secret_data_mut(nkp_secret *s)
{
        return s->data;
}

size_t nkp_secret_len(const nkp_secret *s)
{
        return s->len;
}

bool nkp_secret_equal(const nkp_secret *a, const nkp_secret *b)
{
        if (!a || !b || a->len != b->len)
                return false;
        return CRYPTO_memcmp(a->data, b->data, a->len) == 0;
}

void nkp_secret_free(nkp_secret *s)
{
        if (!s)
                return;
        OPENSSL_cleanse(s->data, s->map_len);
        munlock(s->data, s->map_len);
        munmap(s->data, s->map_len);
        g_free(s);
}

int nkp_password_read_fd(int fd, nkp_secret **ret)
{
        g_autoptr(nkp_secret) buf = NULL;
        size_t have = 0;
        int r = nkp_secret_new(PASSWORD_MAX, &buf);
        if (r < 0)
                return r;

        for (;;) {
                if (have == PASSWORD_MAX)
                        return nkp_fail(-EINVAL, "The password is longer than %d bytes.", PASSWORD_MAX - 1);
                ssize_t n = read(fd, buf->data + have, PASSWORD_MAX - have);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return nkp_fail(-errno, "Cannot read the password: %s.", strerror(errno));
                if (n == 0)
                        break;
                if (memchr(buf->data + have, '\n', (size_t) n)) {
                        have += (size_t) n;
                        break;
                }
                have += (size_t) n;
        }

        size_t len = 0;
        while (len < have && buf->data[len] != '\n')
                len++;
        if (len > 0 && buf->data[len - 1] == '\r')
                len--;
        if (len == 0)
                return nkp_fail(-EINVAL, "The password is empty.");
        return nkp_secret_new_copy(buf->data, len, ret);
}

/* A password comes from a regular file, a terminal, or a pipe the caller
 * made (`cat pw | nkpctl … --password-file /dev/stdin`).  A named FIFO with
 * no writer would block forever, and a device or socket is no password
 * file: refused at once.  The open never blocks (O_NONBLOCK, cleared again
 * for reading). */
static int password_source_ok(int fd, const char *path)
{
        struct stat st;
        if (fstat(fd, &st) < 0)
                return nkp_fail(-errno, "Cannot stat the password file '%s': %s.", path,
                                strerror(errno));
        if (S_ISREG(st.st_mode) || isatty(fd))
                return 0;
        struct statfs sfs;
        if (S_ISFIFO(st.st_mode) && fstatfs(fd, &sfs) == 0 && sfs.f_type == PIPEFS_MAGIC)
                return 0; /* an anonymous pipe: its writer is the caller */
        return nkp_fail(-EINVAL,
                        "The password file '%s' is %s, not a regular file or a terminal; put "
                        "the password in a file (mode 0600) and give that.",
                        path,
                        S_ISFIFO(st.st_mode)  ? "a named FIFO"
                        : S_ISDIR(st.st_mode) ? "a directory"
                                              : "a device or socket");
}

int nkp_password_read_file(const char *path, nkp_secret **ret)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot open the password file '%s': %s.", path, strerror(errno));
        int r = password_source_ok(fd, path);
        int fl = fcntl(fd, F_GETFL);
        if (r == 0 && (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0))
                r = nkp_fail(-errno, "Cannot read the password file '%s': %s.", path,
                             strerror(errno));
        if (r < 0) {
                close(fd);
                return r;
        }
        r = nkp_password_read_fd(fd, ret);
        close(fd);
        if (r == -EINVAL && strcmp(nkp_error_message(), "The password is empty.") == 0)
                return nkp_fail(-EINVAL, "The password file '%s' is empty.", path);
        return r;
}
