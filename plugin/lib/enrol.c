/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Enrolling VMs: what `nkpctl vm encrypt` and nkpd's automatic enrolment
 * share (issue 7).
 *
 *  - the vTPM state on disk (none yet / clear / encrypted), from swtpm's
 *    state-file header;
 *  - the provider to use (named, else the host's default);
 *  - nkp_enrol_build: the keys (a DEK per object, random secret UUIDs), the
 *    keysafe (new, or the VM's own when it already has one: a vTPM added
 *    later with virt-xml to a VM whose disks nkp encrypts), and the new
 *    domain XML -- nothing is written;
 *  - nkp_vtpm_start_check: the hook's rule for a plain emulator vTPM at
 *    start ([vtpm] policy in nkp.conf);
 *  - nkp_vm_auto_enrol: nkpd's enrolment of a plain vTPM with no state yet,
 *    or with state a first start made under the host key (issue 15).
 *
 * Why "no state yet" matters: libvirt hands the vTPM secret to swtpm_setup
 * at the first start, so a vTPM enrolled before its first start never has a
 * byte of clear state.  A vTPM that already has clear state is left alone
 * (reported by `nkpctl vm status`; `nkpctl vm encrypt` converts it
 * offline). */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nkp-private.h"

/* ---- vTPM state ------------------------------------------------------------- */

char *nkp_vtpm_state_file(const nkp_context *ctx, const NkpDomain *d)
{
        bool v12 = d->tpm_version && strcmp(d->tpm_version, "1.2") == 0;
        return g_build_filename(ctx->vtpm_state_dir, d->uuid, v12 ? "tpm1.2" : "tpm2",
                                v12 ? "tpm-00.permall" : "tpm2-00.permall", NULL);
}

/* swtpm's state files start with a header (swtpm_nvstore.c, packed, big
 * endian): u8 version, u8 min_version, u16 hdrsize, u16 flags, u32 totlen;
 * flags bit 0 = encrypted with the state key. */
enum nkp_vtpm_state nkp_vtpm_state(const nkp_context *ctx, const NkpDomain *d)
{
        g_autofree char *path = nkp_vtpm_state_file(ctx, d);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return errno == ENOENT ? NKP_VTPM_STATE_NONE : NKP_VTPM_STATE_UNKNOWN;
        uint8_t h[10];
        ssize_t n = read(fd, h, sizeof h);
        close(fd);
        if (n != (ssize_t) sizeof h || h[0] < 1 || h[0] > 3)
                return NKP_VTPM_STATE_UNKNOWN;
        unsigned flags = (unsigned) h[4] << 8 | h[5];
        return (flags & 1) ? NKP_VTPM_STATE_ENCRYPTED : NKP_VTPM_STATE_CLEAR;
}

/* ---- building an enrolment --------------------------------------------------- */

static void enrol_disk_free(gpointer p)
{
        NkpEnrolDisk *e = p;
        if (!e)
                return;
        g_free(e->target);
        nkp_secret_free(e->value);
        g_free(e);
}

void nkp_enrolment_free(NkpEnrolment *en)
{
        if (!en)
                return;
        g_free(en->xml);
        g_free(en->provider);
        nkp_secret_free(en->vtpm_value);
        if (en->disks)
                g_ptr_array_unref(en->disks);
        g_free(en);
}

/* One DEK: wrapped into `ks`, its secret value returned. */
static int new_object(nkp_keysafe *ks, const nkp_secret *kek, const char *kind, const char *id,
                      char uuid[NKP_UUID_STRING_LEN + 1], nkp_secret **ret_value)
{
        g_autoptr(nkp_secret) dek = NULL;
        nkp_uuid_random(uuid);
        int r = nkp_secret_new_random(NKP_DEK_SIZE, &dek);
        if (r < 0)
                return r;
        r = nkp_keysafe_put_dek(ks, kek, kind, id, uuid, dek);
        if (r < 0)
                return r;
        return nkp_secret_value_from_dek(dek, ret_value);
}

int nkp_enrol_build(nkp_context *ctx, const NkpDomain *d, const char *xml, const nkp_provider *p,
                    bool vtpm, GPtrArray *disk_targets, NkpEnrolment **ret)
{
        g_autoptr(nkp_keysafe) ks = NULL;
        g_autoptr(nkp_secret) kdk = NULL, kek = NULL;
        const char *key_id;
        int r;
        if (d->keysafe) {
                /* Add to the VM's own keysafe, under its own provider. */
                g_autofree char *text = NULL;
                key_id = nkp_keysafe_provider_key_id(d->keysafe);
                r = nkp_keysafe_format(d->keysafe, &text);
                if (r >= 0)
                        r = nkp_keysafe_parse(text, strlen(text), &ks);
                if (r >= 0)
                        r = nkp_provider_get_kdk(ctx, key_id, &kdk);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s': its keysafe cannot take another key",
                                               d->name);
                g_autofree char *fp = NULL;
                r = nkp_kdk_fingerprint(kdk, &fp);
                if (r < 0)
                        return r;
                if (g_ascii_strcasecmp(fp, nkp_keysafe_provider_fingerprint(ks)) != 0)
                        return nkp_fail(-EKEYREJECTED,
                                        "VM '%s': the provider with key id %s on this host holds "
                                        "a different key than the one that protects the VM.",
                                        d->name, key_id);
                /* A fresh KEK salt, the same DEKs: the new definition's
                 * signature (journal.c) differs from the old one, so a crash
                 * while disks are added is reconciled to the right side. */
                g_autoptr(nkp_secret) old_kek = NULL;
                r = nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), key_id, d->uuid, &old_kek);
                if (r >= 0)
                        r = nkp_keysafe_rewrap_for(ks, old_kek, nkp_keysafe_provider_name(ks),
                                                   key_id, fp, kdk);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s': its keysafe cannot take another key",
                                               d->name);
        } else {
                if (!p)
                        return nkp_fail(-EINVAL, "No provider to enrol VM '%s' with.", d->name);
                if (!nkp_provider_is_active(p))
                        return nkp_fail(-EPERM,
                                        "Provider '%s' was never backed up, so it cannot protect "
                                        "VMs yet: nkpctl provider backup '%s' --out FILE.p12.",
                                        nkp_provider_name(p), nkp_provider_name(p));
                key_id = nkp_provider_key_id(p);
                r = nkp_provider_get_kdk(ctx, key_id, &kdk);
                if (r >= 0)
                        r = nkp_keysafe_new(d->uuid, p, &ks);
                if (r < 0)
                        return r;
        }
        r = nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), key_id, d->uuid, &kek);
        if (r < 0)
                return r;

        g_autoptr(NkpEnrolment) en = g_new0(NkpEnrolment, 1);
        en->provider = g_strdup(nkp_keysafe_provider_name(ks));
        en->disks = g_ptr_array_new_with_free_func(enrol_disk_free);
        if (vtpm) {
                en->vtpm = true;
                r = new_object(ks, kek, NKP_OBJECT_VTPM, "vtpm", en->vtpm_secret_uuid,
                               &en->vtpm_value);
                if (r < 0)
                        return r;
        }
        for (guint i = 0; disk_targets && i < disk_targets->len; i++) {
                NkpEnrolDisk *ed = g_new0(NkpEnrolDisk, 1);
                ed->target = g_strdup(disk_targets->pdata[i]);
                g_ptr_array_add(en->disks, ed);
                r = new_object(ks, kek, NKP_OBJECT_DISK, ed->target, ed->secret_uuid, &ed->value);
                if (r < 0)
                        return r;
        }

        g_autofree char *ksxml = NULL;
        g_autoptr(NkpDomainEdit) e = NULL;
        if ((r = nkp_keysafe_format(ks, &ksxml)) < 0 ||
            (r = nkp_domain_edit_new(xml, strlen(xml), &e)) < 0 ||
            (r = nkp_domain_edit_set_keysafe(e, ksxml)) < 0 ||
            (vtpm && (r = nkp_domain_edit_set_vtpm_secret(e, en->vtpm_secret_uuid)) < 0))
                return r;
        for (guint i = 0; i < en->disks->len; i++) {
                NkpEnrolDisk *ed = en->disks->pdata[i];
                if ((r = nkp_domain_edit_set_disk_luks(e, ed->target, ed->secret_uuid)) < 0)
                        return r;
        }
        if ((r = nkp_domain_edit_format(e, &en->xml)) < 0)
                return r;
        *ret = g_steal_pointer(&en);
        return 0;
}

/* ---- the rule at start (the hook) --------------------------------------------- */

/* A plain vTPM with no state at start is a new VM's first start (issue 15):
 * virt-install and virt-manager start a new VM with createXML before they
 * define it, and `virsh create` never defines it, so nkpd cannot have
 * enrolled it.  Its state may be made now only where it is encrypted at
 * rest anyway: a state directory protected by the host key and unlocked
 * (the key is added here on demand).  nkpd enrols the VM once it is defined
 * and the prepare step converts that state to the VM's own DEK at its next
 * start (nkp_vm_adopt_vtpm_state).  The refusals never promise what cannot
 * work: the domain of a failed createXML is gone, so no "again in a
 * moment". */
int nkp_vtpm_start_check(nkp_context *ctx, const NkpDomain *d)
{
        if (!d->has_vtpm || d->tpm_secret || ctx->vtpm_policy == NKP_VTPM_POLICY_OFF)
                return 0;
        if (ctx->vtpm_policy == NKP_VTPM_POLICY_REQUIRE)
                return nkp_fail(-EPERM,
                                "VM '%s' cannot start: its vTPM is not encrypted and this host's "
                                "policy requires it ([vtpm] policy=require in nkp.conf); create "
                                "the VM enrolled (nkpctl vm create FILE.xml [--start]), or encrypt "
                                "a defined one first (nkpctl vm encrypt '%s')",
                                d->name, d->name);
        if (nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_NONE)
                return 0; /* existing clear state: left alone (vm status reports it) */
        int r = nkp_hostkey_dir_ready(ctx, ctx->vtpm_state_dir, true);
        if (r > 0)
                return 0;
        if (r == -ENOKEY)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its new vTPM state would "
                                          "have nowhere encrypted to go",
                                       d->name);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start", d->name);
        return nkp_fail(-EPERM,
                        "VM '%s' cannot start: its new vTPM would write its state in clear, "
                        "because '%s' is not protected by the host key; protect it once (nkpctl "
                        "host protect), or enrol the VM first (nkpctl vm create FILE.xml; a "
                        "defined VM: nkpctl vm encrypt '%s')",
                        d->name, ctx->vtpm_state_dir, d->name);
}

/* ---- nkpd: automatic enrolment ------------------------------------------------ */

bool nkp_vm_conversion_pending(nkp_context *ctx, const NkpDomain *d)
{
        g_autofree char *journal = nkp_journal_path(ctx, d->uuid);
        if (access(journal, F_OK) == 0)
                return true;
        int fd = -1;
        int r = nkp_vm_lock(ctx, d->uuid, false, 0, &fd); /* a daemon never waits */
        if (r == 0)
                nkp_journal_unlock(fd);
        nkp_error_clear();
        return r == -EBUSY;
}

static void plain_disks(const NkpDomain *d, GPtrArray *empty, GPtrArray *data);

/* A new VM with a new vTPM and new empty disks, shut off (virt-xml, a
 * define): the vTPM and those disks in one conversion (nkp_vm_encrypt), so
 * the keysafe never appears without the disks' keys and no start can slip
 * in between two steps.  0 when there is no such disk or the VM runs (the
 * caller enrols the vTPM alone); 1 done; a negative errno. */
static int enrol_with_empty_disks(nkp_context *ctx, NkpVirt *v, const NkpDomain *d,
                                  char **ret_note)
{
        if (ctx->disks_policy == NKP_DISKS_POLICY_OFF ||
            nkp_virt_domain_is_active(v, d->name) != 0 ||
            nkp_virt_domain_has_managed_save(v, d->name) != 0) {
                nkp_error_clear();
                return 0;
        }
        g_autoptr(GPtrArray) empty = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) data = g_ptr_array_new_with_free_func(g_free);
        plain_disks(d, empty, data);
        if (empty->len == 0)
                return 0;
        g_ptr_array_add(empty, NULL);
        g_autofree char *list = g_strjoinv(",", (char **) empty->pdata);
        g_autoptr(nkp_vm_result) res = NULL;
        int r = nkp_vm_encrypt(ctx, v, d->name, NULL, list, &res);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be enrolled", d->name);
        if (ret_note)
                *ret_note = g_strdup_printf("VM '%s': its new vTPM and its new empty disk(s) %s "
                                            "are now encrypted by provider '%s'",
                                            d->name, list, nkp_vm_result_provider(res));
        return 1;
}

int nkp_vm_auto_enrol(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note)
{
        if (ctx->vtpm_policy != NKP_VTPM_POLICY_ENROL)
                return 0;
        g_autofree char *xml = NULL;
        int r = nkp_virt_domain_xml(v, name, true, &xml);
        if (r == -ENOENT)
                return 0; /* undefined meanwhile */
        if (r < 0)
                return r;
        g_autoptr(NkpDomain) d = NULL;
        r = nkp_domain_parse(xml, strlen(xml), &d);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be enrolled", name);
        if (!d->has_vtpm || d->tpm_secret)
                return 0;
        if (nkp_vm_conversion_pending(ctx, d))
                return 0; /* nkpctl owns it now; its define would undo ours anyway */
        if (d->keysafe) {
                for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                        if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_VTPM) == 0)
                                return 0; /* not ours to guess: vm status shows it */
        }
        enum nkp_vtpm_state st = nkp_vtpm_state(ctx, d);
        /* State made by a first start before the definition (virt-install,
         * issue 15) in the host-key-protected state directory: enrolled
         * too; the prepare step converts the state at the next start. */
        bool under_host_key = st == NKP_VTPM_STATE_CLEAR &&
                              nkp_hostkey_dir_ready(ctx, ctx->vtpm_state_dir, false) > 0;
        nkp_error_clear();
        if (st != NKP_VTPM_STATE_NONE && !under_host_key) {
                if (ret_note)
                        *ret_note = g_strdup_printf(
                                "VM '%s' has a plain vTPM with existing %s state: left alone "
                                "(nkpctl vm encrypt '%s' converts it)",
                                name, st == NKP_VTPM_STATE_CLEAR ? "clear" : "unreadable", name);
                return 0;
        }
        g_autoptr(nkp_provider) p = NULL;
        if (!d->keysafe) {
                r = nkp_provider_pick(ctx, NULL, &p);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s' has a new plain vTPM that cannot be "
                                                  "enrolled",
                                               name);
        }
        if (!d->keysafe && st == NKP_VTPM_STATE_NONE)
                if ((r = enrol_with_empty_disks(ctx, v, d, ret_note)) != 0)
                        return r;
        g_autoptr(NkpEnrolment) en = NULL;
        r = nkp_enrol_build(ctx, d, xml, p, true, NULL, &en);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be enrolled", name);
        r = nkp_virt_domain_define(v, en->xml);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be enrolled", name);
        if (ret_note && under_host_key)
                *ret_note = g_strdup_printf("VM '%s': its vTPM is now enrolled with provider '%s'; "
                                            "its state, made before (under the host key), is "
                                            "converted to its own key at its next start",
                                            name, en->provider);
        else if (ret_note)
                *ret_note = g_strdup_printf("VM '%s': its new vTPM is now encrypted by provider "
                                            "'%s'",
                                            name, en->provider);
        return 1;
}

/* ---- new disks follow the VM (issue 15) ------------------------------------------ */
/* A plain qcow2 disk added to a VM nkp protects (virt-xml --add-device
 * --disk, virt-manager "Add Hardware", virsh attach-disk --config) is
 * encrypted by nkpd while it is still EMPTY, under the [disks] policy:
 *
 *   empty = the qcow2 header names no backing file and no encryption, and
 *           `qemu-img map -U` reports no extent that is present or holds
 *           data.  The guest has then never written a byte to it (a write
 *           of zeroes allocates a cluster too, so it counts as data), and
 *           converting it copies nothing.  Anything nkp cannot read that
 *           way is "unknown", never empty: fail safe.
 *
 * nkpd converts only with the VM shut off (the conversion protocol needs
 * it: vm-convert.c), through `nkp_vm_encrypt --disks` (add_disks_locked:
 * the VM's own keysafe, crash-safe).  A disk that holds data is not
 * converted behind the admin's back (a full copy, their call): it stays
 * plain with a vm-plain-disk alarm naming the fix. */

const char *nkp_disk_unmanaged_reason(const NkpDomainDisk *disk)
{
        if (g_strcmp0(disk->device, "disk") != 0)
                return disk->device ? disk->device : "not a disk";
        if (g_strcmp0(disk->type, "network") == 0)
                return "network disk";
        if (g_strcmp0(disk->type, "block") == 0)
                return "block device";
        if (g_strcmp0(disk->type, "file") != 0)
                return "not a file";
        if (!disk->source_file)
                return "no source file";
        if (g_strcmp0(disk->driver_type, "qcow2") != 0)
                return g_strcmp0(disk->driver_type, "raw") == 0 ? "raw file" : "not qcow2";
        return NULL;
}

/* qcow2 header (docs/interop/qcow2.txt, big endian): magic "QFI\xfb" at 0,
 * backing_file_offset u64 at 8, crypt_method u32 at 32. */
static int qcow2_header_check(const char *path, char **ret_why)
{
        /* O_NONBLOCK: a FIFO in place of the disk must not hang nkpd. */
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                *ret_why = g_strdup_printf("cannot be opened: %s", g_strerror(errno));
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        struct stat st;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                close(fd);
                *ret_why = g_strdup("is not a regular file");
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        uint8_t h[36];
        ssize_t n = read(fd, h, sizeof h);
        close(fd);
        if (n != (ssize_t) sizeof h || memcmp(h, "QFI\xfb", 4) != 0) {
                *ret_why = g_strdup("is not a qcow2 file");
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        uint64_t backing = 0;
        for (int i = 8; i < 16; i++)
                backing = backing << 8 | h[i];
        uint32_t crypt = (uint32_t) h[32] << 24 | (uint32_t) h[33] << 16 |
                         (uint32_t) h[34] << 8 | h[35];
        if (backing) {
                *ret_why = g_strdup("has a backing file");
                return NKP_DISK_CONTENT_DATA;
        }
        if (crypt) {
                *ret_why = g_strdup("is encrypted, but the VM's definition names no key");
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        return NKP_DISK_CONTENT_EMPTY;
}

enum nkp_disk_content nkp_disk_content(const char *path, char **ret_why)
{
        g_autofree char *why = NULL;
        int c = qcow2_header_check(path, &why);
        if (c != NKP_DISK_CONTENT_EMPTY) {
                if (ret_why)
                        *ret_why = g_steal_pointer(&why);
                return c;
        }
        /* -U: a running QEMU holds the image's lock; a read-only look is
         * fine (a status may be a moment old, the conversion re-checks
         * nothing on its own: nkpd decides with the VM shut off). */
        const char *argv[] = { "qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path,
                               NULL };
        g_autofree char *out = NULL, *err = NULL;
        g_autoptr(GError) error = NULL;
        int status = 0;
        if (!g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, &out,
                          &err, &status, &error) ||
            !g_spawn_check_wait_status(status, NULL)) {
                if (ret_why)
                        *ret_why = g_strdup_printf("cannot be read by qemu-img map: %s",
                                                   error ? error->message : g_strstrip(err));
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        /* One JSON object per extent, each with "present" and "data"
         * booleans (QEMU's qapi output): any true one is data; an output
         * without those fields is a format nkp does not know, not empty. */
        g_strstrip(out);
        if (out[0] != '[' || !strstr(out, "\"data\": ")) {
                if (ret_why)
                        *ret_why = g_strdup("qemu-img map printed an unknown format");
                return NKP_DISK_CONTENT_UNKNOWN;
        }
        if (strstr(out, "\"data\": true") || strstr(out, "\"present\": true")) {
                if (ret_why)
                        *ret_why = g_strdup("holds data");
                return NKP_DISK_CONTENT_DATA;
        }
        if (ret_why)
                *ret_why = g_strdup("is empty");
        return NKP_DISK_CONTENT_EMPTY;
}

bool nkp_disk_in_keysafe(const NkpDomain *d, const char *target)
{
        for (size_t i = 0; d->keysafe && i < nkp_keysafe_n_entries(d->keysafe); i++)
                if (strcmp(nkp_keysafe_entry_kind(d->keysafe, i), NKP_OBJECT_DISK) == 0 &&
                    g_strcmp0(nkp_keysafe_entry_id(d->keysafe, i), target) == 0)
                        return true;
        return false;
}

char *nkp_disk_alarm_subject(const char *vm, const char *target)
{
        return g_strdup_printf("%s:%s", vm, target);
}

/* The vm-plain-disk alarms of VM `d`: raised for each target in `data`
 * (GPtrArray of char*), cleared for every other disk the alarm names. */
static void plain_disk_alarms(nkp_context *ctx, const NkpDomain *d, GPtrArray *data)
{
        for (guint i = 0; i < data->len; i++) {
                const char *t = data->pdata[i];
                g_autofree char *subject = nkp_disk_alarm_subject(d->name, t);
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s': disk '%s' holds data and is not encrypted (nkp encrypts only "
                        "new, empty disks by itself); encrypt it with the VM shut off: nkpctl "
                        "vm encrypt '%s' --disks %s",
                        d->name, t, d->name, t);
                if (nkp_alarm_raise(ctx, "vm-plain-disk", subject, msg) < 0)
                        nkp_log(NKP_LOG_WARNING, "%s", nkp_error_message());
        }
        nkp_alarm **list = NULL;
        size_t n = 0;
        if (nkp_alarm_list(ctx, &list, &n) < 0) {
                nkp_error_clear();
                return;
        }
        g_autofree char *prefix = g_strdup_printf("%s:", d->name);
        for (size_t i = 0; i < n; i++) {
                const char *subject = nkp_alarm_subject(list[i]);
                if (strcmp(nkp_alarm_kind(list[i]), "vm-plain-disk") != 0 ||
                    !g_str_has_prefix(subject, prefix))
                        continue;
                const char *t = subject + strlen(prefix);
                bool still = false;
                for (guint j = 0; j < data->len; j++)
                        still = still || strcmp(data->pdata[j], t) == 0;
                if (!still)
                        (void) nkp_alarm_clear(ctx, "vm-plain-disk", subject);
        }
        nkp_alarm_list_free(list, n);
        nkp_error_clear();
}

/* The plain qcow2 disks of `d` that nkp would manage: empty ones into
 * `empty`, those holding data (or unreadable) into `data`.  A disk the
 * keysafe holds a key for is nkp's already: a plain active layer there is
 * a snapshot overlay (vm-plain-layer, vm-snapshot.c), not a new disk. */
static void plain_disks(const NkpDomain *d, GPtrArray *empty, GPtrArray *data)
{
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *disk = d->disks->pdata[i];
                if (!disk->target || disk->encryption_format || nkp_disk_unmanaged_reason(disk) ||
                    nkp_disk_in_keysafe(d, disk->target))
                        continue;
                enum nkp_disk_content c = nkp_disk_content(disk->source_file, NULL);
                g_ptr_array_add(c == NKP_DISK_CONTENT_EMPTY ? empty : data,
                                g_strdup(disk->target));
        }
}

int nkp_vm_auto_enrol_disks(nkp_context *ctx, nkp_virt *v, const char *name, char **ret_note)
{
        if (ctx->disks_policy == NKP_DISKS_POLICY_OFF)
                return 0;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_vm_definition(v, name, NULL, &d);
        if (r == -ENOENT) {
                nkp_error_clear();
                return 0;
        }
        if (r < 0)
                return nkp_fail_prefix(r, "The disks of VM '%s' cannot be checked", name);
        if (!d->keysafe || nkp_vm_conversion_pending(ctx, d))
                return 0; /* not nkp's VM; or nkpctl owns it now */
        g_autoptr(GPtrArray) empty = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) data = g_ptr_array_new_with_free_func(g_free);
        plain_disks(d, empty, data);
        plain_disk_alarms(ctx, d, data);
        if (empty->len == 0) {
                if (ret_note && data->len) {
                        g_ptr_array_add(data, NULL);
                        g_autofree char *dl = g_strjoinv(",", (char **) data->pdata);
                        *ret_note = g_strdup_printf("VM '%s': plain disk(s) %s hold data (or "
                                                    "cannot be read): left plain, alarm "
                                                    "vm-plain-disk",
                                                    name, dl);
                }
                return 0;
        }
        g_ptr_array_add(empty, NULL);
        g_autofree char *list = g_strjoinv(",", (char **) empty->pdata);
        r = nkp_virt_domain_is_active(v, name);
        if (r < 0)
                return r;
        if (r > 0 || nkp_virt_domain_has_managed_save(v, name) > 0) {
                nkp_error_clear();
                if (ret_note)
                        *ret_note = g_strdup_printf(
                                "VM '%s' has a new empty plain disk (%s) while it runs or has a "
                                "saved state: nkpd encrypts it once the VM is shut off, if it "
                                "is still empty then",
                                name, list);
                return 0;
        }
        g_autoptr(nkp_vm_result) res = NULL;
        r = nkp_vm_encrypt(ctx, v, name, NULL, list, &res);
        if (r < 0)
                return nkp_fail_prefix(r, "The new disk(s) %s of VM '%s' cannot be encrypted",
                                       list, name);
        if (ret_note)
                *ret_note = g_strdup_printf("VM '%s': its new empty disk(s) %s now encrypted "
                                            "by provider '%s' (LUKS, own DEK in its keysafe)",
                                            name, list, nkp_vm_result_provider(res));
        return 1;
}

int nkp_disks_start_check(nkp_context *ctx, const NkpDomain *d)
{
        if (ctx->disks_policy != NKP_DISKS_POLICY_REQUIRE || !d->keysafe)
                return 0;
        for (guint i = 0; i < d->disks->len; i++) {
                const NkpDomainDisk *disk = d->disks->pdata[i];
                if (!disk->target || disk->encryption_format || nkp_disk_unmanaged_reason(disk))
                        continue;
                return nkp_fail(-EPERM,
                                "VM '%s' cannot start: its disk '%s' is not encrypted and this "
                                "host's policy requires it ([disks] policy=require in nkp.conf); "
                                "encrypt it first: nkpctl vm encrypt '%s' --disks %s",
                                d->name, disk->target, d->name, disk->target);
        }
        return 0;
}
