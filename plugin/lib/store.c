/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The provider store: one GKeyFile at ROOT/var/lib/nkp/providers.ini
 * (directory 0700, file 0600, owned by the user nkp runs as), rewritten
 * whole and atomically (temp file, fsync, rename, fsync of the directory)
 * by writers that hold the flock on ROOT/var/lib/nkp/.lock.  Readers take
 * no lock: a rename is atomic, so they see the old or the new file.
 *
 * Layout (version 1):
 *
 *   [nkp]
 *   version=1
 *
 *   [provider NAME]               one group per provider, at most 32
 *   name=NAME                     [A-Za-z0-9._-]{1,64}, equal to the group's
 *   key_id=UUID                   lower-case RFC 4122 text, unique
 *   fingerprint=64 hex digits     nkp_kdk_fingerprint() of the KDK
 *   flags=backed-up;default;      words: default, backed-up, require-tpm
 *   created=2026-01-02T03:04:05Z  ISO 8601, UTC
 *   sealed=none|tpm
 *   kdk=BASE64                    sealed=none: the 32-byte KDK
 *   tpm_blob=BASE64               sealed=tpm: TPM2B_PUBLIC + TPM2B_PRIVATE
 *   tpm_srk_name=HEX              sealed=tpm: name of the SRK it is sealed under
 *   bind=tang                     network-bound (tang.c): the kdk (sealed=none)
 *                                 or the tpm_blob (sealed=tpm) is not in the
 *                                 group but inside bind_jwe
 *   bind_servers=URL;URL;         the Tang servers, 1 to 8
 *   bind_threshold=N              how many of them must answer
 *   bind_jwe=JWE                  Clevis sss/tang JWE (compact): `clevis decrypt`
 *
 * Loading is strict and never repairs: a file that does not parse, has a
 * duplicated group or key, an unknown group/key/flag/version, a bad value,
 * duplicate names or key ids, more than 32 providers or more than one
 * default is refused with one sentence that names the file and the fix.
 *
 * Key hygiene: the KDK's base64 text never reaches GKeyFile (whose strings
 * are freed without being wiped).  On load, the kdk= values are decoded
 * straight from the raw buffer into nkp_secrets and blanked before GKeyFile
 * parses the buffer; on save, GKeyFile writes a placeholder that is replaced
 * in the final buffer.  Every buffer that held key text is wiped.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nkp-private.h"

/* Here, not in provider.c: the store validates the names it reads, and the
 * provider layer builds on the store, never the reverse. */
bool nkp_provider_name_valid(const char *name)
{
        if (!name)
                return false;
        size_t n = strlen(name);
        if (n < 1 || n > NKP_NAME_MAX)
                return false;
        /* Names become file names (backups, the cache): never a directory. */
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                return false;
        for (size_t i = 0; i < n; i++) {
                char c = name[i];
                if (!g_ascii_isalnum(c) && c != '.' && c != '_' && c != '-')
                        return false;
        }
        return true;
}


#define STORE_VERSION 1
#define STORE_MAX_SIZE (1024 * 1024)
#define TPM_BLOB_MAX 16384
#define KDK_B64_LEN 44 /* base64 of 32 bytes */
#define KDK_PLACEHOLDER "@"
#define GROUP_PREFIX "provider "
#define LOCK_TIMEOUT_MS 30000

static const char store_fix[] =
        "nkp does not repair it: put back a good copy of the file, or move it aside and "
        "restore each provider from its backup (nkpctl provider restore FILE.p12)";

void nkp_store_entry_free(NkpStoreEntry *e)
{
        if (!e)
                return;
        nkp_secret_free(e->kdk);
        if (e->tpm_blob)
                g_bytes_unref(e->tpm_blob);
        g_free(e->tpm_srk_name);
        nkp_binding_free(e->bind);
        g_free(e->bind_jwe);
        nkp_wipe(e, sizeof *e);
        g_free(e);
}

void nkp_store_free(NkpStore *store)
{
        if (!store)
                return;
        if (store->entries)
                g_ptr_array_unref(store->entries);
        g_free(store);
}

static NkpStore *store_new(void)
{
        NkpStore *s = g_new0(NkpStore, 1);
        s->entries = g_ptr_array_new_with_free_func((GDestroyNotify) nkp_store_entry_free);
        return s;
}

/* ---- lock ---------------------------------------------------------------- */

int nkp_store_lock(nkp_context *ctx, int *ret_fd)
{
        int r = nkp_mkdir_private(ctx->store_dir);
        if (r < 0)
                return r;
        int fd = open(ctx->lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (fd < 0)
                return nkp_fail(-errno, "Cannot open the store lock '%s': %s.", ctx->lock_path,
                                strerror(errno));
        /* Bounded wait: a stuck writer must not hang every nkpctl forever. */
        for (int waited = 0;; waited += 10) {
                if (flock(fd, LOCK_EX | LOCK_NB) == 0)
                        break;
                if (errno == EINTR)
                        continue;
                if (errno != EWOULDBLOCK || waited >= LOCK_TIMEOUT_MS) {
                        int e = errno;
                        close(fd);
                        if (e == EWOULDBLOCK)
                                return nkp_fail(-EBUSY,
                                                "Another nkp process has held the store lock '%s' "
                                                "for %d seconds; find it (fuser '%s') and retry.",
                                                ctx->lock_path, LOCK_TIMEOUT_MS / 1000,
                                                ctx->lock_path);
                        return nkp_fail(-e, "Cannot lock '%s': %s.", ctx->lock_path, strerror(e));
                }
                g_usleep(10 * 1000);
        }
        *ret_fd = fd;
        return 0;
}

void nkp_store_unlock(int fd)
{
        if (fd < 0)
                return;
        flock(fd, LOCK_UN);
        close(fd);
}

/* ---- helpers ------------------------------------------------------------- */

static int store_corrupt(const nkp_context *ctx, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static int store_corrupt(const nkp_context *ctx, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        g_autofree char *detail = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        return nkp_fail(-EBADMSG, "The provider store '%s' is damaged: %s; %s.", ctx->store_path,
                        detail, store_fix);
}

static bool is_lower_hex(const char *s, size_t min, size_t max)
{
        size_t n = strlen(s);
        if (n < min || n > max || n % 2)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!g_ascii_isdigit(s[i]) && !(s[i] >= 'a' && s[i] <= 'f'))
                        return false;
        return true;
}

/* Strict base64 (RFC 4648 alphabet, padded, length multiple of 4). */
static bool is_base64(const char *s, size_t n)
{
        if (n == 0 || n % 4)
                return false;
        for (size_t i = 0; i < n; i++) {
                char c = s[i];
                if (g_ascii_isalnum(c) || c == '+' || c == '/')
                        continue;
                if (c == '=' && (i == n - 1 || (i == n - 2 && s[n - 1] == '=')))
                        continue;
                return false;
        }
        return true;
}

static bool uuid_canonical(const char *s)
{
        uint8_t b[16];
        char back[NKP_UUID_STRING_LEN + 1];
        if (nkp_uuid_parse(s, b) < 0)
                return false;
        nkp_uuid_format(b, back);
        return strcmp(back, s) == 0;
}

static char *format_time(int64_t t)
{
        g_autoptr(GDateTime) dt = g_date_time_new_from_unix_utc(t);
        if (!dt)
                return g_strdup("1970-01-01T00:00:00Z");
        return g_date_time_format(dt, "%Y-%m-%dT%H:%M:%SZ");
}

/* Only the form format_time writes (so a loaded store saves unchanged). */
static bool parse_time(const char *s, int64_t *ret)
{
        g_autoptr(GDateTime) dt = g_date_time_new_from_iso8601(s, NULL);
        if (!dt)
                return false;
        int64_t t = g_date_time_to_unix(dt);
        g_autofree char *canonical = format_time(t);
        if (strcmp(canonical, s) != 0)
                return false;
        *ret = t;
        return true;
}

static const struct {
        unsigned flag;
        const char *word;
} flag_words[] = {
        { NKP_PROVIDER_DEFAULT, "default" },
        { NKP_PROVIDER_BACKED_UP, "backed-up" },
        { NKP_PROVIDER_REQUIRE_TPM, "require-tpm" },
};

/* ---- load ---------------------------------------------------------------- */

static void secret_free_void(gpointer p)
{
        nkp_secret_free(p);
}

/* Walks the raw text the way GKeyFile will read it: refuses duplicated
 * groups and keys (GKeyFile would merge them silently), and moves each
 * kdk= value into an nkp_secret (keyed by group), blanking it in `buf`. */
static int prescan(const nkp_context *ctx, char *buf, size_t len, GHashTable *kdks)
{
        g_autoptr(GHashTable) groups = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                                             (GDestroyNotify) g_hash_table_unref);
        GHashTable *keys = NULL;
        const char *group = NULL;
        unsigned lineno = 0;

        for (size_t pos = 0; pos < len;) {
                char *line = buf + pos;
                char *nl = memchr(line, '\n', len - pos);
                size_t llen = nl ? (size_t) (nl - line) : len - pos;
                pos += llen + (nl ? 1 : 0);
                lineno++;

                if (memchr(line, '\0', llen))
                        return store_corrupt(ctx, "line %u contains a NUL byte", lineno);
                while (llen > 0 && g_ascii_isspace(*line)) {
                        line++;
                        llen--;
                }
                while (llen > 0 && g_ascii_isspace(line[llen - 1]))
                        llen--;
                if (llen == 0 || line[0] == '#')
                        continue;
                if (line[0] == '[') {
                        if (line[llen - 1] != ']')
                                return store_corrupt(ctx, "line %u is not a valid group header", lineno);
                        g_autofree char *name = g_strndup(line + 1, llen - 2);
                        if (g_hash_table_contains(groups, name))
                                return store_corrupt(ctx, "the group '[%s]' appears twice (line %u)",
                                                     name, lineno);
                        keys = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
                        group = name;
                        g_hash_table_insert(groups, g_steal_pointer(&name), keys);
                        continue;
                }
                char *eq = memchr(line, '=', llen);
                if (!eq || !group)
                        return store_corrupt(ctx, "line %u is neither a group nor a key=value", lineno);
                size_t klen = (size_t) (eq - line);
                while (klen > 0 && g_ascii_isspace(line[klen - 1]))
                        klen--;
                g_autofree char *key = g_strndup(line, klen);
                if (g_hash_table_contains(keys, key))
                        return store_corrupt(ctx, "the key '%s' appears twice in '[%s]' (line %u)", key,
                                             group, lineno);
                bool is_kdk = strcmp(key, "kdk") == 0;
                g_hash_table_add(keys, g_steal_pointer(&key));
                if (!is_kdk)
                        continue;

                char *v = eq + 1;
                size_t vlen = llen - (size_t) (v - line);
                while (vlen > 0 && g_ascii_isspace(*v)) {
                        v++;
                        vlen--;
                }
                if (vlen != KDK_B64_LEN || !is_base64(v, vlen) || v[KDK_B64_LEN - 2] == '=')
                        return store_corrupt(ctx, "the kdk of '[%s]' is not the base64 of %d bytes",
                                             group, NKP_KDK_SIZE);
                g_autoptr(nkp_secret) scratch = NULL;
                int r = nkp_secret_new(48, &scratch);
                if (r < 0)
                        return r;
                gint state = 0;
                guint save = 0;
                gsize n = g_base64_decode_step(v, vlen, nkp_secret_data_mut(scratch), &state, &save);
                nkp_wipe(&save, sizeof save);
                nkp_wipe(v, vlen);
                memset(v, '*', vlen);
                if (n != NKP_KDK_SIZE)
                        return store_corrupt(ctx, "the kdk of '[%s]' is not %d bytes", group,
                                             NKP_KDK_SIZE);
                nkp_secret *kdk = NULL;
                r = nkp_secret_new_copy(nkp_secret_data(scratch), NKP_KDK_SIZE, &kdk);
                if (r < 0)
                        return r;
                g_hash_table_insert(kdks, g_strdup(group), kdk);
        }
        return 0;
}

/* bind=, bind_servers=, bind_threshold=, bind_jwe=: all or none. */
static int parse_binding(const nkp_context *ctx, GKeyFile *kf, const char *group, const char *name,
                         NkpStoreEntry *e)
{
        static const char *const keys[] = { "bind", "bind_servers", "bind_threshold", "bind_jwe" };
        unsigned present = 0;
        for (size_t i = 0; i < G_N_ELEMENTS(keys); i++)
                present += g_key_file_has_key(kf, group, keys[i], NULL);
        if (present == 0)
                return 0;
        g_autofree char *bind = g_key_file_get_string(kf, group, "bind", NULL);
        g_autofree char *jwe = g_key_file_get_string(kf, group, "bind_jwe", NULL);
        g_auto(GStrv) servers = g_key_file_get_string_list(kf, group, "bind_servers", NULL, NULL);
        g_autoptr(GError) err = NULL;
        gint threshold = g_key_file_get_integer(kf, group, "bind_threshold", &err);
        if (present != G_N_ELEMENTS(keys) || !bind || strcmp(bind, "tang") != 0 || !jwe || !servers || err ||
            threshold < 1)
                return store_corrupt(ctx, "the network binding of provider '%s' is incomplete or not "
                                          "bind=tang",
                                     name);
        g_autofree char *joined = g_strjoinv(",", servers);
        g_autofree char *spec = g_strconcat("tang:", joined, NULL);
        NkpBinding *b = NULL;
        if (nkp_binding_parse(spec, (unsigned) threshold, &b) < 0)
                return store_corrupt(ctx, "the network binding of provider '%s' is not valid (%s)", name,
                                     nkp_error_message());
        size_t len = strlen(jwe);
        unsigned dots = 0;
        for (size_t i = 0; i < len; i++)
                dots += jwe[i] == '.';
        if (len > NKP_JWE_MAX || dots != 4) {
                nkp_binding_free(b);
                return store_corrupt(ctx, "the bind_jwe of provider '%s' is not a compact JWE", name);
        }
        e->bind = b;
        e->bind_jwe = g_steal_pointer(&jwe);
        return 0;
}

static int parse_entry(const nkp_context *ctx, GKeyFile *kf, const char *group, GHashTable *kdks,
                       NkpStoreEntry **ret)
{
        static const char *const allowed[] = { "name",    "key_id", "fingerprint", "flags",
                                               "created", "sealed", "kdk",         "tpm_blob",
                                               "tpm_srk_name", "bind", "bind_servers",
                                               "bind_threshold", "bind_jwe", NULL };
        const char *gname = group + strlen(GROUP_PREFIX);

        g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
        for (size_t i = 0; keys && keys[i]; i++)
                if (!g_strv_contains(allowed, keys[i]))
                        return store_corrupt(ctx, "'[%s]' has the unknown key '%s'", group, keys[i]);

#define GET(var, key)                                                                             \
        g_autofree char *var = g_key_file_get_string(kf, group, key, NULL);                       \
        if (!var)                                                                                 \
                return store_corrupt(ctx, "'[%s]' has no %s", group, key);

        GET(name, "name");
        GET(key_id, "key_id");
        GET(fingerprint, "fingerprint");
        GET(created, "created");
        GET(sealed, "sealed");
#undef GET

        if (!nkp_provider_name_valid(name) || strcmp(name, gname) != 0)
                return store_corrupt(ctx, "'[%s]' has the invalid or mismatched name '%s'", group, name);
        if (!uuid_canonical(key_id))
                return store_corrupt(ctx, "the key id '%s' of provider '%s' is not a lower-case UUID",
                                     key_id, name);
        if (!is_lower_hex(fingerprint, 64, 64))
                return store_corrupt(ctx, "the fingerprint of provider '%s' is not 64 hex digits", name);

        g_autoptr(NkpStoreEntry) e = g_new0(NkpStoreEntry, 1);
        g_strlcpy(e->name, name, sizeof e->name);
        g_strlcpy(e->key_id, key_id, sizeof e->key_id);
        g_strlcpy(e->fingerprint, fingerprint, sizeof e->fingerprint);

        if (!parse_time(created, &e->created))
                return store_corrupt(ctx,
                                     "the creation time '%s' of provider '%s' is not in UTC as "
                                     "YYYY-MM-DDThh:mm:ssZ",
                                     created, name);

        if (!g_key_file_has_key(kf, group, "flags", NULL))
                return store_corrupt(ctx, "'[%s]' has no flags", group);
        gsize nflags = 0;
        g_autoptr(GError) flags_error = NULL;
        g_auto(GStrv) flags = g_key_file_get_string_list(kf, group, "flags", &nflags, &flags_error);
        if (flags_error)
                return store_corrupt(ctx, "the flags of provider '%s' cannot be read (%s)", name,
                                     flags_error->message);
        for (gsize i = 0; flags && i < nflags; i++) {
                unsigned f = 0;
                for (size_t j = 0; j < G_N_ELEMENTS(flag_words); j++)
                        if (strcmp(flags[i], flag_words[j].word) == 0)
                                f = flag_words[j].flag;
                if (!f)
                        return store_corrupt(ctx, "provider '%s' has the unknown flag '%s'", name,
                                             flags[i]);
                e->flags |= f;
        }
        if ((e->flags & NKP_PROVIDER_DEFAULT) && !(e->flags & NKP_PROVIDER_BACKED_UP))
                return store_corrupt(ctx, "provider '%s' is the default but was never backed up", name);

        int r = parse_binding(ctx, kf, group, name, e);
        if (r < 0)
                return r;
        bool bound = e->bind != NULL;
        bool has_kdk = g_key_file_has_key(kf, group, "kdk", NULL);
        bool has_blob = g_key_file_has_key(kf, group, "tpm_blob", NULL);
        bool has_srk = g_key_file_has_key(kf, group, "tpm_srk_name", NULL);
        if (strcmp(sealed, "none") == 0) {
                nkp_secret *kdk = g_hash_table_lookup(kdks, group);
                if (bound && !has_kdk && !has_blob && !has_srk) {
                        e->seal = NKP_SEAL_NONE;
                        *ret = g_steal_pointer(&e);
                        return 0;
                }
                if (bound || !has_kdk || !kdk || has_blob || has_srk)
                        return store_corrupt(ctx,
                                             "provider '%s' is sealed=none but does not carry exactly a kdk%s",
                                             name, bound ? " (or, bound, only its bind_jwe)" : "");
                e->seal = NKP_SEAL_NONE;
                gpointer key = NULL;
                g_hash_table_steal_extended(kdks, group, &key, NULL);
                g_free(key);
                e->kdk = kdk;
        } else if (strcmp(sealed, "tpm") == 0) {
                if (has_kdk || has_blob == bound || !has_srk)
                        return store_corrupt(ctx,
                                             "provider '%s' is sealed=tpm but does not carry exactly "
                                             "a tpm_blob (or, bound, a bind_jwe) and a tpm_srk_name",
                                             name);
                g_autofree char *srk = g_key_file_get_string(kf, group, "tpm_srk_name", NULL);
                if (bound) {
                        if (!srk || !is_lower_hex(srk, 2, 256))
                                return store_corrupt(ctx, "the tpm_srk_name of provider '%s' is not hex", name);
                        e->seal = NKP_SEAL_TPM;
                        e->tpm_srk_name = g_steal_pointer(&srk);
                        *ret = g_steal_pointer(&e);
                        return 0;
                }
                g_autofree char *blob = g_key_file_get_string(kf, group, "tpm_blob", NULL);
                size_t blen = blob ? strlen(blob) : 0;
                if (!blob || !is_base64(blob, blen) || blen > TPM_BLOB_MAX * 4 / 3 + 4)
                        return store_corrupt(ctx, "the tpm_blob of provider '%s' is not valid base64",
                                             name);
                if (!srk || !is_lower_hex(srk, 2, 256))
                        return store_corrupt(ctx, "the tpm_srk_name of provider '%s' is not hex", name);
                gsize n = 0;
                guchar *raw = g_base64_decode(blob, &n);
                if (n == 0) {
                        g_free(raw);
                        return store_corrupt(ctx, "the tpm_blob of provider '%s' is empty", name);
                }
                e->seal = NKP_SEAL_TPM;
                e->tpm_blob = g_bytes_new_take(raw, n);
                e->tpm_srk_name = g_steal_pointer(&srk);
        } else {
                return store_corrupt(ctx, "provider '%s' has sealed='%s' (expected none or tpm)", name,
                                     sealed);
        }
        *ret = g_steal_pointer(&e);
        return 0;
}

static int check_dir(const nkp_context *ctx)
{
        struct stat st;
        if (stat(ctx->store_dir, &st) < 0) {
                if (errno == ENOENT)
                        return 0;
                return nkp_fail(-errno, "Cannot stat '%s': %s.", ctx->store_dir, strerror(errno));
        }
        if (!S_ISDIR(st.st_mode))
                return nkp_fail(-ENOTDIR, "'%s' is not a directory.", ctx->store_dir);
        if ((st.st_mode & 0077) != 0 || st.st_uid != geteuid())
                return nkp_fail(-EPERM,
                                "The store directory '%s' has mode %04o and owner %u; nkp requires "
                                "0700 owned by uid %u (check who changed it, then: chmod 700 '%s').",
                                ctx->store_dir, (unsigned) (st.st_mode & 07777), (unsigned) st.st_uid,
                                (unsigned) geteuid(), ctx->store_dir);
        return 0;
}

int nkp_store_parse(const nkp_context *ctx, char *buf, size_t len, NkpStore **ret)
{
        g_autoptr(GHashTable) kdks = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                                           secret_free_void);
        int r = prescan(ctx, buf, len, kdks);
        if (r < 0)
                return r;

        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) error = NULL;
        if (!g_key_file_load_from_data(kf, buf, len, G_KEY_FILE_NONE, &error))
                return store_corrupt(ctx, "%s", error->message);

        if (!g_key_file_has_group(kf, "nkp"))
                return store_corrupt(ctx, "it has no [nkp] group with its format version");
        g_auto(GStrv) nkp_keys = g_key_file_get_keys(kf, "nkp", NULL, NULL);
        for (size_t i = 0; nkp_keys && nkp_keys[i]; i++)
                if (strcmp(nkp_keys[i], "version") != 0)
                        return store_corrupt(ctx, "'[nkp]' has the unknown key '%s'", nkp_keys[i]);
        g_autofree char *version = g_key_file_get_string(kf, "nkp", "version", NULL);
        if (!version)
                return store_corrupt(ctx, "'[nkp]' has no version");
        if (strcmp(version, G_STRINGIFY(STORE_VERSION)) != 0)
                return nkp_fail(-EPROTONOSUPPORT,
                                "The provider store '%s' has format version '%s' and this nkp reads "
                                "version %d only; use the nkp release that wrote it.",
                                ctx->store_path, version, STORE_VERSION);

        g_autoptr(NkpStore) store = store_new();
        g_auto(GStrv) groups = g_key_file_get_groups(kf, NULL);
        unsigned n_default = 0;
        for (size_t i = 0; groups[i]; i++) {
                if (strcmp(groups[i], "nkp") == 0)
                        continue;
                if (!g_str_has_prefix(groups[i], GROUP_PREFIX))
                        return store_corrupt(ctx, "it has the unknown group '[%s]'", groups[i]);
                if (store->entries->len >= NKP_MAX_PROVIDERS)
                        return store_corrupt(ctx, "it holds more than %d providers", NKP_MAX_PROVIDERS);
                NkpStoreEntry *e = NULL;
                r = parse_entry(ctx, kf, groups[i], kdks, &e);
                if (r < 0)
                        return r;
                g_ptr_array_add(store->entries, e);
                if (nkp_store_find_key_id(store, e->key_id) != e)
                        return store_corrupt(ctx, "the key id '%s' appears twice", e->key_id);
                /* Names are unique per group; prescan refused duplicated groups. */
                if (e->flags & NKP_PROVIDER_DEFAULT)
                        n_default++;
        }
        if (n_default > 1)
                return store_corrupt(ctx, "%u providers are marked default (at most one may be)",
                                     n_default);
        *ret = g_steal_pointer(&store);
        return 0;
}

int nkp_store_load(nkp_context *ctx, NkpStore **ret)
{
        int r = check_dir(ctx);
        if (r < 0)
                return r;

        char *buf = NULL;
        size_t len = 0;
        r = nkp_read_file(ctx->store_path, STORE_MAX_SIZE, true, &buf, &len);
        if (r == -ENOENT) {
                nkp_error_clear();
                *ret = store_new();
                return 0;
        }
        if (r == -EPERM)
                return nkp_fail_prefix(r, "The provider store is not private");
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot read the provider store");

        r = nkp_store_parse(ctx, buf, len, ret);
        nkp_wipe(buf, len);
        g_free(buf);
        return r;
}

/* ---- save ---------------------------------------------------------------- */

/* Temp files a crashed writer left behind (they may hold a KDK).  Only lock
 * holders write the store, so under the lock any such file is stale. */
static void remove_stale_temps(const nkp_context *ctx)
{
        g_autofree char *base = g_path_get_basename(ctx->store_path);
        g_autofree char *prefix = g_strconcat(base, ".tmp-", NULL);
        GDir *d = g_dir_open(ctx->store_dir, 0, NULL);
        if (!d)
                return;
        const char *name;
        while ((name = g_dir_read_name(d))) {
                if (!g_str_has_prefix(name, prefix))
                        continue;
                g_autofree char *path = g_build_filename(ctx->store_dir, name, NULL);
                if (unlink(path) == 0)
                        nkp_log(NKP_LOG_INFO, "Removed '%s', left over by an interrupted write.", path);
        }
        g_dir_close(d);
}

int nkp_store_format(const NkpStore *store, char **ret, size_t *ret_len, size_t *ret_cap)
{
        g_autoptr(GKeyFile) kf = g_key_file_new();
        unsigned n_kdk = 0;

        g_key_file_set_integer(kf, "nkp", "version", STORE_VERSION);
        g_key_file_set_comment(kf, NULL, NULL,
                               " nkp provider store: written by nkp, read strictly.  Do not edit;\n"
                               " use nkpctl provider ….  Mode 0600, directory 0700.",
                               NULL);
        for (guint i = 0; i < store->entries->len; i++) {
                const NkpStoreEntry *e = store->entries->pdata[i];
                g_autofree char *group = g_strconcat(GROUP_PREFIX, e->name, NULL);
                g_autofree char *created = format_time(e->created);
                const char *words[G_N_ELEMENTS(flag_words) + 1];
                size_t nw = 0;

                for (size_t j = 0; j < G_N_ELEMENTS(flag_words); j++)
                        if (e->flags & flag_words[j].flag)
                                words[nw++] = flag_words[j].word;
                words[nw] = NULL;

                g_key_file_set_string(kf, group, "name", e->name);
                g_key_file_set_string(kf, group, "key_id", e->key_id);
                g_key_file_set_string(kf, group, "fingerprint", e->fingerprint);
                g_key_file_set_string_list(kf, group, "flags", words, nw);
                g_key_file_set_string(kf, group, "created", created);
                if (e->bind) {
                        if (!e->bind_jwe)
                                return nkp_fail(-EINVAL, "Provider '%s' is bound but has no JWE.", e->name);
                        g_key_file_set_string(kf, group, "sealed", e->seal == NKP_SEAL_TPM ? "tpm" : "none");
                        if (e->seal == NKP_SEAL_TPM)
                                g_key_file_set_string(kf, group, "tpm_srk_name", e->tpm_srk_name);
                        g_key_file_set_string(kf, group, "bind", "tang");
                        g_key_file_set_string_list(kf, group, "bind_servers",
                                                   (const char *const *) e->bind->servers,
                                                   g_strv_length(e->bind->servers));
                        g_key_file_set_integer(kf, group, "bind_threshold", (gint) e->bind->threshold);
                        g_key_file_set_string(kf, group, "bind_jwe", e->bind_jwe);
                } else if (e->seal == NKP_SEAL_TPM) {
                        if (!e->tpm_blob || !e->tpm_srk_name)
                                return nkp_fail(-EINVAL, "Provider '%s' is sealed to a TPM but has no blob.",
                                                e->name);
                        gsize n = 0;
                        const void *raw = g_bytes_get_data(e->tpm_blob, &n);
                        g_autofree char *b64 = g_base64_encode(raw, n);
                        g_key_file_set_string(kf, group, "sealed", "tpm");
                        g_key_file_set_string(kf, group, "tpm_blob", b64);
                        g_key_file_set_string(kf, group, "tpm_srk_name", e->tpm_srk_name);
                } else {
                        if (!e->kdk || nkp_secret_len(e->kdk) != NKP_KDK_SIZE)
                                return nkp_fail(-EINVAL, "Provider '%s' has no %d-byte KDK to store.",
                                                e->name, NKP_KDK_SIZE);
                        g_key_file_set_string(kf, group, "sealed", "none");
                        g_key_file_set_string(kf, group, "kdk", KDK_PLACEHOLDER);
                        n_kdk++;
                }
        }

        gsize tlen = 0;
        g_autofree char *text = g_key_file_to_data(kf, &tlen, NULL);

        /* Replace each "kdk=@" line, in order, with the real value. */
        static const char marker[] = "\nkdk=" KDK_PLACEHOLDER "\n";
        const size_t mlen = sizeof marker - 1;
        size_t cap = tlen + n_kdk * KDK_B64_LEN + 1;
        char *out = g_malloc(cap);
        size_t o = 0, found = 0;
        const char *p = text;
        const char *end = text + tlen;
        for (guint i = 0; i < store->entries->len; i++) {
                const NkpStoreEntry *e = store->entries->pdata[i];
                if (e->seal == NKP_SEAL_TPM || e->bind)
                        continue;
                const char *m = g_strstr_len(p, end - p, marker);
                if (!m)
                        break;
                size_t chunk = (size_t) (m - p) + strlen("\nkdk=");
                memcpy(out + o, p, chunk);
                o += chunk;
                gint state = 0, save = 0;
                gsize w = g_base64_encode_step(nkp_secret_data(e->kdk), NKP_KDK_SIZE, FALSE, out + o,
                                               &state, &save);
                w += g_base64_encode_close(FALSE, out + o + w, &state, &save);
                nkp_wipe(&save, sizeof save);
                g_assert(w == KDK_B64_LEN);
                o += w;
                p = m + mlen - 1; /* keep the newline */
                found++;
        }
        if (found != n_kdk) {
                nkp_wipe(out, cap);
                g_free(out);
                return nkp_fail(-EIO, "Cannot lay out the provider store (internal error).");
        }
        memcpy(out + o, p, (size_t) (end - p));
        o += (size_t) (end - p);
        out[o] = '\0';
        *ret = out;
        *ret_len = o;
        *ret_cap = cap;
        return 0;
}

int nkp_store_save(nkp_context *ctx, const NkpStore *store)
{
        char *out = NULL;
        size_t len = 0, cap = 0;
        int r = nkp_store_format(store, &out, &len, &cap);
        if (r < 0)
                return r;
        r = nkp_mkdir_private(ctx->store_dir);
        if (r >= 0) {
                remove_stale_temps(ctx);
                r = nkp_write_file_atomic(ctx->store_path, out, len, 0600, false);
        }
        nkp_wipe(out, cap);
        g_free(out);
        if (r < 0)
                return nkp_fail_prefix(r, "Cannot save the provider store");
        return 0;
}

NkpStoreEntry *nkp_store_find(const NkpStore *store, const char *name)
{
        if (!store || !name)
                return NULL;
        for (guint i = 0; i < store->entries->len; i++) {
                NkpStoreEntry *e = store->entries->pdata[i];
                if (strcmp(e->name, name) == 0)
                        return e;
        }
        return NULL;
}

NkpStoreEntry *nkp_store_find_key_id(const NkpStore *store, const char *key_id)
{
        if (!store || !key_id)
                return NULL;
        for (guint i = 0; i < store->entries->len; i++) {
                NkpStoreEntry *e = store->entries->pdata[i];
                if (g_ascii_strcasecmp(e->key_id, key_id) == 0)
                        return e;
        }
        return NULL;
}
