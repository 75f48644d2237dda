/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The host key wired into nkp (issues 14/15; nkp.h "The host key"): which
 * provider it comes from and which directories it protects, adding it to
 * the kernel when that provider's KDK is here, and `nkpctl host protect`.
 * The mechanism (derivation, fscrypt, converting a directory) is hostkey.c.
 *
 * The record is a state file, ROOT/var/lib/nkp/hostkey.ini (0600), not a
 * setting in nkp.conf: it is written by `host protect`, not by hand, and it
 * must travel with the host id (ROOT/var/lib/nkp/host-id) in the backup of
 * /var/lib/nkp: the two together name the key the directories need.
 *
 *   [hostkey]
 *   provider=NAME          the provider the key is derived from
 *   key_id=UUID            its key id (the derivation uses it)
 *   identifier=HEX         the kernel's identifier of the key (32 hex digits)
 *   dirs=/a;/b             the protected directories (absolute)
 *
 * A directory is recorded BEFORE it is converted (after every check that
 * can refuse): a kill during the conversion leaves it recorded, so the key
 * is added at the next boot whichever side of the swap the kill left, and
 * a rerun of `host protect` finishes (hostkey.c's crash table).  A refusal
 * of the conversion itself takes it out of the record again. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "nkp-private.h"

#define RECORD_FILE "hostkey.ini"
#define GROUP "hostkey"

typedef struct {
        char *provider;
        char *key_id;
        uint8_t identifier[NKP_FSCRYPT_ID_SIZE];
        GPtrArray *dirs; /* char* */
} HostKeyRecord;

static void record_free(HostKeyRecord *rec)
{
        if (!rec)
                return;
        g_free(rec->provider);
        g_free(rec->key_id);
        if (rec->dirs)
                g_ptr_array_unref(rec->dirs);
        g_free(rec);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(HostKeyRecord, record_free)

static char *record_path(const nkp_context *ctx)
{
        return g_build_filename(ctx->store_dir, RECORD_FILE, NULL);
}

static bool parse_identifier(const char *hex, uint8_t out[NKP_FSCRYPT_ID_SIZE])
{
        if (!hex || strlen(hex) != 2 * NKP_FSCRYPT_ID_SIZE)
                return false;
        for (size_t i = 0; i < NKP_FSCRYPT_ID_SIZE; i++) {
                int hi = g_ascii_xdigit_value(hex[2 * i]), lo = g_ascii_xdigit_value(hex[2 * i + 1]);
                if (hi < 0 || lo < 0)
                        return false;
                out[i] = (uint8_t) (hi << 4 | lo);
        }
        return true;
}

/* The record; -ENOENT (no message) when nothing was ever protected. */
static int record_load(nkp_context *ctx, HostKeyRecord **ret)
{
        g_autofree char *path = record_path(ctx);
        g_autofree char *text = NULL;
        size_t len = 0;
        int r = nkp_read_file(path, 64 * 1024, true, &text, &len);
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(HostKeyRecord) rec = g_new0(HostKeyRecord, 1);
        rec->dirs = g_ptr_array_new_with_free_func(g_free);
        g_autofree char *id = NULL;
        g_auto(GStrv) dirs = NULL;
        uint8_t bin[16];
        if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, NULL) ||
            !(rec->provider = g_key_file_get_string(kf, GROUP, "provider", NULL)) ||
            !(rec->key_id = g_key_file_get_string(kf, GROUP, "key_id", NULL)) ||
            nkp_uuid_parse(rec->key_id, bin) < 0 ||
            !(id = g_key_file_get_string(kf, GROUP, "identifier", NULL)) ||
            !parse_identifier(id, rec->identifier))
                return nkp_fail(-EBADMSG, "'%s' is damaged; restore it from the backup of "
                                          "/var/lib/nkp, or the protected directories stay "
                                          "locked.",
                                path);
        dirs = g_key_file_get_string_list(kf, GROUP, "dirs", NULL, NULL);
        for (char **d = dirs; d && *d; d++)
                if (**d)
                        g_ptr_array_add(rec->dirs, g_strdup(*d));
        *ret = g_steal_pointer(&rec);
        return 0;
}

static int record_save(nkp_context *ctx, const HostKeyRecord *rec)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        char id[2 * NKP_FSCRYPT_ID_SIZE + 1];
        nkp_hex_encode(rec->identifier, NKP_FSCRYPT_ID_SIZE, id);
        g_key_file_set_string(kf, GROUP, "provider", rec->provider);
        g_key_file_set_string(kf, GROUP, "key_id", rec->key_id);
        g_key_file_set_string(kf, GROUP, "identifier", id);
        g_key_file_set_string_list(kf, GROUP, "dirs", (const char *const *) rec->dirs->pdata,
                                   rec->dirs->len);
        gsize len = 0;
        g_autofree char *text = g_key_file_to_data(kf, &len, NULL);
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                return r;
        g_autofree char *path = record_path(ctx);
        return nkp_write_file_atomic(path, text, len, 0600, false);
}

static bool record_has_dir(const HostKeyRecord *rec, const char *dir)
{
        for (guint i = 0; i < rec->dirs->len; i++)
                if (strcmp(rec->dirs->pdata[i], dir) == 0)
                        return true;
        return false;
}

/* ---- adding the key ---------------------------------------------------------- */

/* The host key of provider `key_id` on this host, a new secret. */
static int derive_key(nkp_context *ctx, const char *key_id, bool create_host_id, nkp_secret **ret)
{
        char host_id[NKP_UUID_STRING_LEN + 1];
        int r = nkp_hostkey_host_id(ctx, create_host_id, host_id);
        if (r < 0)
                return r;
        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_provider_get_kdk(ctx, key_id, &kdk);
        if (r < 0)
                return r;
        return nkp_hostkey_derive(kdk, key_id, host_id, ret);
}

/* Adds `key` to the filesystem of `dir` (or of its nearest existing
 * parent); the identifier the kernel computed into `ret_id`. */
static int add_key_for(const char *dir, const nkp_secret *key, uint8_t ret_id[NKP_FSCRYPT_ID_SIZE])
{
        g_autofree char *p = g_strdup(dir);
        while (access(p, F_OK) < 0 && strcmp(p, "/") != 0) {
                char *parent = g_path_get_dirname(p);
                g_free(p);
                p = parent;
        }
        return nkp_fscrypt_add_key(p, key, ret_id);
}

static int load_key_locked(nkp_context *ctx, const HostKeyRecord *rec)
{
        g_autoptr(nkp_secret) key = NULL;
        int r = derive_key(ctx, rec->key_id, false, &key);
        if (r < 0)
                return nkp_fail_prefix(r == -ENOENT ? -ENOKEY : r,
                                       "The host key (provider '%s', key id %s) cannot be made, so "
                                       "the directories it protects stay locked; restore the "
                                       "provider (nkpctl provider restore FILE.p12), then run: "
                                       "nkpctl host unlock",
                                       rec->provider, rec->key_id);
        for (guint i = 0; i < rec->dirs->len; i++) {
                const char *dir = rec->dirs->pdata[i];
                uint8_t id[NKP_FSCRYPT_ID_SIZE];
                r = add_key_for(dir, key, id);
                if (r < 0)
                        return r;
                if (memcmp(id, rec->identifier, NKP_FSCRYPT_ID_SIZE) != 0) {
                        (void) nkp_fscrypt_remove_key(dir, id, NULL);
                        g_autofree char *msg = g_strdup_printf(
                                "The host key made from provider '%s' is not the key that "
                                "protects '%s' (another key with that name, or another host "
                                "id in /var/lib/nkp/host-id); the directory stays locked. "
                                "Restore the provider and /var/lib/nkp from this host's "
                                "backups, then run: nkpctl host unlock",
                                rec->provider, dir);
                        (void) nkp_alarm_raise(ctx, "hostkey-locked", dir, msg);
                        return nkp_fail(-EKEYREJECTED, "%s", msg);
                }
        }
        (void) nkp_alarm_clear(ctx, "hostkey-locked", NULL);
        nkp_error_clear();
        return 1;
}

int nkp_host_key_load(nkp_context *ctx)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load(ctx, &rec);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return r;
        if (rec->dirs->len == 0)
                return 0;
        return load_key_locked(ctx, rec);
}

int nkp_hostkey_dir_ready(nkp_context *ctx, const char *dir, bool load)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load(ctx, &rec);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return r;
        if (!record_has_dir(rec, dir))
                return 0;
        NkpFscryptState st;
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        r = nkp_fscrypt_status(dir, &st, id);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return r;
        if (st == NKP_FSCRYPT_PLAIN || memcmp(id, rec->identifier, NKP_FSCRYPT_ID_SIZE) != 0)
                return 0; /* protection not finished, or not nkp's key */
        if (st != NKP_FSCRYPT_UNLOCKED && load) {
                r = load_key_locked(ctx, rec);
                if (r < 0)
                        return r;
                r = nkp_fscrypt_status(dir, &st, NULL);
                if (r < 0)
                        return r;
        }
        if (st != NKP_FSCRYPT_UNLOCKED)
                return nkp_fail(-ENOKEY, "'%s' is locked: the host key (provider '%s') is not "
                                         "in the kernel; unlock the host (nkpctl host unlock).",
                                dir, rec->provider);
        return 1;
}

/* ---- host protect ---------------------------------------------------------------- */

/* Serialises `host protect` runs (hostkey.c does not lock). */
static int protect_lock(nkp_context *ctx, int *ret_fd)
{
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                return r;
        g_autofree char *path = g_build_filename(ctx->store_dir, ".hostkey.lock", NULL);
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot open '%s': %s.", path, g_strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                close(fd);
                return nkp_fail(-EBUSY, "Another `nkpctl host protect` is running; wait for it, "
                                        "then run this one again. Nothing was changed.");
        }
        *ret_fd = fd;
        return 0;
}

static int pick_provider(nkp_context *ctx, const HostKeyRecord *rec, const char *name,
                         nkp_provider **ret)
{
        g_autoptr(nkp_provider) p = NULL;
        int r;
        if (rec) {
                if (name && strcmp(name, rec->provider) != 0)
                        return nkp_fail(-EEXIST,
                                        "This host's key already comes from provider '%s', not "
                                        "'%s'; run the command without --provider (or --provider "
                                        "'%s'). Nothing was changed.",
                                        rec->provider, name, rec->provider);
                r = nkp_provider_get_by_key_id(ctx, rec->key_id, &p);
                if (r == -ENOENT)
                        return nkp_fail(-ENOKEY, "The host key's provider '%s' (key id %s) is not "
                                                 "on this host; restore it first (nkpctl "
                                                 "provider restore FILE.p12). Nothing was changed.",
                                        rec->provider, rec->key_id);
        } else {
                r = nkp_provider_pick(ctx, name, &p);
        }
        if (r < 0)
                return r;
        if (!nkp_provider_is_active(p))
                return nkp_fail(-EPERM, "Provider '%s' was never backed up, so the host key cannot "
                                        "come from it yet (a lost provider would lock the "
                                        "directories for good): nkpctl provider backup '%s' --out "
                                        "FILE.p12. Nothing was changed.",
                                nkp_provider_name(p), nkp_provider_name(p));
        *ret = g_steal_pointer(&p);
        return 0;
}

/* A conversion of `dir` left a sibling (hostkey.c's three names). */
static bool has_siblings(const char *dir)
{
        static const char *const suffixes[] = { ".nkp-tmp", ".nkp-new", ".nkp-old" };
        for (size_t i = 0; i < G_N_ELEMENTS(suffixes); i++) {
                g_autofree char *p = g_strconcat(dir, suffixes[i], NULL);
                if (access(p, F_OK) == 0)
                        return true;
        }
        return false;
}

static int protect_locked(nkp_context *ctx, const char *provider, const char *dir)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load(ctx, &rec);
        if (r < 0 && r != -ENOENT)
                return r;
        nkp_error_clear();
        g_autoptr(nkp_provider) p = NULL;
        if ((r = pick_provider(ctx, rec, provider, &p)) < 0)
                return r;
        if ((r = nkp_fscrypt_check_supported(dir)) < 0)
                return r;
        g_autoptr(nkp_secret) key = NULL;
        if ((r = derive_key(ctx, nkp_provider_key_id(p), true, &key)) < 0)
                return r;
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        if ((r = add_key_for(dir, key, id)) < 0)
                return r;
        if (rec && memcmp(id, rec->identifier, NKP_FSCRYPT_ID_SIZE) != 0)
                return nkp_fail(-EKEYREJECTED, "The host key made now is not the one recorded in "
                                               "/var/lib/nkp/hostkey.ini (was host-id "
                                               "replaced?); nothing was changed.");
        if (!rec) {
                rec = g_new0(HostKeyRecord, 1);
                rec->provider = g_strdup(nkp_provider_name(p));
                rec->key_id = g_strdup(nkp_provider_key_id(p));
                rec->dirs = g_ptr_array_new_with_free_func(g_free);
                memcpy(rec->identifier, id, NKP_FSCRYPT_ID_SIZE);
        }
        bool added = !record_has_dir(rec, dir);
        if (added) {
                g_ptr_array_add(rec->dirs, g_strdup(dir));
                if ((r = record_save(ctx, rec)) < 0)
                        return r;
        }
        r = nkp_hostkey_protect_dir(dir, id);
        if (r < 0 && added) {
                /* Refused or failed: a directory left as it was is not
                 * recorded as protected.  (A crash never gets here.) */
                g_autofree char *msg = g_strdup(nkp_error_message());
                NkpFscryptState st;
                if (nkp_fscrypt_status(dir, &st, NULL) == 0 && st == NKP_FSCRYPT_PLAIN &&
                    !has_siblings(dir)) {
                        g_ptr_array_remove_index(rec->dirs, rec->dirs->len - 1);
                        (void) record_save(ctx, rec);
                }
                return nkp_fail(r, "%s", msg);
        }
        return r;
}

int nkp_host_protect(nkp_context *ctx, const char *provider, const char *dir)
{
        const char *d = dir ? dir : ctx->vtpm_state_dir;
        int fd = -1;
        int r = protect_lock(ctx, &fd);
        if (r < 0)
                return r;
        r = protect_locked(ctx, provider, d);
        close(fd);
        return r;
}

/* ---- status ------------------------------------------------------------------------- */

struct nkp_hostkey_status {
        char *provider;
        char *key_id;
        GPtrArray *dirs;   /* char* */
        GPtrArray *states; /* char* */
};

void nkp_hostkey_status_free(nkp_hostkey_status *st)
{
        if (!st)
                return;
        g_free(st->provider);
        g_free(st->key_id);
        g_ptr_array_unref(st->dirs);
        g_ptr_array_unref(st->states);
        g_free(st);
}

static const char *dir_state(const HostKeyRecord *rec, const char *dir)
{
        NkpFscryptState st;
        uint8_t id[NKP_FSCRYPT_ID_SIZE];
        int r = nkp_fscrypt_status(dir, &st, id);
        nkp_error_clear();
        if (r == -ENOENT)
                return "missing";
        if (r < 0)
                return "unreadable";
        if (st == NKP_FSCRYPT_PLAIN)
                return "plain (not finished: run nkpctl host protect again)";
        if (memcmp(id, rec->identifier, NKP_FSCRYPT_ID_SIZE) != 0)
                return "encrypted with another key";
        return nkp_fscrypt_state_name(st);
}

int nkp_hostkey_status_get(nkp_context *ctx, nkp_hostkey_status **ret)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load(ctx, &rec);
        if (r < 0 && r != -ENOENT)
                return r;
        nkp_error_clear();
        nkp_hostkey_status *st = g_new0(nkp_hostkey_status, 1);
        st->dirs = g_ptr_array_new_with_free_func(g_free);
        st->states = g_ptr_array_new_with_free_func(g_free);
        if (rec) {
                st->provider = g_strdup(rec->provider);
                st->key_id = g_strdup(rec->key_id);
                for (guint i = 0; i < rec->dirs->len; i++) {
                        g_ptr_array_add(st->dirs, g_strdup(rec->dirs->pdata[i]));
                        g_ptr_array_add(st->states, g_strdup(dir_state(rec, rec->dirs->pdata[i])));
                }
        }
        *ret = st;
        return 0;
}

const char *nkp_hostkey_status_provider(const nkp_hostkey_status *st)
{
        return st->provider;
}

const char *nkp_hostkey_status_key_id(const nkp_hostkey_status *st)
{
        return st->key_id;
}

size_t nkp_hostkey_status_n_dirs(const nkp_hostkey_status *st)
{
        return st->dirs->len;
}

const char *nkp_hostkey_status_dir(const nkp_hostkey_status *st, size_t i)
{
        return i < st->dirs->len ? st->dirs->pdata[i] : NULL;
}

const char *nkp_hostkey_status_dir_state(const nkp_hostkey_status *st, size_t i)
{
        return i < st->states->len ? st->states->pdata[i] : NULL;
}
