/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The conversion journal: what makes `vm encrypt`, `vm decrypt` and `vm
 * rekey --deep` crash safe (docs/crash-safety.md has the whole protocol).
 *
 * One file per VM, ROOT/var/lib/nkp/journal/<uuid>.ini (GKeyFile, 0600,
 * written atomically), and beside it <uuid>.lock, the flock that the command
 * holds from start to end:
 *
 *   [journal]
 *   version = 1
 *   op = encrypt | decrypt | rekey-deep
 *   name = <domain name>           uuid = <domain uuid>
 *   phase = converting | ready
 *   old = <signature of the definition before>
 *   new = <signature of the definition after>
 *   files = P1;P2;…                the files being replaced
 *   scratch = D1;…                 work directories, removed on recovery
 *   dirs = DEV:INO;…               the directories holding them, recorded at
 *                                  the first save; recovery renames and
 *                                  removes nothing outside them
 *
 * A signature is the hex KEK salt of the definition's keysafe, or "none"
 * when it has no keysafe: every keysafe gets a fresh random salt, so the
 * definition before and the one after an operation always differ, and
 * nothing secret is written here (the salt is public, in the XML).
 *
 * Each file P is replaced through three names in its own directory:
 * P.nkp-new (the converted copy, complete and verified before phase=ready),
 * then the swap P -> P.nkp-old, P.nkp-new -> P, then (once the new
 * definition is defined) P.nkp-old is removed.  Which of the three names
 * exist tells where a file is; the definition libvirt holds tells which
 * side the files must match.  nkp_journal_reconcile() makes them match. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nkp-private.h"

#define JOURNAL_GROUP "journal"
#define JOURNAL_MAX (256 * 1024)

static const char *const phase_names[] = { "converting", "ready" };

const char *nkp_journal_phase_name(NkpJournalPhase phase)
{
        return phase <= NKP_JOURNAL_READY ? phase_names[phase] : "?";
}

NkpJournal *nkp_journal_new(const char *op, const char *vm_name, const char *vm_uuid,
                            const char *old_sig, const char *new_sig)
{
        NkpJournal *j = g_new0(NkpJournal, 1);
        j->op = g_strdup(op);
        j->vm_name = g_strdup(vm_name);
        j->vm_uuid = g_ascii_strdown(vm_uuid, -1);
        j->old_sig = g_strdup(old_sig);
        j->new_sig = g_strdup(new_sig);
        j->phase = NKP_JOURNAL_CONVERTING;
        j->files = g_ptr_array_new_with_free_func(g_free);
        j->scratch = g_ptr_array_new_with_free_func(g_free);
        j->dirs = g_ptr_array_new_with_free_func(g_free);
        return j;
}

void nkp_journal_free(NkpJournal *j)
{
        if (!j)
                return;
        g_free(j->op);
        g_free(j->vm_name);
        g_free(j->vm_uuid);
        g_free(j->old_sig);
        g_free(j->new_sig);
        if (j->files)
                g_ptr_array_unref(j->files);
        if (j->scratch)
                g_ptr_array_unref(j->scratch);
        if (j->dirs)
                g_ptr_array_unref(j->dirs);
        g_free(j);
}

char *nkp_domain_signature(const NkpDomain *d)
{
        if (!d->keysafe)
                return g_strdup("none");
        char hex[2 * NKP_KEK_SALT_SIZE + 1];
        nkp_hex_encode(nkp_keysafe_kek_salt(d->keysafe), NKP_KEK_SALT_SIZE, hex);
        return g_strdup(hex);
}

/* ---- where, and the lock ---------------------------------------------------- */

static char *journal_dir(const nkp_context *ctx)
{
        return g_build_filename(ctx->store_dir, "journal", NULL);
}

static bool uuid_ok(const char *uuid)
{
        uint8_t raw[16];
        return uuid && nkp_uuid_parse(uuid, raw) == 0;
}

char *nkp_journal_path(const nkp_context *ctx, const char *vm_uuid)
{
        g_autofree char *dir = journal_dir(ctx);
        g_autofree char *lower = g_ascii_strdown(vm_uuid, -1);
        g_autofree char *base = g_strconcat(lower, ".ini", NULL);
        return g_build_filename(dir, base, NULL);
}

static char *lock_path(const nkp_context *ctx, const char *vm_uuid)
{
        g_autofree char *dir = journal_dir(ctx);
        g_autofree char *lower = g_ascii_strdown(vm_uuid, -1);
        g_autofree char *base = g_strconcat(lower, ".lock", NULL);
        return g_build_filename(dir, base, NULL);
}

int nkp_journal_lock(nkp_context *ctx, const char *vm_uuid, bool create, int *ret_fd)
{
        if (!uuid_ok(vm_uuid))
                return nkp_fail(-EINVAL, "'%s' is not a VM UUID.", vm_uuid ? vm_uuid : "");
        g_autofree char *dir = journal_dir(ctx);
        g_autofree char *path = lock_path(ctx, vm_uuid);
        if (create) {
                int r = nkp_mkdir_private(dir);
                if (r < 0)
                        return r;
        }
        /* never blocks: neither a second command nor a VM start should wait
         * minutes (a full disk copy) without saying why */
        return nkp_lock_file(path, create, ret_fd);
}

int nkp_vm_lock(nkp_context *ctx, const char *vm_uuid, bool create, unsigned wait_ms,
                int *ret_fd)
{
        int r = nkp_journal_lock(ctx, vm_uuid, create, ret_fd);
        for (unsigned waited = 0; r == -EBUSY && waited < wait_ms; waited += NKP_VM_LOCK_POLL_MS) {
                g_usleep(NKP_VM_LOCK_POLL_MS * 1000);
                r = nkp_journal_lock(ctx, vm_uuid, create, ret_fd);
        }
        return r;
}

void nkp_journal_unlock(int fd)
{
        if (fd < 0)
                return;
        (void) flock(fd, LOCK_UN);
        close(fd);
}

/* ---- the file ----------------------------------------------------------------- */

/* Recovery renames the journal's files and deletes its scratch trees, so a
 * damaged journal must not be able to name anything else: canonical absolute
 * paths (no ".", "..", "//" or trailing "/"), and scratch directories that
 * are nkp's own work directories. */
static bool journal_path_ok(const char *path, bool scratch)
{
        if (!g_path_is_absolute(path) || !g_utf8_validate(path, -1, NULL))
                return false;
        g_auto(GStrv) parts = g_strsplit(path, "/", -1);
        for (char **p = parts + 1; *p; p++)
                if (!(*p)[0] || strcmp(*p, "..") == 0 || strcmp(*p, ".") == 0)
                        return false;
        if (!scratch)
                return true;
        g_autofree char *base = g_path_get_basename(path);
        return strcmp(base, NKP_JOURNAL_SCRATCH_NAME) == 0;
}

static char *join_paths(GPtrArray *paths)
{
        GString *s = g_string_new(NULL);
        for (guint i = 0; i < paths->len; i++)
                g_string_append_printf(s, "%s%s", i ? ";" : "", (const char *) paths->pdata[i]);
        return g_string_free(s, FALSE);
}

static char *dir_id(const struct stat *st)
{
        return g_strdup_printf("%ju:%ju", (uintmax_t) st->st_dev, (uintmax_t) st->st_ino);
}

static bool dir_id_ok(const char *id)
{
        g_auto(GStrv) parts = g_strsplit(id, ":", -1);
        if (g_strv_length(parts) != 2)
                return false;
        for (char **p = parts; *p; p++)
                if (!g_ascii_string_to_unsigned(*p, 10, 0, G_MAXUINT64, NULL, NULL))
                        return false;
        return true;
}

/* The directory that holds `path`, as recorded in a journal. */
static int parent_id(const char *path, char **ret)
{
        g_autofree char *dir = g_path_get_dirname(path);
        struct stat st;
        if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
                return nkp_fail(-errno ? -errno : -ENOTDIR,
                                "Cannot read the directory '%s': %s. Nothing was changed.", dir,
                                g_strerror(errno ? errno : ENOTDIR));
        *ret = dir_id(&st);
        return 0;
}

static int record_dirs(NkpJournal *j)
{
        GPtrArray *lists[] = { j->files, j->scratch };
        for (size_t l = 0; l < G_N_ELEMENTS(lists); l++)
                for (guint i = 0; i < lists[l]->len; i++) {
                        char *id = NULL;
                        int r = parent_id(lists[l]->pdata[i], &id);
                        if (r < 0)
                                return r;
                        if (g_ptr_array_find_with_equal_func(j->dirs, id, g_str_equal, NULL))
                                g_free(id);
                        else
                                g_ptr_array_add(j->dirs, id);
                }
        return 0;
}

int nkp_journal_save(nkp_context *ctx, NkpJournal *j)
{
        for (guint i = 0; i < j->files->len; i++) {
                const char *p = j->files->pdata[i];
                if (strchr(p, ';'))
                        return nkp_fail(-EINVAL, "The path '%s' has a ';', which nkp cannot "
                                                 "journal; rename it. Nothing was changed.",
                                        p);
                if (!journal_path_ok(p, false))
                        return nkp_fail(-EINVAL, "The path '%s' is not a plain absolute path "
                                                 "(it has '.', '..', '//' or a trailing '/'), "
                                                 "which nkp cannot journal; give the domain its "
                                                 "plain absolute path. Nothing was changed.",
                                        p);
        }
        for (guint i = 0; i < j->scratch->len; i++)
                if (!journal_path_ok(j->scratch->pdata[i], true))
                        return nkp_fail(-EINVAL, "Internal error: '%s' is not an nkp work "
                                                 "directory. Nothing was changed.",
                                        (const char *) j->scratch->pdata[i]);
        int r = j->dirs->len ? 0 : record_dirs(j);
        if (r < 0)
                return r;
        gsize len = 0;
        g_autofree char *text = nkp_journal_format(j, &len);
        g_autofree char *dir = journal_dir(ctx);
        r = nkp_mkdir_private(dir);
        if (r < 0)
                return r;
        g_autofree char *path = nkp_journal_path(ctx, j->vm_uuid);
        return nkp_write_file_atomic(path, text, len, 0600, false);
}

char *nkp_journal_format(const NkpJournal *j, size_t *ret_len)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *files = join_paths(j->files);
        g_autofree char *scratch = join_paths(j->scratch);
        g_autofree char *dirs = join_paths(j->dirs);
        g_key_file_set_integer(kf, JOURNAL_GROUP, "version", 1);
        g_key_file_set_string(kf, JOURNAL_GROUP, "op", j->op);
        g_key_file_set_string(kf, JOURNAL_GROUP, "name", j->vm_name);
        g_key_file_set_string(kf, JOURNAL_GROUP, "uuid", j->vm_uuid);
        g_key_file_set_string(kf, JOURNAL_GROUP, "phase", nkp_journal_phase_name(j->phase));
        g_key_file_set_string(kf, JOURNAL_GROUP, "old", j->old_sig);
        g_key_file_set_string(kf, JOURNAL_GROUP, "new", j->new_sig);
        g_key_file_set_string(kf, JOURNAL_GROUP, "files", files);
        g_key_file_set_string(kf, JOURNAL_GROUP, "scratch", scratch);
        g_key_file_set_string(kf, JOURNAL_GROUP, "dirs", dirs);
        gsize len = 0;
        char *text = g_key_file_to_data(kf, &len, NULL);
        *ret_len = len;
        return text;
}

static bool split_into(const char *text, bool scratch, GPtrArray *out)
{
        g_auto(GStrv) parts = g_strsplit(text ? text : "", ";", -1);
        for (char **p = parts; *p; p++) {
                if (!(*p)[0])
                        continue;
                if (!journal_path_ok(*p, scratch))
                        return false;
                g_ptr_array_add(out, g_strdup(*p));
        }
        return true;
}

int nkp_journal_load(nkp_context *ctx, const char *vm_uuid, NkpJournal **ret)
{
        if (!uuid_ok(vm_uuid))
                return nkp_fail(-EINVAL, "'%s' is not a VM UUID.", vm_uuid ? vm_uuid : "");
        g_autofree char *path = nkp_journal_path(ctx, vm_uuid);
        g_autofree char *text = NULL;
        size_t len = 0;
        int r = nkp_read_file(path, JOURNAL_MAX, true, &text, &len);
        if (r == -ENOENT) {
                nkp_error_clear();
                return -ENOENT;
        }
        if (r < 0)
                return r;
        return nkp_journal_parse(text, len, vm_uuid, path, ret);
}

/* The operations that write journals (cmd-vm.c). */
static const char *const journal_ops[] = { "encrypt", "decrypt", "rekey-deep", NULL };

int nkp_journal_parse(const char *text, size_t len, const char *vm_uuid, const char *path,
                      NkpJournal **ret)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        if (!g_key_file_load_from_data(kf, text, len, G_KEY_FILE_NONE, NULL))
                return nkp_fail(-EBADMSG, "The journal '%s' is damaged.", path);
        g_autofree char *op = g_key_file_get_string(kf, JOURNAL_GROUP, "op", NULL);
        g_autofree char *name = g_key_file_get_string(kf, JOURNAL_GROUP, "name", NULL);
        g_autofree char *uuid = g_key_file_get_string(kf, JOURNAL_GROUP, "uuid", NULL);
        g_autofree char *phase = g_key_file_get_string(kf, JOURNAL_GROUP, "phase", NULL);
        g_autofree char *old_sig = g_key_file_get_string(kf, JOURNAL_GROUP, "old", NULL);
        g_autofree char *new_sig = g_key_file_get_string(kf, JOURNAL_GROUP, "new", NULL);
        g_autofree char *files = g_key_file_get_string(kf, JOURNAL_GROUP, "files", NULL);
        g_autofree char *scratch = g_key_file_get_string(kf, JOURNAL_GROUP, "scratch", NULL);
        g_autofree char *dirs = g_key_file_get_string(kf, JOURNAL_GROUP, "dirs", NULL);
        int version = g_key_file_get_integer(kf, JOURNAL_GROUP, "version", NULL);
        if (version != 1 || !op || !name || !uuid || !phase || !old_sig || !new_sig ||
            !uuid_ok(uuid) || (vm_uuid && g_ascii_strcasecmp(uuid, vm_uuid) != 0) ||
            !g_strv_contains(journal_ops, op) ||
            (strcmp(phase, "converting") != 0 && strcmp(phase, "ready") != 0))
                return nkp_fail(-EBADMSG, "The journal '%s' is damaged or of another version.",
                                path);
        g_autoptr(NkpJournal) j = nkp_journal_new(op, name, uuid, old_sig, new_sig);
        j->phase = strcmp(phase, "ready") == 0 ? NKP_JOURNAL_READY : NKP_JOURNAL_CONVERTING;
        if (!split_into(files, false, j->files) || !split_into(scratch, true, j->scratch))
                return nkp_fail(-EBADMSG, "The journal '%s' names a file or work directory that "
                                          "nkp would never write; it is damaged.",
                                path);
        /* A journal without dirs (older nkp) loads, but reconcile refuses it. */
        g_auto(GStrv) ids = g_strsplit(dirs ? dirs : "", ";", -1);
        for (char **p = ids; *p; p++) {
                if (!(*p)[0])
                        continue;
                if (!dir_id_ok(*p))
                        return nkp_fail(-EBADMSG, "The journal '%s' has a damaged 'dirs' entry "
                                                  "'%s'.",
                                        path, *p);
                g_ptr_array_add(j->dirs, g_strdup(*p));
        }
        *ret = g_steal_pointer(&j);
        return 0;
}

int nkp_journal_remove(nkp_context *ctx, const char *vm_uuid)
{
        g_autofree char *path = nkp_journal_path(ctx, vm_uuid);
        int r = nkp_unlink_nofollow(path);
        if (r < 0)
                return nkp_fail(r, "Cannot remove the journal '%s': %s.", path, g_strerror(-r));
        g_autofree char *dir = journal_dir(ctx);
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
                (void) fsync(fd);
                close(fd);
        }
        return 0;
}

/* ---- reconciling the files with a definition ----------------------------------- */

/* Every name is looked up relative to its directory's fd, without
 * following a symlink: the directory was checked once (confine()), and a
 * later swap of a path component cannot redirect a rename. */
static bool exists_at(int dfd, const char *name)
{
        struct stat st;
        return fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

/* What one file needs, decided before anything is touched. */
typedef enum {
        FIX_NOTHING,
        FIX_DROP_NEW,      /* back:    P, new        -> P            */
        FIX_RESTORE_OLD,   /* back:    [P,] old [,new] -> P(old)     */
        FIX_SWAP_AND_DROP, /* forward: P, new        -> P(new)       */
        FIX_NEW_IN,        /* forward: new [,old]    -> P(new)       */
        FIX_DROP_OLD,      /* forward: P, old        -> P            */
} Fix;

static int plan_file(const NkpJournal *j, const char *p, int dfd, const char *base, bool forward,
                     Fix *ret)
{
        g_autofree char *neu = g_strconcat(base, ".nkp-new", NULL);
        g_autofree char *old = g_strconcat(base, ".nkp-old", NULL);
        bool hp = exists_at(dfd, base), hn = exists_at(dfd, neu), ho = exists_at(dfd, old);
        if (!forward) {
                /* P.nkp-old only ever comes from renaming the original away,
                 * so whenever it exists it is the original. */
                if (ho)
                        *ret = FIX_RESTORE_OLD;
                else if (hp)
                        *ret = hn ? FIX_DROP_NEW : FIX_NOTHING;
                else
                        return nkp_fail(-EUCLEAN, "VM '%s': the file '%s' is gone and its "
                                                  "original copy too (%s); nothing was changed.",
                                        j->vm_name, p, hn ? "only the new copy is there"
                                                          : "no copy left");
                return 0;
        }
        if (hp && hn && ho)
                return nkp_fail(-EUCLEAN, "VM '%s': '%s' has both a new and an old copy beside it, "
                                          "so nkp cannot tell which one is current; nothing was "
                                          "changed.",
                                j->vm_name, p);
        if (hn)
                *ret = hp ? FIX_SWAP_AND_DROP : FIX_NEW_IN;
        else if (hp)
                *ret = ho ? FIX_DROP_OLD : FIX_NOTHING;
        else
                return nkp_fail(-EUCLEAN, "VM '%s': the file '%s' and its new copy are gone (%s); "
                                          "nothing was changed.",
                                j->vm_name, p, ho ? "only the original is there" : "no copy left");
        return 0;
}

static int do_rename(int dfd, const char *from, const char *to, const char *p)
{
        if (renameat(dfd, from, dfd, to) < 0)
                return nkp_fail(-errno, "Cannot rename '%s' to '%s' beside '%s': %s.", from, to,
                                p, g_strerror(errno));
        return 0;
}

static int do_unlink(int dfd, const char *name, const char *p)
{
        int r = nkp_unlink_at(dfd, name);
        if (r < 0)
                return nkp_fail(r, "Cannot remove '%s' beside '%s': %s.", name, p,
                                g_strerror(-r));
        return 0;
}

static int swap_at(int dfd, const char *base, const char *path)
{
        g_autofree char *neu = g_strconcat(base, ".nkp-new", NULL);
        g_autofree char *old = g_strconcat(base, ".nkp-old", NULL);
        int r = 0;
        if (exists_at(dfd, base) && !exists_at(dfd, old))
                r = do_rename(dfd, base, old, path);
        if (r == 0 && exists_at(dfd, neu)) {
                nkp_test_crash_point("swap-half");
                r = do_rename(dfd, neu, base, path);
        }
        if (r == 0 && !exists_at(dfd, base))
                r = nkp_fail(-ENOENT, "'%s' has no new copy to put in place.", path);
        return r;
}

static int apply_fix(const char *p, int dfd, const char *base, Fix fix)
{
        g_autofree char *neu = g_strconcat(base, ".nkp-new", NULL);
        g_autofree char *old = g_strconcat(base, ".nkp-old", NULL);
        int r = 0;
        switch (fix) {
        case FIX_NOTHING:
                return 0;
        case FIX_DROP_NEW:
                r = do_unlink(dfd, neu, p);
                break;
        case FIX_RESTORE_OLD:
                /* rename() replaces P (the new copy) in one step. */
                r = do_rename(dfd, old, base, p);
                if (r == 0)
                        r = do_unlink(dfd, neu, p);
                break;
        case FIX_SWAP_AND_DROP:
                r = swap_at(dfd, base, p);
                if (r == 0)
                        r = do_unlink(dfd, old, p);
                break;
        case FIX_NEW_IN:
                r = do_rename(dfd, neu, base, p);
                if (r == 0)
                        r = do_unlink(dfd, old, p);
                break;
        case FIX_DROP_OLD:
                r = do_unlink(dfd, old, p);
                break;
        }
        (void) nkp_fsync_dir_of(p);
        return r;
}

int nkp_journal_swap_file(const char *path)
{
        g_autofree char *base = NULL;
        int dfd = nkp_open_parent(path, &base);
        if (dfd < 0)
                return nkp_fail(dfd, "Cannot open the directory of '%s': %s.", path,
                                g_strerror(-dfd));
        int r = swap_at(dfd, base, path);
        (void) nkp_fsync_dir_of(path);
        close(dfd);
        return r;
}

void nkp_journal_remove_scratch(const NkpJournal *j)
{
        for (guint i = 0; i < j->scratch->len; i++)
                nkp_remove_tree(j->scratch->pdata[i]);
}

/* The directory of every path the journal names, opened once and checked
 * against the directories recorded when the operation began: a damaged or
 * crafted journal cannot make recovery rename or delete anything else. */
typedef struct {
        int *fds;
        char **bases;
        guint n;
} Confined;

static void confined_clear(Confined *c)
{
        for (guint i = 0; i < c->n; i++) {
                if (c->fds[i] >= 0)
                        close(c->fds[i]);
                g_free(c->bases[i]);
        }
        g_free(c->fds);
        g_free(c->bases);
}

static int confine(nkp_context *ctx, const NkpJournal *j, Confined *c)
{
        guint total = j->files->len + j->scratch->len;
        c->fds = g_new(int, total);
        c->bases = g_new0(char *, total);
        for (c->n = 0; c->n < total; c->n++) {
                guint i = c->n;
                const char *p = i < j->files->len ? j->files->pdata[i]
                                                  : j->scratch->pdata[i - j->files->len];
                c->fds[i] = nkp_open_parent(p, &c->bases[i]);
                if (c->fds[i] < 0) {
                        int e = -c->fds[i];
                        c->n++;
                        return nkp_fail(-e,
                                        "VM '%s': the journal of its interrupted '%s' names '%s', "
                                        "whose directory cannot be opened (%s); nothing was "
                                        "changed.",
                                        j->vm_name, j->op, p, g_strerror(e));
                }
                struct stat st;
                g_autofree char *id = NULL;
                if (fstat(c->fds[i], &st) == 0)
                        id = dir_id(&st);
                if (!id || !g_ptr_array_find_with_equal_func(j->dirs, id, g_str_equal, NULL)) {
                        c->n++;
                        return nkp_fail(-EPERM,
                                        "VM '%s': the journal '%s/journal/%s.ini' names '%s', "
                                        "outside the directories its '%s' recorded when it "
                                        "began; nothing was changed. Check the journal, and "
                                        "move it away if it is not nkp's.",
                                        j->vm_name, ctx->store_dir, j->vm_uuid, p, j->op);
                }
        }
        return 0;
}

int nkp_journal_reconcile(nkp_context *ctx, const NkpJournal *j, const char *sig,
                          NkpReconcile *ret_outcome)
{
        bool forward;
        if (sig && strcmp(sig, j->new_sig) == 0)
                forward = true;
        else if (sig && strcmp(sig, j->old_sig) == 0)
                forward = false;
        else
                return nkp_fail(-ESTALE,
                                "VM '%s' has an interrupted 'nkpctl vm %s', and its definition is "
                                "neither the one from before nor the one from after it, so nkp "
                                "cannot tell which files belong to it; nothing was changed. Define "
                                "the VM as it was before or after (virsh define), then run the "
                                "command again; the journal is '%s/journal/%s.ini'.",
                                j->vm_name, strcmp(j->op, "rekey-deep") == 0 ? "rekey --deep"
                                                                            : j->op,
                                ctx->store_dir, j->vm_uuid);
        if (forward && j->phase != NKP_JOURNAL_READY)
                return nkp_fail(-ESTALE,
                                "VM '%s' is defined with its new keys but its converted files "
                                "were never completed (journal phase '%s'); nothing was changed. "
                                "Define the VM as it was before (virsh define), then run the "
                                "command again.",
                                j->vm_name, nkp_journal_phase_name(j->phase));

        /* Every file is checked before any is touched: an error changes nothing. */
        Confined c = { 0 };
        int r = confine(ctx, j, &c);
        g_autofree Fix *fixes = g_new0(Fix, j->files->len + 1);
        for (guint i = 0; r == 0 && i < j->files->len; i++)
                r = plan_file(j, j->files->pdata[i], c.fds[i], c.bases[i], forward, &fixes[i]);
        if (r < 0) {
                confined_clear(&c);
                return r;
        }
        /* Scratch first when rolling back: it may hold a decrypted vTPM blob. */
        for (guint i = j->files->len; i < c.n; i++)
                nkp_remove_tree_at(c.fds[i], c.bases[i]);
        for (guint i = 0; r == 0 && i < j->files->len; i++) {
                r = apply_fix(j->files->pdata[i], c.fds[i], c.bases[i], fixes[i]);
                if (r < 0)
                        r = nkp_fail_prefix(r, "VM '%s': cannot %s the interrupted '%s'",
                                            j->vm_name, forward ? "finish" : "roll back", j->op);
                else
                        nkp_test_crash_point("file-reconciled");
        }
        confined_clear(&c);
        if (r < 0)
                return r;
        r = nkp_journal_remove(ctx, j->vm_uuid);
        if (r < 0)
                return r;
        if (ret_outcome)
                *ret_outcome = forward ? NKP_RECONCILE_FORWARD : NKP_RECONCILE_BACK;
        return 0;
}
