/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internals of libnkp shared between its modules and its tests.  Not
 * installed; the programs include only nkp.h (tests/test-install.sh).
 *
 * Sections by module, grouped by the library's four layers (each a static
 * library that links only the layers below it: plugin/meson.build checks
 * it at build time; README "Design in brief" draws them):
 *   base  error, util, secret, dl
 *   keys  context, crypto, keysafe, backup (p12), store, tpm, cache,
 *         provider, alarms, ekca, ekcert, host, hostkey, host-protect
 *   virt  domain, virt
 *   vm    journal, enrol, tools, vm-convert, vm-status, vm-rekey, hook, daemon,
 *         vm-backup
 */
#ifndef NKP_PRIVATE_H
#define NKP_PRIVATE_H

#include <glib.h>
#include <sys/types.h>

#include "nkp/nkp.h"

/* g_autoptr() of the public types: nkp.h defines them after glib.h. */

/* ==== layer base: errors, secret bytes, files, UUIDs (depends on nothing of nkp) === */

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

/* write(2) until all of `data` is written (EINTR retried): 0 or -errno
 * (-EIO for a write that wrote nothing). */
int nkp_write_all(int fd, const void *data, size_t len);

/* Reads a whole file of at most `max` bytes.  When `private_mode`, refuses a
 * file that is not a regular file owned by us with mode 0600 (-EPERM, with
 * the fix in the message).  -ENOENT passes through untouched for callers
 * that treat "missing" as "empty". */
int nkp_read_file(const char *path, size_t max, bool private_mode, char **ret, size_t *ret_len);

/* fsync of the directory holding `path` (a rename or unlink in it made
 * durable).  0 or a negative errno, no message. */
int nkp_fsync_dir_of(const char *path);

/* Removing and renaming that never follow a symlink in the last component
 * (the parent directory is opened, then *at() calls with its fd).  No
 * message set; 0 or a negative errno.
 * nkp_open_parent: an O_PATH fd of dirname(path) (close it) and in
 *   *ret_base the basename (g_free it).
 * nkp_unlink_at / nkp_unlink_nofollow: ENOENT counts as done.
 * nkp_remove_tree[_at]: best effort rm -rf; a symlink is removed itself,
 *   what it points at is never touched. */
int nkp_open_parent(const char *path, char **ret_base);
int nkp_unlink_at(int dfd, const char *name);
int nkp_unlink_nofollow(const char *path);
int nkp_rename_nofollow(const char *from, const char *to);
void nkp_remove_tree_at(int dfd, const char *name);
void nkp_remove_tree(const char *path);

/* mkdir -p with mode 0700 for every directory created; an existing final
 * directory with a group/other bit set is refused (-EPERM). */
int nkp_mkdir_private(const char *path);

/* An exclusive flock on the file `path` (created 0600 when `create`),
 * never waiting: a holder may keep it for minutes (a whole disk copy).
 * -EBUSY (no message set) when another open file holds it, -ENOENT (no
 * message) when !create and there is no file; *ret_fd is released by
 * nkp_journal_unlock (closing it). */
int nkp_lock_file(const char *path, bool create, int *ret_fd);

int nkp_uuid_parse(const char *s, uint8_t out[16]);
void nkp_uuid_format(const uint8_t in[16], char out[NKP_UUID_STRING_LEN + 1]);
void nkp_uuid_random(char out[NKP_UUID_STRING_LEN + 1]);
int nkp_random_bytes(void *buf, size_t len);

/* Lower-case hex of `len` bytes into `out` (2*len+1). */
void nkp_hex_encode(const uint8_t *in, size_t len, char *out);

/* ==== layer keys: crypto, keysafe, PKCS#12, store, TPM, cache, providers, EK CA, host key === */

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

/* ---- backup.c: PKCS#12 provider backups (pure, in memory; fuzzed) ------- */

typedef struct {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        unsigned flags; /* NKP_PROVIDER_REQUIRE_TPM only is carried */
        /* A share of an m-of-n split (share_count > 0): the secret is then
         * libgfshare's share number share_index (1..share_count) of the
         * KDK, not the KDK.  All zero in a whole backup. */
        unsigned share_index, share_count, threshold;
        char split_id[NKP_UUID_STRING_LEN + 1]; /* the same in every share of one split */
        char fingerprint[65];                   /* of the whole KDK (nkp_kdk_fingerprint) */
} NkpBackupInfo;

/* PBES2 AES-256-CBC + PBKDF2-SHA256 (`iterations`), SHA-256 MAC. */
int nkp_p12_export(const NkpBackupInfo *info, const nkp_secret *kdk, const nkp_secret *password,
                   int iterations, GBytes **ret);
/* -EACCES wrong password / MAC mismatch, -EBADMSG not a well-formed nkp
 * backup (also: no nkp secret bag, KDK of the wrong size). */
int nkp_p12_import(const void *der, size_t len, const nkp_secret *password, NkpBackupInfo *ret_info,
                   nkp_secret **ret_kdk);

/* m-of-n shares (libgfshare, GF(256)).  split: `n` shares of `kdk`, any
 * `m` of which rebuild it; *ret_shares is an array of n secrets (share i+1
 * at [i]), free each and the array with nkp_shares_free().  combine: the
 * infos and secrets of shares as read by nkp_p12_import; checks that they
 * are of one split, distinct, at least its threshold, and that they
 * combine into the KDK whose fingerprint they carry.  -EINVAL bad counts,
 * -EXDEV shares of two splits, -ENOTUNIQ the same share twice, -ENODATA
 * fewer than the threshold, -EBADMSG they do not combine (damaged). */
#define NKP_SHARES_MAX 32
int nkp_shares_split(const nkp_secret *kdk, unsigned n, unsigned m, nkp_secret ***ret_shares);
void nkp_shares_free(nkp_secret **shares, unsigned n);
int nkp_shares_combine(const NkpBackupInfo *infos, nkp_secret *const *shares, size_t n,
                       NkpBackupInfo *ret_info, nkp_secret **ret_kdk);

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
        /* [migration] (the hook's `migrate begin` on a destination) */
        bool migration_allow_plain; /* allow_plain: receive nkp VMs without forced TLS */
        char *migration_qemu_conf;  /* qemu_conf: libvirt's qemu.conf (ROOT/etc/libvirt/qemu.conf) */
        /* [vtpm] (issue 7: plain vTPMs, the EK certificate signer) */
        int vtpm_policy;            /* enum nkp_vtpm_policy */
        char *vtpm_swtpm_user;      /* swtpm_user: libvirt's swtpm user ("tss") */
        char *vtpm_state_dir;       /* state_dir: libvirt's swtpm state (/var/lib/libvirt/swtpm) */
        /* nkp_context_set_progress (vm-convert.c) */
        nkp_progress_func progress;
        void *progress_data;
        /* [disks] (issue 16: snapshots made behind nkp's back) */
        bool disks_allow_plain_layers; /* allow_plain_layers: start with a plain layer */
        bool disks_seal_plain_layers;  /* seal_plain_layers: nkpd seals a plain active layer */
        /* [disks] (issue 15: new disks follow the VM) */
        int disks_policy;           /* enum nkp_disks_policy */
};

enum nkp_disks_policy {
        NKP_DISKS_POLICY_ENROL = 0,   /* default: nkpd encrypts empty plain qcow2 disks of nkp VMs */
        NKP_DISKS_POLICY_REQUIRE = 1, /* enrol, and the hook refuses nkp VMs with a plain disk */
        NKP_DISKS_POLICY_OFF = 2,     /* plain disks untouched */
};

enum nkp_vtpm_policy {
        NKP_VTPM_POLICY_ENROL = 0,   /* default: enrol plain vTPMs with no state (nkpd) */
        NKP_VTPM_POLICY_REQUIRE = 1, /* refuse every unencrypted vTPM start; no auto-enrol */
        NKP_VTPM_POLICY_OFF = 2,     /* plain vTPMs untouched */
};

/* Path of `rel` (absolute, starting with '/') under the context root. */
char *nkp_context_path(const nkp_context *ctx, const char *rel);

/* Calls the context's progress function, if any (vm-convert.c). */
void nkp_progress(const nkp_context *ctx, const char *op, const char *vm, const char *step,
                  unsigned done, unsigned total);

/* ---- tang.c: network binding (Tang servers through Clevis) -------------- */

#define NKP_TANG_MAX 8
#define NKP_JWE_MAX (32 * 1024)

typedef struct {
        char **servers;     /* Tang URLs, NULL-terminated, 1..NKP_TANG_MAX */
        unsigned threshold; /* how many must answer, 1..n */
} NkpBinding;

void nkp_binding_free(NkpBinding *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpBinding, nkp_binding_free)
/* "tang:URL[,URL…]" and a threshold (0 = 1).  -EINVAL with the reason. */
int nkp_binding_parse(const char *spec, unsigned threshold, NkpBinding **ret);
/* "Tang, T of URL, URL" for messages; g_free(). */
char *nkp_binding_describe(const NkpBinding *b);
/* `data` into a Clevis sss/tang JWE (compact), data on clevis's stdin.
 * -EHOSTUNREACH when the servers cannot be reached. */
int nkp_tang_wrap(const NkpBinding *b, const void *data, size_t len, char **ret_jwe);
/* The JWE opened by `clevis decrypt` (stdin/stdout).  -EHOSTUNREACH with a
 * line naming `provider`, the servers and the fix when too few answer. */
int nkp_tang_unwrap(const char *jwe, const char *provider, const NkpBinding *b, nkp_secret **ret);

/* ---- store.c: the provider store (one GKeyFile, atomic rewrite) --------- */

typedef struct {
        char name[NKP_NAME_MAX + 1];
        char key_id[NKP_UUID_STRING_LEN + 1];
        char fingerprint[65];
        unsigned flags;
        int64_t created;
        enum nkp_seal seal;
        /* Network-bound: kdk (NKP_SEAL_NONE) or tpm_blob (NKP_SEAL_TPM) is
         * then NULL and rests inside bind_jwe (tang.c). */
        NkpBinding *bind;
        char *bind_jwe;
        nkp_secret *kdk;      /* NKP_SEAL_NONE: the KDK itself */
        GBytes *tpm_blob;     /* NKP_SEAL_TPM: marshalled TPM2B_PUBLIC + TPM2B_PRIVATE */
        char *tpm_srk_name;   /* NKP_SEAL_TPM: hex name of the SRK it was sealed under */
} NkpStoreEntry;

typedef struct {
        GPtrArray *entries; /* NkpStoreEntry*, owned */
} NkpStore;

void nkp_store_entry_free(NkpStoreEntry *e);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpStoreEntry, nkp_store_entry_free)
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
/* The two halves, apart for the fuzzer.  parse: the file's text in `buf`
 * (its kdk values are wiped in place; `ctx` names the store in errors).
 * format: the text (NUL-terminated, `*ret_len` bytes) in a buffer of
 * `*ret_cap` bytes that holds KDKs: nkp_wipe() all of it, then g_free(). */
int nkp_store_parse(const nkp_context *ctx, char *buf, size_t len, NkpStore **ret);
int nkp_store_format(const NkpStore *store, char **ret, size_t *ret_len, size_t *ret_cap);

NkpStoreEntry *nkp_store_find(const NkpStore *store, const char *name);
NkpStoreEntry *nkp_store_find_key_id(const NkpStore *store, const char *key_id);

/* provider.c.  0 when the entry's key opens on this host (always for
 * NKP_SEAL_NONE); -ENXIO/-EBADMSG when it is sealed to another TPM. */
int nkp_store_entry_opens_here(nkp_context *ctx, const NkpStoreEntry *e);
/* Replaces the entry with the same key id, name and fingerprint by `entry`
 * (ownership taken) under the writers' lock, then caches `kdk`.  Restore
 * uses it to re-seal a copied store to this host's TPM. */
int nkp_store_replace(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk);

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
/* nkp_store_add() for a new provider: on success *ret (if not NULL) gets
 * the provider `entry` describes, freed with nkp_provider_free(). */
int nkp_store_add_provider(nkp_context *ctx, NkpStoreEntry *entry, const nkp_secret *kdk,
                           nkp_provider **ret);

/* Provider `name`, else the host's default.  -ENOENT (with the fix). */
int nkp_provider_pick(nkp_context *ctx, const char *name, nkp_provider **ret);

/* ---- alarms.c ------------------------------------------------------------- */

/* True when an alarm of `kind` is listed for `subject` with `message`
 * (NULL: any subject, any message).  nkpd looks at every rewrite of a
 * definition, and each raise is also a journal entry.  False (with
 * nkp_alarm_list's error) when the alarms cannot be read. */
bool nkp_alarm_open(nkp_context *ctx, const char *kind, const char *subject, const char *message);

/* ---- ekca.c: the provider's EK CA ---------------------------------------- */
/* See plugin/lib/ekca.c for the derivation and the certificate profiles. */

typedef struct NkpEkCa NkpEkCa;

/* The EK CA of provider (name, key id) derived from its KDK: an ECDSA P-384
 * key and a self-signed CA certificate whose every field but the signature
 * is the same on every host holding the provider. */
int nkp_ekca_new(const nkp_secret *kdk, const char *provider_name, const char *key_id,
                 NkpEkCa **ret);
/* The same for the provider with `key_id` on this host (store + KDK from the
 * cache or the store).  -ENOENT when the provider is not here. */
int nkp_ekca_for_provider(nkp_context *ctx, const char *key_id, NkpEkCa **ret);
void nkp_ekca_free(NkpEkCa *ca);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpEkCa, nkp_ekca_free)

/* The CA certificate, PEM (free with g_free) or DER. */
int nkp_ekca_cert_pem(const NkpEkCa *ca, char **ret);
int nkp_ekca_cert_der(const NkpEkCa *ca, GBytes **ret);

/* What swtpm_setup's create_certs_tool is given (strings as on its command
 * line; NULL where absent). */
typedef struct {
        const char *type;              /* "ek" or "platform" */
        const char *ek;                /* RSA modulus in hex, or x=<hex>,y=<hex>[,id=<curve>] */
        const char *vmid;              /* "<name>:<uuid>" (libvirt); the subject CN */
        const char *tpm_spec_family;   /* EK: "2.0" */
        const char *tpm_spec_level;    /* EK: "0" */
        const char *tpm_spec_revision; /* EK: "164" */
        const char *tpm_manufacturer;  /* "id:00001014" */
        const char *tpm_model;         /* "swtpm" */
        const char *tpm_version;       /* "id:20191023" */
        const char *platform_manufacturer; /* platform certificate only */
        const char *platform_model;
        const char *platform_version;
        bool allow_signing;
        bool decryption;
} NkpEkCertRequest;

/* Issues the DER certificate that `req` asks for, signed by `ca`.
 * -EINVAL for a malformed or incomplete request (the message says what). */
int nkp_ekca_issue(const NkpEkCa *ca, const NkpEkCertRequest *req, GBytes **ret);

/* Tickets (see ekca.c): the prepare hook's "VM `vm_uuid` (`vm_name`)'s vTPM
 * is being manufactured now by provider `key_id`", valid `ttl_seconds`, good
 * for one certificate of each kind (RSA EK, ECC EK, platform).  No key bytes.
 * write: -EINVAL bad uuid, key id or name.  read: -ENOENT none (not an nkp
 * VM), -ETIMEDOUT expired, -EBADMSG damaged. */
int nkp_ekca_ticket_write(nkp_context *ctx, const char *vm_uuid, const char *vm_name,
                          const char *key_id, unsigned ttl_seconds);
int nkp_ekca_ticket_read(nkp_context *ctx, const char *vm_uuid, char **ret_key_id);
void nkp_ekca_ticket_remove(nkp_context *ctx, const char *vm_uuid);
#define NKP_EKCA_TICKET_TTL 300

/* The UUID at the end of swtpm_setup's --vmid ("<name>:<uuid>"). */
int nkp_ekca_vmid_uuid(const char *vmid, char ret[NKP_UUID_STRING_LEN + 1]);

/* Root only: the VM's ticket, its provider's CA, the certificate; consumes
 * the request's kind from the ticket (the last kind removes it).  The
 * subject is the ticket's "<name>:<uuid>".  -ENOENT no ticket (use swtpm's
 * local CA), -ENOKEY provider not here, -EACCES --vmid is not the ticket's
 * VM, -EALREADY this kind was issued already, -ETIMEDOUT ticket expired;
 * nothing is issued on any error. */
int nkp_ekca_sign_request(nkp_context *ctx, const NkpEkCertRequest *req, GBytes **ret,
                          char **ret_provider);

/* The signer's wire format (nkp-swtpm-certs <-> nkpd, see ekca.c). */
#define NKP_EKCA_REQ_MAX 8192
#define NKP_EKCA_SOCKET "/run/nkp/ekca.sock" /* under the context root */
char *nkp_ekca_request_format(const NkpEkCertRequest *req);
int nkp_ekca_request_parse(char *text, NkpEkCertRequest *req);
#define NKP_EKCA_CLIENT_DEADLINE_MS 2000 /* nkpd: the whole request, from accept */
/* The peer of the connected UNIX socket `fd` is root or `allowed_uid`
 * (SO_PEERCRED; nothing is read): 0, or -EPERM naming the uid. */
int nkp_ekca_peer_check(int fd, uid_t allowed_uid);
/* Sends "<head><message>\n" (newlines inside made spaces) without waiting. */
void nkp_ekca_send_line(int fd, const char *head, const char *message);
/* `buf` holds a whole request (ends with an empty line). */
bool nkp_ekca_request_complete(const char *buf, size_t len);
/* The answer to the request in `buf` (`len` bytes): "OK <n>\n" + DER,
 * "NOTICKET\n" or "ERR <line>\n", always set.  Returns 0 or the refusal's
 * error; `ret_note` (may be NULL) gets one line for the log on success. */
int nkp_ekca_answer(nkp_context *ctx, char *buf, size_t len, GBytes **ret_answer,
                    char **ret_note);

/* ---- hostkey.c, host-protect.c: the host key and its protected directories */
/* A key per host, derived from a provider's KDK, encrypts at rest (kernel
 * fscrypt, policy v2) the directories libvirt writes behind nkp's back: the
 * swtpm state of VMs nkp has not enrolled yet, managed-save images, dumps,
 * NVRAM.  See hostkey.c and docs/host-key.md.  Root only.  Every function
 * returns 0 or a negative errno with a one-line nkp_fail message that names
 * the directory and the fix. */

#define NKP_HOSTKEY_SIZE 64    /* an fscrypt v2 master key (AES-256-XTS) */
#define NKP_FSCRYPT_ID_SIZE 16 /* the kernel's key identifier, in every policy */

/* The host key of provider (kdk, key_id) on host `host_id` (a UUID):
 * HKDF-SHA256(kdk, info = "nkp host key v1" 0x00 key_id host_id), 64 bytes,
 * a new secret the caller frees.  -EINVAL bad KDK size or ids. */
int nkp_hostkey_derive(const nkp_secret *kdk, const char *key_id, const char *host_id,
                       nkp_secret **ret);

/* This host's id: ROOT/var/lib/nkp/host-id (a random UUID, not secret),
 * made when missing and `create`.  -ENOENT missing (!create), -EBADMSG
 * damaged. */
int nkp_hostkey_host_id(nkp_context *ctx, bool create, char ret[NKP_UUID_STRING_LEN + 1]);

/* 0 when the filesystem holding `dir` can encrypt; else -EOPNOTSUPP with
 * the refusal (tmpfs, ext4 without `tune2fs -O encrypt`, ...).  The
 * fallback for such filesystems is that refusal (hostkey.c says why). */
int nkp_fscrypt_check_supported(const char *dir);

/* Adds `key` (NKP_HOSTKEY_SIZE bytes; not kept) to the filesystem holding
 * `path` (its keyring lives until removed or unmounted); every directory
 * encrypted under it unlocks.  `ret_identifier` gets the kernel's
 * identifier.  Adding a key that is there already is fine. */
int nkp_fscrypt_add_key(const char *path, const nkp_secret *key,
                        uint8_t ret_identifier[NKP_FSCRYPT_ID_SIZE]);

/* Removes the key `identifier` (every user's claim) from the filesystem
 * holding `path`: its directories lock.  `ret_busy` (may be NULL) is set
 * when files were still open and stay readable until closed (state
 * LOCKING; a later call finishes).  -ENOKEY when the key is not there. */
int nkp_fscrypt_remove_key(const char *path, const uint8_t identifier[NKP_FSCRYPT_ID_SIZE],
                           bool *ret_busy);

/* Encrypts the EMPTY directory `dir` under the key `identifier` (added
 * before): AES-256-XTS contents, AES-256-CTS names, v2.  -ENOTEMPTY,
 * -EEXIST (another key), -ENOKEY, -EOPNOTSUPP (the refusal). */
int nkp_fscrypt_set_policy(const char *dir, const uint8_t identifier[NKP_FSCRYPT_ID_SIZE]);

typedef enum {
        NKP_FSCRYPT_PLAIN,    /* not encrypted (also: a filesystem without fscrypt) */
        NKP_FSCRYPT_UNLOCKED, /* encrypted, its key present */
        NKP_FSCRYPT_LOCKED,   /* encrypted, its key absent: names encrypted, open() ENOKEY */
        NKP_FSCRYPT_LOCKING,  /* key removed, files still open keep it readable */
} NkpFscryptState;
const char *nkp_fscrypt_state_name(NkpFscryptState state);

/* The state of `dir`; `ret_identifier` (may be NULL) gets its policy's key
 * identifier (zeros when plain).  -EMEDIUMTYPE a v1 policy (not nkp's). */
int nkp_fscrypt_status(const char *dir, NkpFscryptState *ret_state,
                       uint8_t ret_identifier[NKP_FSCRYPT_ID_SIZE]);

/* `nkpctl host protect` for one directory: encrypts `dir` (absolute) under
 * the key `identifier`, which must be added.  An empty directory is
 * encrypted in place; one holding files is copied into an encrypted sibling
 * that then takes its place (crash-safe: a rerun after a kill at any point
 * finishes; the states are in hostkey.c).  Idempotent: 0 at once when `dir`
 * is already protected by that key.  The caller keeps writers out of `dir`
 * meanwhile.  Refusals change nothing: -EOPNOTSUPP no fscrypt, -ENOKEY key
 * not added, -EEXIST encrypted with another key, -EBUSY a mount point or a
 * socket inside, -EUCLEAN siblings in a state protect never leaves. */
int nkp_hostkey_protect_dir(const char *dir, const uint8_t identifier[NKP_FSCRYPT_ID_SIZE]);
/* `nkpctl host unprotect` for one directory: `dir`, encrypted under
 * `identifier` (which must be added), becomes a plain directory with the
 * same contents: copied out into a plain sibling that takes its place
 * (crash-safe like protect, with siblings of other names: hostkey.c's
 * second table).  Idempotent: 0 at once when `dir` is plain with no
 * leftovers.  The caller keeps writers out of `dir`.  Refusals change
 * nothing: -ENOKEY key not added, -EEXIST encrypted with another key,
 * -EBUSY a mount point or a socket inside, -EUCLEAN an interrupted protect
 * (or siblings in a state unprotect never leaves). */
int nkp_hostkey_unprotect_dir(const char *dir, const uint8_t identifier[NKP_FSCRYPT_ID_SIZE]);
/* Whether an interrupted protect or unprotect left a sibling of `dir`. */
bool nkp_hostkey_conversion_left(const char *dir);
/* host-protect.c (the public half is nkp.h "The host key").  1 when `dir`
 * is a recorded protected directory, encrypted with the recorded host key
 * and unlocked (the key added first when it is locked and `load`); 0 when
 * it is not protected (no record, not recorded, plain, missing, another
 * key); -ENOKEY when it is protected but stays locked (the message says
 * why and the fix), the errors of nkp_host_key_load. */
int nkp_hostkey_dir_ready(nkp_context *ctx, const char *dir, bool load);
/* The hook's prepare step, for EVERY VM: 0 when no protected directory is
 * locked (the key is added first when it can be); else -ENOKEY with the
 * line "VM 'NAME' cannot start: …" naming the locked directories and the
 * fix, and a "hostkey-locked" alarm for the VM.  Why every VM: a locked
 * save directory hides its managed-save images from libvirt, which would
 * cold-boot the VM and later resume a stale image. */
int nkp_hostkey_start_check(nkp_context *ctx, const char *vm_name);

/* ==== layer virt: the libvirt glue (domain XML, connection, secrets, metadata) === */

/* ---- domain.c: the domain XML (the hook's stdin, libvirt's XML) --------- */
/* Pure functions over text; fuzzed (tests/fuzz/fuzz-domain.c).  Parsing is
 * namespace-aware, never touches the network, never expands entities and
 * refuses a DOCTYPE the parser meets (not the text "<!DOCTYPE" in a comment
 * or CDATA); input above NKP_DOMAIN_XML_MAX is refused.  <name> is libvirt's
 * (whole text, no length cap). */

/* NKP_DOMAIN_XML_MAX: nkp.h. */

typedef struct {
        char *target;            /* target dev, "vda" */
        char *device;            /* "disk", "cdrom", … */
        char *type;              /* "file", "block", … */
        char *source_file;       /* source file= (type file) or dev= (block); NULL otherwise */
        char *driver_type;       /* "qcow2", "raw", NULL */
        char *encryption_format; /* existing <encryption format=…>, NULL when none */
        char *encryption_secret; /* its secret uuid, NULL when none */
} NkpDomainDisk;

typedef struct {
        char *name;
        char *uuid;               /* lower case */
        bool has_vtpm;            /* a <tpm> with an emulator backend (any <devices>) */
        char *tpm_model;
        char *tpm_version;
        char *tpm_secret;         /* <encryption secret=…> of the backend; NULL when none,
                                     or when any emulator <tpm> has none */
        GPtrArray *disks;         /* NkpDomainDisk*, document order */
        char *keysafe_xml;        /* the nkp element of <metadata>, standalone; NULL when none */
        nkp_keysafe *keysafe;     /* parsed keysafe_xml; NULL when none */
} NkpDomain;

/* true when the bytes mention nkp's namespace at all (used to tell a broken
 * nkp VM from foreign garbage). */
bool nkp_domain_mentions_nkp(const char *xml, size_t len);

/* Parses a domain XML.  -EBADMSG not a well-formed <domain> (or a DOCTYPE,
 * or a damaged nkp keysafe, or a keysafe made for another VM UUID),
 * -EFBIG too large; the keysafe parser's errors pass through. */
int nkp_domain_parse(const char *xml, size_t len, NkpDomain **ret);
void nkp_domain_free(NkpDomain *d);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpDomain, nkp_domain_free)
const NkpDomainDisk *nkp_domain_find_disk(const NkpDomain *d, const char *target);

/* Editing a domain XML for `vm encrypt/decrypt` (the result is given to
 * virDomainDefineXML). */
typedef struct NkpDomainEdit NkpDomainEdit;
int nkp_domain_edit_new(const char *xml, size_t len, NkpDomainEdit **ret);
void nkp_domain_edit_free(NkpDomainEdit *e);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpDomainEdit, nkp_domain_edit_free)
/* Sets (uuid) or removes (NULL) <encryption secret=…/> on the emulator vTPM
 * backend.  -ENOENT when the domain has no emulator vTPM. */
int nkp_domain_edit_set_vtpm_secret(NkpDomainEdit *e, const char *secret_uuid);
/* Sets <encryption format='luks'><secret type='passphrase' uuid=…/></encryption>
 * on disk `target`, its driver type to qcow2 and snapshot='no' on the
 * <disk> (libvirt then refuses internal, full-system and plain disk-only
 * snapshots of it; docs/snapshots-clones.md); NULL removes any encryption
 * and the snapshot attribute.  -ENOENT no such disk. */
int nkp_domain_edit_set_disk_luks(NkpDomainEdit *e, const char *target, const char *secret_uuid);
/* snapshot='no' on every <disk> with a LUKS <encryption> that lacks it
 * (definitions nkp wrote before it set the attribute).  The number of disks
 * changed, or -ENOMEM. */
int nkp_domain_edit_refuse_snapshots(NkpDomainEdit *e);
/* Puts `keysafe_xml` (an element in NKP_KEYSAFE_NS) into <metadata>,
 * replacing any nkp element; NULL removes it. */
int nkp_domain_edit_set_keysafe(NkpDomainEdit *e, const char *keysafe_xml);
int nkp_domain_edit_format(NkpDomainEdit *e, char **ret);

/* ---- virt.c: libvirt glue ------------------------------------------------- */
/* libvirt has no per-call timeout.  A keepalive would only prove that the
 * daemon's event loop lives, not that a worker thread will serve the call,
 * so the bound is the calling program's: the hook and nkpctl arm a process
 * deadline (alarm) and exit with one line when it fires.  libvirt's default
 * error printing is switched off: errors come back as nkp_fail messages.
 * (Since the library redesign the deadline is the connection's: see
 * nkp_virt_open() in nkp.h.)
 *
 * Secret values: every nkp secret value is the lower-case hex text of the
 * 32-byte DEK (64 ASCII characters).  LUKS passphrases must be UTF-8 with
 * no NUL; using the same encoding for the vTPM keeps one rule (swtpm runs
 * PBKDF2 over whatever bytes it gets).  The entropy stays 256 bits. */

/* The connection (nkp_virt) is public: nkp_virt_open() in nkp.h. */
typedef nkp_virt NkpVirt;

#define NKP_SECRET_VALUE_LEN (2 * NKP_DEK_SIZE)

/* hex(DEK) into a new secret of NKP_SECRET_VALUE_LEN bytes. */
int nkp_secret_value_from_dek(const nkp_secret *dek, nkp_secret **ret);

/* The URI the hook uses when none is configured: the secret driver only. */
#define NKP_HOOK_DEFAULT_URI "secret:///system"

/* The virConnectPtr (nkpd registers its domain events on it). */
void *nkp_virt_connection(NkpVirt *v);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpVirt, nkp_virt_close)

/* Defines an ephemeral, private secret `secret_uuid` and sets its value.
 * kind NKP_OBJECT_VTPM: usage vtpm, name "nkp-vtpm-<vm uuid>";
 * NKP_OBJECT_DISK: usage volume, `volume` = the disk path.  Idempotent: an
 * existing secret with that UUID gets the value again, provided it is
 * ephemeral and private (else -EEXIST, one line, nothing changed). */
/* Whether a libvirt secret's XML (virSecretGetXMLDesc) says ephemeral='yes'
 * and private='yes': the only pre-existing secret nkp puts a DEK in. */
bool nkp_virt_secret_xml_reusable(const char *xml);
int nkp_virt_secret_define(NkpVirt *v, const char *secret_uuid, const char *kind,
                           const char *vm_uuid, const char *volume, const nkp_secret *value);
/* -ENOENT when there is none. */
int nkp_virt_secret_undefine(NkpVirt *v, const char *secret_uuid);
bool nkp_virt_secret_exists(NkpVirt *v, const char *secret_uuid);

/* The XML of a domain (inactive: the persistent definition), with secure
 * info.  -ENOENT no such domain. */
int nkp_virt_domain_xml(NkpVirt *v, const char *name, bool inactive, char **ret);
/* Defines `xml` as the persistent definition. */
int nkp_virt_domain_define(NkpVirt *v, const char *xml);
/* Starts a new domain from `xml`: transient (createXML, nothing defined),
 * else defined, then started. */
int nkp_virt_domain_create(NkpVirt *v, const char *xml, bool transient);
/* Names of every defined (persistent) domain, sorted. */
int nkp_virt_domain_list(NkpVirt *v, GPtrArray **ret_names);
/* 1 running/paused, 0 shut off, negative error. */
int nkp_virt_domain_is_active(NkpVirt *v, const char *name);
/* 1 when the domain has a managed save image (virsh managedsave), whose
 * embedded definition and device state would outlive a change of its keys
 * or files; 0 none; negative error. */
int nkp_virt_domain_has_managed_save(NkpVirt *v, const char *name);
/* The nkp element of the domain's <metadata> (live definition when `live`,
 * else the persistent one) as standalone XML; *ret = NULL when there is
 * none. */
int nkp_virt_keysafe_get(NkpVirt *v, const char *name, bool live, char **ret);
/* Puts `keysafe_xml` (NULL: removes it) into the domain's <metadata> under
 * the prefix "nkp": in the persistent definition, and in the live one too
 * when the domain runs (online, for shallow rekey). */
int nkp_virt_keysafe_set(NkpVirt *v, const char *name, const char *keysafe_xml);

/* The definition embedded in the domain's managed save image (virsh
 * managedsave: a restore starts from it, keysafe included); *ret = NULL
 * when there is no image. */
int nkp_virt_managed_save_xml(NkpVirt *v, const char *name, char **ret);
/* Puts `keysafe_xml` into ONE definition of domain `name`: the live one
 * when `live` (-EBUSY when the domain does not run), else the persistent
 * one.  Shallow rekey writes each definition on its own (docs/rekey.md). */
int nkp_virt_keysafe_put(NkpVirt *v, const char *name, const char *keysafe_xml, bool live);

/* Unlocking a VM (the hook's prepare/migrate, `host unlock`, `vm status`). */
typedef struct {
        char *kind;        /* NKP_OBJECT_VTPM / NKP_OBJECT_DISK */
        char *object_id;   /* "vtpm" or the disk target ("vda") */
        char *secret_uuid;
        char *volume;      /* disks: the source path from the domain XML */
        nkp_secret *value; /* hex(DEK); NULL from nkp_vm_check */
} NkpVmSecret;
void nkp_vm_secret_free(gpointer p);

/* The KEK that opens the keysafe of domain `d`: its provider's KDK (key
 * cache, else the store; a deleted but cached provider works too), checked
 * against the fingerprint the keysafe names, then nkp_kek_derive().  The
 * messages are neutral (callers say what could not be done):  -ENOKEY the
 * provider is not on this host, -EKEYREJECTED a provider with that key id
 * holds another key, -EINVAL no keysafe, -EBADMSG a keysafe naming no
 * provider; nkp_provider_get_kdk()'s other errors pass through. */
int nkp_vm_kek(nkp_context *ctx, const NkpDomain *d, nkp_secret **ret);

/* For a domain with a keysafe: the KDK of its provider (cache, else the
 * store), its fingerprint checked, the KEK derived, every DEK unwrapped into
 * a secret value.  -ENOKEY the provider is not on this host (the message is
 * the one-line "VM 'x' is locked: …" with the fix), -EKEYREJECTED a provider
 * with that key id holds a different key, -EBADMSG a wrapped DEK does not
 * open.  When `want_values` is false only the provider is checked. */
int nkp_vm_unlock(nkp_context *ctx, const NkpDomain *d, bool want_values, GPtrArray **ret);

/* ==== layer vm: journal and lock, enrolment, tools on pipes, the VM operations === */

/* ---- journal.c: the VM lock, crash safety of file conversions ------------ */
/* vm encrypt/decrypt and vm rekey --deep replace files (disks, the vTPM
 * state) and the definition; the journal says what was being done, so that
 * whoever comes next (the command run again, or the hook at the next start)
 * can make the files match the definition libvirt holds.  See journal.c and
 * docs/crash-safety.md.  No key material is ever in a journal. */

typedef enum {
        NKP_JOURNAL_CONVERTING = 0, /* new copies being made; only rolling back is possible */
        NKP_JOURNAL_READY = 1,      /* every P.nkp-new complete and verified */
} NkpJournalPhase;

typedef struct {
        char *op;           /* "encrypt", "decrypt", "rekey-deep" */
        char *vm_name;
        char *vm_uuid;      /* lower case */
        NkpJournalPhase phase;
        char *old_sig;      /* nkp_domain_signature() of the definition before */
        char *new_sig;      /* … and after */
        GPtrArray *files;   /* char*: absolute paths P being replaced */
        GPtrArray *scratch; /* char*: work directories to remove on recovery */
        GPtrArray *dirs;    /* char* "DEV:INO": the directories holding files and
                             * scratch when the operation began (the first save);
                             * reconcile touches nothing anywhere else */
} NkpJournal;

typedef enum {
        NKP_RECONCILE_BACK,    /* files are the ones from before the operation again */
        NKP_RECONCILE_FORWARD, /* the operation was finished */
} NkpReconcile;

NkpJournal *nkp_journal_new(const char *op, const char *vm_name, const char *vm_uuid,
                            const char *old_sig, const char *new_sig);
void nkp_journal_free(NkpJournal *j);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpJournal, nkp_journal_free)
const char *nkp_journal_phase_name(NkpJournalPhase phase);

/* "none" for a definition without a keysafe, else the hex KEK salt of its
 * keysafe (public; fresh for every keysafe). */
char *nkp_domain_signature(const NkpDomain *d);

/* ROOT/var/lib/nkp/journal/<uuid>.ini */
char *nkp_journal_path(const nkp_context *ctx, const char *vm_uuid);

/* The VM's lock (flock on ROOT/var/lib/nkp/journal/<uuid>.lock), never
 * waiting: -EBUSY when another process holds it (no message set), -ENOENT
 * when !create and no lock file exists (nobody ever locked this VM).
 * Release with nkp_journal_unlock(). */
int nkp_journal_lock(nkp_context *ctx, const char *vm_uuid, bool create, int *ret_fd);
void nkp_journal_unlock(int fd);
/* The one waiting rule for the VM's lock: nkp_journal_lock, tried again
 * every NKP_VM_LOCK_POLL_MS for up to `wait_ms` (0: once) while another
 * process holds it; then -EBUSY (no message set: the caller says who waits
 * for what).  Who waits how long:
 *  - commands that change a VM (encrypt, decrypt, rekey, rekey --deep)
 *    wait 2 s and create the lock file (nkp_vm_lock_recovered,
 *    vm-convert.c): the hook and `vm status` hold it for milliseconds;
 *  - the hook and `vm status` never wait (0) and never create the lock
 *    file (`create` false: -ENOENT when nobody ever locked the VM);
 *  - nkpd's enrolment (enrol.c) never waits either (0, `create` false):
 *    its one event loop serves every VM, and a held lock means an nkpctl
 *    command owns the VM and decides what it becomes (an enrolment now
 *    would be undone by that command's define); nkpd looks at the VM
 *    again at its next define event or scan;
 *  - nkpd's snapshot='no' fix (nkp_vm_refuse_snapshots) does not wait
 *    either but creates the lock file (a VM migrated in was never locked
 *    here, and its define must not race a first nkpctl command). */
#define NKP_VM_LOCK_POLL_MS 50
int nkp_vm_lock(nkp_context *ctx, const char *vm_uuid, bool create, unsigned wait_ms,
                int *ret_fd);

/* Atomic write (0600) / read.  load: -ENOENT (no message) when there is
 * none, -EBADMSG damaged. */
/* The first save records j->dirs (the parent directory of every file and
 * scratch directory); later saves keep them. */
int nkp_journal_save(nkp_context *ctx, NkpJournal *j);
int nkp_journal_load(nkp_context *ctx, const char *vm_uuid, NkpJournal **ret);
/* The two halves of save and load, apart for the fuzzer.  parse: `vm_uuid`
 * NULL accepts any VM; `path` names the journal in errors.  format: the
 * text (g_free it), which holds no key material. */
int nkp_journal_parse(const char *text, size_t len, const char *vm_uuid, const char *path,
                      NkpJournal **ret);
char *nkp_journal_format(const NkpJournal *j, size_t *ret_len);
/* The basename of every scratch directory a journal may name. */
#define NKP_JOURNAL_SCRATCH_NAME ".nkp-work"
int nkp_journal_remove(nkp_context *ctx, const char *vm_uuid);

/* P -> P.nkp-old, P.nkp-new -> P; idempotent (a rerun after a crash between
 * the two renames finishes it). */
int nkp_journal_swap_file(const char *path);
/* Removes the journal's scratch directories. */
void nkp_journal_remove_scratch(const NkpJournal *j);

/* Makes the files of `j` match the definition whose signature is `sig`:
 * the old side -> roll back (P.nkp-old back to P, P.nkp-new removed); the
 * new side -> roll forward (only in phase ready: swaps finished, P.nkp-old
 * removed).  Every file is checked before any is touched.  Then removes the
 * scratch directories and the journal.  -ESTALE when `sig` is neither side
 * (or the new side before phase ready), -EUCLEAN when a file's copies do not
 * allow it; the message names the VM and the fix, nothing is changed.  The
 * caller holds the VM's lock. */
int nkp_journal_reconcile(nkp_context *ctx, const NkpJournal *j, const char *sig,
                          NkpReconcile *ret_outcome);

/* Tests only: NKP_TEST_CRASH_AT=STEP[#N] makes the process die by SIGKILL
 * at the Nth (default first) time it passes `step`. */
void nkp_test_crash_point(const char *step);

/* ---- vm-clone.c: definitions copied with another VM's keysafe (issue 16) ---- */

/* 1 when the domain XML carries an nkp keysafe made for another VM UUID
 * than its own <uuid> (virt-clone --preserve-data / --skip-copy, a copy by
 * hand), *ret_keysafe_uuid (caller frees) the UUID it names; 0 otherwise,
 * an unreadable XML included (nkp_domain_parse says why).  Never fails. */
int nkp_domain_foreign_keysafe(const char *xml, size_t len, char **ret_keysafe_uuid);

/* nkpd's check of a defined domain: raises the vm-foreign-keysafe alarm
 * (subject: the VM's name; the message names the VM the keysafe belongs
 * to and the fix, nkpctl vm clone) and returns 1 when its keysafe is
 * another VM's; clears the alarm and returns 1 when the domain is gone,
 * 0 when neither (the alarm cleared).  1 means: enrol nothing, rewrite
 * nothing.  *ret_note (may be NULL) is set when the alarm is newly
 * raised.  libvirt's errors. */
int nkp_vm_watch_foreign_keysafe(nkp_context *ctx, NkpVirt *v, const char *name,
                                 char **ret_note);

/* ---- enrol.c: enrolling VMs (vm encrypt, vm create, nkpd) ---------------- */

enum nkp_vtpm_state {
        NKP_VTPM_STATE_NONE,      /* never started: no state file */
        NKP_VTPM_STATE_CLEAR,
        NKP_VTPM_STATE_ENCRYPTED,
        NKP_VTPM_STATE_UNKNOWN,   /* unreadable or not swtpm's format */
};
/* ctx->vtpm_state_dir/<uuid>/tpm2/tpm2-00.permall (tpm1.2/tpm-00.permall). */
char *nkp_vtpm_state_file(const nkp_context *ctx, const NkpDomain *d);
enum nkp_vtpm_state nkp_vtpm_state(const nkp_context *ctx, const NkpDomain *d);

typedef struct {
        char *target;
        char secret_uuid[NKP_UUID_STRING_LEN + 1];
        nkp_secret *value; /* hex(DEK) */
} NkpEnrolDisk;

typedef struct {
        char *xml;      /* the new definition (keysafe, <encryption>s) */
        char *provider; /* name of the provider that protects it */
        bool vtpm;
        char vtpm_secret_uuid[NKP_UUID_STRING_LEN + 1];
        nkp_secret *vtpm_value; /* hex(DEK) of the vTPM */
        GPtrArray *disks;       /* NkpEnrolDisk*, in the order asked */
} NkpEnrolment;
void nkp_enrolment_free(NkpEnrolment *en);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpEnrolment, nkp_enrolment_free)

/* Keys, keysafe and new XML for domain `d` (its XML `xml`): a DEK for the
 * vTPM when `vtpm`, one per disk target in `disk_targets` (char*, may be
 * NULL).  A VM that has a keysafe gets the new keys in it, under its own
 * provider (`p` ignored); otherwise a new keysafe for `p`, which must be
 * active.  Writes nothing. */
int nkp_enrol_build(nkp_context *ctx, const NkpDomain *d, const char *xml, const nkp_provider *p,
                    bool vtpm, GPtrArray *disk_targets, NkpEnrolment **ret);

/* The hook's rule for a plain emulator vTPM at start ([vtpm] policy):
 * 0 go; -EPERM (require) or -EAGAIN (enrol, no state yet: enrolment
 * pending) with the one-line message. */
int nkp_vtpm_start_check(nkp_context *ctx, const NkpDomain *d);

/* nkp_vm_auto_enrol (nkpd's automatic enrolment) is public: nkp.h. */

/* New disks follow the VM (issue 15; enrol.c says what "empty" means). */
enum nkp_disk_content {
        NKP_DISK_CONTENT_EMPTY = 0, /* no backing file, no extent present or holding data */
        NKP_DISK_CONTENT_DATA = 1,  /* holds data, or a backing file does */
        NKP_DISK_CONTENT_UNKNOWN = 2, /* nkp cannot tell: never treated as empty */
};
/* Why nkp does not manage `disk` ("cdrom", "raw file", "network disk",
 * "block device", …: a static string), NULL for a file-backed qcow2 disk. */
const char *nkp_disk_unmanaged_reason(const NkpDomainDisk *disk);
/* What the plain qcow2 file `path` holds (runs `qemu-img map -U`);
 * *ret_why (may be NULL; caller frees) says it in a few words. */
enum nkp_disk_content nkp_disk_content(const char *path, char **ret_why);
/* The keysafe of `d` holds a key for disk `target`. */
bool nkp_disk_in_keysafe(const NkpDomain *d, const char *target);
/* The subject of a vm-plain-disk alarm: "VM:target" (caller frees). */
char *nkp_disk_alarm_subject(const char *vm, const char *target);
/* The hook's rule for plain qcow2 disks at start: under [disks]
 * policy=require an nkp VM (keysafe) with one is refused (-EPERM, one line
 * naming the disk and the fix); else 0.  Reads the XML only. */
int nkp_disks_start_check(nkp_context *ctx, const NkpDomain *d);


/* ---- tools.c: running qemu-img and swtpm with keys on pipes ------------- */

/* One run of a tool: argv[0] is looked up in PATH; secrets[i] is readable
 * on the child's fd 3+i (a pipe filled before it starts), and `blob_fd`
 * (-1: none) is the child's next fd (3+n_secrets), for swtpm_ioctl's
 * state blob as /proc/self/fd/N.  stdout is discarded. */
typedef struct {
        const char *const *argv;
        nkp_secret *const *secrets;
        size_t n_secrets;
        int blob_fd;
} NkpToolRun;

/* Returns the exit status (0..255; 128 when killed), or a negative errno
 * with a message when the tool cannot run.  *ret_err (NULL: stderr is
 * discarded and not waited for, as for a daemonizing swtpm) gets its
 * stderr, to be g_free()d. */
typedef int (*NkpToolRunner)(const NkpToolRun *run, char **ret_err, void *userdata);

/* Tests only: runs `fn` instead of the tools (NULL: the real ones again). */
void nkp_tools_set_runner(NkpToolRunner fn, void *userdata);

/* Runs a tool through the current runner; *ret_err (may be NULL) gets the
 * first line of its stderr. */
int nkp_tool_run(const NkpToolRun *run, char **ret_err);

/* Converts the qcow2 file `path` into `path`.nkp-new: from LUKS under
 * `old_value` (NULL: plain) to LUKS under `new_value` (NULL: plain), then
 * compares the two images, fsyncs the copy and gives it the owner and mode
 * of `path`.  On failure the copy is removed (-EIO with qemu-img's line). */
int nkp_disk_convert(const char *path, const nkp_secret *old_value, const nkp_secret *new_value);

/* From the qcow2 header of `path`: its virtual size, its cluster size and
 * the backing file name as written (NULL when none; g_free).  -EMEDIUMTYPE
 * when `path` is not a qcow2 file, -errno when it cannot be read.  Reads
 * the file only (no qemu-img). */
int nkp_qcow2_geometry(const char *path, guint64 *ret_size, guint64 *ret_cluster,
                       char **ret_backing);

/* Converts the snapshot layer `path` (a qcow2 over `below` backing layers,
 * every one LUKS under `old_value`) into `path`.nkp-new: LUKS under
 * `new_value` (NULL: plain), over the same backing file name, the same
 * virtual and cluster size, holding exactly the clusters `path` allocates
 * (qemu-img convert -n -B; docs/rekey.md "Disks with snapshots"), compared
 * with it through the whole chain, fsynced, owner and mode of `path`.
 * Crash point "disk-copied" after the copy.  On failure the copy is removed
 * (-EIO with qemu-img's line; -EINVAL when the header names no backing). */
int nkp_layer_convert(const char *path, unsigned below, const nkp_secret *old_value,
                      const nkp_secret *new_value);

/* Writes the vTPM state of `d` (in ctx's [vtpm] state_dir), re-keyed from
 * `old_key` to `new_key` (either may be NULL: clear), into the scratch
 * directory (nkp_vtpm_scratch_dir) and checks it opens under the new key.
 * The decrypted state is only ever in memfds.  Touches nothing else;
 * -EBUSY when the vTPM has saved volatile state. */
int nkp_vtpm_convert(const nkp_context *ctx, const NkpDomain *d, const nkp_secret *old_key,
                     const nkp_secret *new_key);
/* Moves the converted state beside the state file as <file>.nkp-new
 * (journal.c's three names) and removes the scratch directory. */
int nkp_vtpm_stage(const nkp_context *ctx, const NkpDomain *d);
/* <state_dir>/<uuid>/.nkp-work (NKP_JOURNAL_SCRATCH_NAME). */
char *nkp_vtpm_scratch_dir(const nkp_context *ctx, const NkpDomain *d);

/* ---- vm-convert.c: the VM conversions and their recovery ------------------ */

/* The persistent definition of domain `name`, parsed (and its XML when
 * `ret_xml` is not NULL). */
int nkp_vm_definition(NkpVirt *v, const char *name, char **ret_xml, NkpDomain **ret);

/* The prepare step of a VM nkpd enrolled after its vTPM state was made in
 * clear under the host key (issue 15: virt-install's transient first
 * start): the state converted to the VM's own DEK, crash-safely (one
 * rename; the state's header says which side it is on).  0 nothing to do
 * (no keysafe vTPM key, state absent or already encrypted), 1 converted;
 * -EBUSY nkpctl holds the VM's lock, nkp_vm_unlock's and the conversion's
 * errors, each one line "VM 'x' cannot start: …". */
int nkp_vm_adopt_vtpm_state(nkp_context *ctx, const NkpDomain *d);

/* The command words of a journal op: "rekey-deep" -> "vm rekey --deep". */
const char *nkp_vm_op_words(const char *op);

/* The one recovery, with the VM's lock held (nkp_vm_lock): loads the
 * journal, compares the signature of the definition `d` with its two
 * sides and reconciles the files to it (journal.c).  *ret = NONE when no
 * journal, else ROLLED_BACK (a note is logged) or FINISHED; *ret_op (may
 * be NULL) = the journal's op.  A damaged journal is said as "VM 'x'
 * cannot start: …" when `at_start` (the hook). */
int nkp_vm_recover_locked(nkp_context *ctx, const NkpDomain *d, bool at_start,
                          enum nkp_vm_recovery *ret, char **ret_op);

/* How every command that changes a VM's keys or files begins (vm encrypt,
 * decrypt, rekey, rekey --deep): takes the VM's lock with the commands'
 * rule (nkp_vm_lock, waiting COMMAND_LOCK_WAIT_MS; -EBUSY with a message
 * naming the fix), reconciles a conversion a crash interrupted
 * (nkp_vm_recover_locked; notes are logged, "finished … first" when the
 * finished op is not `op`), then reads the persistent definition again
 * under the lock.  `d` is the definition read before (its name and UUID).
 * On success the lock stays held in *ret_lock (release it with
 * nkp_journal_unlock), *ret (and *ret_xml when not NULL) is the definition
 * as it is now, and *ret_finished (may be NULL) the journal op that was
 * finished, or NULL.  On error nothing is held. */
int nkp_vm_lock_recovered(nkp_context *ctx, NkpVirt *v, const NkpDomain *d, const char *op,
                          int *ret_lock, char **ret_finished, char **ret_xml, NkpDomain **ret);

/* ---- vm-snapshot.c: snapshot layers of nkp disks ------------------------ */

/* One layer of a disk's chain as the domain XML names it. */
typedef struct {
        char *target;      /* "vda" */
        char *path;        /* the layer's file (or block device) */
        char *format;      /* "qcow2", NULL when the XML says none */
        unsigned depth;    /* 0 the active layer, 1 its backing, … */
        bool encrypted;    /* an <encryption> covers this layer */
        char *secret_uuid; /* its <secret uuid>, NULL when none */
} NkpDiskLayer;
void nkp_disk_layer_free(gpointer p);

/* The layers of disk `target` in a domain XML: <source> (with the disk's
 * <encryption> or one inside <source>), then each <backingStore>'s
 * <source>.  An empty array when there is no such disk.  -EBADMSG when
 * the XML cannot be read.  Pure (the fuzzed parser checked the input). */
int nkp_domain_disk_layers(const char *xml, size_t len, const char *target, GPtrArray **ret);

/* nkp_domain_disk_layers, completed from the qcow2 headers where the XML
 * stops short (an offline snapshot made behind nkp's back): a LUKS layer
 * found so gets `secret_uuid`. */
int nkp_disk_chain_layers(const char *xml, size_t len, const char *target,
                          const char *secret_uuid, GPtrArray **ret);

/* `xml` (not changed) with disk `target`'s chain written as `layers` says
 * (active layer first): each layer below as a <backingStore>, with an
 * <encryption engine='qemu'> under its secret_uuid when `encrypted`, ended
 * by an empty <backingStore/>; the disk-level <encryption> kept.  New
 * string in *ret; -ENOENT when there is no such disk. */
int nkp_domain_set_disk_chain(const char *xml, const char *target, GPtrArray *layers, char **ret);

/* The plain layers (NkpDiskLayer*, new array) of every disk the keysafe
 * of `d` holds a key for, from `xml` (the text `d` was parsed from). */
int nkp_vm_disk_chain_plain_layers(const NkpDomain *d, const char *xml, size_t len,
                                   GPtrArray **ret);

/* The hook's rule at start: 0 when no nkp disk has a plain layer, or
 * [disks] allow_plain_layers; else -EPERM with the one line naming the
 * layer and the fix, and a vm-plain-layer alarm. */
int nkp_vm_plain_layer_check(nkp_context *ctx, const NkpDomain *d, const char *xml, size_t len);

/* qemu-img --image-opts for the chain `layers` (nkp_domain_disk_layers)
 * from layers[from] on, whose top file is `file`: the key secret id "sk"
 * on every encrypted layer below the top, and on the top when `top_key`. */
char *nkp_disk_chain_opts(GPtrArray *layers, guint from, const char *file, bool top_key);

/* vm status: "TARGET PATH" (g_free) of each plain layer of `d`'s nkp disks
 * into `out`, from the live definition when the VM runs (a snapshot of a
 * running VM) and from `xml` (the persistent one); the vm-plain-layer
 * alarm as nkp_vm_plain_layer_alarm.  Never fails. */
void nkp_vm_status_add_plain_layers(nkp_context *ctx, NkpVirt *v, const NkpDomain *d,
                                    const char *xml, GPtrArray *out);

/* The vm-plain-layer alarm (subject: the VM's name) of `d`, from its
 * persistent definition `xml` and its running one `live` (NULL when shut
 * off): raised naming the first plain layer of an nkp disk's chain and both
 * fixes (not raised again when open with the same message; in the running
 * VM: "nkpd sealed it" naming the encrypted active layer over it, or "it is
 * NOT sealed" when it is the active layer and [disks] seal_plain_layers is
 * on: nkp_vm_seal_plain_tops), cleared when
 * neither XML has one.  Raised whatever [disks] allow_plain_layers says:
 * that key only lets such a VM start, the guest's data is in clear all the
 * same (the message then does not announce a refusal).  Each plain layer
 * appended to `out` (may be NULL) as "TARGET PATH" (g_free), each path
 * once.  Returns how many; -EBADMSG when an XML cannot be read (nothing
 * raised or cleared). */
int nkp_vm_plain_layer_alarm(nkp_context *ctx, const NkpDomain *d, const char *xml,
                             const char *live, GPtrArray *out);

/* nkpd's look at the disk chains of domain `name` (issue 16), after libvirt
 * rewrote its persistent or its running definition (a disk-only snapshot
 * made behind nkp's back): nkp_vm_plain_layer_alarm on both.  Nothing for
 * a domain gone, not nkp's, or whose lock nkpctl holds (or left a
 * journal).  Returns how many plain layers, `ret_note` (may be NULL) set
 * when the alarm was not open before; errors of libvirt and -EBADMSG, naming the VM. */
int nkp_vm_watch_plain_layers(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note);
/* The seal decision (pure): the plain active layers (NkpDiskLayer*, depth
 * 0, new array) of the nkp disks of `d` in its running definition `live`.
 * -EBADMSG when `live` cannot be read. */
int nkp_vm_plain_tops(const NkpDomain *d, const char *live, size_t len, GPtrArray **ret);
/* The name of the overlay that seals plain layer `plain`: PLAIN.nkp-seal,
 * or PLAIN.nkp-seal-N (2..100) when taken (any file, even a dangling
 * link, counts as taken); NULL when all are.  g_free it. */
char *nkp_seal_overlay_path(const char *plain);
/* nkpd, at each rewrite of an nkp VM's definitions ([disks]
 * seal_plain_layers, default true): each plain ACTIVE layer of a running
 * nkp VM's disk (a `virsh snapshot-create-as --disk-only` made behind
 * nkp's back) is sealed under a new LUKS overlay under the disk's own
 * secret (nkp_seal_overlay_path; made as FILE.nkp-new, in place before
 * libvirt gets it), handed to libvirt live like nkp_vm_snapshot's
 * (DISK_ONLY | REUSE_EXT | ATOMIC | NO_METADATA: no entry in
 * snapshot-list), so the guest's writes from then on are encrypted; what
 * it wrote before stays in clear in the plain layer (vm-plain-layer alarm;
 * nkpctl vm encrypt-layer with the VM shut off).  Never waits for the VM's
 * lock.  Returns how many layers were sealed (0: none to seal, the VM does
 * not run, is gone or is not nkp's, or sealing is off), *ret_note (may be
 * NULL; g_free) the log line "VM 'x': disk vda: plain layer 'F' sealed
 * under 'G'" ("; "-joined when several).  Errors, each saying the layer is
 * NOT sealed and why, no overlay file left: -EBUSY an nkpctl command holds
 * the VM's lock or left a journal; nkp_vm_unlock's (provider locked, …);
 * -EIO qemu-img or libvirt refused; -EEXIST every overlay name is taken. */
int nkp_vm_seal_plain_tops(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note);
/* nkpd: snapshot='no' on every LUKS disk of the persistent definition of
 * nkp VM `name` that lacks it (nkp_domain_edit_refuse_snapshots), the
 * definition written again.  0 nothing to do (not an nkp VM, transient,
 * gone, or an nkpctl command holds its lock: looked at again later), 1
 * done (*ret_note, if given, says so: g_free it), a negative errno. */
int nkp_vm_refuse_snapshots(nkp_context *ctx, NkpVirt *v, const char *name, char **ret_note);

/* An nkpctl vm encrypt/decrypt/rekey --deep/snapshot/encrypt-layer of `d`
 * is running (its lock is held) or was interrupted (a journal is left):
 * see journal.c; enrol.c. */
bool nkp_vm_conversion_pending(nkp_context *ctx, const NkpDomain *d);

/* 1 when `path` is a qcow2 whose header says LUKS, 0 another qcow2,
 * -EMEDIUMTYPE not qcow2, -errno unreadable (no message). */
int nkp_qcow2_is_luks(const char *path);

/* vm-snapshot.c's pieces that vm-revert.c reuses:
 * nkp_luks_overlay_create: `path`, a LUKS qcow2 of `size` bytes over
 *   `backing` (not opened), passphrase `value` on a pipe (vm snapshot's
 *   overlays); -EIO with qemu-img's message, nothing left at `path`.
 * nkp_disk_chain_from_headers: appends to `layers` what the last one's
 *   qcow2 header names below it (LUKS ones under `secret_uuid`).
 * (nkp_disk_chain_layers and nkp_domain_set_disk_chain above: the chain
 *   at a snapshot, and the reverted chain written.)
 * nkp_vm_disk_value / nkp_vm_disk_secret_uuid: disk `target`'s value
 *   among nkp_vm_unlock's secrets / its secret UUID in d's keysafe (NULL
 *   when none; borrowed).
 * nkp_overlay_path: virsh's overlay name, "DIR/vm1.qcow2" -> "DIR/vm1.NAME"
 *   (g_free). */
int nkp_luks_overlay_create(const char *path, const char *backing, const char *backing_fmt,
                            guint64 size, const nkp_secret *value);
void nkp_disk_chain_from_headers(GPtrArray *layers, const char *secret_uuid);
const nkp_secret *nkp_vm_disk_value(GPtrArray *secrets, const char *target);
const char *nkp_vm_disk_secret_uuid(const NkpDomain *d, const char *target);
char *nkp_overlay_path(const char *top, const char *name);

/* ---- vm-revert.c: back to a disk-only snapshot (issue 16) ----------------- */

/* What nkp reads of a snapshot's XML (libvirt's <domainsnapshot>). */
typedef struct {
        char *name;
        char *state;        /* <state>: "shutoff", "disk-snapshot", …; NULL none */
        bool has_memory;    /* <memory snapshot=…> other than 'no' */
        char *memory_file;  /* <memory snapshot='external' file=…>; NULL none */
        int64_t created;    /* <creationTime>, s since the epoch; 0 none */
        unsigned n_internal; /* <disk snapshot=…> neither 'external' nor 'no' */
        char **external;    /* the targets of its external disks (NULL-ended) */
        char **overlays;    /* external[i]'s <source file>, the overlay it made
                             * ("" when none); as many as external */
        char *domain_xml;   /* its <domain>: the disks of that moment; NULL none */
} NkpRevertSnapshot;
void nkp_revert_snapshot_free(gpointer p);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpRevertSnapshot, nkp_revert_snapshot_free)

/* One disk of a revert. */
typedef struct {
        char *target;
        char *secret_uuid;      /* the disk's secret (keysafe): every layer's */
        GPtrArray *at_snapshot; /* NkpDiskLayer*: its chain at the snapshot, top first */
        GPtrArray *now;         /* NkpDiskLayer*: its chain now */
        char *overlay;          /* the new active layer: DIR/vm1.SNAP-rN */
} NkpRevertDisk;
void nkp_revert_disk_free(gpointer p);

/* *ret (nkp_revert_snapshot_free) = what snapshot `name`'s XML says;
 * -EBADMSG when it cannot be read.  Pure. */
int nkp_revert_snapshot_parse(const char *name, const char *xml, NkpRevertSnapshot **ret);

/* The revert of VM `d` (its definition `xml`) to snapshot `s`, checked:
 * *ret = NkpRevertDisk* per external disk of `s` (overlay names free on
 * disk now).  Nothing is written.  Errors, one line each: -EINVAL `s` is
 * not disk-only/external or names a disk without an nkp key; -ENOENT a
 * layer file of the chain at `s` is missing, or the disk is gone; -EPERM a
 * layer at `s` is not LUKS; -ESTALE the layer at `s` is the disk's active
 * layer now (written since); -EBADMSG unreadable XML. */
int nkp_revert_plan(const NkpDomain *d, const char *xml, const NkpRevertSnapshot *s,
                    GPtrArray **ret);

/* rd->overlay made: a LUKS qcow2 over the layer at the snapshot, its size,
 * under `value`; made as OVERLAY.nkp-new, fsynced, renamed (crash points
 * revert-overlay-made, revert-overlay-renamed).  -EIO qemu-img failed
 * (nothing left). */
int nkp_revert_make_overlay(const NkpRevertDisk *rd, const nkp_secret *value);

/* *ret (g_free) = `xml` with each disk of `plan` on its new overlay, the
 * chain at the snapshot below it (<backingStore>, engine='qemu'). */
int nkp_revert_definition(const char *xml, GPtrArray *plan, char **ret);

/* The layers of each disk's chain now that the revert leaves behind, as
 * "TARGET PATH" (g_free) into `unneeded`, or into `needed` when the chain
 * of one of `snapshots` (NkpRevertSnapshot*) holds it. */
void nkp_revert_abandoned(GPtrArray *plan, GPtrArray *snapshots, GPtrArray *unneeded,
                          GPtrArray *needed);

/* ---- snapshots under deep rekey and decrypt (issue 16, vm-revert.c) -------- */
/* *ret (NkpRevertSnapshot*, new array, empty when none) = every snapshot of
 * VM `name`, parsed; -ENOENT no such domain, -EIO libvirt failed, -EBADMSG
 * a snapshot's XML unreadable (each with a message). */
int nkp_vm_snapshots(NkpVirt *v, const char *name, GPtrArray **ret);

/* *ret (NkpDiskLayer*, new array; empty when `s` has no <domain> or no
 * such disk) = the chain of disk `target` at snapshot `s`, active layer
 * first, completed from the qcow2 headers (LUKS layers found so get
 * `secret_uuid`): as vm revert reads it.  -EBADMSG unreadable XML. */
int nkp_revert_chain_at(const NkpRevertSnapshot *s, const char *target,
                        const char *secret_uuid, GPtrArray **ret);

/* Every snapshot of VM `name` whose XML names one of the secret UUIDs
 * `from[i]` redefined (REDEFINE, DISK_ONLY when its state says so, CURRENT
 * when it is libvirt's current one) with `to[i]` instead (NULL-ended
 * parallel arrays).  Returns how many were redefined; a snapshot libvirt
 * refuses is logged as a warning and skipped (the files do not depend on
 * it: vm revert opens every layer with the disk's current secret). */
int nkp_vm_snapshots_rename_secrets(NkpVirt *v, const char *name, const char *const *from,
                                    const char *const *to);
/* ---- vm-backup.c: encrypted backups and block copies (issue 16) ---------- */
/* The manifest of a backup directory (its format: vm-backup.c, docs/backup.md).
 * targets[i] (a disk's target dev) and secrets[i] (its LUKS secret UUID) for
 * i < n_disks; checkpoints[l] for each level l < n_levels ("-": none). */
typedef struct {
        char *vm;
        char *uuid;
        char *key_id;
        size_t n_disks;
        char **targets;
        char **secrets;
        size_t n_levels;
        char **checkpoints;
        bool has_mac;       /* the mac= line: IV | GCM tag (vm-backup.c) */
        uint8_t mac[12 + 16];
} NkpBackupManifest;
void nkp_backup_manifest_free(NkpBackupManifest *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NkpBackupManifest, nkp_backup_manifest_free)
/* Parses a manifest (outside input: strict, fuzzed by tests/fuzz/fuzz-backup-manifest.c).
 * -EBADMSG anything but the exact format, -EFBIG over 64 KiB.  Pure. */
int nkp_backup_manifest_parse(const char *text, size_t len, NkpBackupManifest **ret);
/* The text of `m` (g_free it); parses back to the same manifest. */
char *nkp_backup_manifest_format(const NkpBackupManifest *m);

/* nkp's own copy jobs, so that nkpd does not alarm on them: nkpctl marks
 * the job (`what` "backup" or "copy") of VM `vm_uuid` when it starts and
 * again when it ended (ROOT/run/nkp/own-jobs); nkpd asks whether an event
 * of that kind at real time `at` (seconds) is claimed by such a mark (a
 * claim removes the mark: one job, one event). */
int nkp_own_job_mark(nkp_context *ctx, const char *vm_uuid, const char *what, bool ended);
bool nkp_own_job_claims(nkp_context *ctx, const char *vm_uuid, const char *what, int64_t at);

/* nkpd's watch on copies made behind nkp's back (vm-backup.c says what
 * libvirt 9.0 announces): events are queued from libvirt's callbacks
 * (nkp_copy_watch_event: `what` "backup", "copy" with `disk`, "save"),
 * looked at after the loop pass (nkp_copy_watch_process), and running nkp
 * VMs' jobs are looked at every 0.5 s (nkp_copy_watch_poll: backup
 * targets, save and dump files, the dump alarm).  Alarms: vm-clear-copy,
 * vm-clear-save, subject the VM's name. */
typedef struct NkpCopyWatch NkpCopyWatch;
NkpCopyWatch *nkp_copy_watch_new(void);
void nkp_copy_watch_free(NkpCopyWatch *w);
void nkp_copy_watch_event(NkpCopyWatch *w, const char *what, const char *name, const char *uuid,
                          const char *disk);
/* Running VM `name`'s status XML (ROOT/run/libvirt/qemu/NAME.xml) was
 * written: its block copies' destinations are noted, so a copy that ends
 * before nkpd asks libvirt (virsh blockcopy --wait --finish on a small
 * disk) is still alarmed with its file; a dump job in it is noted (alarmed
 * at the next look even if it has ended).  True when the status XML shows
 * a dump, save or backup job: look at the jobs now (nkp_copy_watch_poll). */
bool nkp_copy_watch_status_written(nkp_context *ctx, NkpCopyWatch *w, const char *name);
/* libvirt writes the status XML again when a job ends, after a new
 * snapshot's metadata: so after each status write, nkp_copy_watch_process
 * reads the current snapshot of that nkp VM, and one with its memory in a
 * file outside the protected directories is alarmed (vm-clear-save), even
 * when the job was too short for any look to see it.  Once per snapshot,
 * across restarts: the alarmed ones are kept in ROOT/var/lib/nkp/
 * memory-snapshots (vm-backup.c says its format). */
/* Looks every NKP_COPY_WATCH_IDLE_MS (NKP_TEST_COPY_WATCH_IDLE_MS in tests:
 * proves the status-XML path alone finds a dump), and at once when a
 * status XML shows a job; true while a watched job runs: look again in
 * NKP_COPY_WATCH_BUSY_MS. */
#define NKP_COPY_WATCH_IDLE_MS 500
#define NKP_COPY_WATCH_BUSY_MS 200
bool nkp_copy_watch_poll(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w);
void nkp_copy_watch_process(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w);
/* nkpd's start scan (at each connection to libvirt): every memory snapshot
 * of every nkp VM (persistent or running) whose file still exists outside
 * the protected directories and is not in the record is alarmed, one
 * vm-clear-save per VM, and recorded: those made while nkpd was stopped,
 * and those older than nkp on this host.  Lines of snapshots gone are
 * pruned from the record.  Failures are logged; nothing is returned. */
void nkp_copy_watch_start_scan(nkp_context *ctx, NkpVirt *v, NkpCopyWatch *w);

#endif /* NKP_PRIVATE_H */
