/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The public provider API on top of the store, the TPM and the key cache.
 *
 * Every writer takes the store lock, loads, checks, changes and saves; a
 * refused operation returns before anything is written.  Readers load
 * without the lock (the store is replaced atomically).
 *
 * Default provider: only an active (backed-up) provider can be the default,
 * and nothing becomes the default implicitly.  In particular the first
 * provider that gets backed up does NOT silently become the default: which
 * provider protects new VMs is an admin decision (nkpctl provider
 * set-default NAME), and a default appearing as a side effect of a backup
 * would surprise scripts that back up several providers.  Without a default
 * the commands that need one ask for --provider NAME.
 */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"


struct nkp_provider {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        char fingerprint[65];
        unsigned flags;
        int64_t created;
        enum nkp_seal seal;
        char **bind_servers; /* NULL: not bound to the network */
        unsigned bind_threshold;
};

static int check_name(const char *name)
{
        if (nkp_provider_name_valid(name))
                return 0;
        g_autofree char *shown = g_strescape(name ? name : "", NULL);
        if (strlen(shown) > 80)
                strcpy(shown + 77, "...");
        return nkp_fail(-EINVAL,
                        "'%s' is not a valid provider name; use 1 to %d letters, digits, '.', '_' "
                        "or '-'.",
                        shown, NKP_NAME_MAX);
}

static int no_such_provider(const char *name)
{
        return nkp_fail(-ENOENT, "There is no provider named '%s' (see: nkpctl provider list).", name);
}

nkp_provider *nkp_provider_from_entry(const NkpStoreEntry *e)
{
        nkp_provider *p = g_new0(nkp_provider, 1);
        g_strlcpy(p->name, e->name, sizeof p->name);
        g_strlcpy(p->key_id, e->key_id, sizeof p->key_id);
        g_strlcpy(p->fingerprint, e->fingerprint, sizeof p->fingerprint);
        p->flags = e->flags;
        p->created = e->created;
        p->seal = e->seal;
        if (e->bind) {
                p->bind_servers = g_strdupv(e->bind->servers);
                p->bind_threshold = e->bind->threshold;
        }
        return p;
}

/* The KDK that the entry `e` rests as: through its network binding (Tang)
 * first when it has one, then through the TPM when sealed.  -EHOSTUNREACH
 * when the Tang servers do not answer (tang.c words it). */
static int entry_open(nkp_context *ctx, const NkpStoreEntry *e, nkp_secret **ret)
{
        g_autoptr(nkp_secret) material = NULL;
        int r;
        if (e->bind) {
                r = nkp_tang_unwrap(e->bind_jwe, e->name, e->bind, &material);
                if (r < 0)
                        return r;
        }
        if (e->seal == NKP_SEAL_NONE) {
                const nkp_secret *kdk = material ? material : e->kdk;
                if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                        return nkp_fail(-EBADMSG, "The key of provider '%s' is not %d bytes; the store is "
                                                  "damaged: restore the provider from its backup.",
                                        e->name, NKP_KDK_SIZE);
                return nkp_secret_new_copy(nkp_secret_data(kdk), NKP_KDK_SIZE, ret);
        }
        g_autoptr(GBytes) blob = material ? g_bytes_new(nkp_secret_data(material), nkp_secret_len(material))
                                          : g_bytes_ref(e->tpm_blob);
        g_autoptr(NkpTpm) tpm = NULL;
        r = nkp_tpm_open(ctx, &tpm);
        if (r >= 0)
                r = nkp_tpm_unseal(tpm, blob, e->tpm_srk_name, ret);
        return r;
}

/* ---- shared by create and restore --------------------------------------- */

int nkp_store_entry_new(nkp_context *ctx, const char *name, const char *key_id, unsigned flags,
                        int64_t created, const nkp_secret *kdk, NkpStoreEntry **ret)
{
        uint8_t uuid[16];
        int r = check_name(name);
        if (r < 0)
                return r;
        if (nkp_uuid_parse(key_id, uuid) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a valid key id (a UUID).", key_id ? key_id : "");
        if (flags & ~(unsigned) (NKP_PROVIDER_DEFAULT | NKP_PROVIDER_BACKED_UP | NKP_PROVIDER_REQUIRE_TPM))
                return nkp_fail(-EINVAL, "Unknown provider flags 0x%x.", flags);
        if (!kdk || nkp_secret_len(kdk) != NKP_KDK_SIZE)
                return nkp_fail(-EINVAL, "A provider key must be %d bytes.", NKP_KDK_SIZE);

        g_autoptr(NkpStoreEntry) e = g_new0(NkpStoreEntry, 1);
        g_strlcpy(e->name, name, sizeof e->name);
        nkp_uuid_format(uuid, e->key_id); /* canonical lower case */
        e->flags = flags;
        e->created = created;

        g_autofree char *fp = NULL;
        r = nkp_kdk_fingerprint(kdk, &fp);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot compute the fingerprint of provider '%s'", name);
        g_strlcpy(e->fingerprint, fp, sizeof e->fingerprint);

        g_autoptr(NkpTpm) tpm = NULL;
        r = nkp_tpm_open(ctx, &tpm);
        if (r == -ENODEV) {
                if (flags & NKP_PROVIDER_REQUIRE_TPM)
                        return nkp_fail(-ENODEV,
                                        "Provider '%s' requires a TPM 2.0 and this host has none "
                                        "(config '%s': [tpm] tcti=%s); hold it on a host with a TPM, "
                                        "or set tcti= to this host's TPM.",
                                        name, ctx->conf_path, nkp_context_tcti(ctx));
                e->seal = NKP_SEAL_NONE;
                r = nkp_secret_new_copy(nkp_secret_data(kdk), NKP_KDK_SIZE, &e->kdk);
                if (r < 0)
                        return r;
        } else if (r < 0) {
                return nkp_fail_prefix(r, "Cannot seal provider '%s' to the TPM", name);
        } else {
                r = nkp_tpm_seal(tpm, kdk, &e->tpm_blob, &e->tpm_srk_name);
                if (r < 0)
                        return nkp_fail_prefix(r, "Cannot seal provider '%s' to the TPM", name);
                e->seal = NKP_SEAL_TPM;
        }
        *ret = g_steal_pointer(&e);
        return 0;
}

static void cache_put_quiet(nkp_context *ctx, const NkpStoreEntry *e, const nkp_secret *kdk)
{
        NkpCacheInfo info = { 0 };
        g_strlcpy(info.name, e->name, sizeof info.name);
        g_strlcpy(info.key_id, e->key_id, sizeof info.key_id);
        /* The store is the truth; a cache that cannot take the key only costs
         * an unseal later. */
        if (nkp_cache_put(ctx, &info, kdk) < 0)
                nkp_log(NKP_LOG_DEBUG, "Provider '%s' not cached: %s", e->name, nkp_error_message());
}

/* Takes the writers' lock and loads the store under it; on error the lock
 * is released. */
static int lock_and_load(nkp_context *ctx, int *ret_fd, NkpStore **ret_store)
{
        int r = nkp_store_lock(ctx, ret_fd);
        if (r < 0)
                return r;
        r = nkp_store_load(ctx, ret_store);
        if (r < 0) {
                nkp_store_unlock(*ret_fd);
                *ret_fd = -1;
        }
        return r;
}

int nkp_store_add(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk)
{
        g_autoptr(NkpStoreEntry) e = entry;
        g_autoptr(NkpStore) store = NULL;
        int fd = -1;
        int r = lock_and_load(ctx, &fd, &store);
        if (r < 0)
                return r;

        NkpStoreEntry *same = nkp_store_find(store, e->name);
        if (same) {
                r = nkp_fail(-EEXIST, "A provider named '%s' already exists (key id %s); pick another name.",
                             e->name, same->key_id);
                goto out;
        }
        same = nkp_store_find_key_id(store, e->key_id);
        if (same) {
                r = nkp_fail(-EEXIST, "The key id %s is already held here by provider '%s'.", e->key_id,
                             same->name);
                goto out;
        }
        if (store->entries->len >= NKP_MAX_PROVIDERS) {
                r = nkp_fail(-ENOSPC,
                             "This host already holds %d providers, the most nkp allows; delete one "
                             "first (nkpctl provider delete NAME).",
                             NKP_MAX_PROVIDERS);
                goto out;
        }
        if (e->flags & NKP_PROVIDER_DEFAULT) {
                if (!(e->flags & NKP_PROVIDER_BACKED_UP)) {
                        r = nkp_fail(-EPERM, "Provider '%s' was never backed up and cannot be the default.",
                                     e->name);
                        goto out;
                }
                for (guint i = 0; i < store->entries->len; i++) {
                        NkpStoreEntry *o = store->entries->pdata[i];
                        if (o->flags & NKP_PROVIDER_DEFAULT) {
                                r = nkp_fail(-EEXIST, "Provider '%s' is already the default.", o->name);
                                goto out;
                        }
                }
        }

        NkpStoreEntry *added = g_steal_pointer(&e);
        g_ptr_array_add(store->entries, added);
        r = nkp_store_save(ctx, store);
        if (r < 0)
                goto out;
        nkp_store_unlock(fd);
        fd = -1;
        if (kdk)
                cache_put_quiet(ctx, added, kdk);
        return 0;
out:
        nkp_store_unlock(fd);
        return r;
}

/* 0 when the store entry opens on this host; -ENXIO / -EBADMSG when it is
 * sealed to another TPM (a store copied from another host); another error
 * when the TPM cannot be asked.  Never reads the key cache: the question is
 * about what rests on disk. */
int nkp_store_entry_opens_here(nkp_context *ctx, const NkpStoreEntry *e)
{
        if (e->seal == NKP_SEAL_NONE && !e->bind)
                return 0;
        g_autoptr(nkp_secret) kdk = NULL;
        return entry_open(ctx, e, &kdk);
}

int nkp_store_replace(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk)
{
        g_autoptr(NkpStoreEntry) e = entry;
        g_autoptr(NkpStore) store = NULL;
        int fd = -1;
        int r = lock_and_load(ctx, &fd, &store);
        if (r < 0)
                return r;
        guint i;
        for (i = 0; i < store->entries->len; i++) {
                NkpStoreEntry *o = store->entries->pdata[i];
                if (strcmp(o->key_id, e->key_id) == 0)
                        break;
        }
        if (i == store->entries->len) {
                r = nkp_fail(-ENOENT, "Provider '%s' left the store meanwhile; nothing was changed.",
                             e->name);
                goto out;
        }
        NkpStoreEntry *o = store->entries->pdata[i];
        if (strcmp(o->name, e->name) != 0 || strcmp(o->fingerprint, e->fingerprint) != 0) {
                r = nkp_fail(-EEXIST, "Provider '%s' changed meanwhile; nothing was changed.",
                             e->name);
                goto out;
        }
        NkpStoreEntry *added = g_steal_pointer(&e);
        nkp_store_entry_free(o);
        store->entries->pdata[i] = added;
        r = nkp_store_save(ctx, store);
        if (r < 0)
                goto out;
        nkp_store_unlock(fd);
        cache_put_quiet(ctx, added, kdk);
        return 0;
out:
        nkp_store_unlock(fd);
        return r;
}

int nkp_store_add_provider(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk,
                           nkp_provider **ret)
{
        nkp_provider *p = nkp_provider_from_entry(entry);
        int r = nkp_store_add(ctx, entry, kdk);
        if (r < 0 || !ret)
                nkp_provider_free(p);
        else
                *ret = p;
        return r;
}

/* ---- the public API -------------------------------------------------------- */

int nkp_provider_create(nkp_context *ctx, const char *name, unsigned flags, nkp_provider **ret)
{
        int r = check_name(name);
        if (r < 0)
                return r;
        if (flags & ~(unsigned) NKP_PROVIDER_REQUIRE_TPM)
                return nkp_fail(-EINVAL,
                                "A new provider can only be created with the require-tpm flag; it "
                                "becomes usable (and can be made default) once backed up.");

        /* Cheap early checks (authoritative ones run again under the lock),
         * so a doomed create does not first talk to the TPM. */
        g_autoptr(NkpStore) store = NULL;
        r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        if (nkp_store_find(store, name))
                return nkp_fail(-EEXIST, "A provider named '%s' already exists; pick another name.", name);
        if (store->entries->len >= NKP_MAX_PROVIDERS)
                return nkp_fail(-ENOSPC,
                                "This host already holds %d providers, the most nkp allows; delete one "
                                "first (nkpctl provider delete NAME).",
                                NKP_MAX_PROVIDERS);

        g_autoptr(nkp_secret) kdk = NULL;
        r = nkp_secret_new_random(NKP_KDK_SIZE, &kdk);
        if (r < 0)
                return r;
        char key_id[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(key_id);

        NkpStoreEntry *e = NULL;
        r = nkp_store_entry_new(ctx, name, key_id, flags, g_get_real_time() / G_USEC_PER_SEC, kdk, &e);
        if (r < 0)
                return r;
        return nkp_store_add_provider(ctx, e, kdk, ret);
}

int nkp_provider_get(nkp_context *ctx, const char *name, nkp_provider **ret)
{
        int r = check_name(name);
        if (r < 0)
                return r;
        g_autoptr(NkpStore) store = NULL;
        r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *e = nkp_store_find(store, name);
        if (!e)
                return no_such_provider(name);
        *ret = nkp_provider_from_entry(e);
        return 0;
}

int nkp_provider_get_by_key_id(nkp_context *ctx, const char *key_id, nkp_provider **ret)
{
        uint8_t uuid[16];
        if (nkp_uuid_parse(key_id, uuid) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a valid key id (a UUID).", key_id ? key_id : "");
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *e = nkp_store_find_key_id(store, key_id);
        if (!e)
                return nkp_fail(-ENOENT, "There is no provider with key id %s on this host.", key_id);
        *ret = nkp_provider_from_entry(e);
        return 0;
}

static gint entry_cmp(gconstpointer a, gconstpointer b)
{
        const NkpStoreEntry *x = *(NkpStoreEntry *const *) a;
        const NkpStoreEntry *y = *(NkpStoreEntry *const *) b;
        return strcmp(x->name, y->name);
}

int nkp_provider_list(nkp_context *ctx, nkp_provider ***ret, size_t *ret_n)
{
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        g_ptr_array_sort(store->entries, entry_cmp);
        size_t n = store->entries->len;
        nkp_provider **list = g_new0(nkp_provider *, n + 1);
        for (size_t i = 0; i < n; i++)
                list[i] = nkp_provider_from_entry(store->entries->pdata[i]);
        *ret = list;
        *ret_n = n;
        return 0;
}

void nkp_provider_list_free(nkp_provider **list, size_t n)
{
        if (!list)
                return;
        for (size_t i = 0; i < n; i++)
                nkp_provider_free(list[i]);
        g_free(list);
}

int nkp_provider_set_default(nkp_context *ctx, const char *name)
{
        int r = check_name(name);
        if (r < 0)
                return r;
        g_autoptr(NkpStore) store = NULL;
        int fd = -1;
        r = nkp_store_lock(ctx, &fd);
        if (r < 0)
                return r;
        r = nkp_store_load(ctx, &store);
        if (r < 0)
                goto out;
        NkpStoreEntry *e = nkp_store_find(store, name);
        if (!e) {
                r = no_such_provider(name);
                goto out;
        }
        if (!(e->flags & NKP_PROVIDER_BACKED_UP)) {
                r = nkp_fail(-EPERM,
                             "Provider '%s' was never backed up, so it is inactive and cannot be the "
                             "default; back it up first: nkpctl provider backup %s --out FILE.p12",
                             name, name);
                goto out;
        }
        if (e->flags & NKP_PROVIDER_DEFAULT)
                goto out; /* already: nothing to write */
        for (guint i = 0; i < store->entries->len; i++) {
                NkpStoreEntry *o = store->entries->pdata[i];
                o->flags &= ~(unsigned) NKP_PROVIDER_DEFAULT;
        }
        e->flags |= NKP_PROVIDER_DEFAULT;
        r = nkp_store_save(ctx, store);
out:
        nkp_store_unlock(fd);
        return r;
}

int nkp_provider_delete(nkp_context *ctx, const char *name, unsigned in_use, bool force)
{
        int r = check_name(name);
        if (r < 0)
                return r;
        g_autoptr(NkpStore) store = NULL;
        char key_id[NKP_UUID_STRING_LEN + 1];
        int fd = -1;
        r = nkp_store_lock(ctx, &fd);
        if (r < 0)
                return r;
        r = nkp_store_load(ctx, &store);
        if (r < 0)
                goto out;
        NkpStoreEntry *e = nkp_store_find(store, name);
        if (!e) {
                r = no_such_provider(name);
                goto out;
        }
        if (in_use > 0 && !force) {
                r = nkp_fail(-EBUSY,
                             "Provider '%s' protects %u defined VM%s (see: nkpctl provider usage %s); "
                             "rekey or undefine them first, or delete with --force and lose access to "
                             "them once the key cache is flushed.",
                             name, in_use, in_use == 1 ? "" : "s", name);
                goto out;
        }
        g_strlcpy(key_id, e->key_id, sizeof key_id);
        g_ptr_array_remove(store->entries, e);
        r = nkp_store_save(ctx, store);
        if (r < 0)
                goto out;
        nkp_store_unlock(fd);
        fd = -1;
        /* Running VMs keep their key until the cache is flushed (reboot). */
        r = nkp_cache_mark_deleted(ctx, key_id);
        if (r < 0 && r != -ENOENT)
                nkp_log(NKP_LOG_WARNING, "Provider '%s' was deleted but its cache entry is not flagged: %s",
                        name, nkp_error_message());
        nkp_error_clear();
        return 0;
out:
        nkp_store_unlock(fd);
        return r;
}

int nkp_provider_get_kdk(nkp_context *ctx, const char *key_id, nkp_secret **ret)
{
        uint8_t uuid[16];
        char canon[NKP_UUID_STRING_LEN + 1];
        if (nkp_uuid_parse(key_id, uuid) < 0)
                return nkp_fail(-EINVAL, "'%s' is not a valid key id (a UUID).", key_id ? key_id : "");
        nkp_uuid_format(uuid, canon);

        nkp_secret *cached = NULL;
        int r = nkp_cache_get(ctx, canon, &cached, NULL);
        if (r == 0) {
                *ret = cached;
                return 0;
        }
        if (r != -ENOENT)
                nkp_log(NKP_LOG_DEBUG, "Key cache lookup failed, reading the store: %s",
                        nkp_error_message());

        g_autoptr(NkpStore) store = NULL;
        r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        const NkpStoreEntry *e = nkp_store_find_key_id(store, canon);
        if (!e)
                return nkp_fail(-ENOENT,
                                "The provider with key id %s is neither in the store nor in the key "
                                "cache of this host; restore it from its backup (nkpctl provider "
                                "restore FILE.p12).",
                                canon);

        g_autoptr(nkp_secret) kdk = NULL;
        r = entry_open(ctx, e, &kdk);
        if (r == -EHOSTUNREACH)
                return r; /* tang.c's line names the provider, the servers and the fix */
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot unseal provider '%s'", e->name);

        g_autofree char *fp = NULL;
        r = nkp_kdk_fingerprint(kdk, &fp);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot check the key of provider '%s'", e->name);
        if (strcmp(fp, e->fingerprint) != 0)
                return nkp_fail(-EBADMSG,
                                "The key of provider '%s' does not match its fingerprint in '%s'; the "
                                "store is damaged: restore the provider from its backup.",
                                e->name, ctx->store_path);

        cache_put_quiet(ctx, e, kdk);
        *ret = g_steal_pointer(&kdk);
        return 0;
}

const char *nkp_provider_name(const nkp_provider *p)
{
        return p->name;
}

const char *nkp_provider_key_id(const nkp_provider *p)
{
        return p->key_id;
}

const char *nkp_provider_fingerprint(const nkp_provider *p)
{
        return p->fingerprint;
}

unsigned nkp_provider_flags(const nkp_provider *p)
{
        return p->flags;
}

enum nkp_seal nkp_provider_seal(const nkp_provider *p)
{
        return p->seal;
}

int64_t nkp_provider_created(const nkp_provider *p)
{
        return p->created;
}

bool nkp_provider_is_active(const nkp_provider *p)
{
        return (p->flags & NKP_PROVIDER_BACKED_UP) != 0;
}

void nkp_provider_free(nkp_provider *p)
{
        if (p)
                g_strfreev(p->bind_servers);
        g_free(p);
}

const char *const *nkp_provider_binding(const nkp_provider *p, unsigned *ret_threshold)
{
        if (ret_threshold)
                *ret_threshold = p->bind_servers ? p->bind_threshold : 0;
        return (const char *const *) p->bind_servers;
}

/* Provider `name`, else the host's default: what every command that
 * protects a VM starts from. */
int nkp_provider_pick(nkp_context *ctx, const char *name, nkp_provider **ret)
{
        if (name) {
                int r = nkp_provider_get(ctx, name, ret);
                if (r == -ENOENT)
                        return nkp_fail(r, "There is no provider '%s' on this host (see: nkpctl "
                                           "provider list).",
                                        name);
                return r;
        }
        nkp_provider **list = NULL;
        size_t n = 0;
        int r = nkp_provider_list(ctx, &list, &n);
        if (r < 0)
                return r;
        nkp_provider *found = NULL;
        for (size_t i = 0; i < n; i++)
                if (nkp_provider_flags(list[i]) & NKP_PROVIDER_DEFAULT) {
                        found = list[i];
                        list[i] = NULL;
                        break;
                }
        nkp_provider_list_free(list, n);
        if (!found)
                return nkp_fail(-ENOENT, "No default provider on this host: name one with "
                                         "--provider NAME, or set one: nkpctl provider "
                                         "set-default NAME.");
        *ret = found;
        return 0;
}
