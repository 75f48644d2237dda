/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm rekey …: vSphere's two rekeys.
 *
 *   vm rekey DOMAIN [--provider NAME]    shallow: new KEK, DEKs re-wrapped
 *   vm rekey --all [--provider NAME]     shallow, every nkp VM on the host
 *   vm rekey DOMAIN --deep [--provider NAME]
 *                                        deep: new DEKs, data re-encrypted
 *                                        (shut-off VM; cmd-vm.c)
 *
 * Shallow rekey (this file), online:
 *  1. the target is --provider NAME, else the host's default (as vSphere's
 *     shallow rekey moves a VM to the default provider); it must be active
 *     (backed up).  Rekeying to the VM's own provider rotates its KEK.
 *  1b. an encrypt/decrypt/deep rekey of the VM that a crash interrupted is
 *     reconciled (nkpctl_vm_recover), then the VM's lock is taken for the
 *     rest (see rekey_one).
 *  2. the persistent definition's keysafe is opened with the KDK of the
 *     provider it names (key cache, else the store; a provider deleted but
 *     still cached works too).  If the VM runs, its live definition's
 *     keysafe is read as well; when it differs from the persistent one (an
 *     interrupted rekey, say) both are opened and must hold the same
 *     objects, secret UUIDs and DEKs, or the rekey is refused.
 *  3. nkp_keysafe_rewrap: every DEK unwrapped and wrapped again under the
 *     KEK of the target provider and a fresh salt, all or nothing, in
 *     memory.
 *  4. the new keysafe goes into the live definition first (if the VM
 *     runs), then into the persistent one: one virDomainSetMetadata each,
 *     so each definition is replaced whole or not at all.  The DEKs, the
 *     secret UUIDs and the libvirt secrets the hook defined at start do not
 *     change: the guest notices nothing.  Why this order is crash safe:
 *     docs/rekey.md.
 *
 * Also here: which VMs depend on a provider (provider usage/delete), counted
 * over both definitions of every defined VM. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "nkpctl.h"

static const char rekey_usage[] =
        "Usage: nkpctl vm rekey DOMAIN [--provider NAME] [--deep]\n"
        "       nkpctl vm rekey --all [--provider NAME]\n";

/* ---- one VM --------------------------------------------------------------- */

/* One definition of a domain: the persistent one, or the live one. */
static int load_definition(NkpVirt *v, const char *name, bool live, NkpDomain **ret)
{
        g_autofree char *xml = NULL;
        int r = nkp_virt_domain_xml(v, name, !live, &xml);
        if (r < 0)
                return r;
        return nkp_domain_parse(xml, strlen(xml), ret);
}

/* The keysafe as nkp writes it: two keysafes are the same iff their texts
 * are (libvirt's namespace prefixes are normalized away by the parser). */
static char *keysafe_text(const nkp_keysafe *ks)
{
        char *text = NULL;
        if (nkp_keysafe_format(ks, &text) < 0)
                return NULL;
        return text;
}

/* The KEK that opens the keysafe of definition `d` (`which`: "persistent"
 * or "live"): its provider's KDK from the key cache or the store, checked
 * against the fingerprint the keysafe names.  -ENOKEY provider not here,
 * -EKEYREJECTED another key under that key id. */
static int current_kek(nkp_context *ctx, const NkpDomain *d, const char *which, nkp_secret **ret)
{
        const nkp_keysafe *ks = d->keysafe;
        const char *pname = nkp_keysafe_provider_name(ks);
        const char *key_id = nkp_keysafe_provider_key_id(ks);
        g_autoptr(nkp_secret) kdk = NULL;
        int r = nkp_provider_get_kdk(ctx, key_id, &kdk);
        if (r == -ENOENT)
                return nkp_fail(-ENOKEY,
                                "VM '%s' cannot be rekeyed: provider '%s' (key id %s), which "
                                "protects its %s definition, is not on this host. Restore it "
                                "(nkpctl provider restore FILE.p12) and run the rekey again; "
                                "nothing was changed.",
                                d->name, pname, key_id, which);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be rekeyed: the key of provider '%s' "
                                          "(key id %s) is unavailable; nothing was changed",
                                       d->name, pname, key_id);
        g_autofree char *fp = NULL;
        if ((r = nkp_kdk_fingerprint(kdk, &fp)) < 0)
                return r;
        if (g_ascii_strcasecmp(fp, nkp_keysafe_provider_fingerprint(ks)) != 0)
                return nkp_fail(-EKEYREJECTED,
                                "VM '%s' cannot be rekeyed: the provider with key id %s on this "
                                "host holds another key than '%s', which protects its %s "
                                "definition (fingerprint mismatch). Restore the provider's own "
                                "backup (nkpctl provider restore FILE.p12); nothing was changed.",
                                d->name, key_id, pname, which);
        return nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), key_id, d->uuid, ret);
}

static bool same_bytes(const nkp_secret *a, const nkp_secret *b)
{
        size_t n = nkp_secret_len(a);
        if (n != nkp_secret_len(b))
                return false;
        const uint8_t *x = nkp_secret_data(a), *y = nkp_secret_data(b);
        uint8_t diff = 0; /* no early exit: key bytes */
        for (size_t i = 0; i < n; i++)
                diff |= x[i] ^ y[i];
        return diff == 0;
}

static gssize find_entry(const nkp_keysafe *ks, const char *kind, const char *id)
{
        for (size_t i = 0; i < nkp_keysafe_n_entries(ks); i++)
                if (strcmp(nkp_keysafe_entry_kind(ks, i), kind) == 0 &&
                    strcmp(nkp_keysafe_entry_id(ks, i), id) == 0)
                        return (gssize) i;
        return -1;
}

/* 0 when the persistent keysafe (opened by kek_p) and the live one (kek_l)
 * hold the same objects under the same secret UUIDs with the same DEKs:
 * then one new keysafe serves both definitions, and the secrets the
 * running VM uses stay right. */
static int same_deks(const NkpDomain *dp, const nkp_secret *kek_p, const NkpDomain *dl,
                     const nkp_secret *kek_l)
{
        const nkp_keysafe *p = dp->keysafe, *l = dl->keysafe;
        size_t n = nkp_keysafe_n_entries(p);
        bool same = n == nkp_keysafe_n_entries(l);
        for (size_t i = 0; same && i < n; i++) {
                const char *kind = nkp_keysafe_entry_kind(p, i);
                const char *id = nkp_keysafe_entry_id(p, i);
                gssize j = find_entry(l, kind, id);
                g_autoptr(nkp_secret) a = NULL, b = NULL;
                same = j >= 0 &&
                       strcmp(nkp_keysafe_entry_secret_uuid(p, i),
                              nkp_keysafe_entry_secret_uuid(l, (size_t) j)) == 0 &&
                       nkp_keysafe_get_dek(p, kek_p, kind, id, &a) == 0 &&
                       nkp_keysafe_get_dek(l, kek_l, kind, id, &b) == 0 && same_bytes(a, b);
        }
        if (!same)
                return nkp_fail(-ESTALE,
                                "VM '%s' cannot be rekeyed while it runs: its live and persistent "
                                "definitions hold different keys (the persistent one was changed "
                                "behind nkp's back?). Shut it down, then rekey; nothing was "
                                "changed.",
                                dp->name);
        return 0;
}

typedef struct {
        char *name;
        const char *result; /* "rekeyed", "failed", "locked" */
        char *from;         /* the provider before (persistent definition) */
        char *to;
        bool running;       /* the live definition was rekeyed too */
        char *reason;
} RekeyResult;

static void rekey_result_clear(RekeyResult *res)
{
        g_free(res->name);
        g_free(res->from);
        g_free(res->to);
        g_free(res->reason);
}

/* A start that slipped in after we found the VM shut off runs with the old
 * keysafe (`old_text`) in its live definition: give it the new one too. */
static int follow_a_racing_start(NkpVirt *v, const char *name, const char *old_text,
                                 const char *new_text, bool *ret_running)
{
        if (nkp_virt_domain_is_active(v, name) <= 0)
                return 0;
        g_autoptr(NkpDomain) dl = NULL;
        int r = load_definition(v, name, true, &dl);
        if (r < 0)
                return r;
        g_autofree char *live = dl->keysafe ? keysafe_text(dl->keysafe) : NULL;
        if (live && strcmp(live, new_text) == 0)
                return 0;
        if (!live || strcmp(live, old_text) != 0)
                return nkp_fail(-ESTALE, "VM '%s' was started during the rekey with another "
                                         "keysafe; run the rekey again.",
                                name);
        *ret_running = true;
        return nkp_virt_keysafe_put(v, name, new_text, true);
}

/* The rekey proper, with the VM's lock held; `dp` is its persistent
 * definition (with a keysafe), read under the lock. */
static int rekey_locked(NkpctlGlobals *g, NkpVirt *v, NkpDomain *dp, const nkp_provider *to,
                        const nkp_secret *to_kdk, RekeyResult *res)
{
        const char *name = dp->name;
        g_autoptr(NkpDomain) dl = NULL;
        res->from = g_strdup(nkp_keysafe_provider_name(dp->keysafe));
        /* A restore starts from the definition inside the saved state, with
         * the keysafe it had then: after a rekey and the old provider's
         * deletion it would no longer restore. */
        int r = nkp_virt_domain_has_managed_save(v, name);
        if (r < 0)
                return r;
        if (r > 0)
                return nkp_fail(-EBUSY, "VM '%s' has a saved state (virsh managedsave), which "
                                        "would restore with its old keysafe; start it, then "
                                        "rekey (or drop the state: virsh managedsave-remove "
                                        "'%s'). Nothing was changed.",
                                name, name);
        r = nkp_virt_domain_is_active(v, name);
        if (r < 0)
                return r;
        res->running = r > 0;
        if (res->running && (r = load_definition(v, name, true, &dl)) < 0)
                return r;
        if (dl && !dl->keysafe)
                return nkp_fail(-EBADMSG, "VM '%s' runs without an nkp keysafe in its live "
                                          "definition, though its persistent one has one; shut it "
                                          "down, then rekey. Nothing was changed.",
                                name);

        g_autofree char *old_text = keysafe_text(dp->keysafe);
        g_autofree char *live_text = dl ? keysafe_text(dl->keysafe) : NULL;
        if (!old_text || (dl && !live_text))
                return nkp_fail(-ENOMEM, "Cannot format the keysafe of VM '%s'.", name);
        g_autoptr(nkp_secret) kek_p = NULL, kek_l = NULL;
        if ((r = current_kek(g->ctx, dp, "persistent", &kek_p)) < 0)
                return r;
        if (dl && strcmp(old_text, live_text) != 0) {
                if ((r = current_kek(g->ctx, dl, "live", &kek_l)) < 0 ||
                    (r = same_deks(dp, kek_p, dl, kek_l)) < 0)
                        return r;
        }

        if ((r = nkp_keysafe_rewrap(dp->keysafe, kek_p, to, to_kdk)) < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be rekeyed (nothing was changed)",
                                       name);
        g_autofree char *new_text = keysafe_text(dp->keysafe);
        if (!new_text)
                return nkp_fail(-ENOMEM, "Cannot format the keysafe of VM '%s'.", name);

        /* Live first, persistent last: see docs/rekey.md. */
        if (res->running && (r = nkp_virt_keysafe_put(v, name, new_text, true)) < 0) {
                if (nkp_virt_domain_is_active(v, name) != 0)
                        return nkp_fail_prefix(r, "VM '%s' was not rekeyed (nothing was changed)",
                                               name);
                res->running = false; /* it stopped meanwhile: its live keysafe is gone */
        }
        r = nkp_virt_keysafe_put(v, name, new_text, false);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' is half rekeyed: %s; it starts and runs as "
                                          "before, run the rekey again to finish",
                                       name,
                                       res->running ? "its live definition has the new keysafe, "
                                                      "its persistent one the old"
                                                    : "nothing was changed");
        if (!res->running && (r = follow_a_racing_start(v, name, old_text, new_text,
                                                        &res->running)) < 0)
                return r;
        return 0;
}

static bool journal_pending(NkpctlGlobals *g, const NkpDomain *d)
{
        g_autofree char *path = nkp_journal_path(g->ctx, d->uuid);
        return g_file_test(path, G_FILE_TEST_EXISTS);
}

/* Shallow rekey of domain `name` to provider `to` (KDK `to_kdk`).
 * 0 done, 1 not an nkp VM (plain), negative on error (nothing changed
 * unless the message says otherwise).
 *
 * The VM's lock (journal.c) is held for the whole read-rewrap-write: vm
 * encrypt, decrypt and rekey --deep hold it while they run, so none of them
 * can interleave with this rekey (a deep rekey's new DEKs overwritten by a
 * rewrap of the old ones would lock the VM out of its own data), and the
 * hook refuses to start the VM meanwhile ("wait for it to finish").  An
 * operation of theirs that a crash interrupted is reconciled first. */
static int rekey_one(NkpctlGlobals *g, NkpVirt *v, const char *name, const nkp_provider *to,
                     const nkp_secret *to_kdk, RekeyResult *res)
{
        g_autoptr(NkpDomain) dp = NULL;
        int r = load_definition(v, name, false, &dp);
        if (r < 0)
                return r;
        if (!dp->keysafe && !journal_pending(g, dp))
                return 1;
        if ((r = nkpctl_vm_recover(g, v, name)) < 0)
                return r;
        int fd = -1;
        r = nkp_journal_lock(g->ctx, dp->uuid, true, &fd);
        if (r == -EBUSY)
                return nkp_fail(r, "VM '%s' is being changed by another nkpctl command; wait "
                                   "for it to finish, then run the rekey again. Nothing was "
                                   "changed.",
                                name);
        if (r < 0)
                return r;
        /* Read again under the lock: the recovery or another command may
         * have changed it. */
        g_clear_pointer(&dp, nkp_domain_free);
        r = load_definition(v, name, false, &dp);
        if (r == 0)
                r = dp->keysafe ? rekey_locked(g, v, dp, to, to_kdk, res) : 1;
        nkp_journal_unlock(fd);
        return r;
}

/* ---- output --------------------------------------------------------------- */

static void add_str(JsonBuilder *b, const char *member, const char *value)
{
        json_builder_set_member_name(b, member);
        if (value)
                json_builder_add_string_value(b, value);
        else
                json_builder_add_null_value(b);
}

static void result_json(JsonBuilder *b, const RekeyResult *res)
{
        json_builder_begin_object(b);
        add_str(b, "name", res->name);
        add_str(b, "result", res->result);
        add_str(b, "from", res->from);
        add_str(b, "provider", res->to);
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, res->running);
        add_str(b, "reason", res->reason);
        json_builder_end_object(b);
}

/* Fills res->result and res->reason from rekey_one's return value. */
static void settle(RekeyResult *res, int r)
{
        if (r == 0) {
                res->result = "rekeyed";
                return;
        }
        res->result = (r == -ENOKEY || r == -EKEYREJECTED) ? "locked" : "failed";
        const char *msg = nkp_error_message();
        res->reason = g_strdup(msg[0] ? msg : g_strerror(-r));
}

/* ---- entry points --------------------------------------------------------- */

/* The target provider and its KDK: --provider NAME or the default, active. */
static int pick_target(NkpctlGlobals *g, const char *name, nkp_provider **ret,
                       nkp_secret **ret_kdk)
{
        g_autoptr(nkp_provider) p = NULL;
        int r = nkp_provider_pick(g->ctx, name, &p);
        if (r < 0)
                return r;
        if (!nkp_provider_is_active(p))
                return nkp_fail(-EPERM,
                                "Provider '%s' was never backed up, so it cannot protect VMs yet: "
                                "nkpctl provider backup '%s' --out FILE.p12. Nothing was changed.",
                                nkp_provider_name(p), nkp_provider_name(p));
        if ((r = nkp_provider_get_kdk(g->ctx, nkp_provider_key_id(p), ret_kdk)) < 0)
                return nkp_fail_prefix(r, "The key of provider '%s' is unavailable; nothing was "
                                          "changed",
                                       nkp_provider_name(p));
        *ret = g_steal_pointer(&p);
        return 0;
}

static int rekey_single(NkpctlGlobals *g, const char *name, const char *provider)
{
        g_autoptr(nkp_provider) to = NULL;
        g_autoptr(nkp_secret) to_kdk = NULL;
        if (pick_target(g, provider, &to, &to_kdk) < 0)
                return nkpctl_lib_error();
        g_autoptr(NkpVirt) v = NULL;
        if (nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, &v) < 0)
                return nkpctl_lib_error();
        RekeyResult res = { .name = g_strdup(name), .to = g_strdup(nkp_provider_name(to)) };
        int r = rekey_one(g, v, name, to, to_kdk, &res);
        int rc = 0;
        if (r == 1)
                rc = nkpctl_error("VM '%s' is not encrypted by nkp; nothing to rekey (to protect "
                                  "it: nkpctl vm encrypt '%s').",
                                  name, name);
        else if (r < 0)
                rc = nkpctl_lib_error();
        else if (g->json) {
                settle(&res, r);
                g_autoptr(JsonBuilder) b = json_builder_new();
                result_json(b, &res);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("VM '%s' is rekeyed to provider '%s' (was '%s'): new KEK, same data "
                       "keys; %s.\n",
                       name, res.to, res.from,
                       res.running ? "live and persistent definitions" : "persistent definition");
        }
        rekey_result_clear(&res);
        return rc;
}

static int rekey_all(NkpctlGlobals *g, const char *provider)
{
        g_autoptr(nkp_provider) to = NULL;
        g_autoptr(nkp_secret) to_kdk = NULL;
        if (pick_target(g, provider, &to, &to_kdk) < 0)
                return nkpctl_lib_error();
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, &v) < 0 ||
            nkp_virt_domain_list(v, &names) < 0)
                return nkpctl_lib_error();

        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_array(b);
        unsigned done = 0, not_done = 0;
        for (guint i = 0; i < names->len; i++) {
                const char *name = names->pdata[i];
                RekeyResult res = { .name = g_strdup(name), .to = g_strdup(nkp_provider_name(to)) };
                nkp_error_clear();
                int r = rekey_one(g, v, name, to, to_kdk, &res);
                if (r == 1 || r == -ENOENT) { /* plain, or undefined meanwhile */
                        rekey_result_clear(&res);
                        continue;
                }
                settle(&res, r);
                if (r == 0)
                        done++;
                else
                        not_done++;
                if (g->json)
                        result_json(b, &res);
                else if (r == 0 && strcmp(res.from, res.to) == 0)
                        printf("%s: rekeyed to '%s' (same provider, new KEK)\n", name, res.to);
                else if (r == 0)
                        printf("%s: rekeyed to '%s' (was '%s')\n", name, res.to, res.from);
                else
                        printf("%s: %s: %s\n", name, res.result, res.reason);
                fflush(stdout);
                rekey_result_clear(&res);
        }
        json_builder_end_array(b);
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        else if (done + not_done == 0)
                printf("No VM on this host is encrypted by nkp.\n");
        if (not_done)
                return nkpctl_error("%u of %u nkp VMs were not rekeyed (see above); fix what "
                                    "their lines say and run the rekey again.",
                                    not_done, done + not_done);
        return 0;
}

int nkpctl_vm_rekey(NkpctlGlobals *g, int argc, char **argv)
{
        const char *provider = NULL, *domain = NULL;
        bool deep = false, all = false;
        for (int i = 2; i < argc; i++) {
                if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc)
                        provider = argv[++i];
                else if (g_str_has_prefix(argv[i], "--provider="))
                        provider = argv[i] + strlen("--provider=");
                else if (strcmp(argv[i], "--deep") == 0)
                        deep = true;
                else if (strcmp(argv[i], "--all") == 0)
                        all = true;
                else if (argv[i][0] != '-' && !domain)
                        domain = argv[i];
                else {
                        fputs(rekey_usage, stderr);
                        return nkpctl_error("unknown or incomplete option '%s'.", argv[i]);
                }
        }
        if (all == (domain != NULL) || (all && deep)) {
                fputs(rekey_usage, stderr);
                return nkpctl_error("name one DOMAIN, or --all (shallow rekey only).");
        }
        if (deep)
                return nkpctl_vm_rekey_deep(g, domain, provider);
        if (all)
                return rekey_all(g, provider);
        return rekey_single(g, domain, provider);
}

/* ---- which VMs depend on a provider ------------------------------------------ */

enum definition { DEF_PERSISTENT, DEF_LIVE, DEF_SAVED };

/* Whether definition `which` of `name` names provider `key_id`.  A
 * definition whose nkp data is damaged counts when its text mentions the
 * key id: it may depend on it. */
static bool definition_uses(NkpVirt *v, const char *name, enum definition which,
                            const char *key_id)
{
        g_autofree char *xml = NULL;
        int r = which == DEF_SAVED ? nkp_virt_managed_save_xml(v, name, &xml)
                                   : nkp_virt_domain_xml(v, name, which == DEF_PERSISTENT, &xml);
        if (r < 0 || !xml)
                return false; /* undefined, stopped or restored meanwhile */
        g_autoptr(NkpDomain) d = NULL;
        if (nkp_domain_parse(xml, strlen(xml), &d) < 0)
                return strstr(xml, key_id) != NULL;
        return d->keysafe &&
               g_ascii_strcasecmp(nkp_keysafe_provider_key_id(d->keysafe), key_id) == 0;
}

int nkpctl_provider_dependents(NkpctlGlobals *g, const char *key_id, GPtrArray **ret_names)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(GPtrArray) names = NULL;
        if (nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, &v) < 0 ||
            nkp_virt_domain_list(v, &names) < 0)
                return nkp_fail_prefix(-ECONNREFUSED, "Cannot tell which VMs use the provider");
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
        for (guint i = 0; i < names->len; i++) {
                const char *name = names->pdata[i];
                /* The persistent definition starts the VM next time; the live
                 * one is what a running VM needs after a libvirtd restart or
                 * on a migration; a saved state restores with its own. */
                if (definition_uses(v, name, DEF_PERSISTENT, key_id) ||
                    (nkp_virt_domain_is_active(v, name) > 0 &&
                     definition_uses(v, name, DEF_LIVE, key_id)) ||
                    definition_uses(v, name, DEF_SAVED, key_id))
                        g_ptr_array_add(out, g_strdup(name));
        }
        *ret_names = g_steal_pointer(&out);
        return 0;
}
