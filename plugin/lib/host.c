/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The host as nkp sees it: its TPM (configured, answering) and the key
 * cache (which providers are unsealed for this boot).  No key bytes ever
 * leave this module: only names, key ids and flags. */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"

struct nkp_host_status {
        bool tpm_in_use;
        bool tpm_answers;
        char *tpm_error; /* why a configured TPM does not answer */
        GArray *cached;  /* NkpCacheInfo */
};

/* Opens the TPM once: the only proof that a configured one answers. */
static void probe_tpm(nkp_context *ctx, nkp_host_status *st)
{
        const char *tcti = nkp_context_tcti(ctx);
        st->tpm_in_use = tcti && strcmp(tcti, "none") != 0;
        if (!st->tpm_in_use)
                return;
        NkpTpm *tpm = NULL;
        int r = nkp_tpm_open(ctx, &tpm);
        if (r == 0) {
                st->tpm_answers = true;
                nkp_tpm_close(tpm);
        } else if (r == -ENODEV) {
                st->tpm_in_use = false; /* the default device is absent: no TPM */
        } else {
                st->tpm_error = g_strdup(nkp_error_message());
        }
        nkp_error_clear();
}

int nkp_host_status_get(nkp_context *ctx, nkp_host_status **ret)
{
        g_autoptr(GArray) cached = NULL;
        int r = nkp_cache_list(ctx, &cached);
        if (r < 0)
                return r;
        nkp_host_status *st = g_new0(nkp_host_status, 1);
        st->cached = g_steal_pointer(&cached);
        probe_tpm(ctx, st);
        *ret = st;
        return 0;
}

void nkp_host_status_free(nkp_host_status *st)
{
        if (!st)
                return;
        g_free(st->tpm_error);
        if (st->cached)
                g_array_unref(st->cached);
        g_free(st);
}

bool nkp_host_status_tpm_in_use(const nkp_host_status *st)
{
        return st->tpm_in_use;
}

bool nkp_host_status_tpm_answers(const nkp_host_status *st)
{
        return st->tpm_answers;
}

const char *nkp_host_status_tpm_error(const nkp_host_status *st)
{
        return st->tpm_error;
}

size_t nkp_host_status_n_cached(const nkp_host_status *st)
{
        return st->cached->len;
}

static const NkpCacheInfo *cached_at(const nkp_host_status *st, size_t i)
{
        return i < st->cached->len ? &g_array_index(st->cached, NkpCacheInfo, i) : NULL;
}

const char *nkp_host_status_cached_name(const nkp_host_status *st, size_t i)
{
        const NkpCacheInfo *c = cached_at(st, i);
        return c ? c->name : NULL;
}

const char *nkp_host_status_cached_key_id(const nkp_host_status *st, size_t i)
{
        const NkpCacheInfo *c = cached_at(st, i);
        return c ? c->key_id : NULL;
}

bool nkp_host_status_cached_deleted(const nkp_host_status *st, size_t i)
{
        const NkpCacheInfo *c = cached_at(st, i);
        return c && c->deleted;
}

int nkp_host_flush_cache(nkp_context *ctx, size_t *ret_forgotten)
{
        g_autoptr(GArray) cached = NULL;
        int r = nkp_cache_list(ctx, &cached);
        if (r < 0)
                return r;
        if ((r = nkp_cache_flush(ctx)) < 0)
                return r;
        if (ret_forgotten)
                *ret_forgotten = cached->len;
        return 0;
}
