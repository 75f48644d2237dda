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
 *   fstrim=/a              directories converted while they held files: their
 *                          old clear blocks are only freed, so `host status`
 *                          says once to run fstrim (then the key goes)
 *
 * A directory is recorded BEFORE it is converted (after every check that
 * can refuse): a kill during the conversion leaves it recorded, so the key
 * is added at the next boot whichever side of the swap the kill left, and
 * a rerun of `host protect` finishes (hostkey.c's crash table).  A refusal
 * of the conversion itself takes it out of the record again. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <grp.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nkp-private.h"

#define RECORD_FILE "hostkey.ini"
#define GROUP "hostkey"

typedef struct {
        char *provider;
        char *key_id;
        uint8_t identifier[NKP_FSCRYPT_ID_SIZE];
        GPtrArray *dirs;   /* char* */
        GPtrArray *fstrim; /* char*: converted with files (docs/host-key.md) */
} HostKeyRecord;

static void record_free(HostKeyRecord *rec)
{
        if (!rec)
                return;
        g_free(rec->provider);
        g_free(rec->key_id);
        if (rec->dirs)
                g_ptr_array_unref(rec->dirs);
        if (rec->fstrim)
                g_ptr_array_unref(rec->fstrim);
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
        rec->fstrim = g_ptr_array_new_with_free_func(g_free);
        g_autofree char *id = NULL;
        g_auto(GStrv) dirs = NULL, fstrim = NULL;
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
        fstrim = g_key_file_get_string_list(kf, GROUP, "fstrim", NULL, NULL);
        for (char **d = fstrim; d && *d; d++)
                if (**d)
                        g_ptr_array_add(rec->fstrim, g_strdup(*d));
        *ret = g_steal_pointer(&rec);
        return 0;
}

/* record_load() where no record is fine: 1 with *ret, 0 (no message, *ret
 * left NULL) when nothing was ever protected, or a negative errno. */
static int record_load_if_any(nkp_context *ctx, HostKeyRecord **ret)
{
        int r = record_load(ctx, ret);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        return r < 0 ? r : 1;
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
        if (rec->fstrim->len)
                g_key_file_set_string_list(kf, GROUP, "fstrim",
                                           (const char *const *) rec->fstrim->pdata,
                                           rec->fstrim->len);
        gsize len = 0;
        g_autofree char *text = g_key_file_to_data(kf, &len, NULL);
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                return r;
        g_autofree char *path = record_path(ctx);
        return nkp_write_file_atomic(path, text, len, 0600, false);
}

static bool list_has(const GPtrArray *list, const char *dir)
{
        for (guint i = 0; i < list->len; i++)
                if (strcmp(list->pdata[i], dir) == 0)
                        return true;
        return false;
}

static bool record_has_dir(const HostKeyRecord *rec, const char *dir)
{
        return list_has(rec->dirs, dir);
}

static void list_remove(GPtrArray *list, const char *dir)
{
        for (guint i = 0; i < list->len; i++)
                if (strcmp(list->pdata[i], dir) == 0)
                        g_ptr_array_remove_index(list, i--);
}

/* The record saved, or removed once it protects nothing (a later protect
 * may then pick another provider). */
static int record_store(nkp_context *ctx, const HostKeyRecord *rec)
{
        if (rec->dirs->len > 0)
                return record_save(ctx, rec);
        g_autofree char *path = record_path(ctx);
        if (unlink(path) < 0 && errno != ENOENT)
                return nkp_fail(-errno, "Cannot remove '%s': %s.", path, g_strerror(errno));
        return nkp_fsync_dir_of(path);
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
        int r = record_load_if_any(ctx, &rec);
        if (r <= 0)
                return r;
        if (rec->dirs->len == 0)
                return 0;
        return load_key_locked(ctx, rec);
}

int nkp_hostkey_dir_ready(nkp_context *ctx, const char *dir, bool load)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load_if_any(ctx, &rec);
        if (r <= 0)
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

/* ---- host protect / unprotect ---------------------------------------------------- */

/* The directory nkp offers for administrators' `virsh save` and `virsh
 * dump --memory-only` files: next to libvirt's own save directory, so on
 * the same filesystem (the one the administrator made fscrypt-capable for
 * /var/lib/libvirt), inside /var/lib/libvirt/qemu which libvirt already
 * keeps for root and its qemu user.  docs/host-key.md. */
#define NKP_SAVES_DIR "/var/lib/libvirt/qemu/nkp-saves"

/* Serialises `host protect` / `host unprotect` runs (hostkey.c does not lock). */
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
                return nkp_fail(-EBUSY, "Another `nkpctl host protect` or `host unprotect` is "
                                        "running; wait for it, then run this one again. Nothing "
                                        "was changed.");
        }
        *ret_fd = fd;
        return 0;
}

/* The string value of `key` in libvirt's qemu.conf (virConf syntax, first
 * assignment wins); NULL when unset or the file is missing. */
static char *qemu_conf_string(const char *path, const char *key)
{
        g_autofree char *text = NULL;
        if (!g_file_get_contents(path, &text, NULL, NULL))
                return NULL;
        g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
        size_t klen = strlen(key);
        for (char **l = lines; *l; l++) {
                char *p = g_strstrip(*l);
                if (strncmp(p, key, klen) != 0)
                        continue;
                p += klen;
                while (*p == ' ' || *p == '\t')
                        p++;
                if (*p != '=')
                        continue; /* another key with that prefix */
                p = g_strstrip(p + 1);
                size_t len = strlen(p);
                if (len >= 2 && p[0] == '"' && strchr(p + 1, '"'))
                        return g_strndup(p + 1, (size_t) (strchr(p + 1, '"') - p - 1));
        }
        return NULL;
}

/* The directories `host protect` protects when none is named: the swtpm
 * state, the managed-save, automatic-dump and NVRAM directories of
 * libvirt's QEMU driver (its fixed paths; auto_dump_path from qemu.conf),
 * and the one nkp offers for `virsh save`/`virsh dump` files. */
static GPtrArray *default_dirs(nkp_context *ctx)
{
        GPtrArray *dirs = g_ptr_array_new_with_free_func(g_free);
        g_ptr_array_add(dirs, g_strdup(ctx->vtpm_state_dir));
        g_ptr_array_add(dirs, g_strdup("/var/lib/libvirt/qemu/save"));
        char *dump = qemu_conf_string(ctx->migration_qemu_conf, "auto_dump_path");
        g_ptr_array_add(dirs, dump && dump[0] == '/' ? dump : g_strdup("/var/lib/libvirt/qemu/dump"));
        if (dump && dump[0] != '/')
                g_free(dump);
        g_ptr_array_add(dirs, g_strdup("/var/lib/libvirt/qemu/nvram"));
        g_ptr_array_add(dirs, g_strdup(NKP_SAVES_DIR));
        return dirs;
}

/* A missing default directory made as libvirt makes its own (0755, owned
 * by qemu.conf's user and group, Debian's libvirt-qemu when unset; the
 * swtpm directory 0711 root, as libvirt's swtpm code makes it), and nkp's
 * save directory 0750 for root and that group: its files are guest memory. */
static int make_missing_dir(nkp_context *ctx, const char *dir)
{
        if (access(dir, F_OK) == 0)
                return 0;
        g_autofree char *parent = g_path_get_dirname(dir);
        if (access(parent, F_OK) < 0)
                return nkp_fail(-ENOENT, "Cannot protect '%s': its parent '%s' does not exist "
                                         "(is libvirt installed?).",
                                dir, parent);
        bool swtpm = strcmp(dir, ctx->vtpm_state_dir) == 0;
        mode_t mode = swtpm ? 0711 : strcmp(dir, NKP_SAVES_DIR) == 0 ? 0750 : 0755;
        uid_t uid = 0;
        gid_t gid = 0;
        if (!swtpm) {
                g_autofree char *user = qemu_conf_string(ctx->migration_qemu_conf, "user");
                g_autofree char *group = qemu_conf_string(ctx->migration_qemu_conf, "group");
                struct passwd *pw = getpwnam(user ? user : "libvirt-qemu");
                struct group *gr = getgrnam(group ? group : "libvirt-qemu");
                uid = pw ? pw->pw_uid : 0;
                gid = gr ? gr->gr_gid : 0;
        }
        if (mkdir(dir, mode) < 0 && errno != EEXIST)
                return nkp_fail(-errno, "Cannot make '%s': %s.", dir, g_strerror(errno));
        if (chown(dir, uid, gid) < 0 || chmod(dir, mode) < 0)
                return nkp_fail(-errno, "Cannot set the owner and mode of '%s': %s.", dir,
                                g_strerror(errno));
        return nkp_fsync_dir_of(dir);
}

/* The running QEMU domains: libvirt keeps a status file
 * ROOT/run/libvirt/qemu/NAME.xml for each, from start to stop.  Their
 * names joined by ", " into `ret` (NULL when none). */
static void running_vms(nkp_context *ctx, char **ret)
{
        *ret = NULL;
        g_autofree char *dir = nkp_context_path(ctx, "/run/libvirt/qemu");
        g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
        if (!d)
                return;
        g_autoptr(GString) names = g_string_new(NULL);
        const char *n;
        while ((n = g_dir_read_name(d))) {
                g_autofree char *path = g_build_filename(dir, n, NULL);
                if (!g_str_has_suffix(n, ".xml") || !g_file_test(path, G_FILE_TEST_IS_REGULAR))
                        continue;
                g_string_append_printf(names, "%s%.*s", names->len ? ", " : "",
                                       (int) (strlen(n) - 4), n);
        }
        if (names->len)
                *ret = g_string_free(g_steal_pointer(&names), FALSE);
}

/* -EBUSY while a VM runs: libvirt could write a save image, an NVRAM or a
 * vTPM state into `dir` during its conversion, and that file would be left
 * in the copy that is thrown away. */
static int refuse_while_running(nkp_context *ctx, const char *dir, const char *what)
{
        g_autofree char *vms = NULL;
        running_vms(ctx, &vms);
        if (!vms)
                return 0;
        return nkp_fail(-EBUSY, "'%s' cannot be %s while VMs run (%s): libvirt could write "
                                "into it meanwhile; stop or save them (virsh managedsave), then "
                                "run the command again. Nothing was changed.",
                        dir, what, vms);
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

static bool dir_has_entries(const char *path)
{
        g_autoptr(GDir) d = g_dir_open(path, 0, NULL);
        return d && g_dir_read_name(d) != NULL;
}

static int protect_one(nkp_context *ctx, const char *provider, const char *dir)
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
        /* A conversion (a copy) needs libvirt idle; an empty directory is
         * encrypted in place in one step and needs nothing. */
        NkpFscryptState st;
        bool copies = nkp_fscrypt_status(dir, &st, NULL) == 0 && st == NKP_FSCRYPT_PLAIN &&
                      (dir_has_entries(dir) || nkp_hostkey_conversion_left(dir));
        nkp_error_clear();
        if (copies && (r = refuse_while_running(ctx, dir, "converted")) < 0)
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
                rec->fstrim = g_ptr_array_new_with_free_func(g_free);
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
                if (nkp_fscrypt_status(dir, &st, NULL) == 0 && st == NKP_FSCRYPT_PLAIN &&
                    !nkp_hostkey_conversion_left(dir)) {
                        g_ptr_array_remove_index(rec->dirs, rec->dirs->len - 1);
                        (void) record_save(ctx, rec);
                }
                return nkp_fail(r, "%s", msg);
        }
        if (r == 0 && copies && !list_has(rec->fstrim, dir)) {
                g_ptr_array_add(rec->fstrim, g_strdup(dir));
                r = record_save(ctx, rec);
        }
        return r;
}

int nkp_host_protect(nkp_context *ctx, const char *provider, const char *dir)
{
        g_autoptr(GPtrArray) dirs = NULL;
        if (dir && (dir[0] != '/' || g_str_has_suffix(dir, "/") || strstr(dir, "//")))
                return nkp_fail(-EINVAL, "'%s' is not an absolute directory path without a "
                                         "trailing '/'; nothing was changed.",
                                dir);
        if (dir) {
                dirs = g_ptr_array_new_with_free_func(g_free);
                g_ptr_array_add(dirs, g_strdup(dir));
        } else {
                dirs = default_dirs(ctx);
        }
        int fd = -1;
        int r = protect_lock(ctx, &fd);
        if (r < 0)
                return r;
        if (!dir) {
                /* The provider before anything is made: a refusal leaves
                 * no directory behind. */
                g_autoptr(HostKeyRecord) rec = NULL;
                g_autoptr(nkp_provider) p = NULL;
                r = record_load(ctx, &rec);
                if (r == -ENOENT)
                        r = 0;
                if (r == 0)
                        r = pick_provider(ctx, rec, provider, &p);
        }
        for (guint i = 0; r == 0 && !dir && i < dirs->len; i++) {
                /* Every default is checked before any is encrypted: a
                 * filesystem without fscrypt refuses the whole run. */
                if ((r = make_missing_dir(ctx, dirs->pdata[i])) == 0)
                        r = nkp_fscrypt_check_supported(dirs->pdata[i]);
        }
        for (guint i = 0; r == 0 && i < dirs->len; i++)
                r = protect_one(ctx, provider, dirs->pdata[i]);
        close(fd);
        return r;
}

static int unprotect_one(nkp_context *ctx, HostKeyRecord *rec, const char *dir)
{
        int r;
        if (access(dir, F_OK) < 0 && !nkp_hostkey_conversion_left(dir)) {
                /* Gone (removed by hand): nothing left to convert. */
                list_remove(rec->dirs, dir);
                list_remove(rec->fstrim, dir);
                return record_store(ctx, rec);
        }
        if ((r = refuse_while_running(ctx, dir, "turned back to plain")) < 0)
                return r;
        NkpFscryptState st;
        if (nkp_fscrypt_status(dir, &st, NULL) == 0 && st != NKP_FSCRYPT_PLAIN &&
            st != NKP_FSCRYPT_UNLOCKED && (r = load_key_locked(ctx, rec)) < 0)
                return r;
        nkp_error_clear();
        /* Recorded until the conversion is complete: a kill meanwhile
         * leaves the key added at the next boot, and a rerun finishes. */
        if ((r = nkp_hostkey_unprotect_dir(dir, rec->identifier)) < 0)
                return r;
        list_remove(rec->dirs, dir);
        list_remove(rec->fstrim, dir);
        return record_store(ctx, rec);
}

int nkp_host_unprotect(nkp_context *ctx, const char *dir)
{
        int fd = -1;
        int r = protect_lock(ctx, &fd);
        if (r < 0)
                return r;
        g_autoptr(HostKeyRecord) rec = NULL;
        r = record_load(ctx, &rec);
        if (r == -ENOENT)
                r = nkp_fail(-ENOENT, "Nothing on this host is protected by the host key "
                                      "(no /var/lib/nkp/hostkey.ini); nothing was changed.");
        else if (r == 0 && dir && !record_has_dir(rec, dir))
                r = nkp_fail(-ENOENT, "'%s' is not protected by the host key (nkpctl host "
                                      "status lists the protected directories); nothing was "
                                      "changed.",
                             dir);
        if (r == 0) {
                g_autoptr(GPtrArray) dirs = g_ptr_array_new_with_free_func(g_free);
                for (guint i = 0; i < rec->dirs->len; i++)
                        if (!dir || strcmp(dir, rec->dirs->pdata[i]) == 0)
                                g_ptr_array_add(dirs, g_strdup(rec->dirs->pdata[i]));
                for (guint i = 0; r == 0 && i < dirs->len; i++)
                        r = unprotect_one(ctx, rec, dirs->pdata[i]);
        }
        close(fd);
        return r;
}

/* ---- the hook's prepare step ---------------------------------------------------------- */

/* The recorded directories that are encrypted with the host key and locked
 * (or locking), joined by ", "; NULL when none. */
static char *locked_dirs(const HostKeyRecord *rec)
{
        g_autoptr(GString) s = g_string_new(NULL);
        for (guint i = 0; i < rec->dirs->len; i++) {
                NkpFscryptState st;
                uint8_t id[NKP_FSCRYPT_ID_SIZE];
                if (nkp_fscrypt_status(rec->dirs->pdata[i], &st, id) < 0 ||
                    st == NKP_FSCRYPT_PLAIN || st == NKP_FSCRYPT_UNLOCKED ||
                    memcmp(id, rec->identifier, NKP_FSCRYPT_ID_SIZE) != 0)
                        continue;
                g_string_append_printf(s, "%s%s", s->len ? ", " : "",
                                       (const char *) rec->dirs->pdata[i]);
        }
        nkp_error_clear();
        return s->len ? g_string_free(g_steal_pointer(&s), FALSE) : NULL;
}

int nkp_hostkey_start_check(nkp_context *ctx, const char *vm_name)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load_if_any(ctx, &rec);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start", vm_name);
        if (r == 0)
                return 0;
        g_autofree char *locked = locked_dirs(rec);
        if (!locked)
                return 0;
        /* The provider may be here (a start before nkpd added the key). */
        if (load_key_locked(ctx, rec) >= 0) {
                g_free(locked);
                locked = locked_dirs(rec);
        }
        nkp_error_clear();
        if (!locked)
                return 0;
        g_autofree char *msg = g_strdup_printf(
                "VM '%s' cannot start: the host key's directories are locked (%s): its provider "
                "'%s' (key id %s) is not available, and libvirt would not see a managed-save "
                "image, NVRAM or vTPM state kept there. Restore the provider if it is missing "
                "(nkpctl provider restore FILE.p12), then: nkpctl host unlock",
                vm_name, locked, rec->provider, rec->key_id);
        (void) nkp_alarm_raise(ctx, "hostkey-locked", vm_name, msg);
        return nkp_fail(-ENOKEY, "%s", msg);
}

/* ---- status ------------------------------------------------------------------------- */

struct nkp_hostkey_status {
        char *provider;
        char *key_id;
        GPtrArray *dirs;   /* char* */
        GPtrArray *states; /* char* */
        char *fstrim;      /* "MOUNTPOINT (DIR), …" or NULL */
};

void nkp_hostkey_status_free(nkp_hostkey_status *st)
{
        if (!st)
                return;
        g_free(st->provider);
        g_free(st->key_id);
        g_ptr_array_unref(st->dirs);
        g_ptr_array_unref(st->states);
        g_free(st->fstrim);
        g_free(st);
}

/* The mount point of the filesystem holding `path` (walking up while the
 * device stays the same). */
static char *mount_point_of(const char *path)
{
        g_autofree char *cur = g_strdup(path);
        struct stat st;
        if (stat(cur, &st) < 0)
                return g_strdup(path);
        while (strcmp(cur, "/") != 0) {
                g_autofree char *parent = g_path_get_dirname(cur);
                struct stat pst;
                if (stat(parent, &pst) < 0 || pst.st_dev != st.st_dev)
                        break;
                g_free(cur);
                cur = g_steal_pointer(&parent);
        }
        return g_steal_pointer(&cur);
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
                g_autoptr(GString) trim = g_string_new(NULL);
                for (guint i = 0; i < rec->fstrim->len; i++) {
                        g_autofree char *mnt = mount_point_of(rec->fstrim->pdata[i]);
                        g_string_append_printf(trim, "%s%s (%s)", trim->len ? ", " : "", mnt,
                                               (const char *) rec->fstrim->pdata[i]);
                }
                if (trim->len)
                        st->fstrim = g_string_free(g_steal_pointer(&trim), FALSE);
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

const char *nkp_hostkey_status_fstrim(const nkp_hostkey_status *st)
{
        return st->fstrim;
}

int nkp_hostkey_fstrim_said(nkp_context *ctx)
{
        g_autoptr(HostKeyRecord) rec = NULL;
        int r = record_load_if_any(ctx, &rec);
        if (r <= 0 || rec->fstrim->len == 0)
                return r < 0 ? r : 0;
        g_ptr_array_set_size(rec->fstrim, 0);
        return record_save(ctx, rec);
}
