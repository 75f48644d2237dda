/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The steps of nkp's qemu hook (nkp.h "Hook steps"; the program is
 * libvirt-hooks/nkp-hook.c, which documents when libvirt calls each step
 * and why calling the secret API from a hook is safe).
 *
 *   start (prepare/restore begin)  an interrupted conversion reconciled to
 *                                  the definition being started (refused
 *                                  while one runs); any VM refused while a
 *                                  host-key directory is locked; the VM's DEKs unwrapped
 *                                  and defined as ephemeral private libvirt
 *                                  secrets; the [vtpm] policy for a plain
 *                                  vTPM (a new one starts when its state
 *                                  lands under the host key, enrol.c); a
 *                                  vTPM state made before nkpd enrolled the
 *                                  VM converted to its DEK (vm-convert.c);
 *                                  the EK CA ticket of a new vTPM.
 *   migrate begin (destination)    the checks of "The migrate step" below,
 *                                  then the secrets as for a start.
 *   reconnect begin                the secrets again (libvirtd restarted).
 *   release end                    the secrets undefined, the ticket gone.
 *
 * The migrate step, in this order, each failure one line naming the VM,
 * this host (g_get_host_name()) and the fix, plus a "migration-refused"
 * alarm:
 *   1. every provider the incoming keysafe names is here (store or key
 *      cache) with the same key id and fingerprint.  A provider of the same
 *      name with another key (or the same key id with another key) is
 *      drift, said as such;
 *   2. every wrapped DEK unwraps (a keysafe altered in the incoming XML
 *      fails here, or already when the XML is parsed);
 *   3. TLS policy: this host's libvirt forces TLS for migrations
 *      (migrate_tls_force = 1 in qemu.conf), or nkp.conf allows plain
 *      migrations ([migration] allow_plain = true).  The hook cannot see
 *      virsh's flags, and libvirt checks migrate_tls_force only where a
 *      migration begins (the source), so nkp makes it a condition for a
 *      host to receive nkp VMs: every host of a pool that receives them
 *      then refuses to send in clear too.  docs/migration.md defends it.
 * A successful step clears an earlier "migration-refused" alarm.
 *
 * A domain without an nkp keysafe (nor a plain vTPM at start) is not nkp's
 * business: 0 at once.
 *
 * When the hook cannot decide (issue 13): input that is not a domain XML
 * nkp can read (malformed, truncated, empty, too large, a DOCTYPE, another
 * root element) at a step that can refuse (start, migrate) is refused with
 * one line under [vtpm] policy enrol or require, or when nkp's config
 * cannot be loaded: nkp cannot tell whether the VM has a plain vTPM, and
 * letting it through would start a plain vTPM the policy forbids.  Under
 * policy=off it goes on (0), unless it mentions nkp's namespace (nkp data
 * that cannot be read is always refused).  Internal failures at those steps
 * refuse too: an nkp.conf that cannot be loaded refuses every start (the
 * policy is unknown, and an interrupted conversion could not be finished),
 * as do a conversion lock, a key that does not unwrap, libvirt's secret
 * API.
 *   reconnect, release: always 0 on input nkp cannot read.  Refusing
 *   protects nothing there (the VM already runs or is gone): a failing
 *   reconnect makes libvirt kill the running VM, and release failures are
 *   ignored by libvirt.  The secrets of such a VM are then neither redefined
 *   nor undefined (ephemeral, they go with libvirtd anyway). */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"

enum nkp_hook_step nkp_hook_step_of(const char *op, const char *subop)
{
        if (!op || !subop)
                return NKP_HOOK_NONE;
        if (strcmp(op, "prepare") == 0 && strcmp(subop, "begin") == 0)
                return NKP_HOOK_START;
        if (strcmp(op, "restore") == 0 && strcmp(subop, "begin") == 0)
                return NKP_HOOK_START;
        if (strcmp(op, "migrate") == 0 && strcmp(subop, "begin") == 0)
                return NKP_HOOK_MIGRATE;
        if (strcmp(op, "reconnect") == 0 && strcmp(subop, "begin") == 0)
                return NKP_HOOK_RECONNECT;
        if (strcmp(op, "release") == 0 && strcmp(subop, "end") == 0)
                return NKP_HOOK_RELEASE;
        return NKP_HOOK_NONE;
}

bool nkp_hook_step_may_fail(enum nkp_hook_step step)
{
        return step == NKP_HOOK_START || step == NKP_HOOK_MIGRATE;
}

/* ---- the secrets ------------------------------------------------------------- */

/* Defines every secret of the VM. */
static int define_secrets(nkp_context *ctx, const char *uri, const NkpDomain *d)
{
        g_autoptr(GPtrArray) secrets = NULL;
        int r = nkp_vm_unlock(ctx, d, true, &secrets);
        if (r == -ENOKEY || r == -EKEYREJECTED) {
                g_autofree char *msg = g_strdup(nkp_error_message());
                (void) nkp_alarm_raise(ctx, "vm-locked", d->name, msg);
                return nkp_fail(r, "%s", msg);
        }
        if (r < 0)
                return r;
        g_autoptr(NkpVirt) v = NULL;
        r = nkp_virt_open(uri, 0, &v);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its keys cannot be handed to "
                                          "libvirt",
                                       d->name);
        for (guint i = 0; i < secrets->len; i++) {
                const NkpVmSecret *s = secrets->pdata[i];
                if (strcmp(s->kind, NKP_OBJECT_DISK) == 0 && !s->volume)
                        continue; /* the disk is no longer in the VM */
                r = nkp_virt_secret_define(v, s->secret_uuid, s->kind, d->uuid, s->volume,
                                           s->value);
                if (r < 0)
                        return nkp_fail_prefix(r, "VM '%s' cannot start", d->name);
        }
        return 0;
}

static void undefine_secrets(const char *uri, const NkpDomain *d)
{
        g_autoptr(NkpVirt) v = NULL;
        if (nkp_virt_open(uri, 0, &v) < 0)
                return;
        for (size_t i = 0; i < nkp_keysafe_n_entries(d->keysafe); i++)
                (void) nkp_virt_secret_undefine(v, nkp_keysafe_entry_secret_uuid(d->keysafe, i));
}

/* ---- the migrate step (destination) ------------------------------------- */

/* migrate_tls_force in libvirt's qemu.conf (virConf syntax; the first
 * assignment wins, as in libvirt).  A missing file is libvirt's default: 0. */
static bool qemu_conf_forces_tls(const char *path)
{
        g_autofree char *text = NULL;
        if (!g_file_get_contents(path, &text, NULL, NULL))
                return false;
        g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
        for (char **l = lines; *l; l++) {
                char *hash = strchr(*l, '#');
                if (hash)
                        *hash = '\0';
                char *p = g_strstrip(*l);
                if (!g_str_has_prefix(p, "migrate_tls_force"))
                        continue;
                p += strlen("migrate_tls_force");
                while (*p == ' ' || *p == '\t')
                        p++;
                if (*p != '=')
                        continue; /* another key with that prefix */
                p = g_strstrip(p + 1);
                return strcmp(p, "1") == 0;
        }
        return false;
}

/* A provider in this host's store or key cache with `name` but another key
 * id than `key_id`: its key id into `ret` (NKP_UUID_STRING_LEN + 1). */
static bool provider_name_drift(nkp_context *ctx, const char *name, const char *key_id, char *ret)
{
        g_autoptr(NkpStore) store = NULL;
        if (nkp_store_load(ctx, &store) == 0) {
                const NkpStoreEntry *e = nkp_store_find(store, name);
                if (e && g_ascii_strcasecmp(e->key_id, key_id) != 0) {
                        g_strlcpy(ret, e->key_id, NKP_UUID_STRING_LEN + 1);
                        return true;
                }
        }
        g_autoptr(GArray) cached = NULL;
        if (nkp_cache_list(ctx, &cached) == 0) {
                for (guint i = 0; i < cached->len; i++) {
                        const NkpCacheInfo *c = &g_array_index(cached, NkpCacheInfo, i);
                        if (!c->deleted && strcmp(c->name, name) == 0 &&
                            g_ascii_strcasecmp(c->key_id, key_id) != 0) {
                                g_strlcpy(ret, c->key_id, NKP_UUID_STRING_LEN + 1);
                                return true;
                        }
                }
        }
        nkp_error_clear();
        return false;
}

static int migrate_refuse(nkp_context *ctx, const NkpDomain *d, int err, const char *msg)
{
        (void) nkp_alarm_raise(ctx, "migration-refused", d->name, msg);
        return nkp_fail(err, "%s", msg);
}

/* Steps 1-3 of "The migrate step" above.  0, or a negative errno with the
 * one-line message set (and the alarm recorded). */
static int migrate_check(nkp_context *ctx, const NkpDomain *d)
{
        const char *host = g_get_host_name();
        const char *pname = nkp_keysafe_provider_name(d->keysafe);
        const char *key_id = nkp_keysafe_provider_key_id(d->keysafe);
        if (!pname)
                pname = "?";
        if (!key_id)
                key_id = "?";

        int r = nkp_vm_unlock(ctx, d, false, NULL);
        if (r == -ENOKEY) {
                char other[NKP_UUID_STRING_LEN + 1];
                g_autofree char *msg = NULL;
                if (provider_name_drift(ctx, pname, key_id, other))
                        msg = g_strdup_printf(
                                "VM '%s' cannot be migrated to host '%s': provider drift: the "
                                "provider '%s' here is another key (key id %s) than the '%s' that "
                                "protects the VM (key id %s). Remove this one (nkpctl provider "
                                "delete %s) and restore the VM's provider from its backup "
                                "(nkpctl provider restore FILE.p12), then migrate again.",
                                d->name, host, pname, other, pname, key_id, pname);
                else
                        msg = g_strdup_printf(
                                "VM '%s' cannot be migrated to host '%s': its key provider '%s' "
                                "(key id %s) is not on this host. Restore it here first (nkpctl "
                                "provider restore FILE.p12), then migrate again.",
                                d->name, host, pname, key_id);
                return migrate_refuse(ctx, d, r, msg);
        }
        if (r == -EKEYREJECTED) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s': provider drift: the provider "
                        "with key id %s here holds another key than the '%s' that protects the "
                        "VM (fingerprint mismatch). Restore the VM's provider from its own "
                        "backup here (nkpctl provider restore FILE.p12), then migrate again.",
                        d->name, host, key_id, pname);
                return migrate_refuse(ctx, d, r, msg);
        }
        if (r < 0) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s'%s: %s", d->name, host,
                        r == -EBADMSG ? " (the keysafe in the incoming domain XML was altered "
                                        "or damaged; the VM stays where it is)"
                                      : "",
                        nkp_error_message());
                return migrate_refuse(ctx, d, r, msg);
        }

        if (!ctx->migration_allow_plain && !qemu_conf_forces_tls(ctx->migration_qemu_conf)) {
                g_autofree char *msg = g_strdup_printf(
                        "VM '%s' cannot be migrated to host '%s': nkp VMs only move between "
                        "hosts that force TLS for migrations, and this one does not "
                        "(migrate_tls_force is not 1 in %s). Set migrate_tls_force = 1 there, "
                        "restart libvirtd and migrate with --tls; or allow plain migrations "
                        "in %s ([migration] allow_plain = true).",
                        d->name, host, ctx->migration_qemu_conf, ctx->conf_path);
                return migrate_refuse(ctx, d, -EPERM, msg);
        }
        (void) nkp_alarm_clear(ctx, "migration-refused", d->name);
        nkp_error_clear();
        return 0;
}

/* ---- the start step ------------------------------------------------------------ */

/* The first start of an nkp vTPM runs swtpm_setup, which calls
 * nkp-swtpm-certs; the ticket tells it (or nkpd) that this VM's vTPM is
 * being manufactured now, by this provider (see swtpm-hooks/). */
static int ekca_ticket(nkp_context *ctx, const NkpDomain *d)
{
        if (!d->has_vtpm || !d->tpm_secret || nkp_vtpm_state(ctx, d) != NKP_VTPM_STATE_NONE)
                return 0;
        int r = nkp_ekca_ticket_write(ctx, d->uuid, d->name,
                                      nkp_keysafe_provider_key_id(d->keysafe), NKP_EKCA_TICKET_TTL);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot start: its vTPM certificate ticket "
                                          "cannot be written",
                                       d->name);
        return 0;
}

/* An `nkpctl vm encrypt/decrypt/rekey --deep` of the VM (vm-convert.c) is
 * running (its lock is held): the VM must not start on half-converted
 * files.  Lock free but a journal: the command died; the files are made to
 * match the definition being started, old side or new (renames and unlinks
 * only: bounded, and no call into libvirt).  Then the start goes on. */
static int recover_for_start(nkp_context *ctx, const NkpDomain *d)
{
        uint8_t raw_uuid[16];
        if (!d->uuid || nkp_uuid_parse(d->uuid, raw_uuid) < 0)
                return 0; /* libvirt always gives one; nkpctl never journals without */
        int fd = -1;
        int r = nkp_vm_lock(ctx, d->uuid, false, 0, &fd);
        if (r == -ENOENT)
                return 0; /* nkpctl never converted this VM's files */
        if (r == -EBUSY) {
                g_autoptr(NkpJournal) j = NULL;
                if (nkp_journal_load(ctx, d->uuid, &j) == 0)
                        return nkp_fail(r, "VM '%s' cannot start now: it is being re-encrypted "
                                           "by nkpctl (%s, %s); wait for it to finish, then "
                                           "start it.",
                                        d->name,
                                        strcmp(j->op, "rekey-deep") == 0 ? "vm rekey --deep"
                                                                         : j->op,
                                        nkp_journal_phase_name(j->phase));
                return nkp_fail(r, "VM '%s' cannot start now: nkpctl is changing its keys "
                                   "or copying its disks (vm clone); wait for it to finish, "
                                   "then start it.",
                                d->name);
        }
        if (r < 0)
                return r;
        enum nkp_vm_recovery outcome;
        r = nkp_vm_recover_locked(ctx, d, true, &outcome, NULL);
        nkp_journal_unlock(fd);
        return r;
}

/* A domain with a keysafe at start or migrate: its secrets, and at start
 * the [vtpm] policy (a plain vTPM added to an nkp VM) and the ticket. */
static int start_nkp_domain(nkp_context *ctx, const char *uri, enum nkp_hook_step step,
                            const NkpDomain *d)
{
        /* [disks] policy=require first: a refusal leaves no secret behind. */
        int r = step == NKP_HOOK_START ? nkp_disks_start_check(ctx, d) : 0;
        if (r == 0)
                r = define_secrets(ctx, uri, d);
        if (r == 0 && step == NKP_HOOK_START)
                r = nkp_vtpm_start_check(ctx, d);
        if (r == 0 && step == NKP_HOOK_START)
                r = nkp_vm_adopt_vtpm_state(ctx, d);
        if (r == 0 && step == NKP_HOOK_START)
                r = ekca_ticket(ctx, d);
        return r;
}

static const char *policy_name(int policy)
{
        switch (policy) {
        case NKP_VTPM_POLICY_REQUIRE:
                return "require";
        case NKP_VTPM_POLICY_OFF:
                return "off";
        default:
                return "enrol";
        }
}

/* "start" or "be migrated to host 'H'", for the refusals below. */
static char *step_verb(enum nkp_hook_step step)
{
        if (step == NKP_HOOK_MIGRATE)
                return g_strdup_printf("be migrated to host '%s'", g_get_host_name());
        return g_strdup("start");
}

/* The input of a step that can refuse is not a domain nkp can read (the
 * parser's error `r`, its message set): nkp cannot tell whether the VM has
 * a plain vTPM, so it fails closed (issue 13).  Nkp data it cannot read:
 * always refused.  Otherwise the [vtpm] policy decides: off means plain
 * vTPMs are not nkp's business, so foreign input goes on (0); enrol and
 * require refuse, as does a config that cannot be loaded (the policy is
 * unknown).  One line naming the VM, the reason and the fix. */
static int refuse_undecidable(const char *root, enum nkp_hook_step step, const char *domain,
                              const char *xml, size_t len, int r)
{
        g_autofree char *why = g_strdup(nkp_error_message());
        g_autofree char *verb = step_verb(step);
        if (!domain || !domain[0])
                domain = "?";
        g_autofree char *ks_uuid = NULL;
        if (nkp_domain_foreign_keysafe(xml, len, &ks_uuid))
                return nkp_fail(-EPERM, "VM '%s' cannot %s: its nkp keysafe was made for the VM "
                                        "UUID '%s', not for this VM (a copied definition: "
                                        "virt-clone --preserve-data or --skip-copy, or by hand) "
                                        "and cannot share that VM's keys; undefine it and clone "
                                        "with nkpctl vm clone SOURCE '%s'",
                                domain, verb, ks_uuid, domain);
        if (nkp_domain_mentions_nkp(xml, len))
                return nkp_fail(r, "VM '%s' cannot %s: its domain XML carries nkp data that "
                                   "cannot be read: %s",
                                domain, verb, why);
        g_autoptr(nkp_context) ctx = NULL;
        int ctx_r = nkp_context_new(root, &ctx);
        if (ctx_r < 0) {
                g_autofree char *conf_why = g_strdup(nkp_error_message());
                return nkp_fail(ctx_r, "VM '%s' cannot %s: nkp cannot read its domain XML (%s) "
                                       "nor its own config to know the [vtpm] policy (%s)",
                                domain, verb, why, conf_why);
        }
        if (ctx->vtpm_policy == NKP_VTPM_POLICY_OFF) {
                nkp_error_clear();
                return 0;
        }
        return nkp_fail(r, "VM '%s' cannot %s: nkp cannot read its domain XML (%s), so it "
                           "cannot tell whether its vTPM is encrypted as this host's policy "
                           "requires ([vtpm] policy=%s in %s); report the XML to nkp's "
                           "maintainers, or set policy=off if plain vTPMs are allowed here",
                        domain, verb, why, policy_name(ctx->vtpm_policy), ctx->conf_path);
}

int nkp_hook_run(const char *root, const char *uri, enum nkp_hook_step step, const char *domain,
                 const char *xml, size_t len)
{
        if (step == NKP_HOOK_NONE)
                return 0;
        const bool may_fail = nkp_hook_step_may_fail(step);
        if (!uri || !uri[0])
                uri = NKP_HOOK_DEFAULT_URI;
        g_autoptr(NkpDomain) d = NULL;
        int r = nkp_domain_parse(xml, len, &d);
        if (r < 0) {
                if (!may_fail) {
                        /* reconnect, release: see the file's comment. */
                        nkp_error_clear();
                        return 0;
                }
                return refuse_undecidable(root, step, domain, xml, len, r);
        }
        if (!d->keysafe && step != NKP_HOOK_START)
                return 0;
        g_autoptr(nkp_context) ctx = NULL;
        r = nkp_context_new(root, &ctx);
        if (r < 0) {
                if (!may_fail)
                        return 0;
                g_autofree char *verb = step_verb(step);
                return nkp_fail_prefix(r, "VM '%s' cannot %s: nkp cannot load its config, so "
                                          "it cannot apply this host's [vtpm] policy",
                                       d->name, verb);
        }
        if (step == NKP_HOOK_START && (r = recover_for_start(ctx, d)) < 0)
                return r;
        /* Every VM, nkp's or not: a locked host-key directory hides its
         * managed-save image or NVRAM from libvirt (host-protect.c). */
        if (step == NKP_HOOK_START && (r = nkp_hostkey_start_check(ctx, d->name)) < 0)
                return r;
        if (!d->keysafe) {
                /* A plain emulator vTPM (virt-manager & co.): the [vtpm] policy. */
                if (!d->has_vtpm || d->tpm_secret)
                        return 0;
                return nkp_vtpm_start_check(ctx, d);
        }

        switch (step) {
        case NKP_HOOK_MIGRATE:
                if ((r = migrate_check(ctx, d)) < 0)
                        return r;
                return start_nkp_domain(ctx, uri, step, d);
        case NKP_HOOK_START:
                /* A plain snapshot layer in a disk chain (vm-snapshot.c). */
                if ((r = nkp_vm_plain_layer_check(ctx, d, xml, len)) < 0)
                        return r;
                return start_nkp_domain(ctx, uri, step, d);
        case NKP_HOOK_RECONNECT:
                return define_secrets(ctx, uri, d); /* the caller keeps the VM alive */
        case NKP_HOOK_RELEASE:
                undefine_secrets(uri, d);
                nkp_ekca_ticket_remove(ctx, d->uuid);
                return 0;
        case NKP_HOOK_NONE:
                break;
        }
        return 0;
}
