/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The keysafe: a VM's wrapped DEKs, kept in the domain XML <metadata>.
 *
 * XML (version 1), as nkp_keysafe_format() writes it:
 *
 *   <keysafe xmlns="https://nkp.invalid/xmlns/keysafe/1" version="1">
 *     <vm uuid="VM-UUID"/>
 *     <provider name="NAME" key-id="KEY-ID-UUID" fingerprint="64 HEX"/>
 *     <kek salt="BASE64(32 bytes)"/>
 *     <dek kind="vtpm|disk" id="OBJECT-ID" secret="SECRET-UUID"
 *          wrapped="BASE64(iv[12] || ct[32] || tag[16])"/>      (0..64 of these)
 *   </keysafe>
 *
 *  - Elements are in the namespace NKP_KEYSAFE_NS under any prefix (libvirt
 *    re-serialises the metadata as <nkp:keysafe xmlns:nkp="…">), or in no
 *    namespace at all: virDomainGetMetadata() strips its namespace from
 *    every element it returns.  Any other namespace is refused.
 *  - The children come in exactly this order and are empty; no other
 *    element, attribute or non-blank text is accepted.  Comments are
 *    ignored.
 *  - version: decimal without leading zeros.  Anything but 1 is
 *    -EPROTONOSUPPORT; everything else that is wrong is -EBADMSG.
 *  - UUIDs are parsed case-insensitively and kept in lower case; the
 *    fingerprint is 64 hex digits, kept in lower case.  NAME is
 *    [A-Za-z0-9._-]{1,64}; OBJECT-ID is [A-Za-z0-9][A-Za-z0-9._-]{0,63};
 *    base64 is the canonical standard alphabet with padding.
 *  - (kind, id) pairs and secret UUIDs are unique within a keysafe.
 *  - Input: at most 64 KiB, no NUL byte, no DTD or entity declaration (so
 *    no entity expansion), parsed as UTF-8 whatever it declares, never
 *    touching the network.
 *
 * Wrapping: wrapped = iv || AES-256-GCM(KEK, iv, AAD, DEK) || tag, with a
 * fresh random 96-bit iv per wrap.  The KEK (crypto.c) is derived from the
 * provider's KDK, the KEK salt, the provider key id and the VM UUID.  The
 * AAD binds each wrapped DEK to everything that says what it is for, in an
 * unambiguous length-prefixed encoding (u32be = 4-byte big-endian length):
 *
 *   u32be(15) "nkp keysafe dek"
 *   u32be(4)  u32be(keysafe version = 1)
 *   u32be(16) vm_uuid[16 raw bytes]
 *   u32be(n)  kind ("vtpm" | "disk")
 *   u32be(n)  object id
 *   u32be(16) secret_uuid[16 raw bytes]
 *   u32be(16) provider key_id[16 raw bytes]
 *
 * So a wrapped DEK moved to another VM, object, secret, provider or version
 * fails to open (-EBADMSG), as does any flipped bit.  The provider name and
 * fingerprint are not bound: they are labels for humans and for drift
 * checks, and the KEK itself already depends on the KDK.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <libxml/parser.h>
#include <libxml/tree.h>

#include "nkp-private.h"

#define KEYSAFE_MAX_SIZE (64 * 1024)
#define KEYSAFE_MAX_ENTRIES 64
#define OBJECT_ID_MAX 64
#define FINGERPRINT_LEN 64
#define WRAPPED_SIZE (NKP_GCM_IV_SIZE + NKP_DEK_SIZE + NKP_GCM_TAG_SIZE)
#define AAD_LABEL "nkp keysafe dek"
#define AAD_MAX 256

typedef struct {
        char kind[8];
        char id[OBJECT_ID_MAX + 1];
        char secret_uuid[NKP_UUID_STRING_LEN + 1];
        uint8_t wrapped[WRAPPED_SIZE];
} KeysafeEntry;

struct nkp_keysafe {
        char vm_uuid[NKP_UUID_STRING_LEN + 1];
        char provider_name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        char fingerprint[FINGERPRINT_LEN + 1];
        uint8_t kek_salt[NKP_KEK_SALT_SIZE];
        GArray *entries; /* KeysafeEntry, in document order */
};

/* ---- Field validation (shared by the API and the parser) ------------------- */

/* A value from outside (API argument or XML), fit for an error message:
 * printable ASCII only, at most 32 characters (the hook reports errors on
 * one line).  Accepts NULL. */
static char *excerpt(const char *s)
{
        if (!s)
                return g_strdup("");
        GString *out = g_string_new(NULL);
        for (size_t i = 0; s[i] && out->len < 32; i++)
                g_string_append_c(out, g_ascii_isprint(s[i]) ? s[i] : '?');
        if (strlen(s) > out->len)
                g_string_append(out, "...");
        return g_string_free(out, FALSE);
}

static int canonical_uuid(const char *in, char out[NKP_UUID_STRING_LEN + 1])
{
        uint8_t raw[16];
        if (nkp_uuid_parse(in, raw) < 0)
                return -EINVAL;
        nkp_uuid_format(raw, out);
        return 0;
}

static bool charset_ok(const char *s, size_t max, bool first_alnum)
{
        size_t n = s ? strlen(s) : 0;
        if (n == 0 || n > max)
                return false;
        if (first_alnum && !g_ascii_isalnum(s[0]))
                return false;
        for (size_t i = 0; i < n; i++)
                if (!g_ascii_isalnum(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
                        return false;
        return true;
}

static bool provider_name_ok(const char *s)
{
        return charset_ok(s, NKP_NAME_MAX, false);
}

static bool object_id_ok(const char *s)
{
        return charset_ok(s, OBJECT_ID_MAX, true);
}

static bool kind_ok(const char *s)
{
        return s && (strcmp(s, NKP_OBJECT_VTPM) == 0 || strcmp(s, NKP_OBJECT_DISK) == 0);
}

static int canonical_fingerprint(const char *in, char out[FINGERPRINT_LEN + 1])
{
        if (!in || strlen(in) != FINGERPRINT_LEN)
                return -EINVAL;
        for (size_t i = 0; i < FINGERPRINT_LEN; i++) {
                if (!g_ascii_isxdigit(in[i]))
                        return -EINVAL;
                out[i] = g_ascii_tolower(in[i]);
        }
        out[FINGERPRINT_LEN] = '\0';
        return 0;
}

/* Decodes canonical padded base64 of exactly `out_len` bytes: anything
 * g_base64_decode() would silently skip or round off is refused. */
static int base64_decode_exact(const char *s, uint8_t *out, size_t out_len)
{
        size_t want = 4 * ((out_len + 2) / 3);
        if (!s || strlen(s) != want)
                return -EINVAL;
        for (size_t i = 0; i < want; i++)
                if (!g_ascii_isalnum(s[i]) && s[i] != '+' && s[i] != '/' && s[i] != '=')
                        return -EINVAL;
        gsize n = 0;
        g_autofree guchar *raw = g_base64_decode(s, &n);
        if (n != out_len)
                return -EINVAL;
        g_autofree char *again = g_base64_encode(raw, n);
        if (strcmp(again, s) != 0)
                return -EINVAL;
        memcpy(out, raw, out_len);
        return 0;
}

/* ---- AAD and wrapping ------------------------------------------------------- */

typedef struct {
        uint8_t buf[AAD_MAX];
        size_t len;
} Aad;

static void aad_put(Aad *aad, const void *data, size_t len)
{
        /* Every field is validated and bounded: AAD_MAX cannot overflow. */
        g_assert(aad->len + 4 + len <= sizeof aad->buf);
        uint8_t *p = aad->buf + aad->len;
        p[0] = (uint8_t) (len >> 24);
        p[1] = (uint8_t) (len >> 16);
        p[2] = (uint8_t) (len >> 8);
        p[3] = (uint8_t) len;
        memcpy(p + 4, data, len);
        aad->len += 4 + len;
}

static void aad_put_uuid(Aad *aad, const char *uuid)
{
        uint8_t raw[16];
        if (nkp_uuid_parse(uuid, raw) < 0)
                g_error("keysafe holds an unvalidated UUID"); /* canonical by construction */
        aad_put(aad, raw, sizeof raw);
}

static void build_aad(const nkp_keysafe *ks, const KeysafeEntry *e, Aad *aad)
{
        const uint8_t version[4] = { 0, 0, 0, NKP_KEYSAFE_VERSION };
        aad->len = 0;
        aad_put(aad, AAD_LABEL, strlen(AAD_LABEL));
        aad_put(aad, version, sizeof version);
        aad_put_uuid(aad, ks->vm_uuid);
        aad_put(aad, e->kind, strlen(e->kind));
        aad_put(aad, e->id, strlen(e->id));
        aad_put_uuid(aad, e->secret_uuid);
        aad_put_uuid(aad, ks->key_id);
}

static int check_key(const nkp_secret *key, const char *what)
{
        if (!key || nkp_secret_len(key) != 32)
                return nkp_fail(-EINVAL, "The %s must be 32 bytes.", what);
        return 0;
}

/* Wraps `dek` into e->wrapped, bound to `ks` (VM, provider) and to `e`. */
static int entry_wrap(const nkp_keysafe *ks, const nkp_secret *kek, const nkp_secret *dek,
                      KeysafeEntry *e)
{
        Aad aad;
        build_aad(ks, e, &aad);
        uint8_t *iv = e->wrapped;
        uint8_t *ct = e->wrapped + NKP_GCM_IV_SIZE;
        uint8_t *tag = ct + NKP_DEK_SIZE;
        int r = nkp_random_bytes(iv, NKP_GCM_IV_SIZE);
        if (r < 0)
                return r;
        return nkp_aes256gcm_seal(nkp_secret_data(kek), iv, NKP_GCM_IV_SIZE, aad.buf, aad.len,
                                  nkp_secret_data(dek), NKP_DEK_SIZE, ct, tag);
}

static int entry_unwrap(const nkp_keysafe *ks, const nkp_secret *kek, const KeysafeEntry *e,
                        nkp_secret **ret)
{
        Aad aad;
        build_aad(ks, e, &aad);
        const uint8_t *iv = e->wrapped;
        const uint8_t *ct = e->wrapped + NKP_GCM_IV_SIZE;
        const uint8_t *tag = ct + NKP_DEK_SIZE;

        g_autoptr(nkp_secret) dek = NULL;
        int r = nkp_secret_new(NKP_DEK_SIZE, &dek);
        if (r < 0)
                return r;
        r = nkp_aes256gcm_open(nkp_secret_data(kek), nkp_secret_len(kek), iv, NKP_GCM_IV_SIZE,
                               aad.buf, aad.len, ct, NKP_DEK_SIZE, tag, NKP_GCM_TAG_SIZE,
                               nkp_secret_data_mut(dek));
        if (r == -EBADMSG)
                return nkp_fail(-EBADMSG,
                                "The wrapped key of %s '%s' does not open: the keysafe was altered, "
                                "or the provider key is not the one that wrapped it.",
                                e->kind, e->id);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&dek);
        return 0;
}

/* ---- Objects and accessors -------------------------------------------------- */

static nkp_keysafe *keysafe_alloc(void)
{
        nkp_keysafe *ks = g_new0(nkp_keysafe, 1);
        ks->entries = g_array_new(FALSE, TRUE, sizeof(KeysafeEntry));
        return ks;
}

void nkp_keysafe_free(nkp_keysafe *ks)
{
        if (!ks)
                return;
        g_array_unref(ks->entries);
        g_free(ks);
}

/* Validates and stores the provider fields into `ks`. */
static int set_provider(nkp_keysafe *ks, const char *name, const char *key_id,
                        const char *fingerprint)
{
        if (!provider_name_ok(name)) {
                g_autofree char *shown = excerpt(name);
                return nkp_fail(-EINVAL, "The provider name '%s' is not valid "
                                         "(1 to 64 of A-Z a-z 0-9 . _ -).", shown);
        }
        if (canonical_uuid(key_id, ks->key_id) < 0) {
                g_autofree char *shown = excerpt(key_id);
                return nkp_fail(-EINVAL, "The provider key id '%s' is not a UUID.", shown);
        }
        if (canonical_fingerprint(fingerprint, ks->fingerprint) < 0)
                return nkp_fail(-EINVAL, "The provider fingerprint is not 64 hex digits.");
        g_strlcpy(ks->provider_name, name, sizeof ks->provider_name);
        return 0;
}

int nkp_keysafe_new_for(const char *vm_uuid, const char *provider_name, const char *key_id,
                        const char *fingerprint, nkp_keysafe **ret)
{
        g_autoptr(nkp_keysafe) ks = keysafe_alloc();
        if (canonical_uuid(vm_uuid, ks->vm_uuid) < 0) {
                g_autofree char *shown = excerpt(vm_uuid);
                return nkp_fail(-EINVAL, "The VM UUID '%s' is not a UUID.", shown);
        }
        int r = set_provider(ks, provider_name, key_id, fingerprint);
        if (r < 0)
                return r;
        r = nkp_random_bytes(ks->kek_salt, sizeof ks->kek_salt);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&ks);
        return 0;
}

int nkp_keysafe_new(const char *vm_uuid, const nkp_provider *provider, nkp_keysafe **ret)
{
        if (!provider)
                return nkp_fail(-EINVAL, "A keysafe needs a provider.");
        return nkp_keysafe_new_for(vm_uuid, nkp_provider_name(provider), nkp_provider_key_id(provider),
                                   nkp_provider_fingerprint(provider), ret);
}

const char *nkp_keysafe_vm_uuid(const nkp_keysafe *ks)
{
        return ks ? ks->vm_uuid : NULL;
}

const char *nkp_keysafe_provider_name(const nkp_keysafe *ks)
{
        return ks ? ks->provider_name : NULL;
}

const char *nkp_keysafe_provider_key_id(const nkp_keysafe *ks)
{
        return ks ? ks->key_id : NULL;
}

const char *nkp_keysafe_provider_fingerprint(const nkp_keysafe *ks)
{
        return ks ? ks->fingerprint : NULL;
}

const uint8_t *nkp_keysafe_kek_salt(const nkp_keysafe *ks)
{
        return ks ? ks->kek_salt : NULL;
}

size_t nkp_keysafe_n_entries(const nkp_keysafe *ks)
{
        return ks ? ks->entries->len : 0;
}

static const KeysafeEntry *entry_at(const nkp_keysafe *ks, size_t i)
{
        if (!ks || i >= ks->entries->len)
                return NULL;
        return &g_array_index(ks->entries, KeysafeEntry, i);
}

const char *nkp_keysafe_entry_kind(const nkp_keysafe *ks, size_t i)
{
        const KeysafeEntry *e = entry_at(ks, i);
        return e ? e->kind : NULL;
}

const char *nkp_keysafe_entry_id(const nkp_keysafe *ks, size_t i)
{
        const KeysafeEntry *e = entry_at(ks, i);
        return e ? e->id : NULL;
}

const char *nkp_keysafe_entry_secret_uuid(const nkp_keysafe *ks, size_t i)
{
        const KeysafeEntry *e = entry_at(ks, i);
        return e ? e->secret_uuid : NULL;
}

/* Index of the entry (kind, id), or -1. */
static gssize find_entry(const GArray *entries, const char *kind, const char *id)
{
        for (guint i = 0; i < entries->len; i++) {
                const KeysafeEntry *e = &g_array_index(entries, KeysafeEntry, i);
                if (strcmp(e->kind, kind) == 0 && strcmp(e->id, id) == 0)
                        return (gssize) i;
        }
        return -1;
}

static gssize find_secret(const GArray *entries, const char *secret_uuid)
{
        for (guint i = 0; i < entries->len; i++)
                if (strcmp(g_array_index(entries, KeysafeEntry, i).secret_uuid, secret_uuid) == 0)
                        return (gssize) i;
        return -1;
}

static int check_object(const char *kind, const char *object_id)
{
        if (!kind_ok(kind)) {
                g_autofree char *shown = excerpt(kind);
                return nkp_fail(-EINVAL, "The object kind '%s' is not '" NKP_OBJECT_VTPM "' or '"
                                         NKP_OBJECT_DISK "'.", shown);
        }
        if (!object_id_ok(object_id)) {
                g_autofree char *shown = excerpt(object_id);
                return nkp_fail(-EINVAL, "The object id '%s' is not valid (a letter or digit, then up "
                                         "to 63 of A-Z a-z 0-9 . _ -).", shown);
        }
        return 0;
}

/* ---- Put, get, remove, rewrap ---------------------------------------------- */

int nkp_keysafe_put_dek(nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, const char *secret_uuid, const nkp_secret *dek)
{
        if (!ks)
                return nkp_fail(-EINVAL, "No keysafe to put a key into.");
        int r = check_object(kind, object_id);
        if (r < 0)
                return r;
        KeysafeEntry e = { 0 };
        if (canonical_uuid(secret_uuid, e.secret_uuid) < 0) {
                g_autofree char *shown = excerpt(secret_uuid);
                return nkp_fail(-EINVAL, "The secret UUID '%s' is not a UUID.", shown);
        }
        if ((r = check_key(kek, "key encryption key")) < 0 || (r = check_key(dek, "data encryption key")) < 0)
                return r;

        gssize existing = find_entry(ks->entries, kind, object_id);
        gssize same_secret = find_secret(ks->entries, e.secret_uuid);
        if (same_secret >= 0 && same_secret != existing)
                return nkp_fail(-EEXIST, "The secret UUID '%s' already carries another key of this VM.",
                                e.secret_uuid);
        if (existing < 0 && ks->entries->len >= KEYSAFE_MAX_ENTRIES)
                return nkp_fail(-ENOSPC, "A keysafe holds at most %d keys.", KEYSAFE_MAX_ENTRIES);

        g_strlcpy(e.kind, kind, sizeof e.kind);
        g_strlcpy(e.id, object_id, sizeof e.id);
        r = entry_wrap(ks, kek, dek, &e);
        if (r < 0)
                return r;
        if (existing >= 0)
                g_array_index(ks->entries, KeysafeEntry, existing) = e;
        else
                g_array_append_val(ks->entries, e);
        return 0;
}

int nkp_keysafe_get_dek(const nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, nkp_secret **ret)
{
        if (!ks)
                return nkp_fail(-EINVAL, "No keysafe to get a key from.");
        int r = check_object(kind, object_id);
        if (r < 0)
                return r;
        if ((r = check_key(kek, "key encryption key")) < 0)
                return r;
        gssize i = find_entry(ks->entries, kind, object_id);
        if (i < 0)
                return nkp_fail(-ENOENT, "The keysafe holds no key for %s '%s'.", kind, object_id);
        return entry_unwrap(ks, kek, &g_array_index(ks->entries, KeysafeEntry, i), ret);
}

int nkp_keysafe_remove_dek(nkp_keysafe *ks, const char *kind, const char *object_id)
{
        if (!ks)
                return nkp_fail(-EINVAL, "No keysafe to remove a key from.");
        int r = check_object(kind, object_id);
        if (r < 0)
                return r;
        gssize i = find_entry(ks->entries, kind, object_id);
        if (i < 0)
                return nkp_fail(-ENOENT, "The keysafe holds no key for %s '%s'.", kind, object_id);
        g_array_remove_index(ks->entries, (guint) i);
        return 0;
}

int nkp_keysafe_rewrap_for(nkp_keysafe *ks, const nkp_secret *old_kek, const char *provider_name,
                           const char *key_id, const char *fingerprint, const nkp_secret *new_kdk)
{
        if (!ks)
                return nkp_fail(-EINVAL, "No keysafe to rewrap.");
        int r = check_key(old_kek, "old key encryption key");
        if (r < 0)
                return r;

        /* Everything new is built on the side and swapped in at the end, so
         * a failure anywhere leaves `ks` as it was. */
        g_autoptr(nkp_keysafe) next = keysafe_alloc();
        memcpy(next->vm_uuid, ks->vm_uuid, sizeof next->vm_uuid);
        if ((r = set_provider(next, provider_name, key_id, fingerprint)) < 0)
                return r;
        if ((r = nkp_random_bytes(next->kek_salt, sizeof next->kek_salt)) < 0)
                return r;
        g_autoptr(nkp_secret) new_kek = NULL;
        if ((r = nkp_kek_derive(new_kdk, next->kek_salt, next->key_id, next->vm_uuid, &new_kek)) < 0)
                return r;

        for (guint i = 0; i < ks->entries->len; i++) {
                const KeysafeEntry *old = &g_array_index(ks->entries, KeysafeEntry, i);
                g_autoptr(nkp_secret) dek = NULL;
                if ((r = entry_unwrap(ks, old_kek, old, &dek)) < 0)
                        return nkp_fail_prefix(r, "Nothing was rewrapped");
                KeysafeEntry e = *old;
                if ((r = entry_wrap(next, new_kek, dek, &e)) < 0)
                        return nkp_fail_prefix(r, "Nothing was rewrapped");
                g_array_append_val(next->entries, e);
        }

        /* Commit. */
        GArray *old_entries = ks->entries;
        *ks = *next;
        next->entries = old_entries;
        return 0;
}

int nkp_keysafe_rewrap(nkp_keysafe *ks, const nkp_secret *old_kek, const nkp_provider *new_provider,
                       const nkp_secret *new_kdk)
{
        if (!new_provider)
                return nkp_fail(-EINVAL, "Rewrapping a keysafe needs a provider.");
        return nkp_keysafe_rewrap_for(ks, old_kek, nkp_provider_name(new_provider),
                                      nkp_provider_key_id(new_provider),
                                      nkp_provider_fingerprint(new_provider), new_kdk);
}

/* ---- Format ------------------------------------------------------------------ */

int nkp_keysafe_format(const nkp_keysafe *ks, char **ret)
{
        if (!ks)
                return nkp_fail(-EINVAL, "No keysafe to format.");
        /* Every value was validated to a charset that needs no escaping. */
        g_autoptr(GString) s = g_string_new(NULL);
        g_autofree char *salt = g_base64_encode(ks->kek_salt, sizeof ks->kek_salt);
        g_string_append_printf(s, "<keysafe xmlns=\"%s\" version=\"%d\">\n", NKP_KEYSAFE_NS,
                               NKP_KEYSAFE_VERSION);
        g_string_append_printf(s, "  <vm uuid=\"%s\"/>\n", ks->vm_uuid);
        g_string_append_printf(s, "  <provider name=\"%s\" key-id=\"%s\" fingerprint=\"%s\"/>\n",
                               ks->provider_name, ks->key_id, ks->fingerprint);
        g_string_append_printf(s, "  <kek salt=\"%s\"/>\n", salt);
        for (guint i = 0; i < ks->entries->len; i++) {
                const KeysafeEntry *e = &g_array_index(ks->entries, KeysafeEntry, i);
                g_autofree char *wrapped = g_base64_encode(e->wrapped, sizeof e->wrapped);
                g_string_append_printf(s, "  <dek kind=\"%s\" id=\"%s\" secret=\"%s\" wrapped=\"%s\"/>\n",
                                       e->kind, e->id, e->secret_uuid, wrapped);
        }
        g_string_append(s, "</keysafe>\n");

        char *out = strdup(s->str);
        if (!out)
                return nkp_fail(-ENOMEM, "Out of memory for the keysafe XML.");
        *ret = out;
        return 0;
}

/* ---- Parse ------------------------------------------------------------------- */

G_DEFINE_AUTOPTR_CLEANUP_FUNC(xmlDoc, xmlFreeDoc)

static int bad(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static int bad(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        g_autofree char *msg = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        return nkp_fail(-EBADMSG, "The keysafe is malformed: %s.", msg);
}

static bool in_our_namespace(const xmlNode *node)
{
        return !node->ns || (node->ns->href && strcmp((const char *) node->ns->href, NKP_KEYSAFE_NS) == 0);
}

static bool is_blank(const xmlChar *text)
{
        for (const xmlChar *p = text; p && *p; p++)
                if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
                        return false;
        return true;
}

/* Next element child from *cursor on, skipping comments and blank text;
 * NULL at the end.  -EBADMSG for anything else (text, CDATA, PIs, entity
 * references). */
static int next_element(xmlNode **cursor, xmlNode **ret)
{
        for (xmlNode *n = *cursor; n; n = n->next) {
                switch (n->type) {
                case XML_COMMENT_NODE:
                        continue;
                case XML_TEXT_NODE:
                        if (is_blank(n->content))
                                continue;
                        return bad("it holds text outside its attributes");
                case XML_ELEMENT_NODE:
                        if (!in_our_namespace(n))
                                return bad("element '%.64s' is in a foreign namespace",
                                           (const char *) n->name);
                        *cursor = n->next;
                        *ret = n;
                        return 0;
                default:
                        return bad("it holds an XML node of type %d where elements belong", (int) n->type);
                }
        }
        *cursor = NULL;
        *ret = NULL;
        return 0;
}

/* Reads exactly the attributes `names` (all required, no others) of
 * element `node` into `values` (g_free each). */
static int read_attrs(const xmlNode *node, const char *const *names, char **values, size_t n)
{
        for (const xmlAttr *a = node->properties; a; a = a->next) {
                size_t k = 0;
                while (k < n && strcmp((const char *) a->name, names[k]) != 0)
                        k++;
                if (k == n || a->ns)
                        return bad("element '%.64s' has an unexpected attribute '%.64s'",
                                   (const char *) node->name,
                                   (const char *) a->name);
                if (values[k])
                        return bad("element '%s' repeats attribute '%s'", (const char *) node->name,
                                   names[k]);
                xmlChar *v = xmlNodeListGetString(node->doc, a->children, 1);
                values[k] = g_strdup(v ? (const char *) v : "");
                xmlFree(v);
        }
        for (size_t k = 0; k < n; k++)
                if (!values[k])
                        return bad("element '%s' has no '%s' attribute", (const char *) node->name, names[k]);
        xmlNode *child = node->children;
        xmlNode *extra = NULL;
        int r = next_element(&child, &extra);
        if (r < 0)
                return r;
        if (extra)
                return bad("element '%.64s' has a child element '%.64s'", (const char *) node->name,
                           (const char *) extra->name);
        return 0;
}

static void free_values(char **values, size_t n)
{
        for (size_t k = 0; k < n; k++)
                g_free(values[k]);
}

/* The next element, which must be called `name`. */
static int expect_element(xmlNode **cursor, const char *name, xmlNode **ret)
{
        xmlNode *node;
        int r = next_element(cursor, &node);
        if (r < 0)
                return r;
        if (!node || strcmp((const char *) node->name, name) != 0)
                return bad("expected element '%s', found %s%.64s%s", name, node ? "'" : "",
                           node ? (const char *) node->name : "the end", node ? "'" : "");
        *ret = node;
        return 0;
}

static int parse_version(const xmlNode *root)
{
        for (const xmlAttr *a = root->properties; a; a = a->next)
                if (a->ns || strcmp((const char *) a->name, "version") != 0)
                        return bad("element 'keysafe' has an unexpected attribute '%.64s'",
                                   (const char *) a->name);
        xmlChar *v = xmlGetNoNsProp(root, (const xmlChar *) "version");
        if (!v)
                return bad("element 'keysafe' has no 'version' attribute");
        g_autofree char *s = g_strdup((const char *) v);
        xmlFree(v);

        size_t len = strlen(s);
        bool digits = len > 0 && len <= 9 && s[0] != '0';
        for (size_t i = 0; digits && i < len; i++)
                digits = g_ascii_isdigit(s[i]);
        if (!digits) {
                g_autofree char *shown = excerpt(s);
                return bad("the version '%s' is not a number", shown);
        }
        unsigned long version = strtoul(s, NULL, 10);
        if (version != NKP_KEYSAFE_VERSION)
                return nkp_fail(-EPROTONOSUPPORT,
                                "The keysafe has version %lu; this nkp reads version %d only "
                                "(update nkp on this host).", version, NKP_KEYSAFE_VERSION);
        return 0;
}

static int parse_vm(xmlNode **cursor, nkp_keysafe *ks)
{
        static const char *const names[] = { "uuid" };
        char *v[G_N_ELEMENTS(names)] = { NULL };
        xmlNode *node;
        int r = expect_element(cursor, "vm", &node);
        if (r == 0)
                r = read_attrs(node, names, v, G_N_ELEMENTS(names));
        if (r == 0 && canonical_uuid(v[0], ks->vm_uuid) < 0)
                r = bad("the VM UUID is not a UUID");
        free_values(v, G_N_ELEMENTS(names));
        return r;
}

static int parse_provider(xmlNode **cursor, nkp_keysafe *ks)
{
        static const char *const names[] = { "name", "key-id", "fingerprint" };
        char *v[G_N_ELEMENTS(names)] = { NULL };
        xmlNode *node;
        int r = expect_element(cursor, "provider", &node);
        if (r == 0)
                r = read_attrs(node, names, v, G_N_ELEMENTS(names));
        if (r == 0 && !provider_name_ok(v[0]))
                r = bad("the provider name is not valid");
        if (r == 0 && canonical_uuid(v[1], ks->key_id) < 0)
                r = bad("the provider key id is not a UUID");
        if (r == 0 && canonical_fingerprint(v[2], ks->fingerprint) < 0)
                r = bad("the provider fingerprint is not 64 hex digits");
        if (r == 0)
                g_strlcpy(ks->provider_name, v[0], sizeof ks->provider_name);
        free_values(v, G_N_ELEMENTS(names));
        return r;
}

static int parse_kek(xmlNode **cursor, nkp_keysafe *ks)
{
        static const char *const names[] = { "salt" };
        char *v[G_N_ELEMENTS(names)] = { NULL };
        xmlNode *node;
        int r = expect_element(cursor, "kek", &node);
        if (r == 0)
                r = read_attrs(node, names, v, G_N_ELEMENTS(names));
        if (r == 0 && base64_decode_exact(v[0], ks->kek_salt, sizeof ks->kek_salt) < 0)
                r = bad("the KEK salt is not base64 of %d bytes", NKP_KEK_SALT_SIZE);
        free_values(v, G_N_ELEMENTS(names));
        return r;
}

static int parse_dek(const xmlNode *node, nkp_keysafe *ks)
{
        static const char *const names[] = { "kind", "id", "secret", "wrapped" };
        char *v[G_N_ELEMENTS(names)] = { NULL };
        KeysafeEntry e = { 0 };
        int r = 0;
        if (strcmp((const char *) node->name, "dek") != 0)
                r = bad("expected element 'dek', found '%.64s'", (const char *) node->name);
        if (r == 0)
                r = read_attrs(node, names, v, G_N_ELEMENTS(names));
        if (r == 0 && !kind_ok(v[0])) {
                g_autofree char *shown = excerpt(v[0]);
                r = bad("a key has the unknown kind '%s'", shown);
        }
        if (r == 0 && !object_id_ok(v[1]))
                r = bad("a key has an invalid object id");
        if (r == 0 && canonical_uuid(v[2], e.secret_uuid) < 0)
                r = bad("the secret UUID of %s '%s' is not a UUID", v[0], v[1]);
        if (r == 0 && base64_decode_exact(v[3], e.wrapped, sizeof e.wrapped) < 0)
                r = bad("the wrapped key of %s '%s' is not base64 of %d bytes", v[0], v[1], WRAPPED_SIZE);
        if (r == 0 && find_entry(ks->entries, v[0], v[1]) >= 0)
                r = bad("%s '%s' appears twice", v[0], v[1]);
        if (r == 0 && find_secret(ks->entries, e.secret_uuid) >= 0)
                r = bad("the secret UUID '%s' appears twice", e.secret_uuid);
        if (r == 0) {
                g_strlcpy(e.kind, v[0], sizeof e.kind);
                g_strlcpy(e.id, v[1], sizeof e.id);
                g_array_append_val(ks->entries, e);
        }
        free_values(v, G_N_ELEMENTS(names));
        return r;
}

/* The number of element children, counted before anything is allocated
 * for them. */
static size_t count_elements(const xmlNode *first)
{
        size_t n = 0;
        for (const xmlNode *c = first; c; c = c->next)
                n += c->type == XML_ELEMENT_NODE;
        return n;
}

static int parse_root(const xmlNode *root, nkp_keysafe *ks)
{
        if (!root || strcmp((const char *) root->name, "keysafe") != 0 || !in_our_namespace(root))
                return bad("it is not an nkp keysafe (element 'keysafe' in namespace '%s')", NKP_KEYSAFE_NS);
        int r = parse_version(root);
        if (r < 0)
                return r;

        /* vm, provider and kek, then the keys */
        if (count_elements(root->children) > 3 + KEYSAFE_MAX_ENTRIES)
                return bad("it holds more than %d keys", KEYSAFE_MAX_ENTRIES);
        xmlNode *cursor = root->children;
        if ((r = parse_vm(&cursor, ks)) < 0 || (r = parse_provider(&cursor, ks)) < 0 ||
            (r = parse_kek(&cursor, ks)) < 0)
                return r;
        for (;;) {
                xmlNode *node;
                if ((r = next_element(&cursor, &node)) < 0)
                        return r;
                if (!node)
                        return 0;
                if ((r = parse_dek(node, ks)) < 0)
                        return r;
        }
}

/* Refuses what must never reach the XML parser: oversized input, NUL bytes
 * (which also rules out UTF-16/32), and DTDs or entity declarations, so no
 * entity is ever expanded. */
static int precheck_input(const char *xml, size_t len)
{
        if (!xml || len == 0)
                return bad("it is empty");
        if (len > KEYSAFE_MAX_SIZE)
                return bad("it is larger than %d KiB", KEYSAFE_MAX_SIZE / 1024);
        if (memchr(xml, '\0', len))
                return bad("it contains a NUL byte");
        if (memmem(xml, len, "<!DOCTYPE", 9) || memmem(xml, len, "<!ENTITY", 8))
                return bad("it declares a DTD or entities");
        return 0;
}

int nkp_keysafe_parse(const char *xml, size_t len, nkp_keysafe **ret)
{
        int r = precheck_input(xml, len);
        if (r < 0)
                return r;

        /* No NOENT (entities stay unexpanded), no DTD loading or validation,
         * no network, no messages on stderr; UTF-8 whatever it declares. */
        const int options = XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING |
                            XML_PARSE_IGNORE_ENC | XML_PARSE_NOCDATA;
        g_autoptr(xmlDoc) doc = xmlReadMemory(xml, (int) len, NULL, "UTF-8", options);
        if (!doc)
                return bad("it is not well-formed XML");
        if (doc->intSubset || doc->extSubset)
                return bad("it declares a DTD");

        g_autoptr(nkp_keysafe) ks = keysafe_alloc();
        r = parse_root(xmlDocGetRootElement(doc), ks);
        if (r < 0)
                return r;
        *ret = g_steal_pointer(&ks);
        return 0;
}
