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

/* An nkpctl vm encrypt/decrypt/rekey --deep of the VM is running (its lock
 * is held) or was interrupted (a journal is left): see journal.c. */
static bool conversion_pending(nkp_context *ctx, const NkpDomain *d)
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
        if (conversion_pending(ctx, d))
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
