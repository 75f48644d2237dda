/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The key cache: unsealed KDKs in the kernel keyring, for the boot.
 *
 * Kernel memory only: never on disk, never swapped as file pages; it survives
 * libvirtd, nkpctl and hook processes coming and going, and dies with the
 * reboot.  `nkpctl host flush-cache` does what a reboot does.
 *
 * One keyring per store, so that two lab hosts (or two test roots) sharing a
 * kernel never see each other's keys:
 *
 *   @u (root's user keyring)
 *    └─ keyring "nkp-cache:<dev>:<ino>[:<handle>]"   of ROOT/var/lib/nkp
 *        └─ user key "nkp-kdk:<key id>"               one per provider
 *
 * <dev>:<ino> identify the store directory; <handle> is its file handle
 * (name_to_handle_at: inode + generation) where the file system has one, so
 * a store directory removed and re-created on a reused inode does not
 * inherit the old cache.
 *
 * Permissions: possessor and owner (uid 0) only; no group or other bits, so
 * other uids can neither find nor read them.  Keyring and keys grant the
 * owner what it needs because a root process does not always possess @u
 * (it depends on its session keyring).
 *
 * Payload of a key, version 1 (140 bytes, byte fields only):
 *
 *   offset size
 *        0    4  magic "NKPC"
 *        4    1  version = 1
 *        5    1  flags: bit 0 = deleted from the store
 *        6    1  KDK length = 32
 *        7    1  reserved, zero
 *        8   36  key id (UUID string, no NUL)
 *       44   64  provider name, NUL-padded
 *      108   32  KDK
 *
 * An entry in another format (a newer nkp) is treated as a miss: the KDK is
 * then unsealed from the store again and the entry rewritten.  Every payload
 * buffer read back from the kernel is wiped before it is freed.
 */
#include <errno.h>
#include <fcntl.h>
#include <keyutils.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nkp-private.h"

#define CACHE_MAGIC "NKPC"
#define CACHE_VERSION 1
#define CACHE_FLAG_DELETED 0x01
#define KEY_PREFIX "nkp-kdk:"

typedef struct {
        char magic[4];
        uint8_t version;
        uint8_t flags;
        uint8_t kdk_len;
        uint8_t reserved;
        char key_id[NKP_UUID_STRING_LEN];
        char name[NKP_NAME_MAX];
        uint8_t kdk[NKP_KDK_SIZE];
} CachePayload;
G_STATIC_ASSERT(sizeof(CachePayload) == 140);

#define KEYRING_PERM (KEY_POS_ALL | KEY_USR_ALL)
#define KEY_PERM                                                                                  \
        (KEY_POS_VIEW | KEY_POS_READ | KEY_POS_WRITE | KEY_POS_SEARCH | KEY_POS_SETATTR |        \
         KEY_USR_VIEW | KEY_USR_READ | KEY_USR_WRITE | KEY_USR_SEARCH | KEY_USR_SETATTR)

/* ---- the per-store keyring ------------------------------------------------- */

/* -ENOENT when the store directory does not exist. */
static int keyring_description(const nkp_context *ctx, char **ret)
{
        struct stat st;
        if (stat(ctx->store_dir, &st) < 0) {
                if (errno == ENOENT)
                        return -ENOENT;
                return nkp_fail(-errno, "Cannot inspect the store directory '%s': %s.",
                                ctx->store_dir, g_strerror(errno));
        }
        GString *s = g_string_new(NULL);
        g_string_printf(s, "nkp-cache:%llx:%llu", (unsigned long long) st.st_dev,
                        (unsigned long long) st.st_ino);

        union {
                struct file_handle fh;
                uint8_t space[sizeof(struct file_handle) + MAX_HANDLE_SZ];
        } h = { .fh.handle_bytes = MAX_HANDLE_SZ };
        int mnt;
        if (name_to_handle_at(AT_FDCWD, ctx->store_dir, &h.fh, &mnt, 0) == 0) {
                char hex[2 * MAX_HANDLE_SZ + 1];
                nkp_hex_encode(h.fh.f_handle, h.fh.handle_bytes, hex);
                g_string_append_printf(s, ":%x:%s", (unsigned) h.fh.handle_type, hex);
        }
        *ret = g_string_free(s, FALSE);
        return 0;
}

static int keyctl_fail(int err, const char *what)
{
        return nkp_fail(-err,
                        "Cannot %s the key cache in the kernel keyring: %s; nkp must run as root "
                        "on a kernel with keyrings (CONFIG_KEYS).",
                        what, g_strerror(err));
}

/* Finds the store's keyring; with `create`, makes it (and the store
 * directory) when missing.  -ENOENT when it does not exist. */
static int keyring_get(nkp_context *ctx, bool create, key_serial_t *ret)
{
        g_autofree char *desc = NULL;
        int r = keyring_description(ctx, &desc);
        if (r == -ENOENT && create) {
                r = nkp_mkdir_private(ctx->store_dir);
                if (r < 0)
                        return r;
                r = keyring_description(ctx, &desc);
        }
        if (r < 0)
                return r;

        key_serial_t id = keyctl_search(KEY_SPEC_USER_KEYRING, "keyring", desc, 0);
        if (id >= 0) {
                *ret = id;
                return 0;
        }
        if (errno != ENOKEY && errno != EKEYREVOKED && errno != EKEYEXPIRED)
                return keyctl_fail(errno, "search");
        if (!create)
                return -ENOENT;

        /* add_key() of a keyring displaces one of the same name: serialize
         * the creators on the store directory, then look again. */
        int fd = open(ctx->store_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot open the store directory '%s': %s.", ctx->store_dir,
                                g_strerror(errno));
        while (flock(fd, LOCK_EX) < 0 && errno == EINTR)
                ;
        id = keyctl_search(KEY_SPEC_USER_KEYRING, "keyring", desc, 0);
        if (id < 0) {
                id = add_key("keyring", desc, NULL, 0, KEY_SPEC_USER_KEYRING);
                if (id < 0) {
                        r = keyctl_fail(errno, "create");
                } else if (keyctl_setperm(id, KEYRING_PERM) < 0) {
                        r = keyctl_fail(errno, "set the permissions of");
                        (void) keyctl_invalidate(id);
                }
        }
        close(fd);
        if (r < 0)
                return r;
        *ret = id;
        return 0;
}

static bool key_id_valid(const char *key_id)
{
        uint8_t u[16];
        return key_id && strlen(key_id) == NKP_UUID_STRING_LEN && nkp_uuid_parse(key_id, u) == 0;
}

static int bad_key_id(const char *key_id)
{
        return nkp_fail(-EINVAL, "'%s' is not a provider key id (a UUID).",
                        key_id ? key_id : "(null)");
}

/* ---- payloads ------------------------------------------------------------------ */

/* Reads the payload of key `id` into `out` (wiping every other copy).
 * -ENOENT when the key went away or is not in our format. */
static int payload_read(key_serial_t id, CachePayload *out)
{
        void *buf = NULL;
        long n = keyctl_read_alloc(id, &buf);
        if (n < 0) {
                if (errno == ENOKEY || errno == EKEYREVOKED || errno == EKEYEXPIRED)
                        return -ENOENT;
                return keyctl_fail(errno, "read");
        }
        int r = 0;
        if ((size_t) n != sizeof *out) {
                r = -ENOENT;
        } else {
                memcpy(out, buf, sizeof *out);
                if (memcmp(out->magic, CACHE_MAGIC, 4) != 0 || out->version != CACHE_VERSION ||
                    out->kdk_len != NKP_KDK_SIZE)
                        r = -ENOENT;
        }
        nkp_wipe(buf, (size_t) n);
        free(buf);
        if (r < 0) {
                nkp_wipe(out, sizeof *out);
                nkp_log(NKP_LOG_DEBUG, "Key cache entry %d is not in nkp's format; ignored.", id);
        }
        return r;
}

static void payload_info(const CachePayload *p, NkpCacheInfo *info)
{
        memset(info, 0, sizeof *info);
        memcpy(info->key_id, p->key_id, NKP_UUID_STRING_LEN);
        memcpy(info->name, p->name, NKP_NAME_MAX);
        info->name[NKP_NAME_MAX] = '\0';
        info->deleted = (p->flags & CACHE_FLAG_DELETED) != 0;
}

/* The key of `key_id` in `keyring`; -ENOENT when none. */
static int key_find(key_serial_t keyring, const char *key_id, key_serial_t *ret)
{
        g_autofree char *desc = g_strconcat(KEY_PREFIX, key_id, NULL);
        key_serial_t id = keyctl_search(keyring, "user", desc, 0);
        if (id < 0) {
                if (errno == ENOKEY || errno == EKEYREVOKED || errno == EKEYEXPIRED)
                        return -ENOENT;
                return keyctl_fail(errno, "search");
        }
        *ret = id;
        return 0;
}

/* ---- API --------------------------------------------------------------------- */

int nkp_cache_get(nkp_context *ctx, const char *key_id, nkp_secret **ret, NkpCacheInfo *ret_info)
{
        key_serial_t keyring, id;
        if (!key_id_valid(key_id))
                return bad_key_id(key_id);
        int r = keyring_get(ctx, false, &keyring);
        if (r < 0)
                return r;
        r = key_find(keyring, key_id, &id);
        if (r < 0)
                return r;

        g_autoptr(nkp_secret) buf = NULL;
        r = nkp_secret_new(sizeof(CachePayload), &buf);
        if (r < 0)
                return r;
        CachePayload *p = (CachePayload *) nkp_secret_data_mut(buf);
        r = payload_read(id, p);
        if (r < 0)
                return r;
        if (memcmp(p->key_id, key_id, NKP_UUID_STRING_LEN) != 0)
                return -ENOENT;

        nkp_secret *kdk = NULL;
        r = nkp_secret_new_copy(p->kdk, NKP_KDK_SIZE, &kdk);
        if (r < 0)
                return r;
        if (ret_info)
                payload_info(p, ret_info);
        *ret = kdk;
        return 0;
}

int nkp_cache_put(nkp_context *ctx, const NkpCacheInfo *info, const nkp_secret *kdk)
{
        if (!key_id_valid(info->key_id))
                return bad_key_id(info->key_id);
        size_t name_len = strnlen(info->name, sizeof info->name);
        if (name_len == 0 || name_len > NKP_NAME_MAX)
                return nkp_fail(-EINVAL, "A cached provider needs a name of 1 to %d characters.",
                                NKP_NAME_MAX);
        if (nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A KDK is %d bytes, not %zu.", NKP_KDK_SIZE,
                                nkp_secret_len(kdk));

        key_serial_t keyring;
        int r = keyring_get(ctx, true, &keyring);
        if (r < 0)
                return r;

        g_autoptr(nkp_secret) buf = NULL;
        r = nkp_secret_new(sizeof(CachePayload), &buf);
        if (r < 0)
                return r;
        CachePayload *p = (CachePayload *) nkp_secret_data_mut(buf);
        memcpy(p->magic, CACHE_MAGIC, 4);
        p->version = CACHE_VERSION;
        p->flags = info->deleted ? CACHE_FLAG_DELETED : 0;
        p->kdk_len = NKP_KDK_SIZE;
        memcpy(p->key_id, info->key_id, NKP_UUID_STRING_LEN);
        memcpy(p->name, info->name, name_len);
        memcpy(p->kdk, nkp_secret_data(kdk), NKP_KDK_SIZE);

        g_autofree char *desc = g_strconcat(KEY_PREFIX, info->key_id, NULL);
        key_serial_t id = add_key("user", desc, p, sizeof *p, keyring);
        if (id < 0)
                return keyctl_fail(errno, "add a key to");
        if (keyctl_setperm(id, KEY_PERM) < 0) {
                int err = errno;
                (void) keyctl_invalidate(id);
                return keyctl_fail(err, "set the permissions of a key in");
        }
        return 0;
}

int nkp_cache_mark_deleted(nkp_context *ctx, const char *key_id)
{
        key_serial_t keyring, id;
        if (!key_id_valid(key_id))
                return bad_key_id(key_id);
        int r = keyring_get(ctx, false, &keyring);
        if (r == -ENOENT)
                return 0; /* not cached: nothing to keep */
        if (r < 0)
                return r;
        r = key_find(keyring, key_id, &id);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;

        g_autoptr(nkp_secret) buf = NULL;
        r = nkp_secret_new(sizeof(CachePayload), &buf);
        if (r < 0)
                return r;
        CachePayload *p = (CachePayload *) nkp_secret_data_mut(buf);
        r = payload_read(id, p);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        if (p->flags & CACHE_FLAG_DELETED)
                return 0;
        p->flags |= CACHE_FLAG_DELETED;
        if (keyctl_update(id, p, sizeof *p) < 0)
                return keyctl_fail(errno, "update a key in");
        return 0;
}

static gint info_cmp(gconstpointer a, gconstpointer b)
{
        const NkpCacheInfo *x = a, *y = b;
        int c = strcmp(x->name, y->name);
        return c ? c : strcmp(x->key_id, y->key_id);
}

/* The serials linked in `keyring` (g_free). */
static int keyring_members(key_serial_t keyring, key_serial_t **ret, size_t *ret_n)
{
        void *buf = NULL;
        long n = keyctl_read_alloc(keyring, &buf);
        if (n < 0)
                return keyctl_fail(errno, "list");
        *ret = g_memdup2(buf, (gsize) n);
        *ret_n = (size_t) n / sizeof(key_serial_t);
        free(buf);
        return 0;
}

int nkp_cache_list(nkp_context *ctx, GArray **ret)
{
        g_autoptr(GArray) list = g_array_new(FALSE, TRUE, sizeof(NkpCacheInfo));
        key_serial_t keyring;
        int r = keyring_get(ctx, false, &keyring);
        if (r == -ENOENT) {
                *ret = g_steal_pointer(&list);
                return 0;
        }
        if (r < 0)
                return r;

        g_autofree key_serial_t *ids = NULL;
        size_t n = 0;
        r = keyring_members(keyring, &ids, &n);
        if (r < 0)
                return r;

        g_autoptr(nkp_secret) buf = NULL;
        r = nkp_secret_new(sizeof(CachePayload), &buf);
        if (r < 0)
                return r;
        CachePayload *p = (CachePayload *) nkp_secret_data_mut(buf);
        for (size_t i = 0; i < n; i++) {
                char *desc = NULL;
                if (keyctl_describe_alloc(ids[i], &desc) < 0)
                        continue; /* went away meanwhile */
                /* "type;uid;gid;perm;description" */
                bool ours = g_str_has_prefix(desc, "user;") &&
                            strstr(desc, ";" KEY_PREFIX) != NULL;
                free(desc);
                if (!ours || payload_read(ids[i], p) < 0)
                        continue;
                NkpCacheInfo info;
                payload_info(p, &info);
                nkp_wipe(p, sizeof *p);
                g_array_append_val(list, info);
        }
        g_array_sort(list, info_cmp);
        *ret = g_steal_pointer(&list);
        return 0;
}

int nkp_cache_flush(nkp_context *ctx)
{
        key_serial_t keyring;
        int r = keyring_get(ctx, false, &keyring);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;

        /* Invalidate every key first: gone at once from every keyring, and
         * their payloads freed (the kernel wipes user-key payloads). */
        g_autofree key_serial_t *ids = NULL;
        size_t n = 0;
        r = keyring_members(keyring, &ids, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++)
                (void) keyctl_invalidate(ids[i]);
        if (keyctl_invalidate(keyring) < 0) {
                if (keyctl_clear(keyring) < 0 || keyctl_unlink(keyring, KEY_SPEC_USER_KEYRING) < 0)
                        return keyctl_fail(errno, "remove");
        }
        return 0;
}
