/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Alarms: what an admin must act on.
 *
 * Recorded alarms live in ROOT/var/lib/nkp/alarms.ini (GKeyFile, 0600,
 * written atomically under the store lock), one group per (kind, subject):
 *
 *   [alarm <first 16 hex digits of SHA-256(kind NUL subject)>]
 *   kind=vm-locked
 *   subject=web01
 *   message=…
 *   since=<unix seconds of the first raise>
 *   last=<unix seconds of the latest raise>
 *
 * Derived alarms are computed from the current state on every list and
 * never stored: "provider-inactive" (a provider never backed up) and
 * "provider-deleted" (a key-cache entry flagged deleted).
 *
 * nkp_alarm_raise() also sends the alarm to the journal, straight through
 * GLib's journald writer (no libsystemd), with the structured fields
 * NKP_ALARM_KIND, NKP_ALARM_SUBJECT and NKP_ROOT.  Without a journal that
 * step does nothing; it never prints.
 */
#include <errno.h>
#include <string.h>

#include "nkp-private.h"

#define ALARMS_VERSION 1
#define ALARMS_MAX_SIZE (1024 * 1024)
#define ALARM_TEXT_MAX 1024

struct nkp_alarm {
        char *kind;
        char *subject;
        char *message;
        int64_t since;
};

static nkp_alarm *alarm_new(const char *kind, const char *subject, const char *message, int64_t since)
{
        nkp_alarm *a = g_new0(nkp_alarm, 1);
        a->kind = g_strdup(kind);
        a->subject = g_strdup(subject);
        a->message = g_strdup(message);
        a->since = since;
        return a;
}

static void alarm_free(nkp_alarm *a)
{
        if (!a)
                return;
        g_free(a->kind);
        g_free(a->subject);
        g_free(a->message);
        g_free(a);
}

static bool kind_valid(const char *kind)
{
        if (!kind || !kind[0] || strlen(kind) > 64)
                return false;
        for (const char *p = kind; *p; p++)
                if (!g_ascii_islower(*p) && !g_ascii_isdigit(*p) && *p != '-')
                        return false;
        return true;
}

static bool text_valid(const char *s)
{
        if (!s || !s[0] || strlen(s) > ALARM_TEXT_MAX || !g_utf8_validate(s, -1, NULL))
                return false;
        for (const char *p = s; *p; p++)
                if ((unsigned char) *p < 0x20)
                        return false;
        return true;
}

static char *group_for(const char *kind, const char *subject)
{
        g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_SHA256);
        g_checksum_update(sum, (const guchar *) kind, (gssize) strlen(kind) + 1);
        g_checksum_update(sum, (const guchar *) subject, (gssize) strlen(subject));
        char hex[17];
        g_strlcpy(hex, g_checksum_get_string(sum), sizeof hex);
        return g_strconcat("alarm ", hex, NULL);
}

static int alarms_corrupt(const nkp_context *ctx, const char *detail)
{
        return nkp_fail(-EBADMSG,
                        "The alarm file '%s' is damaged (%s); nkp does not repair it: fix it or move "
                        "it aside (derived alarms are recomputed, recorded ones are raised again by "
                        "the next failure).",
                        ctx->alarms_path, detail);
}

/* Loads the recorded alarms; a missing file is an empty key file. */
static int alarms_load(nkp_context *ctx, GKeyFile **ret)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        char *buf = NULL;
        size_t len = 0;
        int r = nkp_read_file(ctx->alarms_path, ALARMS_MAX_SIZE, true, &buf, &len);
        if (r == -ENOENT) {
                nkp_error_clear();
                *ret = g_steal_pointer(&kf);
                return 0;
        }
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot read the alarms");
        g_autoptr(GError) error = NULL;
        bool ok = g_key_file_load_from_data(kf, buf, len, G_KEY_FILE_NONE, &error);
        g_free(buf);
        if (!ok)
                return alarms_corrupt(ctx, error->message);
        g_autofree char *version = g_key_file_get_string(kf, "nkp", "version", NULL);
        if (!version)
                return alarms_corrupt(ctx, "no [nkp] version");
        if (strcmp(version, G_STRINGIFY(ALARMS_VERSION)) != 0)
                return nkp_fail(-EPROTONOSUPPORT,
                                "The alarm file '%s' has format version '%s' and this nkp reads "
                                "version %d only.",
                                ctx->alarms_path, version, ALARMS_VERSION);
        *ret = g_steal_pointer(&kf);
        return 0;
}

static int alarms_save(nkp_context *ctx, GKeyFile *kf)
{
        g_key_file_set_integer(kf, "nkp", "version", ALARMS_VERSION);
        gsize len = 0;
        g_autofree char *text = g_key_file_to_data(kf, &len, NULL);
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                return r;
        r = nkp_write_file_atomic(ctx->alarms_path, text, len, 0600, false);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot record the alarm");
        return 0;
}

static void send_to_journal(nkp_context *ctx, const char *kind, const char *subject,
                            const char *message)
{
        g_autofree char *text = g_strdup_printf("nkp alarm %s for '%s': %s", kind, subject, message);
        const GLogField fields[] = {
                { "MESSAGE", text, -1 },
                { "PRIORITY", "4", -1 }, /* warning */
                { "SYSLOG_IDENTIFIER", "nkp", -1 },
                { "GLIB_DOMAIN", G_LOG_DOMAIN, -1 },
                { "NKP_ALARM_KIND", kind, -1 },
                { "NKP_ALARM_SUBJECT", subject, -1 },
                { "NKP_ROOT", nkp_context_root(ctx), -1 },
        };
        /* Returns G_LOG_WRITER_UNHANDLED when there is no journal: fine. */
        if (g_log_writer_journald(G_LOG_LEVEL_WARNING, fields, G_N_ELEMENTS(fields), NULL) !=
            G_LOG_WRITER_HANDLED)
                nkp_log(NKP_LOG_DEBUG, "No journal for the alarm %s on '%s'.", kind, subject);
}

int nkp_alarm_raise(nkp_context *ctx, const char *kind, const char *subject, const char *message)
{
        if (!kind_valid(kind))
                return nkp_fail(-EINVAL, "'%s' is not a valid alarm kind (lower-case letters, digits, '-').",
                                kind ? kind : "");
        if (!text_valid(subject) || !text_valid(message))
                return nkp_fail(-EINVAL,
                                "An alarm needs a subject and a message of one line each (1 to %d bytes "
                                "of UTF-8).",
                                ALARM_TEXT_MAX);

        int fd = -1;
        int r = nkp_store_lock(ctx, &fd);
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = NULL;
        r = alarms_load(ctx, &kf);
        if (r >= 0) {
                g_autofree char *group = group_for(kind, subject);
                int64_t now = g_get_real_time() / G_USEC_PER_SEC;
                if (!g_key_file_has_key(kf, group, "since", NULL))
                        g_key_file_set_int64(kf, group, "since", now);
                g_key_file_set_string(kf, group, "kind", kind);
                g_key_file_set_string(kf, group, "subject", subject);
                g_key_file_set_string(kf, group, "message", message);
                g_key_file_set_int64(kf, group, "last", now);
                r = alarms_save(ctx, kf);
        }
        nkp_store_unlock(fd);
        send_to_journal(ctx, kind, subject, message);
        return r < 0 ? r : 0;
}

int nkp_alarm_clear(nkp_context *ctx, const char *kind, const char *subject)
{
        int fd = -1;
        int r = nkp_store_lock(ctx, &fd);
        if (r < 0)
                return r;
        g_autoptr(GKeyFile) kf = NULL;
        r = alarms_load(ctx, &kf);
        if (r >= 0) {
                g_auto(GStrv) groups = g_key_file_get_groups(kf, NULL);
                bool changed = false;
                for (size_t i = 0; groups[i]; i++) {
                        if (!g_str_has_prefix(groups[i], "alarm "))
                                continue;
                        g_autofree char *k = g_key_file_get_string(kf, groups[i], "kind", NULL);
                        g_autofree char *s = g_key_file_get_string(kf, groups[i], "subject", NULL);
                        if ((kind && g_strcmp0(k, kind) != 0) || (subject && g_strcmp0(s, subject) != 0))
                                continue;
                        g_key_file_remove_group(kf, groups[i], NULL);
                        changed = true;
                }
                if (changed)
                        r = alarms_save(ctx, kf);
        }
        nkp_store_unlock(fd);
        return r < 0 ? r : 0;
}

static gint alarm_cmp(gconstpointer a, gconstpointer b)
{
        const nkp_alarm *x = *(nkp_alarm *const *) a;
        const nkp_alarm *y = *(nkp_alarm *const *) b;
        if (x->since != y->since)
                return x->since < y->since ? -1 : 1;
        int c = strcmp(x->kind, y->kind);
        return c ? c : strcmp(x->subject, y->subject);
}

int nkp_alarm_list(nkp_context *ctx, nkp_alarm ***ret, size_t *ret_n)
{
        g_autoptr(GPtrArray) all = g_ptr_array_new_with_free_func((GDestroyNotify) alarm_free);

        /* Derived: providers never backed up. */
        g_autoptr(NkpStore) store = NULL;
        int r = nkp_store_load(ctx, &store);
        if (r < 0)
                return r;
        for (guint i = 0; i < store->entries->len; i++) {
                const NkpStoreEntry *e = store->entries->pdata[i];
                if (e->flags & NKP_PROVIDER_BACKED_UP)
                        continue;
                g_autofree char *msg = g_strdup_printf(
                        "Provider '%s' was never backed up and stays inactive (it protects nothing "
                        "and cannot be the default); back it up: nkpctl provider backup %s --out "
                        "FILE.p12",
                        e->name, e->name);
                g_ptr_array_add(all, alarm_new("provider-inactive", e->name, msg, 0));
        }

        /* Derived: deleted from the store, still in the key cache. */
        g_autoptr(GArray) cached = NULL;
        r = nkp_cache_list(ctx, &cached);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot list the key cache for the alarms");
        for (guint i = 0; i < cached->len; i++) {
                const NkpCacheInfo *c = &g_array_index(cached, NkpCacheInfo, i);
                if (!c->deleted)
                        continue;
                g_autofree char *msg = g_strdup_printf(
                        "Provider '%s' (key id %s) was deleted from the store but its key is still "
                        "in the key cache, so running VMs keep working until the next reboot; "
                        "restore it from its backup to keep its VMs (nkpctl provider restore "
                        "FILE.p12)",
                        c->name, c->key_id);
                g_ptr_array_add(all, alarm_new("provider-deleted", c->name, msg, 0));
        }

        /* Recorded. */
        g_autoptr(GKeyFile) kf = NULL;
        r = alarms_load(ctx, &kf);
        if (r < 0)
                return r;
        g_auto(GStrv) groups = g_key_file_get_groups(kf, NULL);
        for (size_t i = 0; groups[i]; i++) {
                if (strcmp(groups[i], "nkp") == 0)
                        continue;
                g_autofree char *k = g_key_file_get_string(kf, groups[i], "kind", NULL);
                g_autofree char *s = g_key_file_get_string(kf, groups[i], "subject", NULL);
                g_autofree char *m = g_key_file_get_string(kf, groups[i], "message", NULL);
                g_autoptr(GError) error = NULL;
                int64_t since = g_key_file_get_int64(kf, groups[i], "since", &error);
                if (!g_str_has_prefix(groups[i], "alarm ") || !kind_valid(k) || !s || !m || error)
                        return alarms_corrupt(ctx, "an alarm lacks its kind, subject, message or since");
                g_ptr_array_add(all, alarm_new(k, s, m, since));
        }

        g_ptr_array_sort(all, alarm_cmp);
        size_t n = all->len;
        g_ptr_array_set_free_func(all, NULL);
        g_ptr_array_add(all, NULL);
        *ret = (nkp_alarm **) g_ptr_array_free(g_steal_pointer(&all), FALSE);
        *ret_n = n;
        return 0;
}

void nkp_alarm_list_free(nkp_alarm **list, size_t n)
{
        if (!list)
                return;
        for (size_t i = 0; i < n; i++)
                alarm_free(list[i]);
        g_free(list);
}

const char *nkp_alarm_kind(const nkp_alarm *a)
{
        return a->kind;
}

const char *nkp_alarm_subject(const nkp_alarm *a)
{
        return a->subject;
}

const char *nkp_alarm_message(const nkp_alarm *a)
{
        return a->message;
}

int64_t nkp_alarm_since(const nkp_alarm *a)
{
        return a->since;
}

bool nkp_alarm_open(nkp_context *ctx, const char *kind, const char *subject, const char *message)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        bool open = false;
        if (nkp_alarm_list(ctx, &list, &n) < 0)
                return false;
        for (size_t i = 0; i < n && !open; i++)
                open = strcmp(nkp_alarm_kind(list[i]), kind) == 0 &&
                       (!subject || strcmp(nkp_alarm_subject(list[i]), subject) == 0) &&
                       (!message || g_strcmp0(nkp_alarm_message(list[i]), message) == 0);
        nkp_alarm_list_free(list, n);
        return open;
}
