/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internals of libnkp shared between its modules, its tests and the
 * programs built in this tree (nkpctl, the hook).  Not installed.
 *
 * Layers (lower never includes higher):
 *   error, secret, util (files, uuid)      — depend on nothing of nkp
 *   crypto (HKDF, AES-GCM), keysafe, p12   — pure functions over bytes
 *   context, store, tpm, cache, alarms     — host state under the root
 *   provider                               — the public provider API on top
 */
#ifndef NKP_PRIVATE_H
#define NKP_PRIVATE_H

#include <glib.h>
#include <sys/types.h>

#include "nkp/nkp.h"

G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_secret, nkp_secret_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_context, nkp_context_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_provider, nkp_provider_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_keysafe, nkp_keysafe_free)

/* ---- error.c ------------------------------------------------------------ */

/* Sets the thread's error message, logs it at debug level, returns `err`
 * (a negative errno) so callers can `return nkp_fail(-EINVAL, "...")`. */
int nkp_fail(int err, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* Same, prefixing the message of a lower-level failure kept as the cause. */
int nkp_fail_prefix(int err, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
void nkp_error_clear(void);
void nkp_log(enum nkp_log_level level, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* The OpenSSL error queue as text (and cleared); "" when empty. */
const char *nkp_openssl_error(void);

/* ---- util.c ------------------------------------------------------------- */

/* Writes `data` to `path` atomically: a temp file in the same directory with
 * `mode`, fsync, rename over `path`, fsync of the directory.  When
 * `exclusive`, refuses (-EEXIST) if `path` exists. */
int nkp_write_file_atomic(const char *path, const void *data, size_t len, mode_t mode,
                          bool exclusive);

/* Reads a whole file of at most `max` bytes.  When `private_mode`, refuses a
 * file that is not a regular file owned by us with mode 0600 (-EPERM, with
 * the fix in the message).  -ENOENT passes through untouched for callers
 * that treat "missing" as "empty". */
int nkp_read_file(const char *path, size_t max, bool private_mode, char **ret, size_t *ret_len);

/* mkdir -p with mode 0700 for every directory created; an existing final
 * directory with a group/other bit set is refused (-EPERM). */
int nkp_mkdir_private(const char *path);

int nkp_uuid_parse(const char *s, uint8_t out[16]);
void nkp_uuid_format(const uint8_t in[16], char out[NKP_UUID_STRING_LEN + 1]);
void nkp_uuid_random(char out[NKP_UUID_STRING_LEN + 1]);
int nkp_random_bytes(void *buf, size_t len);

/* Lower-case hex of `len` bytes into `out` (2*len+1). */
void nkp_hex_encode(const uint8_t *in, size_t len, char *out);

/* ---- crypto.c: thin glue over OpenSSL 3 ----------------------------------- */

int nkp_hkdf_sha256(const uint8_t *ikm, size_t ikm_len, const uint8_t *salt, size_t salt_len,
                    const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len);

#define NKP_GCM_IV_SIZE 12
#define NKP_GCM_TAG_SIZE 16

/* AES-256-GCM.  `ct`/`pt` are `len` bytes.  open returns -EBADMSG when the
 * tag does not verify, and then leaves `pt` zeroed. */
int nkp_aes256gcm_seal(const uint8_t key[32], const uint8_t *iv, size_t iv_len, const uint8_t *aad,
                       size_t aad_len, const uint8_t *pt, size_t len, uint8_t *ct,
                       uint8_t tag[NKP_GCM_TAG_SIZE]);
int nkp_aes256gcm_open(const uint8_t *key, size_t key_len, const uint8_t *iv, size_t iv_len,
                       const uint8_t *aad, size_t aad_len, const uint8_t *ct, size_t len,
                       const uint8_t *tag, size_t tag_len, uint8_t *pt);

/* ---- keysafe.c ------------------------------------------------------------ */

/* nkp_keysafe_new() without a provider object (tests, and callers holding
 * only the keysafe fields).  `fingerprint` is 64 hex digits. */
int nkp_keysafe_new_for(const char *vm_uuid, const char *provider_name, const char *key_id,
                        const char *fingerprint, nkp_keysafe **ret);
/* nkp_keysafe_rewrap() to a provider given by its fields (same rules). */
int nkp_keysafe_rewrap_for(nkp_keysafe *ks, const nkp_secret *old_kek, const char *provider_name,
                           const char *key_id, const char *fingerprint, const nkp_secret *new_kdk);

/* ---- p12.c: PKCS#12 provider backups (pure, in memory; fuzzed) ---------- */

typedef struct {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        unsigned flags; /* NKP_PROVIDER_REQUIRE_TPM only is carried */
} NkpBackupInfo;

/* PBES2 AES-256-CBC + PBKDF2-SHA256 (`iterations`), SHA-256 MAC. */
int nkp_p12_export(const NkpBackupInfo *info, const nkp_secret *kdk, const nkp_secret *password,
                   int iterations, GBytes **ret);
/* -EACCES wrong password / MAC mismatch, -EBADMSG not a well-formed nkp
 * backup (also: no nkp secret bag, KDK of the wrong size). */
int nkp_p12_import(const void *der, size_t len, const nkp_secret *password, NkpBackupInfo *ret_info,
                   nkp_secret **ret_kdk);

#define NKP_P12_ITERATIONS 600000
#define NKP_P12_MAX_ITERATIONS 10000000
#define NKP_P12_MAX_SIZE (1024 * 1024)

/* ---- context.c ------------------------------------------------------------ */

struct nkp_context {
        char *root;       /* absolute, no trailing slash ("" for "/") */
        char *store_dir;  /* ROOT/var/lib/nkp */
        char *store_path; /* ROOT/var/lib/nkp/providers.ini */
        char *lock_path;  /* ROOT/var/lib/nkp/.lock */
        char *alarms_path;/* ROOT/var/lib/nkp/alarms.ini */
        char *conf_path;  /* ROOT/etc/nkp/nkp.conf */
        char *run_dir;    /* ROOT/run/nkp */
        char *tcti;       /* "none" or a tpm2-tss TCTI string */
        bool tcti_explicit; /* set in the config: a failing TPM is an error */
};

/* Path of `rel` (absolute, starting with '/') under the context root. */
char *nkp_context_path(const nkp_context *ctx, const char *rel);

/* ---- store.c: the provider store (one GKeyFile, atomic rewrite) --------- */

typedef struct {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        char fingerprint[65];
        unsigned flags;
        int64_t created;
        enum nkp_seal seal;
        nkp_secret *kdk;      /* NKP_SEAL_NONE: the KDK itself */
        GBytes *tpm_blob;     /* NKP_SEAL_TPM: marshalled TPM2B_PUBLIC + TPM2B_PRIVATE */
        char *tpm_srk_name;   /* NKP_SEAL_TPM: hex name of the SRK it was sealed under */
} NkpStoreEntry;

typedef struct {
        GPtrArray *entries; /* NkpStoreEntry*, owned */
} NkpStore;

void nkp_store_entry_free(NkpStoreEntry *e);
void nkp_store_free(NkpStore *store);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpStore, nkp_store_free)

/* Takes the writers' lock (flock on ROOT/var/lib/nkp/.lock, created with the
 * store directory if needed).  Release with nkp_store_unlock(). */
int nkp_store_lock(nkp_context *ctx, int *ret_fd);
void nkp_store_unlock(int fd);

/* Loads the store; a missing file is an empty store.  Corruption, a wrong
 * mode or owner: a clear error, nothing repaired behind the admin's back. */
int nkp_store_load(nkp_context *ctx, NkpStore **ret);
/* Writes the whole store atomically (caller holds the lock). */
int nkp_store_save(nkp_context *ctx, const NkpStore *store);

NkpStoreEntry *nkp_store_find(const NkpStore *store, const char *name);
NkpStoreEntry *nkp_store_find_key_id(const NkpStore *store, const char *key_id);

/* ---- tpm.c: sealing KDKs to the host TPM 2.0 (tpm2-tss ESAPI) ----------- */

typedef struct NkpTpm NkpTpm;

/* Opens the context's TCTI.  -ENODEV when the context has none ("none", or
 * the default device is absent); another error when a configured TPM cannot
 * be reached (the message names the TCTI). */
int nkp_tpm_open(const nkp_context *ctx, NkpTpm **ret);
void nkp_tpm_close(NkpTpm *tpm);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpTpm, nkp_tpm_close)

/* Seals 32 bytes under the owner hierarchy's storage primary key. */
int nkp_tpm_seal(NkpTpm *tpm, const nkp_secret *kdk, GBytes **ret_blob, char **ret_srk_name);
/* -ENXIO when the blob belongs to another TPM (SRK name differs). */
int nkp_tpm_unseal(NkpTpm *tpm, GBytes *blob, const char *srk_name, nkp_secret **ret);

/* ---- cache.c: unsealed KDKs for the boot (kernel keyring) --------------- */

typedef struct {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        bool deleted; /* no longer in the store */
} NkpCacheInfo;

/* -ENOENT on a miss. `ret_info` may be NULL. */
int nkp_cache_get(nkp_context *ctx, const char *key_id, nkp_secret **ret, NkpCacheInfo *ret_info);
int nkp_cache_put(nkp_context *ctx, const NkpCacheInfo *info, const nkp_secret *kdk);
int nkp_cache_mark_deleted(nkp_context *ctx, const char *key_id);
/* Every cached provider (no key bytes), as a GArray of NkpCacheInfo. */
int nkp_cache_list(nkp_context *ctx, GArray **ret);
int nkp_cache_flush(nkp_context *ctx);

/* ---- provider.c ------------------------------------------------------------ */

nkp_provider *nkp_provider_from_entry(const NkpStoreEntry *e);

/* A new store entry for `kdk` (create and restore share it): computes the
 * fingerprint and seals the KDK to the host TPM when the context has one
 * (NKP_SEAL_NONE without a TPM; -ENODEV when `flags` has REQUIRE_TPM and
 * there is no usable TPM).  Writes nothing. */
int nkp_store_entry_new(nkp_context *ctx, const char *name, const char *key_id, unsigned flags,
                        int64_t created, const nkp_secret *kdk, NkpStoreEntry **ret);

/* Adds `entry` (ownership taken) to the store under the writers' lock:
 * -EEXIST name taken, -ENOSPC 32 providers already.  Then puts the KDK into
 * the key cache.  On error nothing is written. */
int nkp_store_add(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk);

#endif /* NKP_PRIVATE_H */
