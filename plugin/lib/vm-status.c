/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* What nkp knows about a VM (nkp.h "VM operations"): plain, encrypted (its
 * provider here), locked (its provider missing or another key), or an
 * error; an interrupted or running conversion (its journal and lock); every
 * disk with its state (issue 15: encrypted by nkp, encrypted with a secret
 * nkp does not manage, plain and empty, plain holding data, not managed);
 * and `host unlock`, which re-checks every VM after a provider came back.
 * Reads only: nothing here changes a VM (host unlock clears alarms). */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"

struct nkp_vm_status {
        char *name;
        char *uuid;
        enum nkp_vm_state state;
        char *provider;
        char *key_id;
        char *reason;
        bool running;
        GPtrArray *objects;        /* "kind:id" */
        char *pending_op;          /* op words of an interrupted or running conversion */
        const char *pending_phase; /* "converting" / "ready" */
        bool pending_in_progress;  /* its process still holds the VM's lock */
        GPtrArray *plain_layers;   /* "TARGET PATH": plain layers in nkp disk chains */
        GPtrArray *disks;          /* StatusDisk*, document order */
        GPtrArray *clear_copies;   /* messages of its vm-clear-copy/-save alarms */
};

typedef struct {
        char *target;
        char *path;
        const char *state; /* nkp.h: nkp_vm_status_disk_state */
        char *note;
} StatusDisk;

static void status_disk_free(gpointer p)
{
        StatusDisk *sd = p;
        g_free(sd->target);
        g_free(sd->path);
        g_free(sd->note);
        g_free(sd);
}

void nkp_vm_status_free(nkp_vm_status *s)
{
        if (!s)
                return;
        g_free(s->name);
        g_free(s->uuid);
        g_free(s->provider);
        g_free(s->key_id);
        g_free(s->reason);
        g_free(s->pending_op);
        g_ptr_array_unref(s->objects);
        g_ptr_array_unref(s->plain_layers);
        g_ptr_array_unref(s->disks);
        g_ptr_array_unref(s->clear_copies);
        g_free(s);
}

void nkp_vm_status_list_free(nkp_vm_status **list, size_t n)
{
        for (size_t i = 0; list && i < n; i++)
                nkp_vm_status_free(list[i]);
        g_free(list);
}

size_t nkp_vm_status_n_clear_copies(const nkp_vm_status *s)
{
        return s->clear_copies->len;
}

const char *nkp_vm_status_clear_copy(const nkp_vm_status *s, size_t i)
{
        return i < s->clear_copies->len ? s->clear_copies->pdata[i] : NULL;
}

/* The vm-clear-copy / vm-clear-save alarms of VM `s` (nkpd raises them:
 * copies of its data made in clear behind nkp's back, vm-backup.c). */
static void clear_copies_of(nkp_context *ctx, nkp_vm_status *s)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        if (nkp_alarm_list(ctx, &list, &n) < 0)
                return;
        for (size_t i = 0; i < n; i++)
                if (g_str_has_prefix(nkp_alarm_kind(list[i]), "vm-clear-") &&
                    g_strcmp0(nkp_alarm_subject(list[i]), s->name) == 0)
                        g_ptr_array_add(s->clear_copies, g_strdup(nkp_alarm_message(list[i])));
        nkp_alarm_list_free(list, n);
}

const char *nkp_vm_status_name(const nkp_vm_status *s)
{
        return s->name;
}

const char *nkp_vm_status_uuid(const nkp_vm_status *s)
{
        return s->uuid;
}

enum nkp_vm_state nkp_vm_status_state(const nkp_vm_status *s)
{
        return s->state;
}

const char *nkp_vm_state_name(enum nkp_vm_state state)
{
        switch (state) {
        case NKP_VM_PLAIN:
                return "plain";
        case NKP_VM_ENCRYPTED:
                return "encrypted";
        case NKP_VM_LOCKED:
                return "locked";
        case NKP_VM_ERROR:
                break;
        }
        return "error";
}

bool nkp_vm_status_running(const nkp_vm_status *s)
{
        return s->running;
}

const char *nkp_vm_status_provider(const nkp_vm_status *s)
{
        return s->provider;
}

const char *nkp_vm_status_key_id(const nkp_vm_status *s)
{
        return s->key_id;
}

const char *nkp_vm_status_reason(const nkp_vm_status *s)
{
        return s->reason;
}

size_t nkp_vm_status_n_objects(const nkp_vm_status *s)
{
        return s->objects->len;
}

const char *nkp_vm_status_object(const nkp_vm_status *s, size_t i)
{
        return i < s->objects->len ? s->objects->pdata[i] : NULL;
}

const char *nkp_vm_status_pending_op(const nkp_vm_status *s)
{
        return s->pending_op;
}

const char *nkp_vm_status_pending_phase(const nkp_vm_status *s)
{
        return s->pending_phase;
}

bool nkp_vm_status_pending_in_progress(const nkp_vm_status *s)
{
        return s->pending_in_progress;
}

size_t nkp_vm_status_n_plain_layers(const nkp_vm_status *s)
{
        return s->plain_layers->len;
}

const char *nkp_vm_status_plain_layer(const nkp_vm_status *s, size_t i)
{
        return i < s->plain_layers->len ? s->plain_layers->pdata[i] : NULL;
}

size_t nkp_vm_status_n_disks(const nkp_vm_status *s)
{
        return s->disks->len;
}

static const StatusDisk *disk_at(const nkp_vm_status *s, size_t i)
{
        return i < s->disks->len ? s->disks->pdata[i] : NULL;
}

const char *nkp_vm_status_disk_target(const nkp_vm_status *s, size_t i)
{
        const StatusDisk *sd = disk_at(s, i);
        return sd ? sd->target : NULL;
}

const char *nkp_vm_status_disk_path(const nkp_vm_status *s, size_t i)
{
        const StatusDisk *sd = disk_at(s, i);
        return sd ? sd->path : NULL;
}

const char *nkp_vm_status_disk_state(const nkp_vm_status *s, size_t i)
{
        const StatusDisk *sd = disk_at(s, i);
        return sd ? sd->state : NULL;
}

const char *nkp_vm_status_disk_note(const nkp_vm_status *s, size_t i)
{
        const StatusDisk *sd = disk_at(s, i);
        return sd ? sd->note : NULL;
}

/* What a plain qcow2 disk of an nkp VM becomes, and how (enrol.c). */
static char *plain_disk_note(nkp_context *ctx, const NkpDomain *d, bool running,
                             const char *target, enum nkp_disk_content c, const char *why)
{
        if (ctx->disks_policy == NKP_DISKS_POLICY_OFF)
                return g_strdup_printf("%s; left plain ([disks] policy=off)", why);
        if (c == NKP_DISK_CONTENT_EMPTY && running)
                return g_strdup_printf("%s; nkpd encrypts it once the VM is shut off (or then: "
                                       "nkpctl vm encrypt '%s' --disks %s)",
                                       why, d->name, target);
        if (c == NKP_DISK_CONTENT_EMPTY)
                return g_strdup_printf("%s; nkpd encrypts it (or now: nkpctl vm encrypt '%s' "
                                       "--disks %s)",
                                       why, d->name, target);
        return g_strdup_printf("%s, in clear (alarm vm-plain-disk); encrypt it with the VM shut "
                               "off: nkpctl vm encrypt '%s' --disks %s",
                               why, d->name, target);
}

/* Every disk of `d` with its state; `probe`: plain qcow2 files are read
 * (qemu-img map) to tell empty from data (vm status; vm list does not). */
static void disks_of(nkp_context *ctx, const NkpDomain *d, bool running, bool probe,
                     nkp_vm_status *s)
{
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *disk = d->disks->pdata[i];
                StatusDisk *sd = g_new0(StatusDisk, 1);
                sd->target = g_strdup(disk->target ? disk->target : "?");
                sd->path = g_strdup(disk->source_file);
                g_ptr_array_add(s->disks, sd);
                const char *unmanaged = nkp_disk_unmanaged_reason(disk);
                if (disk->encryption_format && disk->target && nkp_disk_in_keysafe(d, disk->target)) {
                        sd->state = "encrypted";
                        sd->note = g_strdup_printf("by %s (%s)", s->provider,
                                                   disk->encryption_format);
                } else if (disk->encryption_format) {
                        sd->state = "encrypted-foreign";
                        sd->note = g_strdup_printf("%s with the libvirt secret %s, which nkp does "
                                                   "not manage",
                                                   disk->encryption_format,
                                                   disk->encryption_secret
                                                           ? disk->encryption_secret
                                                           : "(none)");
                } else if (unmanaged) {
                        sd->state = "not-managed";
                        sd->note = g_strdup(unmanaged);
                } else if (disk->target && d->keysafe && nkp_disk_in_keysafe(d, disk->target)) {
                        /* A disk nkp keys whose active layer is plain: a
                         * snapshot overlay made behind nkp's back, not a new
                         * disk (vm-snapshot.c; its own line and alarm). */
                        sd->state = "plain-layer";
                        sd->note = g_strdup_printf("its active layer is plain (a snapshot made "
                                                   "behind nkp's back, alarm vm-plain-layer); "
                                                   "with the VM shut off: nkpctl vm "
                                                   "encrypt-layer '%s' FILE",
                                                   d->name);
                } else if (!probe || !disk->target) {
                        sd->state = "plain";
                } else {
                        g_autofree char *why = NULL;
                        enum nkp_disk_content c = nkp_disk_content(disk->source_file, &why);
                        sd->state = c == NKP_DISK_CONTENT_EMPTY  ? "plain-empty"
                                    : c == NKP_DISK_CONTENT_DATA ? "plain-data"
                                                                 : "plain";
                        sd->note = d->keysafe ? plain_disk_note(ctx, d, running, disk->target, c,
                                                                why)
                                              : g_steal_pointer(&why);
                }
        }
}

/* A journal left for the VM: a conversion in progress (its lock is held)
 * or interrupted (to be finished or rolled back). */
static void pending_of(nkp_context *ctx, const NkpDomain *d, nkp_vm_status *s)
{
        g_autoptr(NkpJournal) j = NULL;
        if (nkp_journal_load(ctx, d->uuid, &j) < 0) {
                nkp_error_clear();
                return;
        }
        s->pending_op = g_strdup(nkp_vm_op_words(j->op));
        s->pending_phase = nkp_journal_phase_name(j->phase);
        int fd = -1;
        int r = nkp_vm_lock(ctx, d->uuid, false, 0, &fd);
        s->pending_in_progress = r == -EBUSY;
        if (r == 0)
                nkp_journal_unlock(fd);
        nkp_error_clear();
}

/* Never fails: a definition that cannot be read is state error, with the
 * reason (and its errno in *ret_err when not NULL). */
static nkp_vm_status *status_of(nkp_context *ctx, nkp_virt *v, const char *name, bool probe,
                                int *ret_err)
{
        nkp_vm_status *s = g_new0(nkp_vm_status, 1);
        g_autoptr(NkpDomain) d = NULL;
        s->name = g_strdup(name);
        s->objects = g_ptr_array_new_with_free_func(g_free);
        s->plain_layers = g_ptr_array_new_with_free_func(g_free);
        s->disks = g_ptr_array_new_with_free_func(status_disk_free);
        s->clear_copies = g_ptr_array_new_with_free_func(g_free);
        g_autofree char *xml = NULL;
        int r = nkp_vm_definition(v, name, &xml, &d);
        if (ret_err)
                *ret_err = r;
        if (r < 0) {
                s->state = NKP_VM_ERROR;
                s->reason = g_strdup(nkp_error_message());
                return s;
        }
        s->uuid = g_strdup(d->uuid);
        s->running = nkp_virt_domain_is_active(v, name) > 0;
        pending_of(ctx, d, s);
        if (!d->keysafe) {
                s->state = NKP_VM_PLAIN;
                disks_of(ctx, d, s->running, probe, s);
                return s;
        }
        s->provider = g_strdup(nkp_keysafe_provider_name(d->keysafe));
        s->key_id = g_strdup(nkp_keysafe_provider_key_id(d->keysafe));
        disks_of(ctx, d, s->running, probe, s);
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                g_ptr_array_add(s->objects,
                                g_strdup_printf("%s:%s", nkp_keysafe_entry_kind(d->keysafe, i),
                                                nkp_keysafe_entry_id(d->keysafe, i)));
        nkp_vm_status_add_plain_layers(ctx, v, d, xml, s->plain_layers);
        if (nkp_vm_unlock(ctx, d, false, NULL) < 0) {
                s->state = NKP_VM_LOCKED;
                s->reason = g_strdup(nkp_error_message());
        } else {
                s->state = NKP_VM_ENCRYPTED;
        }
        clear_copies_of(ctx, s);
        nkp_error_clear();
        return s;
}

int nkp_vm_status_get(nkp_context *ctx, nkp_virt *v, const char *domain, nkp_vm_status **ret)
{
        int r = 0;
        g_autoptr(nkp_vm_status) s = status_of(ctx, v, domain, true, &r);
        if (r < 0)
                return nkp_fail(r, "%s", s->reason);
        *ret = g_steal_pointer(&s);
        return 0;
}

int nkp_vm_list(nkp_context *ctx, nkp_virt *v, nkp_vm_status ***ret, size_t *ret_n)
{
        g_autoptr(GPtrArray) names = NULL;
        int r = nkp_virt_domain_list(v, &names);
        if (r < 0)
                return r;
        nkp_vm_status **list = g_new0(nkp_vm_status *, names->len + 1);
        for (guint i = 0; i < names->len; i++)
                list[i] = status_of(ctx, v, names->pdata[i], false, NULL);
        *ret = list;
        *ret_n = names->len;
        return 0;
}

int nkp_host_unlock(nkp_context *ctx, nkp_virt *v, nkp_vm_status ***ret, size_t *ret_n,
                    unsigned *ret_still_locked)
{
        /* The host key first: VMs whose vTPM state lives in a protected
         * directory need it as much as their provider. */
        unsigned still = 0;
        if (nkp_host_key_load(ctx) < 0) {
                nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
                still++;
        }
        nkp_vm_status **list = NULL;
        size_t n = 0;
        int r = nkp_vm_list(ctx, v, &list, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                if (list[i]->state == NKP_VM_ENCRYPTED)
                        (void) nkp_alarm_clear(ctx, "vm-locked", list[i]->name);
                else if (list[i]->state == NKP_VM_LOCKED)
                        still++;
        }
        nkp_error_clear();
        *ret = list;
        *ret_n = n;
        if (ret_still_locked)
                *ret_still_locked = still;
        return 0;
}
