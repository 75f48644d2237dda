/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The VM conversions (nkp.h "VM operations"): encrypt, decrypt and deep
 * rekey of a shut-off VM, under the crash-safe conversion protocol, and the
 * recovery of one that a crash interrupted.
 *
 * encrypt, on a shut-off domain:
 *  1. provider = the named one or the default; it must be active (backed up).
 *  2. a DEK per object (the emulated vTPM, each chosen disk), a keysafe
 *     (fresh KEK salt) holding them wrapped, a random secret UUID each
 *     (nkp_enrol_build, enrol.c).
 *  3. each chosen plain qcow2 P is converted to a LUKS qcow2 P.nkp-new and
 *     compared with P (nkp_disk_convert, tools.c).  Free space is checked
 *     first (allocated size of each P + 5% + 16 MiB) and refused cleanly.
 *  4. the files are swapped and the new definition defined under the
 *     conversion protocol (convert_and_switch, journal.c,
 *     docs/crash-safety.md): a kill -9 at any instant leaves a VM that
 *     starts, under the old keys or the new.
 *  decrypt is the same the other way round (keys from the keysafe); deep
 *  rekey goes from the old keys to new ones (LUKS to LUKS, both keys on
 *  pipes), with a new keysafe and new secret UUIDs.
 *
 * The vTPM: with no state yet (never started) it is enrolled by the XML
 * alone; libvirt hands the secret to swtpm_setup/swtpm at the first start,
 * so no clear state is ever written.  A vTPM that has state (in the
 * context's [vtpm] state_dir) is converted through swtpm's state-blob
 * interface (nkp_vtpm_convert, tools.c), put beside the state file as
 * <file>.nkp-new and swapped in with the disks, all or nothing.
 *
 * Every operation holds the VM's lock (nkp_vm_lock) from start to end, and
 * first finishes or rolls back an operation a crash interrupted
 * (recover_locked: the one recovery, which the hook's prepare step uses
 * too). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "nkp-private.h"

/* How long a command waits for the VM's lock: the hook (at a start) and
 * `vm status` hold it for milliseconds, worth two seconds of patience; a
 * command holds it for as long as a full copy of the disks takes. */
#define COMMAND_LOCK_WAIT_MS 2000

struct nkp_vm_result {
        char *name;
        char *provider;  /* NULL after decrypt */
        bool vtpm;
        GPtrArray *disks; /* char*: targets converted */
        char *finished;   /* op words, when an interrupted run of it was finished */
};

static nkp_vm_result *result_new(const char *name)
{
        nkp_vm_result *r = g_new0(nkp_vm_result, 1);
        r->name = g_strdup(name);
        r->disks = g_ptr_array_new_with_free_func(g_free);
        return r;
}

void nkp_vm_result_free(nkp_vm_result *r)
{
        if (!r)
                return;
        g_free(r->name);
        g_free(r->provider);
        g_ptr_array_unref(r->disks);
        g_free(r->finished);
        g_free(r);
}

const char *nkp_vm_result_name(const nkp_vm_result *r)
{
        return r->name;
}

const char *nkp_vm_result_provider(const nkp_vm_result *r)
{
        return r->provider;
}

bool nkp_vm_result_vtpm(const nkp_vm_result *r)
{
        return r->vtpm;
}

size_t nkp_vm_result_n_disks(const nkp_vm_result *r)
{
        return r->disks->len;
}

const char *nkp_vm_result_disk(const nkp_vm_result *r, size_t i)
{
        return i < r->disks->len ? r->disks->pdata[i] : NULL;
}

const char *nkp_vm_result_finished(const nkp_vm_result *r)
{
        return r->finished;
}

const char *nkp_vm_op_words(const char *op)
{
        if (strcmp(op, "rekey-deep") == 0)
                return "vm rekey --deep";
        if (strcmp(op, "encrypt") == 0)
                return "vm encrypt";
        if (strcmp(op, "decrypt") == 0)
                return "vm decrypt";
        return op;
}

int nkp_vm_definition(NkpVirt *v, const char *name, char **ret_xml, NkpDomain **ret)
{
        g_autofree char *xml = NULL;
        int r = nkp_virt_domain_xml(v, name, true, &xml);
        if (r < 0)
                return r;
        r = nkp_domain_parse(xml, strlen(xml), ret);
        if (r < 0)
                return r;
        if (ret_xml)
                *ret_xml = g_steal_pointer(&xml);
        return 0;
}

/* ---- objects and their keys --------------------------------------------- */

static bool disk_is_candidate(const NkpDomainDisk *disk)
{
        return disk->target && g_strcmp0(disk->device, "disk") == 0 &&
               g_strcmp0(disk->type, "file") == 0 && disk->source_file &&
               g_strcmp0(disk->driver_type, "qcow2") == 0 && !disk->encryption_format;
}

/* One file to convert: from old_value (NULL: plain) to new_value (NULL:
 * plain); values are hex(DEK) as libvirt and QEMU get them.  A disk with
 * snapshots has a job per layer of its chain (docs/rekey.md "Disks with
 * snapshots"), all under the disk's one key. */
typedef struct {
        char *target;
        char *path;
        unsigned depth; /* 0: the disk's active layer, 1: its backing, … */
        unsigned below; /* layers under this one: 0 for a whole disk */
        char *snapshot; /* a layer only snapshot `snapshot` needs (off the current chain) */
        nkp_secret *old_value;
        nkp_secret *new_value;
} DiskJob;

static void disk_job_free(gpointer p)
{
        DiskJob *j = p;
        g_free(j->target);
        g_free(j->path);
        g_free(j->snapshot);
        nkp_secret_free(j->old_value);
        nkp_secret_free(j->new_value);
        g_free(j);
}

static DiskJob *disk_job_new(const char *target, const char *path)
{
        DiskJob *j = g_new0(DiskJob, 1);
        j->target = g_strdup(target);
        j->path = g_strdup(path);
        return j;
}

static int parse_disks(const NkpDomain *d, const char *spec, GPtrArray *jobs)
{
        bool all = !spec || strcmp(spec, "all") == 0;
        g_auto(GStrv) names = all ? NULL : g_strsplit(spec, ",", -1);
        if (all) {
                for (guint i = 0; i < d->disks->len; i++) {
                        const NkpDomainDisk *disk = d->disks->pdata[i];
                        if (!disk_is_candidate(disk)) {
                                if (g_strcmp0(disk->device, "disk") == 0 && disk->target &&
                                    !disk->encryption_format)
                                        nkp_log(NKP_LOG_WARNING,
                                                "note: disk '%s' of '%s' stays as it is (only "
                                                "file-backed qcow2 disks are encrypted).",
                                                disk->target, d->name);
                                continue;
                        }
                        g_ptr_array_add(jobs, disk_job_new(disk->target, disk->source_file));
                }
                return 0;
        }
        for (char **n = names; *n; n++) {
                if (!(*n)[0])
                        continue;
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, *n);
                if (!disk)
                        return nkp_fail(-ENOENT, "VM '%s' has no disk '%s'.", d->name, *n);
                if (disk->encryption_format)
                        return nkp_fail(-EEXIST, "Disk '%s' of VM '%s' is already encrypted "
                                                 "(format '%s').",
                                        *n, d->name, disk->encryption_format);
                if (!disk_is_candidate(disk))
                        return nkp_fail(-EOPNOTSUPP,
                                        "Disk '%s' of VM '%s' is not a file-backed qcow2 disk; "
                                        "nkp encrypts qcow2 files only (convert it first: "
                                        "qemu-img convert -O qcow2).",
                                        *n, d->name);
                g_ptr_array_add(jobs, disk_job_new(disk->target, disk->source_file));
        }
        return 0;
}

static int require_shut_off(NkpVirt *v, const char *name)
{
        int r = nkp_virt_domain_is_active(v, name);
        if (r < 0)
                return r;
        if (r > 0)
                return nkp_fail(-EBUSY, "VM '%s' is running; shut it down first (virsh shutdown "
                                        "'%s').",
                                name, name);
        /* A saved state restores with the definition and the keys it was
         * saved with, which the new files would no longer match. */
        r = nkp_virt_domain_has_managed_save(v, name);
        if (r < 0)
                return r;
        if (r > 0)
                return nkp_fail(-EBUSY, "VM '%s' has a saved state (virsh managedsave), which "
                                        "would restore with its old keys; start it and shut it "
                                        "down first (or drop the state: virsh managedsave-remove "
                                        "'%s'). Nothing was changed.",
                                name, name);
        return 0;
}

/* The new copies of every disk need, together, per file system: the
 * allocated size of each + 5% + 16 MiB.  Checked before anything is written.
 * NKP_TEST_FREE_SPACE (bytes) stands in for the free space (tests). */
static int check_space(GPtrArray *paths)
{
        g_autoptr(GHashTable) need_by_fs = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                                                 g_free, g_free);
        for (guint i = 0; i < paths->len; i++) {
                const char *path = paths->pdata[i];
                struct stat st;
                if (stat(path, &st) < 0)
                        return nkp_fail(-errno, "Cannot read the disk '%s': %s. Nothing was "
                                                "changed.",
                                        path, g_strerror(errno));
                g_autofree char *dir = g_path_get_dirname(path);
                struct statvfs vfs;
                if (statvfs(dir, &vfs) < 0)
                        return nkp_fail(-errno, "Cannot check the free space in '%s': %s.", dir,
                                        g_strerror(errno));
                guint64 one = (guint64) st.st_blocks * 512;
                one += one / 20 + 16 * 1024 * 1024;
                gint64 fs = (gint64) st.st_dev;
                guint64 *sum = g_hash_table_lookup(need_by_fs, &fs);
                if (!sum) {
                        sum = g_new0(guint64, 1);
                        g_hash_table_insert(need_by_fs, g_memdup2(&fs, sizeof fs), sum);
                }
                *sum += one;
                guint64 have = (guint64) vfs.f_bavail * vfs.f_frsize;
                if (g_getenv("NKP_TEST_FREE_SPACE"))
                        have = g_ascii_strtoull(g_getenv("NKP_TEST_FREE_SPACE"), NULL, 10);
                if (have < *sum)
                        return nkp_fail(-ENOSPC,
                                        "Not enough space in '%s' to convert '%s': %" G_GUINT64_FORMAT
                                        " MiB free, %" G_GUINT64_FORMAT " MiB needed (a full "
                                        "copy). Free some space and run the command again; "
                                        "nothing was changed.",
                                        dir, path, have >> 20, (*sum >> 20) + 1);
        }
        return 0;
}

/* ---- the conversion protocol (journal.c, docs/crash-safety.md) ----------- */
/*
 * With the VM's lock held for the whole operation:
 *   1. journal, phase converting          (crash point "journal")
 *   2. vTPM state -> <state>.nkp-new      ("vtpm-converted")
 *   3. each disk P -> P.nkp-new, compared ("disk-copied", "disk-converted")
 *   4. journal phase ready                ("ready")
 *   5. each file: P -> P.nkp-old, P.nkp-new -> P   ("swap-half", "swapped")
 *   6. the new definition                 ("defined")
 *   7. P.nkp-old removed, journal removed ("reconciled", "done")
 * Until 6 the definition is the old one and every file can go back; from 6
 * on it is the new one and every new copy is complete.  A failure before 6
 * rolls back at once; a crash anywhere is reconciled by the next operation
 * or by the hook at the next start (to whichever definition libvirt holds). */

typedef struct {
        const char *op;         /* journal op: "encrypt", "decrypt", "rekey-deep" */
        const NkpDomain *d;     /* the definition before */
        const char *newxml;     /* the definition after */
        GPtrArray *jobs;        /* DiskJob* */
        bool vtpm;              /* convert the vTPM state too */
        const nkp_secret *vtpm_old, *vtpm_new;
} Conversion;

/* Rolls the files back after a failure before the define, keeping the
 * failure's message. */
static int roll_back(nkp_context *ctx, const NkpJournal *j, int err)
{
        g_autofree char *msg = g_strdup(nkp_error_message());
        if (nkp_journal_reconcile(ctx, j, j->old_sig, NULL) < 0)
                return nkp_fail(err, "%s (and putting the files back failed: %s; run the "
                                     "command again)",
                                msg, nkp_error_message());
        return nkp_fail(err, "%s", msg);
}

static NkpJournal *journal_for(nkp_context *ctx, const Conversion *c, const char *new_sig)
{
        const NkpDomain *d = c->d;
        g_autofree char *old_sig = nkp_domain_signature(d);
        NkpJournal *j = nkp_journal_new(c->op, d->name, d->uuid, old_sig, new_sig);
        if (c->vtpm) {
                g_ptr_array_add(j->files, nkp_vtpm_state_file(ctx, d));
                g_ptr_array_add(j->scratch, nkp_vtpm_scratch_dir(ctx, d));
        }
        for (guint i = 0; i < c->jobs->len; i++)
                g_ptr_array_add(j->files, g_strdup(((DiskJob *) c->jobs->pdata[i])->path));
        return j;
}

/* ---- progress (nkp_context_set_progress) ---------------------------------- */

void nkp_context_set_progress(nkp_context *ctx, nkp_progress_func func, void *userdata)
{
        ctx->progress = func;
        ctx->progress_data = userdata;
}

void nkp_progress(const nkp_context *ctx, const char *op, const char *vm, const char *step,
                  unsigned done, unsigned total)
{
        if (ctx->progress)
                ctx->progress(op, vm, step, done, total, ctx->progress_data);
}

/* A conversion's steps: the vTPM state, each disk, the switch. */
static unsigned conversion_steps(const Conversion *c)
{
        return (c->vtpm ? 1u : 0u) + c->jobs->len + 1u;
}

/* A layer only snapshot dj->snapshot needs could not be converted (under
 * another key, say one an older deep rekey retired): the fix with it. */
static int branch_copy_failed(const NkpDomain *d, const DiskJob *dj, int err)
{
        g_autofree char *msg = g_strdup(nkp_error_message());
        return nkp_fail(err, "%s (Snapshot '%s' needs that layer; if it cannot be opened with "
                             "the disk's key any more, delete that snapshot: virsh "
                             "snapshot-delete '%s' '%s' --metadata.)",
                        msg, dj->snapshot, d->name, dj->snapshot);
}

/* Steps 2-3: every new copy, beside its file. */
static int make_copies(nkp_context *ctx, const Conversion *c)
{
        int r;
        unsigned done = 0, total = conversion_steps(c);
        if (c->vtpm) {
                nkp_progress(ctx, c->op, c->d->name, "vtpm", done++, total);
                r = nkp_vtpm_convert(ctx, c->d, c->vtpm_old, c->vtpm_new);
                if (r == 0)
                        r = nkp_vtpm_stage(ctx, c->d);
                if (r < 0)
                        return r;
                nkp_test_crash_point("vtpm-converted");
        }
        for (guint i = 0; i < c->jobs->len; i++) {
                DiskJob *dj = c->jobs->pdata[i];
                nkp_progress(ctx, c->op, c->d->name, dj->target, done++, total);
                r = dj->below > 0 ? nkp_layer_convert(dj->path, dj->below, dj->old_value,
                                                      dj->new_value)
                                  : nkp_disk_convert(dj->path, dj->old_value, dj->new_value);
                if (r < 0 && dj->snapshot)
                        return branch_copy_failed(c->d, dj, r);
                if (r < 0)
                        return r;
                nkp_test_crash_point("disk-converted");
        }
        return 0;
}

static int convert_and_switch(nkp_context *ctx, NkpVirt *v, const Conversion *c)
{
        const NkpDomain *d = c->d;
        g_autoptr(NkpDomain) nd = NULL;
        int r = nkp_domain_parse(c->newxml, strlen(c->newxml), &nd);
        if (r < 0)
                return nkp_fail_prefix(r, "The new definition of VM '%s' cannot be read",
                                       d->name);
        g_autofree char *new_sig = nkp_domain_signature(nd);
        g_autoptr(NkpJournal) j = journal_for(ctx, c, new_sig);
        g_autoptr(GPtrArray) disk_paths = g_ptr_array_new();
        for (guint i = 0; i < c->jobs->len; i++)
                g_ptr_array_add(disk_paths, ((DiskJob *) c->jobs->pdata[i])->path);
        if ((r = check_space(disk_paths)) < 0)
                return r;

        if ((r = nkp_journal_save(ctx, j)) < 0)
                return r;
        nkp_test_crash_point("journal");
        if ((r = make_copies(ctx, c)) < 0)
                return roll_back(ctx, j, r);
        unsigned total = conversion_steps(c);
        nkp_progress(ctx, c->op, d->name, "definition", total - 1, total);
        j->phase = NKP_JOURNAL_READY;
        if ((r = nkp_journal_save(ctx, j)) < 0)
                return roll_back(ctx, j, r);
        nkp_test_crash_point("ready");

        /* The hook refuses starts while we hold the lock; this catches a
         * start that was already under way when we took it. */
        r = require_shut_off(v, d->name);
        if (r < 0)
                return roll_back(ctx, j, r);
        for (guint i = 0; i < j->files->len; i++) {
                if ((r = nkp_journal_swap_file(j->files->pdata[i])) < 0)
                        return roll_back(ctx, j, r);
                nkp_test_crash_point("swapped");
        }
        r = nkp_virt_domain_define(v, c->newxml);
        if (r < 0) {
                r = nkp_fail_prefix(r, "The new definition of VM '%s' was refused, so every file "
                                       "was put back and nothing was changed",
                                    d->name);
                return roll_back(ctx, j, r);
        }
        nkp_test_crash_point("defined");
        /* From here the new definition is the truth: finish forward. */
        r = nkp_journal_reconcile(ctx, j, j->new_sig, NULL);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' has its new definition, but the old files "
                                          "could not all be removed (run the command again)",
                                       d->name);
        nkp_test_crash_point("done");
        nkp_progress(ctx, c->op, d->name, "done", total, total);
        return 0;
}

/* ---- the VM's lock, and recovering an interrupted operation --------------- */

static int lock_for_command(nkp_context *ctx, const NkpDomain *d, int *ret_fd)
{
        int r = nkp_vm_lock(ctx, d->uuid, true, COMMAND_LOCK_WAIT_MS, ret_fd);
        if (r == -EBUSY)
                return nkp_fail(r, "VM '%s' is being changed by another nkpctl command (vm "
                                   "encrypt, decrypt or rekey); wait for it to finish, then run "
                                   "this one again. Nothing was changed.",
                                d->name);
        return r;
}

int nkp_vm_recover_locked(nkp_context *ctx, const NkpDomain *d, bool at_start,
                          enum nkp_vm_recovery *ret, char **ret_op)
{
        g_autoptr(NkpJournal) j = NULL;
        int r = nkp_journal_load(ctx, d->uuid, &j);
        if (r == -ENOENT) {
                nkp_error_clear();
                *ret = NKP_VM_RECOVERY_NONE;
                return 0;
        }
        if (r < 0)
                return at_start ? nkp_fail_prefix(r, "VM '%s' cannot start", d->name) : r;
        g_autofree char *sig = nkp_domain_signature(d);
        NkpReconcile outcome;
        r = nkp_journal_reconcile(ctx, j, sig, &outcome);
        if (r < 0)
                return r;
        if (outcome == NKP_RECONCILE_BACK)
                nkp_log(NKP_LOG_WARNING, "note: VM '%s': rolled back the interrupted '%s'; its "
                                         "files are as they were before it.",
                        d->name, nkp_vm_op_words(j->op));
        if (ret_op)
                *ret_op = g_strdup(j->op);
        *ret = outcome == NKP_RECONCILE_FORWARD ? NKP_VM_RECOVERY_FINISHED
                                                : NKP_VM_RECOVERY_ROLLED_BACK;
        return 0;
}

int nkp_vm_recover(nkp_context *ctx, nkp_virt *v, const char *domain,
                   enum nkp_vm_recovery *ret_outcome)
{
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_vm_definition(v, domain, NULL, &d);
        if (r < 0)
                return r;
        int fd = -1;
        if ((r = lock_for_command(ctx, d, &fd)) < 0)
                return r;
        g_autofree char *op = NULL;
        enum nkp_vm_recovery outcome = NKP_VM_RECOVERY_NONE;
        r = nkp_vm_recover_locked(ctx, d, false, &outcome, &op);
        nkp_journal_unlock(fd);
        if (r < 0)
                return r;
        if (outcome == NKP_VM_RECOVERY_FINISHED)
                nkp_log(NKP_LOG_WARNING, "note: VM '%s': finished the interrupted '%s'.", domain,
                        nkp_vm_op_words(op));
        if (ret_outcome)
                *ret_outcome = outcome;
        return 0;
}

int nkp_vm_lock_recovered(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *op,
                          int *ret_lock, char **ret_finished, char **ret_xml, NkpDomain **ret)
{
        int fd = -1;
        int r = lock_for_command(ctx, d, &fd);
        if (r < 0)
                return r;
        g_autofree char *done_op = NULL;
        enum nkp_vm_recovery outcome;
        r = nkp_vm_recover_locked(ctx, d, false, &outcome, &done_op);
        if (r == 0 && outcome == NKP_VM_RECOVERY_FINISHED && strcmp(done_op, op) != 0)
                nkp_log(NKP_LOG_WARNING, "note: VM '%s': finished the interrupted '%s' first.",
                        d->name, nkp_vm_op_words(done_op));
        /* Read again under the lock: the recovery, or another command
         * before we held it, may have changed it. */
        g_autoptr(NkpDomain) now = NULL;
        if (r == 0)
                r = nkp_vm_definition(v, d->name, ret_xml, &now);
        if (r < 0) {
                nkp_journal_unlock(fd);
                return r;
        }
        if (ret_finished)
                *ret_finished = outcome == NKP_VM_RECOVERY_FINISHED ? g_steal_pointer(&done_op)
                                                                     : NULL;
        *ret_lock = fd;
        *ret = g_steal_pointer(&now);
        return 0;
}

/* The start of encrypt, decrypt and rekey --deep: the definition, the lock
 * (kept in *ret_lock until the caller releases it), an interrupted
 * operation reconciled, the definition again (as it is now), the VM shut
 * off.  Returns 1 when the interrupted operation was `op` itself and it was
 * finished (*res says so; nothing left to do), 0 to go on. */
static int begin_operation(nkp_context *ctx, NkpVirt *v, const char *name, const char *op,
                           nkp_vm_result *res, int *ret_lock, char **ret_xml, NkpDomain **ret)
{
        g_autoptr(NkpDomain) before = NULL, d = NULL;
        int r = nkp_vm_definition(v, name, NULL, &before);
        if (r < 0)
                return r;
        g_autofree char *done_op = NULL;
        if ((r = nkp_vm_lock_recovered(ctx, v, before, op, ret_lock, &done_op, ret_xml, &d)) < 0)
                return r;
        if (done_op && strcmp(done_op, op) == 0) {
                res->finished = g_strdup(nkp_vm_op_words(op));
                return 1;
        }
        if ((r = require_shut_off(v, name)) < 0)
                return r;
        *ret = g_steal_pointer(&d);
        return 0;
}

/* Releases the VM's lock when an operation ends (g_auto). */
typedef int VmLock;
static void vm_lock_release(VmLock *fd)
{
        nkp_journal_unlock(*fd);
}
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(VmLock, vm_lock_release)

/* What the caller asked for, handed to an operation's body. */
typedef struct {
        const char *provider;
        const char *disks;
} OpArgs;

/* The body of an operation, with the VM's lock held and the definition
 * `d` (its XML `xml`) as it is after any recovery. */
typedef int (*OpBody)(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *xml,
                      const OpArgs *a, nkp_vm_result *res);

/* An operation from begin to end: lock, recovery, body, lock released. */
static int run_operation(nkp_context *ctx, NkpVirt *v, const char *domain, const char *op,
                         OpBody body, const OpArgs *a, nkp_vm_result **ret)
{
        g_autoptr(nkp_vm_result) res = result_new(domain);
        g_autofree char *xml = NULL;
        g_autoptr(NkpDomain) d = NULL;
        g_auto(VmLock) lock = -1;
        int r = begin_operation(ctx, v, domain, op, res, &lock, &xml, &d);
        if (r == 0)
                r = body(ctx, v, d, xml, a, res);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&res);
        return 0;
}

static void result_add_disks(nkp_vm_result *res, GPtrArray *jobs)
{
        for (guint i = 0; i < jobs->len; i++) {
                const DiskJob *j = jobs->pdata[i];
                if (j->depth == 0 && !j->snapshot)
                        g_ptr_array_add(res->disks, g_strdup(j->target));
        }
}

/* ---- disks with snapshots (deep rekey, decrypt) ---------------------------- */
/* After `nkpctl vm snapshot` a disk is a chain base <- overlay <- …, every
 * layer LUKS under the disk's one secret (each with its own master key).
 * Deep rekey and decrypt convert every layer, each into its own
 * P.nkp-new over the same backing name (nkp_layer_convert: only the
 * clusters the layer allocates), so the chain, its file names and the
 * snapshots libvirt records stay as they were; the journal lists every
 * layer, so a kill anywhere is finished or rolled back like a one-file
 * disk.  A chain nkp cannot convert whole is refused before anything is
 * written: never a partial one (the layers left under a retired key). */

/* The refusal for a chain with a layer that is not LUKS under the disk's
 * secret. */
static int chain_refusal(const NkpDomain *d, const char *target, const char *path,
                         const char *why)
{
        return nkp_fail(-EOPNOTSUPP, "Disk %s of VM '%s' has the snapshot layer '%s', which %s; "
                                     "nkp converts a chain only when every layer is LUKS under "
                                     "the disk's key. Encrypt it first (nkpctl vm encrypt-layer "
                                     "'%s' '%s') or commit the chain (virsh blockcommit '%s' %s "
                                     "--active --pivot). Nothing was changed.",
                        target, d->name, path, why, d->name, path, d->name, target);
}

/* Jobs for every layer of the file disk `disk` (secret `secret_uuid`, key
 * `old_value`, copied into each job) into `jobs`; its layers
 * (NkpDiskLayer*) into `chains` when there is more than one.  Returns 1
 * (no job) for a one-layer disk that is not encrypted. */
static int add_chain_jobs(const NkpDomain *d, const char *xml, const NkpDomainDisk *disk,
                          const char *secret_uuid, nkp_secret **old_value, GPtrArray *jobs,
                          GHashTable *chains)
{
        const char *target = disk->target, *path = disk->source_file;
        g_autoptr(GPtrArray) layers = NULL;
        int r = nkp_disk_chain_layers(xml, strlen(xml), target, secret_uuid, &layers);
        if (r < 0)
                return r;
        if (layers->len <= 1 && !disk->encryption_format)
                return 1;
        if (layers->len <= 1) {
                DiskJob *j = disk_job_new(target, path);
                j->old_value = g_steal_pointer(old_value);
                g_ptr_array_add(jobs, j);
                return 0;
        }
        for (guint k = 0; k < layers->len; k++) {
                const NkpDiskLayer *l = layers->pdata[k];
                if (l->format && strcmp(l->format, "qcow2") != 0)
                        return chain_refusal(d, target, l->path, "is not a qcow2 file");
                int luks = nkp_qcow2_is_luks(l->path);
                if (luks < 0)
                        return nkp_fail(luks, "Cannot read the qcow2 header of '%s', a layer of "
                                              "disk %s of VM '%s': %s. Nothing was changed.",
                                        l->path, target, d->name, g_strerror(-luks));
                if (!luks || !l->encrypted)
                        return chain_refusal(d, target, l->path, "is not encrypted");
                if (!l->secret_uuid || g_ascii_strcasecmp(l->secret_uuid, secret_uuid) != 0)
                        return chain_refusal(d, target, l->path, "is under another secret "
                                                                 "than the disk's");
                DiskJob *j = disk_job_new(target, l->path);
                j->depth = k;
                j->below = layers->len - 1 - k;
                if ((r = nkp_secret_new_copy(nkp_secret_data(*old_value),
                                             nkp_secret_len(*old_value), &j->old_value)) < 0) {
                        disk_job_free(j);
                        return r;
                }
                g_ptr_array_add(jobs, j);
        }
        g_hash_table_insert(chains, g_strdup(target), g_steal_pointer(&layers));
        return 0;
}

/* `*xml` with every chain of `chains` written back with each layer under
 * the secret `secret_of(target)` (NULL: plain, decrypt). */
static int rewrite_chains(char **xml, GHashTable *chains,
                          const char *(*secret_of)(const void *data, const char *target),
                          const void *data)
{
        GHashTableIter it;
        gpointer key, value;
        g_hash_table_iter_init(&it, chains);
        while (g_hash_table_iter_next(&it, &key, &value)) {
                GPtrArray *layers = value;
                const char *uuid = secret_of(data, key);
                for (guint k = 0; k < layers->len; k++) {
                        NkpDiskLayer *l = layers->pdata[k];
                        g_free(l->secret_uuid);
                        l->secret_uuid = g_strdup(uuid);
                        l->encrypted = uuid != NULL;
                }
                char *out = NULL;
                int r = nkp_domain_set_disk_chain(*xml, key, layers, &out);
                if (r < 0)
                        return r;
                g_free(*xml);
                *xml = out;
        }
        return 0;
}

static GHashTable *chains_new(void)
{
        return g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                     (GDestroyNotify) g_ptr_array_unref);
}

/* ---- layers only a snapshot needs (off the current chain) ------------------ */
/* `vm revert` leaves the branch it abandons on disk when another snapshot
 * needs its layers ("kept"), and every snapshot names its own overlay.
 * Like every layer of an nkp disk they are opened with the disk's one key,
 * so deep rekey and decrypt convert them too, in the same transaction as
 * the current chain: each file once, over its own chain (`below` from the
 * chain that names it), listed in the journal like the others.  Every copy
 * reads its source chain under the old key: the journal swaps files only
 * once every copy is made.  docs/rekey.md "Disks with snapshots". */

static bool same_file(const char *a, const char *b)
{
        struct stat sa, sb;
        return strcmp(a, b) == 0 || (stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
                                     sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino);
}

static DiskJob *job_of_file(GPtrArray *jobs, const char *path)
{
        for (guint i = 0; i < jobs->len; i++)
                if (same_file(((DiskJob *) jobs->pdata[i])->path, path))
                        return jobs->pdata[i];
        return NULL;
}

static int branch_refusal(const NkpDomain *d, const char *snap, const char *target,
                          const char *path, const char *why)
{
        return nkp_fail(-EOPNOTSUPP, "VM '%s': snapshot '%s' needs the layer '%s' of disk %s, "
                                     "which %s; nkp converts every layer a snapshot needs, or "
                                     "none. Delete that snapshot (virsh snapshot-delete '%s' "
                                     "'%s' --metadata, then its files no other snapshot needs) "
                                     "and run the command again. Nothing was changed.",
                        d->name, snap, path, target, why, d->name, snap);
}

/* A layer a snapshot names is there, a qcow2, LUKS (under the disk's key:
 * a layer under another key makes its copy fail, which rolls back). */
static int check_branch_layer(const NkpDomain *d, const char *snap, const char *target,
                              const char *path, const char *format)
{
        struct stat st;
        if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
                return branch_refusal(d, snap, target, path, "is missing");
        int luks = format && strcmp(format, "qcow2") != 0 ? -EMEDIUMTYPE
                                                            : nkp_qcow2_is_luks(path);
        if (luks == -EMEDIUMTYPE)
                return branch_refusal(d, snap, target, path, "is not a qcow2 file");
        if (luks < 0)
                return nkp_fail(luks, "Cannot read the qcow2 header of '%s', a layer snapshot "
                                      "'%s' of VM '%s' needs: %s. Nothing was changed.",
                                path, snap, d->name, g_strerror(-luks));
        if (!luks)
                return branch_refusal(d, snap, target, path, "is not encrypted");
        return 0;
}

/* The job for `path`, layer `depth` of disk `top->target`'s chain at
 * snapshot `snap` with `below` layers under it: none when `jobs` holds the
 * file already (at the same depth: the chains agree), else a new one under
 * the disk's old key. */
static int add_branch_layer(const NkpDomain *d, const char *snap, const DiskJob *top,
                            const char *path, const char *format, unsigned depth,
                            unsigned below, GPtrArray *jobs)
{
        const DiskJob *have = job_of_file(jobs, path);
        if (have && have->below == below)
                return 0;
        if (have) {
                g_autofree char *why = g_strdup_printf(
                        "has %u layer(s) under it there and %u in the disk's chain (a "
                        "blockcommit or blockpull changed it since)",
                        below, have->below);
                return branch_refusal(d, snap, top->target, path, why);
        }
        int r = check_branch_layer(d, snap, top->target, path, format);
        if (r < 0)
                return r;
        DiskJob *j = disk_job_new(top->target, path);
        j->snapshot = g_strdup(snap);
        j->depth = depth;
        j->below = below;
        g_ptr_array_add(jobs, j);
        return nkp_secret_new_copy(nkp_secret_data(top->old_value), nkp_secret_len(top->old_value),
                                   &j->old_value);
}

/* The layers of disk `top->target` that snapshot `s` names, as jobs: its
 * chain at `s`, or (`overlay`) the overlay `s` made, when it is still
 * there. */
static int add_snapshot_jobs(const NkpDomain *d, const NkpRevertSnapshot *s, const DiskJob *top,
                             bool overlay, GPtrArray *jobs)
{
        g_autoptr(GPtrArray) chain = NULL;
        int r = nkp_revert_chain_at(s, top->target, nkp_vm_disk_secret_uuid(d, top->target),
                                    &chain);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s': the disks of snapshot '%s' cannot be read",
                                       d->name, s->name);
        if (chain->len == 0)
                return 0; /* the disk was not there then */
        for (guint k = 0; k < chain->len && !overlay; k++) {
                const NkpDiskLayer *l = chain->pdata[k];
                if ((r = add_branch_layer(d, s->name, top, l->path, l->format, k + 1,
                                          chain->len - 1 - k, jobs)) < 0)
                        return r;
        }
        /* The overlay took the writes after `s`; vm revert never reads it,
         * so one deleted (revert --delete-abandoned) is no loss. */
        for (size_t i = 0; overlay && s->external && s->external[i]; i++) {
                const char *file = s->overlays[i];
                if (strcmp(s->external[i], top->target) != 0 || !file[0] ||
                    (access(file, F_OK) < 0 && errno == ENOENT))
                        continue;
                if ((r = add_branch_layer(d, s->name, top, file, "qcow2", 0, chain->len,
                                          jobs)) < 0)
                        return r;
        }
        return 0;
}

/* Jobs for every layer a snapshot of `d` names that the current chains of
 * `jobs` do not hold (each disk's old key from its active-layer job): the
 * snapshots' chains first, so that a refusal names the snapshot that needs
 * a layer rather than the one whose overlay it is. */
static int add_branch_jobs(NkpVirt *v, const NkpDomain *d, GPtrArray *jobs)
{
        g_autoptr(GPtrArray) snapshots = NULL;
        int r = nkp_vm_snapshots(v, d->name, &snapshots);
        if (r < 0)
                return r;
        guint n = jobs->len;
        for (guint i = 0; i < n; i++) {
                const DiskJob *top = jobs->pdata[i];
                if (top->depth != 0 || top->snapshot)
                        continue;
                for (int overlay = 0; overlay < 2; overlay++)
                        for (guint k = 0; k < snapshots->len; k++)
                                if ((r = add_snapshot_jobs(d, snapshots->pdata[k], top,
                                                           overlay, jobs)) < 0)
                                        return r;
        }
        return 0;
}

/* The vm-plain-disk alarms (enrol.c) of disks just encrypted. */
static void clear_plain_disk_alarms(nkp_context *ctx, const char *name, GPtrArray *jobs)
{
        for (guint i = 0; i < jobs->len; i++) {
                g_autofree char *subject =
                        nkp_disk_alarm_subject(name, ((DiskJob *) jobs->pdata[i])->target);
                (void) nkp_alarm_clear(ctx, "vm-plain-disk", subject);
        }
        nkp_error_clear();
}

/* ---- encrypt ------------------------------------------------------------ */

/* The vTPM of a VM about to be encrypted: *ret_enrol when it is there to
 * protect, *ret_convert when it has clear state to convert. */
static int vtpm_to_encrypt(nkp_context *ctx, const NkpDomain *d, bool *ret_enrol,
                           bool *ret_convert)
{
        *ret_enrol = *ret_convert = false;
        if (!d->has_vtpm)
                return 0;
        if (d->tpm_secret)
                return nkp_fail(-EEXIST, "The vTPM of VM '%s' is already encrypted with the "
                                         "libvirt secret '%s', which nkp does not manage; "
                                         "nothing was changed.",
                                d->name, d->tpm_secret);
        enum nkp_vtpm_state st = nkp_vtpm_state(ctx, d);
        if (st == NKP_VTPM_STATE_ENCRYPTED || st == NKP_VTPM_STATE_UNKNOWN) {
                g_autofree char *f = nkp_vtpm_state_file(ctx, d);
                return nkp_fail(-EUCLEAN,
                                "The vTPM state of VM '%s' ('%s') is %s, but the VM names no key "
                                "for it; nkp cannot take it over. Nothing was changed.",
                                d->name, f,
                                st == NKP_VTPM_STATE_ENCRYPTED ? "encrypted" : "unreadable");
        }
        *ret_convert = st == NKP_VTPM_STATE_CLEAR;
        *ret_enrol = true;
        return 0;
}

static int provider_usable(const nkp_provider *p, const char *tail)
{
        if (nkp_provider_is_active(p))
                return 0;
        return nkp_fail(-EPERM, "Provider '%s' was never backed up, so it cannot protect VMs "
                                "yet: nkpctl provider backup '%s' --out FILE.p12.%s",
                        nkp_provider_name(p), nkp_provider_name(p), tail);
}

/* `vm encrypt VM --disks …` on a VM nkp already protects (e.g. a vTPM
 * nkpd enrolled): the disks get DEKs in the VM's own keysafe (re-wrapped
 * under a fresh KEK salt, same provider, the other DEKs unchanged) and are
 * converted under the same protocol as a first encrypt. */
static int add_disks_locked(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *xml,
                            const char *disks, nkp_vm_result *res)
{
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        int r = parse_disks(d, disks, jobs);
        if (r < 0)
                return r;
        if (jobs->len == 0)
                return nkp_fail(-ENOENT, "VM '%s' has no plain qcow2 disk to add to its keysafe; "
                                         "nothing was changed.",
                                d->name);
        g_autoptr(GPtrArray) targets = g_ptr_array_new();
        for (guint i = 0; i < jobs->len; i++)
                g_ptr_array_add(targets, ((DiskJob *) jobs->pdata[i])->target);
        g_autoptr(NkpEnrolment) en = NULL;
        if ((r = nkp_enrol_build(ctx, d, xml, NULL, false, targets, &en)) < 0)
                return r;
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                j->new_value = g_steal_pointer(&((NkpEnrolDisk *) en->disks->pdata[i])->value);
        }
        const Conversion c = { .op = "encrypt", .d = d, .newxml = en->xml, .jobs = jobs };
        if ((r = convert_and_switch(ctx, v, &c)) < 0)
                return r;
        res->provider = g_strdup(en->provider);
        result_add_disks(res, jobs);
        clear_plain_disk_alarms(ctx, d->name, jobs);
        return 0;
}

static int encrypt_locked(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *xml,
                          const OpArgs *a, nkp_vm_result *res)
{
        const char *provider = a->provider, *disks = a->disks;
        if (d->keysafe && disks && !provider)
                return add_disks_locked(ctx, v, d, xml, disks, res);
        if (d->keysafe)
                return nkp_fail(-EEXIST, "VM '%s' is already encrypted by provider '%s'; to add "
                                         "disks: nkpctl vm encrypt '%s' --disks vda[,vdb] (its own "
                                         "provider); to move it: nkpctl vm rekey '%s' --provider "
                                         "NAME.",
                                d->name, nkp_keysafe_provider_name(d->keysafe), d->name, d->name);
        g_autoptr(nkp_provider) p = NULL;
        int r = nkp_provider_pick(ctx, provider, &p);
        if (r < 0 || (r = provider_usable(p, "")) < 0)
                return r;
        bool do_vtpm, convert_vtpm;
        if ((r = vtpm_to_encrypt(ctx, d, &do_vtpm, &convert_vtpm)) < 0)
                return r;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        if ((r = parse_disks(d, disks, jobs)) < 0)
                return r;
        if (!do_vtpm && jobs->len == 0)
                return nkp_fail(-ENOENT, "VM '%s' has neither an emulated vTPM nor a qcow2 disk "
                                         "to encrypt; nothing was changed.",
                                d->name);

        /* Keys, keysafe and the new definition (enrol.c, shared with nkpd),
         * built before anything on disk changes. */
        g_autoptr(GPtrArray) targets = g_ptr_array_new();
        for (guint i = 0; i < jobs->len; i++)
                g_ptr_array_add(targets, ((DiskJob *) jobs->pdata[i])->target);
        g_autoptr(NkpEnrolment) en = NULL;
        if ((r = nkp_enrol_build(ctx, d, xml, p, do_vtpm, targets, &en)) < 0)
                return r;
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                j->new_value = g_steal_pointer(&((NkpEnrolDisk *) en->disks->pdata[i])->value);
        }
        const Conversion c = { .op = "encrypt", .d = d, .newxml = en->xml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_new = en->vtpm_value };
        if ((r = convert_and_switch(ctx, v, &c)) < 0)
                return r;
        res->provider = g_strdup(nkp_provider_name(p));
        res->vtpm = do_vtpm;
        result_add_disks(res, jobs);
        clear_plain_disk_alarms(ctx, d->name, jobs);
        return 0;
}

int nkp_vm_encrypt(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                   const char *disks, nkp_vm_result **ret)
{
        const OpArgs a = { .provider = provider, .disks = disks };
        return run_operation(ctx, v, domain, "encrypt", encrypt_locked, &a, ret);
}

/* ---- decrypt ------------------------------------------------------------ */

/* The new (plain) definition: no keysafe, no <encryption> where nkp put one. */
static int plain_definition(const char *xml, bool vtpm, GPtrArray *jobs, char **ret)
{
        g_autoptr(NkpDomainEdit) e = NULL;
        int r = nkp_domain_edit_new(xml, strlen(xml), &e);
        if (r < 0 || (r = nkp_domain_edit_set_keysafe(e, NULL)) < 0)
                return r;
        if (vtpm && (r = nkp_domain_edit_set_vtpm_secret(e, NULL)) < 0)
                return r;
        for (guint i = 0; i < jobs->len; i++) {
                const DiskJob *j = jobs->pdata[i];
                if (j->depth == 0 && !j->snapshot &&
                    (r = nkp_domain_edit_set_disk_luks(e, j->target, NULL)) < 0)
                        return r;
        }
        return nkp_domain_edit_format(e, ret);
}

/* The vTPM state must be encrypted, as a keysafe with a vTPM key says:
 * *ret_convert when there is state to convert (none yet: nothing). */
static int vtpm_encrypted_state(nkp_context *ctx, const NkpDomain *d, bool *ret_convert)
{
        enum nkp_vtpm_state st = nkp_vtpm_state(ctx, d);
        if (st == NKP_VTPM_STATE_CLEAR || st == NKP_VTPM_STATE_UNKNOWN) {
                g_autofree char *f = nkp_vtpm_state_file(ctx, d);
                return nkp_fail(-EUCLEAN, "The vTPM state of VM '%s' ('%s') is %s, not "
                                          "encrypted as its keysafe says; nothing was changed.",
                                d->name, f, st == NKP_VTPM_STATE_CLEAR ? "clear" : "unreadable");
        }
        *ret_convert = st == NKP_VTPM_STATE_ENCRYPTED;
        return 0;
}

static void undefine_old_secrets(NkpVirt *v, GPtrArray *secrets)
{
        /* Its secrets, if a start left any behind. */
        for (guint i = 0; i < secrets->len; i++)
                (void) nkp_virt_secret_undefine(v, ((NkpVmSecret *) secrets->pdata[i])->secret_uuid);
}

static const char *no_secret(const void *data, const char *target)
{
        (void) data;
        (void) target;
        return NULL;
}

static int decrypt_locked(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *xml,
                          const OpArgs *a, nkp_vm_result *res)
{
        (void) a;
        if (!d->keysafe)
                return nkp_fail(-ENOENT, "VM '%s' is not encrypted by nkp; nothing to do.",
                                d->name);
        g_autoptr(GPtrArray) secrets = NULL;
        int r = nkp_vm_unlock(ctx, d, true, &secrets);
        if (r < 0)
                return r;
        bool has_vtpm_entry = false;
        g_autoptr(nkp_secret) vtpm_value = NULL;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        g_autoptr(GHashTable) chains = chains_new();
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0) {
                        has_vtpm_entry = true;
                        vtpm_value = g_steal_pointer(&s->value);
                        continue;
                }
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, s->object_id);
                if (!disk)
                        continue; /* detached: nothing to undo */
                if (disk->encryption_format && !disk->source_file)
                        return nkp_fail(-EINVAL, "Disk '%s' of VM '%s' has no file path.",
                                        s->object_id, d->name);
                /* Never converted: nothing to undo; but a plain overlay
                 * over the disk's LUKS layers is refused (dropping the key
                 * would lose them). */
                if (disk->source_file && (r = add_chain_jobs(d, xml, disk, s->secret_uuid,
                                                             &s->value, jobs, chains)) < 0)
                        return r;
        }
        if ((r = add_branch_jobs(v, d, jobs)) < 0)
                return r;
        bool vtpm = has_vtpm_entry && d->has_vtpm, convert_vtpm = false;
        if (vtpm && (r = vtpm_encrypted_state(ctx, d, &convert_vtpm)) < 0)
                return r;
        g_autofree char *newxml = NULL;
        if ((r = plain_definition(xml, vtpm, jobs, &newxml)) < 0 ||
            (r = rewrite_chains(&newxml, chains, no_secret, NULL)) < 0)
                return r;
        const Conversion c = { .op = "decrypt", .d = d, .newxml = newxml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_old = vtpm_value };
        if ((r = convert_and_switch(ctx, v, &c)) < 0)
                return r;
        undefine_old_secrets(v, secrets);
        nkp_alarm_clear(ctx, "vm-locked", d->name);
        res->vtpm = vtpm;
        result_add_disks(res, jobs);
        return 0;
}

int nkp_vm_decrypt(nkp_context *ctx, nkp_virt *v, const char *domain, nkp_vm_result **ret)
{
        const OpArgs a = { 0 };
        return run_operation(ctx, v, domain, "decrypt", decrypt_locked, &a, ret);
}

/* ---- deep rekey ------------------------------------------------------------ */
/* New DEKs for every object, under a new keysafe (fresh KEK salt) and new
 * secret UUIDs: a libvirt secret left over from an earlier start (old UUID,
 * old value) can then never be mistaken for a new one.  The vTPM state and
 * every disk are re-encrypted through the conversion protocol above.  A key
 * in the keysafe for an object the VM no longer has would be lost: refused. */

/* The provider to rekey to: named, else the VM's own (by key id). */
static int rekey_provider(nkp_context *ctx, const NkpDomain *d, const char *name,
                          nkp_provider **ret)
{
        if (name)
                return nkp_provider_pick(ctx, name, ret);
        const char *key_id = nkp_keysafe_provider_key_id(d->keysafe);
        int r = nkp_provider_get_by_key_id(ctx, key_id, ret);
        if (r == -ENOENT)
                return nkp_fail(-ENOKEY, "The provider '%s' (key id %s) that protects VM '%s' is "
                                         "not in this host's store; restore it (nkpctl provider "
                                         "restore FILE.p12) or name another with --provider. "
                                         "Nothing was changed.",
                                nkp_keysafe_provider_name(d->keysafe), key_id, d->name);
        return r;
}

/* The old keys of every object, as disk jobs (and the vTPM's). */
static int old_keys(nkp_context *ctx, const NkpDomain *d, const char *xml, GPtrArray *jobs,
                    GHashTable *chains, bool *ret_vtpm, nkp_secret **ret_vtpm_old,
                    GPtrArray **ret_secrets)
{
        g_autoptr(GPtrArray) secrets = NULL;
        int r = nkp_vm_unlock(ctx, d, true, &secrets);
        if (r < 0)
                return r;
        for (guint i = 0; i < secrets->len; i++) {
                NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0) {
                        if (!d->has_vtpm)
                                return nkp_fail(-EUCLEAN, "VM '%s' has a vTPM key in its keysafe "
                                                          "but no emulated vTPM; a deep rekey "
                                                          "would lose that key. Nothing was "
                                                          "changed.",
                                                d->name);
                        *ret_vtpm = true;
                        *ret_vtpm_old = g_steal_pointer(&s->value);
                        continue;
                }
                const NkpDomainDisk *disk = nkp_domain_find_disk(d, s->object_id);
                if (disk && disk->source_file && g_strcmp0(disk->type, "file") == 0)
                        r = add_chain_jobs(d, xml, disk, s->secret_uuid, &s->value, jobs,
                                           chains);
                else
                        r = 1;
                if (r < 0)
                        return r;
                if (r > 0)
                        return nkp_fail(-EUCLEAN, "VM '%s' has a key in its keysafe for disk "
                                                  "'%s', which is not an encrypted file disk of "
                                                  "the VM any more; a deep rekey would lose "
                                                  "that key. Attach the disk again first. "
                                                  "Nothing was changed.",
                                        d->name, s->object_id);
        }
        *ret_secrets = g_steal_pointer(&secrets);
        return 0;
}

/* The new key of disk `target` (nkp_enrol_build made one per target). */
static const NkpEnrolDisk *enrol_disk(const NkpEnrolment *en, const char *target)
{
        for (guint i = 0; i < en->disks->len; i++) {
                const NkpEnrolDisk *ed = en->disks->pdata[i];
                if (strcmp(ed->target, target) == 0)
                        return ed;
        }
        g_assert_not_reached();
        return NULL;
}

static const char *enrol_secret(const void *data, const char *target)
{
        return enrol_disk(data, target)->secret_uuid;
}

/* Each snapshot's record names the secrets of its moment: after a deep
 * rekey, the new ones (docs/snapshots-clones.md "Reverting"). */
static void snapshots_to_new_secrets(NkpVirt *v, const NkpDomain *d, GPtrArray *secrets,
                                     const NkpEnrolment *en)
{
        g_autoptr(GPtrArray) from = g_ptr_array_new(), to = g_ptr_array_new();
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                const char *now = NULL;
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0)
                        now = en->vtpm ? en->vtpm_secret_uuid : NULL;
                for (guint k = 0; !now && k < en->disks->len; k++) {
                        const NkpEnrolDisk *ed = en->disks->pdata[k];
                        if (strcmp(ed->target, s->object_id) == 0)
                                now = ed->secret_uuid;
                }
                if (now) {
                        g_ptr_array_add(from, s->secret_uuid);
                        g_ptr_array_add(to, (gpointer) now);
                }
        }
        g_ptr_array_add(from, NULL);
        g_ptr_array_add(to, NULL);
        (void) nkp_vm_snapshots_rename_secrets(v, d->name, (const char *const *) from->pdata,
                                               (const char *const *) to->pdata);
}

static int rekey_deep_locked(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *xml,
                             const OpArgs *a, nkp_vm_result *res)
{
        const char *provider = a->provider;
        if (!d->keysafe)
                return nkp_fail(-ENOENT, "VM '%s' is not encrypted by nkp, so it has no keys to "
                                         "renew; encrypt it with: nkpctl vm encrypt '%s'.",
                                d->name, d->name);
        g_autoptr(nkp_provider) p = NULL;
        int r = rekey_provider(ctx, d, provider, &p);
        if (r < 0 || (r = provider_usable(p, " Nothing was changed.")) < 0)
                return r;
        bool vtpm = false, convert_vtpm = false;
        g_autoptr(nkp_secret) vtpm_old = NULL;
        g_autoptr(GPtrArray) secrets = NULL;
        g_autoptr(GPtrArray) jobs = g_ptr_array_new_with_free_func(disk_job_free);
        g_autoptr(GHashTable) chains = chains_new();
        if ((r = old_keys(ctx, d, xml, jobs, chains, &vtpm, &vtpm_old, &secrets)) < 0 ||
            (r = add_branch_jobs(v, d, jobs)) < 0)
                return r;
        if (vtpm && (r = vtpm_encrypted_state(ctx, d, &convert_vtpm)) < 0)
                return r;
        g_autoptr(GPtrArray) targets = g_ptr_array_new();
        for (guint i = 0; i < jobs->len; i++) {
                const DiskJob *j = jobs->pdata[i];
                if (j->depth == 0 && !j->snapshot)
                        g_ptr_array_add(targets, j->target);
        }

        /* A new keysafe: nkp_enrol_build makes one when the domain has none. */
        NkpDomain fresh = *d;
        fresh.keysafe = NULL;
        g_autoptr(NkpEnrolment) en = NULL;
        if ((r = nkp_enrol_build(ctx, &fresh, xml, p, vtpm, targets, &en)) < 0)
                return r;
        for (guint i = 0; i < jobs->len; i++) {
                DiskJob *j = jobs->pdata[i];
                const NkpEnrolDisk *ed = enrol_disk(en, j->target);
                if ((r = nkp_secret_new_copy(nkp_secret_data(ed->value),
                                             nkp_secret_len(ed->value), &j->new_value)) < 0)
                        return r;
        }
        if ((r = rewrite_chains(&en->xml, chains, enrol_secret, en)) < 0)
                return r;
        const Conversion c = { .op = "rekey-deep", .d = d, .newxml = en->xml, .jobs = jobs,
                               .vtpm = convert_vtpm, .vtpm_old = vtpm_old,
                               .vtpm_new = en->vtpm_value };
        if ((r = convert_and_switch(ctx, v, &c)) < 0)
                return r;
        snapshots_to_new_secrets(v, d, secrets, en);
        undefine_old_secrets(v, secrets);
        res->provider = g_strdup(nkp_provider_name(p));
        res->vtpm = vtpm;
        result_add_disks(res, jobs);
        return 0;
}

int nkp_vm_rekey_deep(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                      nkp_vm_result **ret)
{
        const OpArgs a = { .provider = provider };
        return run_operation(ctx, v, domain, "rekey-deep", rekey_deep_locked, &a, ret);
}

/* ---- a vTPM state made before its enrolment (issue 15) ----------------------- */
/* virt-install starts a new VM before it defines it, so swtpm_setup made
 * its state in clear (swtpm's level) inside the host-key-protected state
 * directory; nkpd then enrolled the VM (enrol.c).  At the next start the
 * prepare step converts that state to the VM's own DEK, before swtpm opens
 * it: nkp_vtpm_convert (swtpm's state-blob interface, the decrypted state in
 * memfds) writes the encrypted copy as <file>.nkp-new beside the state,
 * then one rename() puts it in place.
 *
 * Crash safety without a journal: one file changes, the definition does
 * not (it already names the key), and the state file says by its own header
 * which side it is on.  A kill before the rename leaves the clear state (and
 * maybe a stale .nkp-new, removed by the next run, which converts again); a
 * kill after it leaves the encrypted state, which needs nothing more.  The
 * VM's lock keeps nkpctl and a concurrent start out meanwhile. */
int nkp_vm_adopt_vtpm_state(nkp_context *ctx, const NkpDomain *d)
{
        if (!d->keysafe || !d->has_vtpm || !d->tpm_secret ||
            nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_CLEAR)
                return 0;
        int fd = -1;
        int r = nkp_vm_lock(ctx, d->uuid, true, COMMAND_LOCK_WAIT_MS, &fd);
        if (r == -EBUSY)
                return nkp_fail(r, "VM '%s' cannot start now: nkpctl is changing its keys; wait "
                                   "for it to finish, then start it.",
                                d->name);
        if (r < 0)
                return r;
        G_GNUC_UNUSED g_auto(VmLock) lock = fd;
        if (nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_CLEAR)
                return 0; /* converted meanwhile */
        g_autoptr(GPtrArray) secrets = NULL;
        if ((r = nkp_vm_unlock(ctx, d, true, &secrets)) < 0)
                return r;
        const nkp_secret *value = NULL;
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_VTPM) == 0 &&
                    g_ascii_strcasecmp(s->secret_uuid, d->tpm_secret) == 0)
                        value = s->value;
        }
        if (!value)
                return nkp_fail(-EUCLEAN, "VM '%s' cannot start: its vTPM names the secret %s, "
                                          "which its keysafe does not hold; nothing was changed.",
                                d->name, d->tpm_secret);
        g_autofree char *file = nkp_vtpm_state_file(ctx, d);
        g_autofree char *staged = g_strconcat(file, ".nkp-new", NULL);
        if ((r = nkp_unlink_nofollow(staged)) < 0)
                return nkp_fail(r, "Cannot remove the stale '%s': %s.", staged, g_strerror(-r));
        if ((r = nkp_vtpm_convert(ctx, d, NULL, value)) < 0 || (r = nkp_vtpm_stage(ctx, d)) < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its vTPM state cannot be "
                                          "encrypted with its key",
                                       d->name);
        nkp_test_crash_point("adopt-staged");
        if ((r = nkp_rename_nofollow(staged, file)) < 0)
                return nkp_fail(r, "VM '%s' cannot start: cannot put its encrypted vTPM "
                                   "state in place: %s.",
                                d->name, g_strerror(-r));
        (void) nkp_fsync_dir_of(file);
        nkp_log(NKP_LOG_INFO, "VM '%s': its vTPM state, made before nkp enrolled it, is now "
                              "encrypted with its own key.",
                d->name);
        return 1;
}

/* ---- create (issue 15) ------------------------------------------------------ */
/* A new VM enrolled before libvirt ever sees it: the vTPM has no state yet,
 * so libvirt hands its secret to swtpm_setup at the first start and no
 * byte of it is ever clear, whatever [vtpm] policy says (the way to create
 * VMs under `require`).  Nothing is written but what libvirt writes. */
int nkp_vm_create(nkp_context *ctx, nkp_virt *v, const char *xml, const char *provider,
                  unsigned flags, nkp_vm_result **ret)
{
        if (flags & ~(unsigned) (NKP_VM_CREATE_START | NKP_VM_CREATE_TRANSIENT))
                return nkp_fail(-EINVAL, "Unknown vm create flags 0x%x.", flags);
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_domain_parse(xml, strlen(xml), &d);
        if (r < 0)
                return nkp_fail_prefix(r, "The domain XML cannot be read");
        if (!d->name || !d->uuid)
                return nkp_fail(-EINVAL, "The domain XML has no <name> or no <uuid>; nkp binds a "
                                         "VM's keys to its UUID: add one (<uuid>$(uuidgen)</uuid>, "
                                         "or virt-install --print-xml writes one). Nothing was "
                                         "changed.");
        if (d->keysafe)
                return nkp_fail(-EEXIST, "The domain XML of VM '%s' already carries an nkp "
                                         "keysafe; define it as it is (virsh define). Nothing was "
                                         "changed.",
                                d->name);
        if (!d->has_vtpm || d->tpm_secret)
                return nkp_fail(-ENOENT, "VM '%s' has no plain emulated vTPM to enrol; define it "
                                         "with virsh define, then encrypt its disks with nkpctl "
                                         "vm encrypt '%s' --disks vda. Nothing was changed.",
                                d->name, d->name);
        g_autofree char *existing = NULL;
        r = nkp_virt_domain_xml(v, d->name, true, &existing);
        if (r == 0)
                return nkp_fail(-EEXIST, "A VM named '%s' is already defined; protect it with "
                                         "nkpctl vm encrypt '%s'. Nothing was changed.",
                                d->name, d->name);
        if (r != -ENOENT)
                return r;
        nkp_error_clear();
        if (nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_NONE) {
                g_autofree char *f = nkp_vtpm_state_file(ctx, d);
                return nkp_fail(-EEXIST, "VM '%s' is not new: its vTPM state '%s' exists already; "
                                         "define it and use nkpctl vm encrypt '%s'. Nothing was "
                                         "changed.",
                                d->name, f, d->name);
        }
        g_autoptr(nkp_provider) p = NULL;
        if ((r = nkp_provider_pick(ctx, provider, &p)) < 0 ||
            (r = provider_usable(p, " Nothing was changed.")) < 0)
                return r;
        g_autoptr(NkpEnrolment) en = NULL;
        if ((r = nkp_enrol_build(ctx, d, xml, p, true, NULL, &en)) < 0)
                return r;
        if (flags & NKP_VM_CREATE_TRANSIENT)
                r = nkp_virt_domain_create(v, en->xml, true);
        else if (flags & NKP_VM_CREATE_START)
                r = nkp_virt_domain_create(v, en->xml, false);
        else
                r = nkp_virt_domain_define(v, en->xml);
        if (r < 0)
                return r;
        g_autoptr(nkp_vm_result) res = result_new(d->name);
        res->provider = g_strdup(nkp_provider_name(p));
        res->vtpm = true;
        *ret = g_steal_pointer(&res);
        return 0;
}
