/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Shallow rekey of a VM (new KEK, same DEKs) and the VMs that depend on a
 * provider.  nkpctl's `vm rekey [--all]`, `provider usage` and `provider
 * delete` are thin programs over this file; nkp.h documents the contract.
 *
 * Shallow rekey of one VM, online (docs/rekey.md says why it is crash
 * safe):
 *  1. the target is the named provider, else the host's default (as
 *     vSphere's shallow rekey moves a VM to the default provider); it must
 *     be active (backed up).  Rekeying to the VM's own provider rotates its
 *     KEK.
 *  2. the VM's lock (journal.c) is taken for the rest: vm encrypt, decrypt
 *     and rekey --deep hold it while they run, so none of them interleaves
 *     with this rekey (a deep rekey's new DEKs overwritten by a rewrap of
 *     the old ones would lock the VM out of its own data), and the hook
 *     refuses to start the VM meanwhile.  A conversion of theirs that a
 *     crash interrupted (a journal) is reconciled first, by the same
 *     recovery as theirs (nkp_vm_lock_recovered, vm-convert.c).
 *  3. the persistent definition's keysafe is opened with the KDK of the
 *     provider it names (nkp_vm_kek: key cache, else the store; a provider
 *     deleted but still cached works too).  If the VM runs, its live
 *     definition's keysafe is read as well; when it differs from the
 *     persistent one (an interrupted rekey, say) both are opened and must
 *     hold the same objects, secret UUIDs and DEKs, or the rekey is refused.
 *  4. nkp_keysafe_rewrap: every DEK unwrapped and wrapped again under the
 *     KEK of the target provider and a fresh salt, all or nothing, in
 *     memory.
 *  5. the new keysafe goes into the live definition first (if the VM runs),
 *     then into the persistent one: one virDomainSetMetadata each, so each
 *     definition is replaced whole or not at all.  The DEKs, the secret
 *     UUIDs and the libvirt secrets the hook defined at start do not
 *     change: the guest notices nothing.
 *
 * Which VMs depend on a provider is counted over the persistent, the live
 * and the managed-save definition of every defined domain. */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"

struct nkp_rekey_result {
        char *domain;
        char *from;     /* the provider before (persistent definition) */
        char *provider; /* the target */
        bool running;   /* the live definition was rekeyed too */
        int error;
        char *message;
};

void nkp_rekey_result_free(nkp_rekey_result *res)
{
        if (!res)
                return;
        g_free(res->domain);
        g_free(res->from);
        g_free(res->provider);
        g_free(res->message);
        g_free(res);
}

const char *nkp_rekey_result_domain(const nkp_rekey_result *res)
{
        return res->domain;
}

const char *nkp_rekey_result_from(const nkp_rekey_result *res)
{
        return res->from;
}

const char *nkp_rekey_result_provider(const nkp_rekey_result *res)
{
        return res->provider;
}

bool nkp_rekey_result_running(const nkp_rekey_result *res)
{
        return res->running;
}

int nkp_rekey_result_error(const nkp_rekey_result *res)
{
        return res->error;
}

const char *nkp_rekey_result_message(const nkp_rekey_result *res)
{
        return res->message;
}

/* ---- the target ------------------------------------------------------------ */

typedef struct {
        nkp_provider *provider;
        nkp_secret *kdk;
} RekeyTarget;

static void target_clear(RekeyTarget *t)
{
        g_clear_pointer(&t->provider, nkp_provider_free);
        g_clear_pointer(&t->kdk, nkp_secret_free);
}

/* The target provider and its KDK: `name` or the default, active. */
static int target_pick(nkp_context *ctx, const char *name, RekeyTarget *ret)
{
        g_autoptr(nkp_provider) p = NULL;
        int r = nkp_provider_pick(ctx, name, &p);
        if (r < 0)
                return r;
        if (!nkp_provider_is_active(p))
                return nkp_fail(-EPERM,
                                "Provider '%s' was never backed up, so it cannot protect VMs yet: "
                                "nkpctl provider backup '%s' --out FILE.p12. Nothing was changed.",
                                nkp_provider_name(p), nkp_provider_name(p));
        if ((r = nkp_provider_get_kdk(ctx, nkp_provider_key_id(p), &ret->kdk)) < 0)
                return nkp_fail_prefix(r, "The key of provider '%s' is unavailable; nothing was "
                                          "changed",
                                       nkp_provider_name(p));
        ret->provider = g_steal_pointer(&p);
        return 0;
}

/* ---- one VM ------------------------------------------------------------------ */

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

/* nkp_vm_kek() for definition `d` (`which`: "persistent" or "live"), with
 * the rekey's messages. */
static int definition_kek(nkp_context *ctx, const NkpDomain *d, const char *which,
                          nkp_secret **ret)
{
        const nkp_keysafe *ks = d->keysafe;
        const char *pname = nkp_keysafe_provider_name(ks);
        const char *key_id = nkp_keysafe_provider_key_id(ks);
        int r = nkp_vm_kek(ctx, d, ret);
        if (r == -ENOKEY)
                return nkp_fail(-ENOKEY,
                                "VM '%s' cannot be rekeyed: provider '%s' (key id %s), which "
                                "protects its %s definition, is not on this host. Restore it "
                                "(nkpctl provider restore FILE.p12) and run the rekey again; "
                                "nothing was changed.",
                                d->name, pname, key_id, which);
        if (r == -EKEYREJECTED)
                return nkp_fail(-EKEYREJECTED,
                                "VM '%s' cannot be rekeyed: the provider with key id %s on this "
                                "host holds another key than '%s', which protects its %s "
                                "definition (fingerprint mismatch). Restore the provider's own "
                                "backup (nkpctl provider restore FILE.p12); nothing was changed.",
                                d->name, key_id, pname, which);
        if (r < 0)
                return nkp_fail_prefix(r, "VM '%s' cannot be rekeyed: the key of provider '%s' "
                                          "(key id %s) is unavailable; nothing was changed",
                                       d->name, pname, key_id);
        return 0;
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
                       nkp_keysafe_get_dek(l, kek_l, kind, id, &b) == 0 && nkp_secret_equal(a, b);
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
static int rekey_locked(nkp_context *ctx, NkpVirt *v, NkpDomain *dp, const RekeyTarget *to,
                        nkp_rekey_result *res)
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
        if ((r = definition_kek(ctx, dp, "persistent", &kek_p)) < 0)
                return r;
        if (dl && strcmp(old_text, live_text) != 0) {
                if ((r = definition_kek(ctx, dl, "live", &kek_l)) < 0 ||
                    (r = same_deks(dp, kek_p, dl, kek_l)) < 0)
                        return r;
        }

        if ((r = nkp_keysafe_rewrap(dp->keysafe, kek_p, to->provider, to->kdk)) < 0)
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
        if (!res->running)
                return follow_a_racing_start(v, name, old_text, new_text, &res->running);
        return 0;
}

static bool journal_pending(nkp_context *ctx, const char *vm_uuid)
{
        g_autofree char *path = nkp_journal_path(ctx, vm_uuid);
        return g_file_test(path, G_FILE_TEST_EXISTS);
}

static int not_nkp(const char *name)
{
        return nkp_fail(-ENODATA, "VM '%s' is not encrypted by nkp; nothing to rekey (to "
                                  "protect it: nkpctl vm encrypt '%s').",
                        name, name);
}

/* Shallow rekey of domain `name` to `to`, filling `res` as it goes. */
static int rekey_one(nkp_context *ctx, NkpVirt *v, const char *name, const RekeyTarget *to,
                     nkp_rekey_result *res)
{
        g_autoptr(NkpDomain) before = NULL;
        int r = load_definition(v, name, false, &before);
        if (r < 0)
                return r;
        /* A plain VM is never locked (no lock file made for it). */
        if (!before->keysafe && !journal_pending(ctx, before->uuid))
                return not_nkp(name);
        /* The lock and the recovery of every command (vm-convert.c): an
         * interrupted encrypt rolled back leaves a plain VM (-ENODATA). */
        int fd = -1;
        g_autoptr(NkpDomain) dp = NULL;
        if ((r = nkp_vm_lock_recovered(ctx, v, before, "rekey", &fd, NULL, NULL, &dp)) < 0)
                return r;
        r = dp->keysafe ? rekey_locked(ctx, v, dp, to, res) : not_nkp(name);
        nkp_journal_unlock(fd);
        return r;
}

static nkp_rekey_result *result_new(const char *name, const RekeyTarget *to)
{
        nkp_rekey_result *res = g_new0(nkp_rekey_result, 1);
        res->domain = g_strdup(name);
        res->provider = g_strdup(nkp_provider_name(to->provider));
        return res;
}

int nkp_vm_rekey(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                 nkp_rekey_result **ret)
{
        if (!domain)
                return nkp_fail(-EINVAL, "Name the VM to rekey.");
        RekeyTarget to = { 0 };
        int r = target_pick(ctx, provider, &to);
        if (r < 0)
                return r;
        g_autoptr(nkp_rekey_result) res = result_new(domain, &to);
        r = rekey_one(ctx, v, domain, &to, res);
        target_clear(&to);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&res);
        return 0;
}

int nkp_vm_rekey_all(nkp_context *ctx, nkp_virt *v, const char *provider, nkp_rekey_func func,
                     void *userdata)
{
        RekeyTarget to = { 0 };
        int r = target_pick(ctx, provider, &to);
        if (r < 0)
                return r;
        g_autoptr(GPtrArray) names = NULL;
        if ((r = nkp_virt_domain_list(v, &names)) < 0) {
                target_clear(&to);
                return r;
        }
        for (guint i = 0; i < names->len; i++) {
                const char *name = names->pdata[i];
                g_autoptr(nkp_rekey_result) res = result_new(name, &to);
                nkp_progress(ctx, "rekey", name, "rekey", i, names->len);
                nkp_error_clear();
                r = rekey_one(ctx, v, name, &to, res);
                if (r == -ENODATA || r == -ENOENT) /* plain, or undefined meanwhile */
                        continue;
                res->error = r;
                if (r < 0) {
                        const char *msg = nkp_error_message();
                        res->message = g_strdup(msg[0] ? msg : g_strerror(-r));
                }
                if (func)
                        func(res, userdata);
        }
        nkp_progress(ctx, "rekey", NULL, "done", names->len, names->len);
        target_clear(&to);
        nkp_error_clear();
        return 0;
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

int nkp_provider_dependents(nkp_context *ctx, nkp_virt *v, const char *key_id, char ***ret_names,
                            size_t *ret_n)
{
        (void) ctx;
        g_autoptr(GPtrArray) names = NULL;
        int r = nkp_virt_domain_list(v, &names);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot tell which VMs use the provider");
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
        nkp_error_clear(); /* a domain gone meanwhile is not a failure */
        *ret_n = out->len;
        g_ptr_array_add(out, NULL);
        *ret_names = (char **) g_ptr_array_free(g_steal_pointer(&out), FALSE);
        return 0;
}

static char *join_quoted(char **names, size_t n)
{
        g_autoptr(GString) s = g_string_new(NULL);
        for (size_t i = 0; i < n; i++)
                g_string_append_printf(s, "%s'%s'", i ? ", " : "", names[i]);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

int nkp_provider_delete_checked(nkp_context *ctx, nkp_virt *v, const char *name, bool force,
                                char ***ret_users, size_t *ret_n)
{
        g_autoptr(nkp_provider) p = NULL;
        int r = nkp_provider_get(ctx, name, &p);
        if (r < 0)
                return r;
        if (!v && !force)
                return nkp_fail(-ENOTCONN, "Provider '%s' was not deleted: without libvirt nkp "
                                           "cannot tell which defined VMs depend on it (make "
                                           "libvirt reachable, or use --force).",
                                name);
        g_auto(GStrv) users = NULL;
        size_t n = 0;
        nkp_error_clear();
        r = v ? nkp_provider_dependents(ctx, v, nkp_provider_key_id(p), &users, &n) : -ENOTCONN;
        if (r < 0 && !force) {
                g_autofree char *why = g_strdup(nkp_error_message());
                g_strchomp(why);
                if (g_str_has_suffix(why, "."))
                        why[strlen(why) - 1] = '\0';
                return nkp_fail(r, "%s%sprovider '%s' was not deleted, since defined VMs may "
                                   "depend on it (make libvirt reachable, or use --force).",
                                why, why[0] ? "; " : "", name);
        }
        if (r < 0) { /* --force: delete without knowing the users */
                users = g_new0(char *, 1);
                n = 0;
        }
        if (n > 0 && !force) {
                g_autofree char *list = join_quoted(users, n);
                const char *them = n == 1 ? "it" : "them";
                return nkp_fail(-EBUSY,
                                "Provider '%s' protects the defined VM%s %s; nothing was "
                                "deleted.  Rekey %s to another provider (nkpctl vm rekey DOMAIN "
                                "--provider OTHER) or undefine %s first, or use --force.",
                                name, n == 1 ? "" : "s", list, them, them);
        }
        r = nkp_provider_delete(ctx, name, (unsigned) n, force);
        if (r < 0)
                return r;
        if (ret_users)
                *ret_users = g_steal_pointer(&users);
        if (ret_n)
                *ret_n = n;
        return 0;
}
