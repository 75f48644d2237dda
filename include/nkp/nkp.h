/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libnkp — the public API of nkp, a native key provider for QEMU/libvirt.
 *
 * Conventions (every function below follows them unless it says otherwise):
 *  - Functions that can fail return 0 on success or a negative errno.  On
 *    failure nkp_error_message() returns one readable sentence that says what
 *    failed and, where there is one, the fix; `ret` outputs are set only on
 *    success.
 *  - Objects are opaque, made by a *_new/_create/_get function and released
 *    by a *_free that accepts NULL.  Strings returned as `const char *` are
 *    owned by the object they came from and live as long as it does.
 *    Strings and arrays returned through `char **` are owned by the caller
 *    (free with free()).
 *  - Key bytes only ever travel inside an nkp_secret, which is locked in
 *    memory where possible and wiped when freed.
 *  - The library never prints.  It reports through the log function set by
 *    nkp_set_log_func(); the default drops everything.
 *  - Thread safety: distinct objects may be used from distinct threads; one
 *    object must not be used from two threads at once.
 */
#ifndef NKP_NKP_H
#define NKP_NKP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NKP_KDK_SIZE 32       /* key derivation key, one per provider */
#define NKP_KEK_SIZE 32       /* key encryption key, one per VM, never stored */
#define NKP_DEK_SIZE 32       /* data encryption key, one per protected object */
#define NKP_KEK_SALT_SIZE 32  /* random per-VM salt of the KEK derivation */
#define NKP_MAX_PROVIDERS 32  /* per host */
#define NKP_NAME_MAX 64       /* provider name: [A-Za-z0-9._-]{1,64} */
#define NKP_UUID_STRING_LEN 36

/* ------------------------------------------------------------------------ */
/* Errors and logging                                                        */

/* The text of the last failure in the calling thread ("" if none).  Owned by
 * the library; valid until the next libnkp call in this thread. */
const char *nkp_error_message(void);

enum nkp_log_level {
        NKP_LOG_ERROR = 3,
        NKP_LOG_WARNING = 4,
        NKP_LOG_INFO = 6,
        NKP_LOG_DEBUG = 7,
};

typedef void (*nkp_log_func)(enum nkp_log_level level, const char *message, void *userdata);

/* Install the process-wide log function (NULL restores the default, which
 * drops every message).  Messages never contain key bytes or passwords. */
void nkp_set_log_func(nkp_log_func func, void *userdata);

/* ------------------------------------------------------------------------ */
/* Secret bytes                                                              */

typedef struct nkp_secret nkp_secret;

/* A zero-filled secret of `len` bytes (1..65536), mlock()ed where the
 * process may lock memory.  -EINVAL for a bad length, -ENOMEM. */
int nkp_secret_new(size_t len, nkp_secret **ret);

/* A secret of `len` bytes from the kernel's CSPRNG. */
int nkp_secret_new_random(size_t len, nkp_secret **ret);

/* A secret holding a copy of `data`.  The caller still owns and must wipe
 * `data`. */
int nkp_secret_new_copy(const void *data, size_t len, nkp_secret **ret);

const uint8_t *nkp_secret_data(const nkp_secret *s);
uint8_t *nkp_secret_data_mut(nkp_secret *s);
size_t nkp_secret_len(const nkp_secret *s);

/* Constant-time comparison of two secrets (lengths compared too). */
bool nkp_secret_equal(const nkp_secret *a, const nkp_secret *b);

/* Wipes, unlocks and frees.  Accepts NULL. */
void nkp_secret_free(nkp_secret *s);

/* Reads a password from the file at `path`: the first line, without its
 * line ending.  An empty password is refused (-EINVAL), and so is a path
 * that is not a regular file, a terminal or an anonymous pipe (a named
 * FIFO, a device, a socket, a directory: -EINVAL at once, never blocking).
 * The buffers used to read are wiped. */
int nkp_password_read_file(const char *path, nkp_secret **ret);

/* Same from an open file descriptor, which stays open. */
int nkp_password_read_fd(int fd, nkp_secret **ret);

/* Explicit wipe of caller memory that the compiler may not drop. */
void nkp_wipe(void *p, size_t len);

/* ------------------------------------------------------------------------ */
/* Context: where nkp's files are                                            */

typedef struct nkp_context nkp_context;

/* A context for the host tree under `root` ("/" when NULL): the store in
 * ROOT/var/lib/nkp, the config in ROOT/etc/nkp/nkp.conf, the run state in
 * ROOT/run/nkp.  Reads the config (a missing file means the defaults);
 * touches nothing else.  -EINVAL for a malformed config. */
int nkp_context_new(const char *root, nkp_context **ret);
void nkp_context_free(nkp_context *ctx);

/* The absolute root of the context. */
const char *nkp_context_root(const nkp_context *ctx);

/* The TCTI from the config ("none" when the host has no TPM to use). */
const char *nkp_context_tcti(const nkp_context *ctx);

/* Progress of the long VM operations (nkp_vm_encrypt, nkp_vm_decrypt,
 * nkp_vm_rekey_deep: one step per vTPM state and per disk copied, then one
 * for the switch to the new definition; nkp_vm_rekey_all: one step per
 * domain).  `op` is "encrypt", "decrypt", "rekey-deep" or "rekey"; `vm`
 * the domain (NULL in nkp_vm_rekey_all's last call); `step` what starts
 * now: "vtpm", a disk target such as "vda", "definition", "rekey" (one
 * domain of nkp_vm_rekey_all), or "done" when done == total.  `done` steps
 * of `total` are finished (0 <= done <= total).  Called in the caller's
 * thread, from inside the operation; the strings are valid during the call
 * only.  A function that takes long slows the operation down, nothing
 * else.  A failed operation stops reporting where it failed. */
typedef void (*nkp_progress_func)(const char *op, const char *vm, const char *step,
                                  unsigned done, unsigned total, void *userdata);

/* Installs `func` (NULL: none, the default) for the operations run with
 * `ctx`.  `userdata` is passed back as is; the caller keeps it alive while
 * `ctx` runs operations. */
void nkp_context_set_progress(nkp_context *ctx, nkp_progress_func func, void *userdata);

/* ------------------------------------------------------------------------ */
/* libvirt connection                                                        */

typedef struct nkp_virt nkp_virt;

/* Opens `uri` (NULL: libvirt's default) read-write.  libvirt has no per-call
 * timeout, so when `deadline_seconds` is not 0 every libvirt call made
 * through the connection (the connect included) runs under a process alarm
 * (SIGALRM): a call that does not return in time makes the process print
 * one line on stderr ("PROG: libvirt did not answer within N seconds; …")
 * and exit 1.  Only for programs that own SIGALRM; 0 leaves calls
 * unbounded.  -ECONNREFUSED (with the fix) when libvirt cannot be reached.
 * libnkp loads libvirt.so.0 here, on the first call (not at program
 * start): -ELIBACC (naming the package) when it cannot be loaded. */
int nkp_virt_open(const char *uri, unsigned deadline_seconds, nkp_virt **ret);

/* Closes the connection.  Accepts NULL. */
void nkp_virt_close(nkp_virt *v);

/* ------------------------------------------------------------------------ */
/* VM operations                                                             */
/*
 * What nkpctl's `vm` commands and the hook do, on a domain of the libvirt
 * connection `v` (see nkp_virt_open).  The conversions (encrypt, decrypt,
 * deep rekey) change the VM's files and definition under the crash-safe
 * conversion protocol (plugin/lib/vm-convert.c, docs/crash-safety.md): a
 * kill -9 at any instant leaves a VM that starts, under the old keys or the
 * new, and the next operation (or the hook at the next start) finishes or
 * rolls back what was interrupted.  Each holds the VM's lock from start to
 * end; the lock is waited for up to 2 seconds (the hook and `vm status`
 * hold it for milliseconds), then refused with -EBUSY.
 *
 * Notes for the user go to the log function at NKP_LOG_WARNING, each
 * beginning with "note: " (e.g. "note: VM 'x': rolled back the interrupted
 * 'vm encrypt'; its files are as they were before it.").
 *
 * The vTPM state is looked for in the context's [vtpm] state_dir (nkp.conf;
 * default /var/lib/libvirt/swtpm).  Decrypted vTPM state is only ever in
 * memory (memfd), never in a file on disk.  qemu-img and swtpm get their
 * keys on pipes. */

/* What a conversion did.  Free with nkp_vm_result_free (accepts NULL). */
typedef struct nkp_vm_result nkp_vm_result;

const char *nkp_vm_result_name(const nkp_vm_result *r);
/* The provider that protects the VM now; NULL after a decrypt. */
const char *nkp_vm_result_provider(const nkp_vm_result *r);
/* The emulated vTPM is (was, for decrypt) protected by nkp. */
bool nkp_vm_result_vtpm(const nkp_vm_result *r);
/* The disk targets ("vda") converted, in document order. */
size_t nkp_vm_result_n_disks(const nkp_vm_result *r);
const char *nkp_vm_result_disk(const nkp_vm_result *r, size_t i);
/* Not NULL ("vm encrypt", "vm decrypt", "vm rekey --deep") when the
 * operation found an interrupted run of itself and finished it: then
 * nothing else was done, and the other accessors say nothing. */
const char *nkp_vm_result_finished(const nkp_vm_result *r);
void nkp_vm_result_free(nkp_vm_result *r);

/* Encrypts the shut-off VM `domain`: its emulated vTPM (enrolled by the
 * definition alone when it has no state yet, converted when it has clear
 * state) and its plain file-backed qcow2 disks (`disks`: NULL or "all", or
 * a comma-separated list of targets "vda,vdb"), under provider `provider`
 * (NULL: the host's default), which must be active.  *ret on success.
 * Errors (nothing changed, or rolled back; the message says which):
 * -ENOENT no such domain, provider or disk, or nothing to encrypt;
 * -EEXIST already encrypted (by nkp or a disk by another key); -EOPNOTSUPP a
 * named disk is not a file-backed qcow2; -EPERM the provider was never
 * backed up; -EBUSY the VM runs, has a managed save image, volatile vTPM
 * state, or another operation holds its lock; -EUCLEAN vTPM state that nkp
 * cannot take over; -ENOSPC not enough space for the copies; -EIO qemu-img
 * or swtpm failed; -ESTALE an interrupted operation matches neither
 * definition; errors of libvirt (nkp_virt_open) pass through. */
int nkp_vm_encrypt(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                   const char *disks, nkp_vm_result **ret);

/* Decrypts the shut-off VM `domain` (every object its keysafe protects back
 * to plain, the keysafe removed, its libvirt secrets undefined, its
 * vm-locked alarm cleared).  A disk with snapshots is decrypted layer by
 * layer, each file in place, its backing link kept (docs/rekey.md "Disks
 * with snapshots").  Errors as nkp_vm_encrypt, and -ENOENT not encrypted by
 * nkp, -ENOKEY / -EKEYREJECTED its provider is not here (or is another key),
 * -EBADMSG a wrapped key does not open, -EOPNOTSUPP a disk's chain has a
 * layer that is not LUKS qcow2 under the disk's secret (the message names
 * it and the fix). */
int nkp_vm_decrypt(nkp_context *ctx, nkp_virt *v, const char *domain, nkp_vm_result **ret);

/* `nkpctl vm create FILE.xml`: a new VM whose domain XML `xml` (with a
 * <uuid>) has a plain emulated vTPM is enrolled before libvirt sees it (a
 * DEK, the keysafe, <encryption secret>), so its vTPM state is encrypted
 * from its first byte whatever [vtpm] policy says; then defined
 * (default), defined and started (NKP_VM_CREATE_START), or started as a
 * transient domain (NKP_VM_CREATE_TRANSIENT, nothing defined).  `provider`
 * NULL: the default.  *ret names the VM and the provider.  Errors (nothing
 * changed): -EINVAL no <uuid>/<name> or unknown flags, -EEXIST a keysafe
 * already, a VM of that name defined or vTPM state for that UUID, -ENOENT
 * no plain emulated vTPM or no default provider, -EPERM the provider was
 * never backed up; libvirt's errors (a define that succeeded stays when
 * only the start fails: the message says so). */
#define NKP_VM_CREATE_START 1u
#define NKP_VM_CREATE_TRANSIENT 2u
int nkp_vm_create(nkp_context *ctx, nkp_virt *v, const char *xml, const char *provider,
                  unsigned flags, nkp_vm_result **ret);

/* Deep rekey of the shut-off VM `domain`: new DEKs for every object under a
 * new keysafe and new secret UUIDs, the vTPM state and every disk
 * re-encrypted (every layer of a disk with snapshots, as nkp_vm_decrypt),
 * under `provider` (NULL: the VM's own).  Errors as
 * nkp_vm_decrypt; -ENOKEY also when the VM's own provider is not in the
 * store; -EUCLEAN a key in the keysafe for an object the VM no longer has. */
int nkp_vm_rekey_deep(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                      nkp_vm_result **ret);

/* Snapshots and clones of nkp VMs (issue 16, docs/snapshots-clones.md). */

/* A disk-only, external snapshot `name` of VM `domain` (running: atomic,
 * live; shut off: offline): for every disk its keysafe holds a key for, a
 * LUKS qcow2 overlay beside the active layer ("vm1.qcow2" -> "vm1.NAME"),
 * under the disk's own secret (one secret per disk chain), made by nkp and
 * handed to libvirt (REUSE_EXT); other disks are left out of it.
 * *ret_files (may be NULL; g_strfreev) gets "TARGET PATH" per overlay.
 * Errors (nothing changed): -EINVAL a bad name or not an nkp VM, -EEXIST an
 * overlay file exists, -EPERM a plain layer is in a chain already, -EBUSY
 * another operation holds the VM's lock, -ENOKEY its provider is not here,
 * -EIO qemu-img or libvirt refused. */
int nkp_vm_snapshot(nkp_context *ctx, nkp_virt *v, const char *domain, const char *name,
                    char ***ret_files);

/* Encrypts the plain layer `file` of an nkp disk of the shut-off VM
 * `domain` in place (LUKS under the disk's secret, its backing reference
 * kept) and adds its <encryption> to the definition.  Crash-safe: run it
 * again after a kill.  Errors (nothing changed): -ENOENT `file` is not a
 * plain layer of the VM, -EINVAL the base of a disk or not an nkp VM,
 * -EBUSY the VM runs or its lock is held, -EIO qemu-img failed. */
int nkp_vm_encrypt_layer(nkp_context *ctx, nkp_virt *v, const char *domain, const char *file);

/* What nkp_vm_revert did.  Free with nkp_revert_result_free (accepts NULL). */
typedef struct nkp_revert_result nkp_revert_result;
enum nkp_revert_item {
        NKP_REVERT_LAYER = 0,     /* a disk's new active layer (LUKS) */
        NKP_REVERT_ABANDONED = 1, /* a layer left behind that no snapshot needs: delete it */
        NKP_REVERT_KEPT = 2,      /* a layer left behind that another snapshot needs */
        NKP_REVERT_DELETED = 3,   /* a layer left behind, deleted (DELETE_ABANDONED) */
        NKP_REVERT_N_ITEMS = 4,
};
/* How many items of `kind`; item i as "TARGET PATH" (borrowed; NULL past
 * the end). */
size_t nkp_revert_result_count(const nkp_revert_result *r, enum nkp_revert_item kind);
const char *nkp_revert_result_item(const nkp_revert_result *r, enum nkp_revert_item kind,
                                   size_t i);
/* NULL when libvirt's current snapshot is the one reverted to; else why
 * libvirt refused to mark it (the disks are reverted all the same). */
const char *nkp_revert_result_current_error(const nkp_revert_result *r);
/* true when the VM has a vTPM: a disk-only snapshot does not hold its
 * state, which stays as it is now (as with libvirt). */
bool nkp_revert_result_vtpm(const nkp_revert_result *r);
void nkp_revert_result_free(nkp_revert_result *r);

#define NKP_VM_REVERT_DELETE_ABANDONED 1u /* delete the layers left behind that no snapshot needs */
/* Reverts the shut-off nkp VM `domain` to its disk-only snapshot
 * `snapshot` (libvirt 9.0 cannot revert external snapshots): each disk of
 * the snapshot gets a new LUKS overlay (its own secret) over the layer
 * that was active at the snapshot, which is not modified (revert again at
 * will); the definition is switched to it last (crash-safe: a kill leaves
 * the old chain or the new one); the snapshot is made libvirt's current
 * one when libvirt accepts it.  Layers of the branch left behind are kept
 * and listed (deleted with NKP_VM_REVERT_DELETE_ABANDONED when no snapshot
 * needs them).  *ret (may be NULL) says what was done.
 * Errors (nothing changed): -EINVAL not an nkp VM, a snapshot that is not
 * disk-only external or has a disk without an nkp key; -ENOENT no such
 * snapshot, a layer file of it missing; -EPERM a layer at the snapshot is
 * not encrypted; -ESTALE the layer at the snapshot was written since (it
 * is the active layer again); -EBUSY the VM runs or its lock is held;
 * -ENOKEY its provider is not here; -EIO qemu-img or libvirt failed. */
int nkp_vm_revert(nkp_context *ctx, nkp_virt *v, const char *domain, const char *snapshot,
                  unsigned flags, nkp_revert_result **ret);

/* Clones the shut-off nkp VM `src` into a new defined VM `new_name`: a
 * new UUID, a new keysafe bound to it under the same provider, new secret
 * UUIDs, a fresh vTPM (as virt-clone: no state copied), new MAC addresses,
 * and every disk copied whole (its chain flattened) to the path `files`
 * gives for its target ("vda=/path", NULL-terminated, may be NULL: beside
 * the original as "<new_name>-<target>.qcow2").  Keys: new DEKs (each disk
 * re-encrypted, qemu-img convert + compare), or with NKP_VM_CLONE_SAME_KEYS
 * the original's DEKs re-wrapped for the clone (each single-layer file
 * copied as it is: a reflink where the filesystem can, else sparse; a
 * chain is flattened under the original's DEK).
 * Errors (nothing left behind): -EINVAL not an nkp VM or a bad file
 * mapping, -EEXIST the name or a target file exists, -EBUSY the source
 * runs, -ENOKEY its provider is not here, -EIO qemu-img failed; libvirt's
 * errors pass through. */
#define NKP_VM_CLONE_SAME_KEYS 1u /* the original's DEKs, not new ones */
int nkp_vm_clone(nkp_context *ctx, nkp_virt *v, const char *src, const char *new_name,
                 const char *const *files, unsigned flags);

enum nkp_vm_recovery {
        NKP_VM_RECOVERY_NONE = 0,        /* nothing was interrupted */
        NKP_VM_RECOVERY_ROLLED_BACK = 1, /* files as before the interrupted operation */
        NKP_VM_RECOVERY_FINISHED = 2,    /* the interrupted operation was finished */
};

/* Takes VM `domain`'s lock for the call and reconciles an operation a crash
 * interrupted to the VM's current persistent definition (a note is logged
 * for each outcome but NONE).  *ret_outcome (may be NULL) says what was
 * done.  -EBUSY another operation holds the lock; -ESTALE the definition is
 * neither the one from before nor the one from after (the message names the
 * fix); -EUCLEAN the files do not allow it; -EBADMSG a damaged journal;
 * -ENOENT no such domain. */
int nkp_vm_recover(nkp_context *ctx, nkp_virt *v, const char *domain,
                   enum nkp_vm_recovery *ret_outcome);

/* Backups and block copies (docs/backup.md).  Every image is a LUKS qcow2
 * under the disk's own DEK, so the VM's keysafe and provider open it.
 *
 * nkp_vm_backup: backs up the encrypted disks (and the vTPM state) of nkp
 * VM `domain` into `dir` (absolute; made 0700 when missing).  Full
 * (`incremental` false): `dir` must hold no backup; a running VM is backed
 * up by libvirt (push mode, encrypted target, a checkpoint for the next
 * incremental), a shut-off one copied with qemu-img.  Incremental: adds a
 * level holding what changed since the last checkpoint (running VMs only).
 * *ret_level (may be NULL) gets the level written (0 full).  Errors:
 * -EINVAL not an nkp VM or a bad path, -EEXIST `dir` holds a backup (full)
 * or a leftover image, -ENOENT no backup in `dir` (incremental),
 * -EOPNOTSUPP incremental of a shut-off VM or after an offline level,
 * -ESTALE the VM changed (disks, keys, checkpoint gone): take a full one,
 * -ENOKEY/-EKEYREJECTED the provider is not here, -EIO libvirt or qemu-img
 * failed (the message says why).  A failed level leaves the manifest as it
 * was. */
int nkp_vm_backup(nkp_context *ctx, nkp_virt *v, const char *domain, const char *dir,
                  bool incremental, unsigned *ret_level);

/* Defines a VM from the backup in `dir`: every disk's levels merged into
 * one new LUKS qcow2 (still under its DEK) at DISK_DIR/NAME-TARGET.qcow2
 * (`disk_dir` NULL: beside the original disk), the vTPM state put back,
 * the definition (with its keysafe, same UUID) defined as `new_name` (NULL:
 * the original name).  *ret_name (may be NULL; g_free) gets the name.
 * Refusals change nothing: -EBADMSG a damaged or foreign manifest, domain.xml
 * or image, -EEXIST a VM with that UUID or name, or a disk file, exists,
 * -ENOKEY/-EKEYREJECTED the provider is not here; -EIO qemu-img failed
 * (what was written is removed). */
int nkp_vm_restore_backup(nkp_context *ctx, nkp_virt *v, const char *dir, const char *new_name,
                          const char *disk_dir, char **ret_name);

/* Copies disk `target` of running nkp VM `domain` into the new file `dest`
 * (absolute) with libvirt's block copy, the copy a LUKS qcow2 under the
 * disk's DEK; the VM keeps its own disk.  -EINVAL not an nkp disk,
 * -EEXIST `dest` exists, -EOPNOTSUPP the VM is shut off, -EIO libvirt
 * failed (nothing left at `dest`). */
int nkp_vm_blockcopy(nkp_context *ctx, nkp_virt *v, const char *domain, const char *target,
                     const char *dest);

/* A VM as nkp sees it.  Free with nkp_vm_status_free (accepts NULL). */
typedef struct nkp_vm_status nkp_vm_status;

enum nkp_vm_state {
        NKP_VM_PLAIN = 0,     /* no keysafe */
        NKP_VM_ENCRYPTED = 1, /* its provider is here: it can start */
        NKP_VM_LOCKED = 2,    /* its provider is missing or another key: reason says */
        NKP_VM_ERROR = 3,     /* its definition cannot be read: reason says */
};

/* "plain", "encrypted", "locked", "error". */
const char *nkp_vm_state_name(enum nkp_vm_state state);

/* The status of `domain`.  -ENOENT no such domain; libvirt's errors and
 * -EBADMSG (a definition or keysafe that cannot be parsed) pass through,
 * the message says why. */
int nkp_vm_status_get(nkp_context *ctx, nkp_virt *v, const char *domain, nkp_vm_status **ret);
/* Every defined domain, sorted by name; a domain that cannot be read is in
 * the list in state NKP_VM_ERROR.  Free with nkp_vm_status_list_free. */
int nkp_vm_list(nkp_context *ctx, nkp_virt *v, nkp_vm_status ***ret, size_t *ret_n);
void nkp_vm_status_list_free(nkp_vm_status **list, size_t n);

const char *nkp_vm_status_name(const nkp_vm_status *s);
const char *nkp_vm_status_uuid(const nkp_vm_status *s); /* NULL in state error */
enum nkp_vm_state nkp_vm_status_state(const nkp_vm_status *s);
bool nkp_vm_status_running(const nkp_vm_status *s);
const char *nkp_vm_status_provider(const nkp_vm_status *s); /* NULL when plain */
const char *nkp_vm_status_key_id(const nkp_vm_status *s);   /* NULL when plain */
const char *nkp_vm_status_reason(const nkp_vm_status *s);   /* locked / error, else NULL */
/* The protected objects, "kind:id" ("vtpm:vtpm", "disk:vda"). */
size_t nkp_vm_status_n_objects(const nkp_vm_status *s);
const char *nkp_vm_status_object(const nkp_vm_status *s, size_t i);
/* An interrupted (or running) conversion: its op words ("vm encrypt"),
 * phase ("converting", "ready") and whether its process still runs; op
 * NULL when there is none. */
const char *nkp_vm_status_pending_op(const nkp_vm_status *s);
const char *nkp_vm_status_pending_phase(const nkp_vm_status *s);
bool nkp_vm_status_pending_in_progress(const nkp_vm_status *s);
/* The plain layers `vm status` found in the VM's disk chains:
 * "TARGET PATH" (a snapshot made behind nkp's back; fix: nkp_vm_encrypt_layer). */
size_t nkp_vm_status_n_plain_layers(const nkp_vm_status *s);
const char *nkp_vm_status_plain_layer(const nkp_vm_status *s, size_t i);

/* Every disk of the VM's definition, in document order (none in state
 * error).  Its target ("vda"), its file (NULL for a network disk), its
 * state, and a note (NULL when there is nothing to say) in words:
 *   "encrypted"          LUKS with a key in the VM's keysafe (note: "by P (luks)")
 *   "encrypted-foreign"  an <encryption> whose secret nkp does not manage
 *   "plain-empty"        a plain qcow2 file with nothing written to it
 *                        (nkpd encrypts it: [disks] policy, enrol.c)
 *   "plain-data"         a plain qcow2 file that holds data (or has a
 *                        backing file): for an nkp VM a vm-plain-disk
 *                        alarm, and the note names the fix
 *   "plain-layer"        a disk nkp keys whose active layer is a plain
 *                        overlay (a snapshot made behind nkp's back: the
 *                        vm-plain-layer alarm; fix: nkp_vm_encrypt_layer)
 *   "plain"              a plain qcow2 file not read (nkp_vm_list does not
 *                        read disks) or unreadable (the note says why)
 *   "not-managed"        not a file-backed qcow2 disk (note: "cdrom",
 *                        "raw file", "network disk", "block device", …)
 * nkp_vm_status_get reads plain qcow2 files with `qemu-img map -U` (safe
 * while the VM runs); the strings belong to `s`. */
size_t nkp_vm_status_n_disks(const nkp_vm_status *s);
const char *nkp_vm_status_disk_target(const nkp_vm_status *s, size_t i);
const char *nkp_vm_status_disk_path(const nkp_vm_status *s, size_t i);
const char *nkp_vm_status_disk_state(const nkp_vm_status *s, size_t i);
const char *nkp_vm_status_disk_note(const nkp_vm_status *s, size_t i);
/* Copies of the VM's data in clear that nkpd saw made behind nkp's back
 * (the messages of its vm-clear-copy / vm-clear-save alarms; docs/backup.md). */
size_t nkp_vm_status_n_clear_copies(const nkp_vm_status *s);
const char *nkp_vm_status_clear_copy(const nkp_vm_status *s, size_t i);
void nkp_vm_status_free(nkp_vm_status *s);

/* After a provider came back (restore): the host key added to the kernel
 * when directories are protected (nkp_host_key_load; a failure is logged as
 * a warning and counted in *ret_still_locked), the status of every defined
 * VM (as nkp_vm_list), and the vm-locked alarm of every VM that is encrypted
 * (can start) cleared.  *ret_still_locked (may be NULL) counts the VMs
 * still locked.  Errors of libvirt pass through. */
int nkp_host_unlock(nkp_context *ctx, nkp_virt *v, nkp_vm_status ***ret, size_t *ret_n,
                    unsigned *ret_still_locked);

/* ------------------------------------------------------------------------ */
/* Hook steps                                                                */
/*
 * The work of nkp's qemu hook (SYSCONFDIR/libvirt/hooks/qemu.d/50-nkp,
 * which keeps its argv, stdin, deadline and output).  See
 * plugin/lib/hook.c. */

/* The largest domain XML nkp reads (the hook drains the rest of stdin). */
#define NKP_DOMAIN_XML_MAX (8 * 1024 * 1024)

enum nkp_hook_step {
        NKP_HOOK_NONE = 0,      /* a step nkp ignores */
        NKP_HOOK_START = 1,     /* prepare begin, restore begin */
        NKP_HOOK_MIGRATE = 2,   /* migrate begin (destination) */
        NKP_HOOK_RECONNECT = 3, /* reconnect begin (libvirtd restarted) */
        NKP_HOOK_RELEASE = 4,   /* release end */
};

/* The step of libvirt's (op, subop) arguments. */
enum nkp_hook_step nkp_hook_step_of(const char *op, const char *subop);

/* true for START and MIGRATE: a failure aborts libvirt's operation.  A
 * failure of the others must not (a failing reconnect kills the VM). */
bool nkp_hook_step_may_fail(enum nkp_hook_step step);

/* Runs `step` for domain `domain` whose XML (libvirt's stdin) is `xml`,
 * `len` bytes, with nkp's files under `root` (NULL: "/") and libvirt's
 * secrets through `uri` (NULL: "secret:///system").  Domains that are not
 * nkp's cost a parse: 0.  Input nkp cannot read as a domain at START or
 * MIGRATE fails closed: -EBADMSG / -EFBIG (or the config's error) unless
 * [vtpm] policy=off and the input does not mention nkp's namespace; at
 * RECONNECT and RELEASE it is 0.  A config that cannot be loaded fails
 * every START (and the MIGRATE of an nkp VM) with its error.  START: an interrupted conversion reconciled (or
 * -EBUSY while one runs), the VM's secrets defined, the [vtpm] policy
 * applied (-EPERM / -EAGAIN), the EK CA ticket written.  MIGRATE: the
 * provider, the keys and the TLS policy checked (-ENOKEY, -EKEYREJECTED,
 * -EBADMSG, -EPERM, with a migration-refused alarm), then as START without
 * the recovery.  RECONNECT: the secrets again.  RELEASE: the secrets
 * undefined; always 0.  A failure returns a negative errno with one line
 * in nkp_error_message(); -ENOKEY / -EKEYREJECTED also raise a vm-locked
 * alarm.  Nothing is ever printed. */
int nkp_hook_run(const char *root, const char *uri, enum nkp_hook_step step, const char *domain,
                 const char *xml, size_t len);

/* ------------------------------------------------------------------------ */
/* Providers                                                                 */

typedef struct nkp_provider nkp_provider;

enum nkp_provider_flags {
        NKP_PROVIDER_DEFAULT = 1u << 0,     /* the host's default provider */
        NKP_PROVIDER_BACKED_UP = 1u << 1,   /* a backup was written (or it came from one) */
        NKP_PROVIDER_REQUIRE_TPM = 1u << 2, /* only hosts with a TPM 2.0 may hold it */
};

enum nkp_seal {
        NKP_SEAL_NONE = 0, /* KDK rests in the 0600 store */
        NKP_SEAL_TPM = 1,  /* KDK sealed to this host's TPM 2.0 */
};

/* true when `name` is a valid provider name. */
bool nkp_provider_name_valid(const char *name);

/* Creates a provider with a fresh random KDK and key id.  `flags` may hold
 * NKP_PROVIDER_REQUIRE_TPM only.  The KDK is sealed to the host TPM when the
 * context has one.  Errors: -EINVAL bad name or flags, -EEXIST name taken,
 * -ENOSPC 32 providers already, -ENODEV require-tpm without a TPM.  On any
 * error nothing is written. */
int nkp_provider_create(nkp_context *ctx, const char *name, unsigned flags, nkp_provider **ret);

/* nkp_provider_create() bound to the network as well: `bind` is
 * "tang:URL[,URL…]" (NULL: not bound) and `threshold` how many of the Tang
 * servers must answer to open it (0 = 1).  The key material at rest (the
 * TPM-sealed blob, or the KDK itself on a host without a TPM) is kept only
 * inside a Clevis sss/tang JWE (`clevis encrypt`, the material on its
 * stdin): a cache miss (the first VM start after a boot) needs the TPM and
 * `threshold` of the servers.  Errors as nkp_provider_create(), and -EINVAL
 * a bad binding, -EHOSTUNREACH the servers do not answer (nothing written),
 * -ENOENT clevis is not installed. */
int nkp_provider_create_bound(nkp_context *ctx, const char *name, unsigned flags, const char *bind,
                              unsigned threshold, nkp_provider **ret);

/* Binds provider `name` anew: `bind` as for nkp_provider_create_bound(),
 * "none" or NULL to unbind.  The KDK stays (from the key cache, or opened
 * through the current binding), so no VM is touched; the material at rest
 * is sealed and wrapped afresh (after tangd-rotate-keys: under the servers'
 * new keys).  Errors: -ENOENT no such provider, -EINVAL a bad binding,
 * -EHOSTUNREACH the old servers (key not cached) or the new ones do not
 * answer; on any error nothing is written. */
int nkp_provider_rebind(nkp_context *ctx, const char *name, const char *bind, unsigned threshold);

/* The Tang servers provider `p` is bound to (NULL-terminated, owned by p),
 * NULL when it is not bound; *ret_threshold (may be NULL) how many must
 * answer. */
const char *const *nkp_provider_binding(const nkp_provider *p, unsigned *ret_threshold);

/* 0 when the Tang server at `url` answers GET URL/adv within `timeout_ms`
 * (curl, bounded); -EHOSTUNREACH when not; -EINVAL a bad URL. */
int nkp_tang_probe(const char *url, unsigned timeout_ms);

/* The provider named `name`.  -ENOENT when there is none. */
int nkp_provider_get(nkp_context *ctx, const char *name, nkp_provider **ret);

/* The provider with key id `key_id` (UUID string).  -ENOENT. */
int nkp_provider_get_by_key_id(nkp_context *ctx, const char *key_id, nkp_provider **ret);

/* Every provider, sorted by name.  Free with nkp_provider_list_free(). */
int nkp_provider_list(nkp_context *ctx, nkp_provider ***ret, size_t *ret_n);
void nkp_provider_list_free(nkp_provider **list, size_t n);

/* Makes `name` the default.  -EPERM when it was never backed up. */
int nkp_provider_set_default(nkp_context *ctx, const char *name);

/* Deletes a provider from the store.  Its KDK stays in the key cache (flagged
 * deleted) until the cache is flushed, so running VMs keep working.  Unless
 * `force`, refused with -EBUSY while `in_use` (the caller's count of defined
 * VMs that depend on it) is non-zero.  nkp_provider_delete_checked() counts
 * them itself. */
int nkp_provider_delete(nkp_context *ctx, const char *name, unsigned in_use, bool force);

/* Writes a PKCS#12 backup of the provider to `path` (must not exist; created
 * 0600, atomically) protected by `password`, and marks the provider backed
 * up.  The file is readable by `openssl pkcs12 -info`. */
int nkp_provider_backup(nkp_context *ctx, const char *name, const char *path,
                        const nkp_secret *password);

/* Restores a provider from a backup.  Same name, key id and KDK as on the
 * host that made it; sealed to this host's TPM when there is one.  When the
 * same provider is already here, succeeds with *ret_already = true and
 * changes nothing.  -EEXIST when the name is taken by another key id;
 * -EACCES wrong password or a tampered file; -EBADMSG not an nkp backup. */
int nkp_provider_restore(nkp_context *ctx, const char *path, const nkp_secret *password,
                         nkp_provider **ret, bool *ret_already);

/* nkp_provider_restore() from one whole backup (n = 1) or from shares of
 * an m-of-n split (any m of them, in any order): paths[i] opened with
 * passwords[i].  Errors as nkp_provider_restore(), and for shares: -EXDEV
 * shares of two different splits, -ENOTUNIQ the same share twice,
 * -ENODATA fewer shares than the split's threshold, -EBADMSG shares that
 * disagree or do not combine into the key they name (damaged), -EINVAL a
 * whole backup given with other files.  On any error nothing is written. */
int nkp_provider_restore_files(nkp_context *ctx, const char *const *paths, const nkp_secret *const *passwords,
                               size_t n, nkp_provider **ret, bool *ret_already);

/* Writes an m-of-n split backup of provider `name` into the existing
 * directory `dir`: `n` files NAME-share-I-of-N.p12 (I = 1..n), each a
 * PKCS#12 like nkp_provider_backup()'s under its own password passwords[I-1],
 * each holding one libgfshare (Shamir, GF(256)) share of the KDK and naming
 * its number, n, the threshold `m`, the key id, the KDK's fingerprint and a
 * split id drawn for this split; any `m` of them restore the provider
 * (nkp_provider_restore_files).  Marks the provider backed up.
 * *ret_paths (may be NULL): the n paths, NULL-terminated, g_strfreev().
 * Errors: -EINVAL bad name or counts (2 <= m <= n <= 32) or an empty
 * password, -ENOTDIR no such directory, -EEXIST a share file exists
 * (nothing written), -ENOENT no such provider; on any error no share file
 * is left behind. */
int nkp_provider_backup_shares(nkp_context *ctx, const char *name, const char *dir, unsigned n, unsigned m,
                               const nkp_secret *const *passwords, char ***ret_paths);

/* Checking a backup without importing it. */
typedef struct nkp_backup_report nkp_backup_report;

enum nkp_backup_here {
        NKP_BACKUP_HERE_NONE = 0,       /* no provider of that name or key id here */
        NKP_BACKUP_HERE_SAME = 1,       /* the same provider (name, key id, fingerprint) */
        NKP_BACKUP_HERE_DIFFERENT = 2,  /* another key under that name */
        NKP_BACKUP_HERE_OTHER_NAME = 3, /* the backup's key id here under another name */
};

/* Opens a whole backup (n = 1) or shares of a split as
 * nkp_provider_restore_files() would (password, structure, MAC, shares
 * combined and checked against their fingerprint), and compares it with
 * the provider store; reads nothing else and writes nothing (not the TPM,
 * not the key cache).  *ret: free with nkp_backup_report_free().  Errors
 * as nkp_provider_restore_files(). */
int nkp_backup_verify(nkp_context *ctx, const char *const *paths, const nkp_secret *const *passwords, size_t n,
                      nkp_backup_report **ret);
void nkp_backup_report_free(nkp_backup_report *rep);
const char *nkp_backup_report_name(const nkp_backup_report *rep);
const char *nkp_backup_report_key_id(const nkp_backup_report *rep);
const char *nkp_backup_report_fingerprint(const nkp_backup_report *rep); /* of the KDK, hex */
unsigned nkp_backup_report_flags(const nkp_backup_report *rep);          /* NKP_PROVIDER_REQUIRE_TPM */
/* The split's share count (0 for a whole backup); *ret_threshold its
 * threshold, *ret_given how many shares were verified, *ret_split_id the
 * split id (NULL for a whole backup); each pointer may be NULL. */
unsigned nkp_backup_report_shares(const nkp_backup_report *rep, unsigned *ret_threshold,
                                  unsigned *ret_given, const char **ret_split_id);
/* How this host holds the backup's provider; *ret_name (may be NULL) the
 * name of the provider here it was compared with, NULL for NONE. */
enum nkp_backup_here nkp_backup_report_here(const nkp_backup_report *rep, const char **ret_name);

const char *nkp_provider_name(const nkp_provider *p);
const char *nkp_provider_key_id(const nkp_provider *p);      /* UUID string */
const char *nkp_provider_fingerprint(const nkp_provider *p); /* hex, one-way */
unsigned nkp_provider_flags(const nkp_provider *p);
enum nkp_seal nkp_provider_seal(const nkp_provider *p);
int64_t nkp_provider_created(const nkp_provider *p); /* seconds since the epoch */
/* Active = backed up at least once: only active providers protect VMs. */
bool nkp_provider_is_active(const nkp_provider *p);
void nkp_provider_free(nkp_provider *p);

/* The provider's KDK: from the key cache, else unsealed (or read) from the
 * store and put into the cache.  A provider deleted from the store is still
 * found in the cache by key id.  -ENOENT when neither has it. */
int nkp_provider_get_kdk(nkp_context *ctx, const char *key_id, nkp_secret **ret);

/* ------------------------------------------------------------------------ */
/* The host: its TPM and the key cache                                       */

typedef struct nkp_host_status nkp_host_status;

/* What `nkpctl host status` shows: whether a TPM is configured and answers
 * (the TPM is opened once to find out; a stuck one costs its TCTI's
 * timeout), and the providers whose KDK is in the key cache for this boot
 * (names, key ids, "deleted from the store": never key bytes).  A TPM that
 * does not answer is not an error here: it is reported by the accessors.
 * Errors: the key cache cannot be read. */
int nkp_host_status_get(nkp_context *ctx, nkp_host_status **ret);
void nkp_host_status_free(nkp_host_status *st);
/* false when the config says "none" or the default device is absent. */
bool nkp_host_status_tpm_in_use(const nkp_host_status *st);
bool nkp_host_status_tpm_answers(const nkp_host_status *st);
/* Why a TPM in use does not answer (NULL when it does). */
const char *nkp_host_status_tpm_error(const nkp_host_status *st);
/* Cached providers, by index 0..n-1 (NULL / false past the end). */
size_t nkp_host_status_n_cached(const nkp_host_status *st);
const char *nkp_host_status_cached_name(const nkp_host_status *st, size_t i);
const char *nkp_host_status_cached_key_id(const nkp_host_status *st, size_t i);
bool nkp_host_status_cached_deleted(const nkp_host_status *st, size_t i);

/* Forgets every unsealed KDK now, as a reboot does; *ret_forgotten (may be
 * NULL) = how many were cached.  VMs that need them stay locked until the
 * keys are unsealed again (the next start unseals from the store). */
int nkp_host_flush_cache(nkp_context *ctx, size_t *ret_forgotten);

/* ---- The host key (issues 14/15; docs/host-key.md) ---------------------
 * A key per host, derived from a provider's KDK and this host's id
 * (ROOT/var/lib/nkp/host-id), encrypts at rest (the kernel's fscrypt) the
 * directories libvirt writes behind nkp's back: first of all the swtpm state
 * directory ([vtpm] state_dir), where a VM started before nkp could enrol it
 * (virt-install's transient first start) writes its new vTPM state.  Which
 * provider and which directories: ROOT/var/lib/nkp/hostkey.ini, written by
 * nkp_host_protect (a state file, backed up with /var/lib/nkp).  Root only. */

/* `nkpctl host protect`: encrypts `dir` (absolute; NULL: the defaults:
 * [vtpm] state_dir, libvirt's managed-save, automatic-dump and NVRAM
 * directories and nkp's /var/lib/libvirt/qemu/nkp-saves for `virsh save`
 * files, each made first when missing, with libvirt's modes and owners)
 * under the host key of `provider` (NULL: the one already recorded, else the
 * default; it must be backed up), recording both first.  An empty directory
 * is encrypted in place; one holding files is copied into an encrypted
 * sibling that takes its place, crash-safely: a rerun after a kill finishes;
 * refused (-EBUSY) while any VM runs.  Idempotent.
 * Errors (nothing changed): -EOPNOTSUPP the filesystem has no fscrypt (the
 * message names the fix), -EEXIST another provider is recorded or `dir` is
 * encrypted with another key, -ENOKEY the recorded provider is missing,
 * -EPERM the provider was never backed up, -EBUSY another run or `dir` is a
 * mount point, -ENOENT no default provider; hostkey.c's other errors. */
int nkp_host_protect(nkp_context *ctx, const char *provider, const char *dir);

/* `nkpctl host unprotect`: turns `dir` (NULL: every protected directory)
 * back into a plain directory with the same files, crash-safely (a copy
 * out, then an exchange; a rerun after a kill finishes), and takes it out
 * of the record (the record goes when nothing is left).  The host key is
 * added first when it is missing.  Errors (nothing changed): -ENOENT
 * nothing protected or `dir` is not, -EBUSY a VM runs or another run,
 * -ENOKEY the provider is missing (restore it first); hostkey.c's others. */
int nkp_host_unprotect(nkp_context *ctx, const char *dir);

/* Adds the host key to the kernel (for every recorded directory's
 * filesystem) when directories are protected and the provider's KDK can be
 * had (store + TPM, or the key cache).  Called at `host unlock`, at nkpd's
 * start and by the hook's prepare step on demand.  Returns 0 when nothing
 * is protected, 1 when the key is in the kernel.  Errors: -ENOKEY the
 * provider or host id is missing (the directories stay locked; the message
 * says to restore the provider), -EKEYREJECTED the key made is not the
 * directories' (a "hostkey-locked" alarm is raised), -EBADMSG a damaged
 * record. */
int nkp_host_key_load(nkp_context *ctx);

typedef struct nkp_hostkey_status nkp_hostkey_status;
/* The recorded provider and every protected directory with its state.
 * Errors: -EBADMSG a damaged record (no record: an empty status). */
int nkp_hostkey_status_get(nkp_context *ctx, nkp_hostkey_status **ret);
void nkp_hostkey_status_free(nkp_hostkey_status *st);
/* NULL when nothing is protected. */
const char *nkp_hostkey_status_provider(const nkp_hostkey_status *st);
const char *nkp_hostkey_status_key_id(const nkp_hostkey_status *st);
size_t nkp_hostkey_status_n_dirs(const nkp_hostkey_status *st);
/* By index 0..n-1 (NULL past the end).  The state: "unlocked", "locked",
 * "locking", "missing", "plain (not finished: …)", "encrypted with another
 * key", "unreadable". */
const char *nkp_hostkey_status_dir(const nkp_hostkey_status *st, size_t i);
const char *nkp_hostkey_status_dir_state(const nkp_hostkey_status *st, size_t i);
/* The directories converted while they held files, whose old clear blocks
 * are only freed ("MOUNTPOINT (DIR), …"), or NULL: say to run fstrim on
 * those filesystems, then nkp_hostkey_fstrim_said() so it is said once. */
const char *nkp_hostkey_status_fstrim(const nkp_hostkey_status *st);
/* Forgets the fstrim note.  Errors: -EBADMSG a damaged record, write errors. */
int nkp_hostkey_fstrim_said(nkp_context *ctx);

/* The EK CA certificate (PEM, free with free()) of the provider with key id
 * `key_id`: derived from its KDK, so every host holding the provider has the
 * same CA (subject, key, key identifier; only the self-signature differs,
 * ECDSA nonces).  -ENOENT the provider is not here (or its KDK is not
 * available). */
int nkp_provider_ca_cert_pem(nkp_context *ctx, const char *key_id, char **ret);

/* ------------------------------------------------------------------------ */
/* Key chain                                                                 */

/* The one-way fingerprint of a KDK: 64 hex digits (HKDF-SHA256 with the
 * label "nkp fingerprint v1").  Free with free(). */
int nkp_kdk_fingerprint(const nkp_secret *kdk, char **ret);

/* KEK = HKDF-SHA256(ikm = KDK, salt = kek_salt,
 *                   info = "nkp kek v1" 0x00 key_id[16] vm_uuid[16]), 32 bytes.
 * key_id and vm_uuid are UUID strings.  -EINVAL for a malformed UUID. */
int nkp_kek_derive(const nkp_secret *kdk, const uint8_t kek_salt[NKP_KEK_SALT_SIZE],
                   const char *key_id, const char *vm_uuid, nkp_secret **ret);

/* ------------------------------------------------------------------------ */
/* Keysafe: a VM's wrapped DEKs (the XML kept in the domain <metadata>)       */

typedef struct nkp_keysafe nkp_keysafe;

#define NKP_KEYSAFE_NS "https://nkp.invalid/xmlns/keysafe/1"
#define NKP_KEYSAFE_VERSION 1

/* A new, empty keysafe for VM `vm_uuid` protected by `provider`, with a fresh
 * random KEK salt. */
int nkp_keysafe_new(const char *vm_uuid, const nkp_provider *provider, nkp_keysafe **ret);

/* Parses the XML form (see plugin/lib/keysafe.c for the documented layout).
 * -EBADMSG malformed, -EPROTONOSUPPORT unknown version.  Never trusts sizes
 * in the input. */
int nkp_keysafe_parse(const char *xml, size_t len, nkp_keysafe **ret);

/* The XML form, NUL-terminated.  Free with free(). */
int nkp_keysafe_format(const nkp_keysafe *ks, char **ret);

void nkp_keysafe_free(nkp_keysafe *ks);

const char *nkp_keysafe_vm_uuid(const nkp_keysafe *ks);
const char *nkp_keysafe_provider_name(const nkp_keysafe *ks);
const char *nkp_keysafe_provider_key_id(const nkp_keysafe *ks);
const char *nkp_keysafe_provider_fingerprint(const nkp_keysafe *ks);
const uint8_t *nkp_keysafe_kek_salt(const nkp_keysafe *ks);

/* Kinds of protected objects. */
#define NKP_OBJECT_VTPM "vtpm"
#define NKP_OBJECT_DISK "disk"

/* Wraps `dek` under `kek` (AES-256-GCM, fresh 96-bit IV; the AAD binds the
 * keysafe version, VM UUID, kind, object id, secret UUID and provider key
 * id) and adds or replaces the entry (kind, object_id).  `secret_uuid` is the
 * libvirt secret that carries the DEK while the VM runs. */
int nkp_keysafe_put_dek(nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, const char *secret_uuid, const nkp_secret *dek);

/* Unwraps the entry (kind, object_id).  -ENOENT no such entry, -EBADMSG the
 * wrapped key or anything it is bound to was altered, or the KEK is wrong. */
int nkp_keysafe_get_dek(const nkp_keysafe *ks, const nkp_secret *kek, const char *kind,
                        const char *object_id, nkp_secret **ret);

/* Entries, in document order. */
size_t nkp_keysafe_n_entries(const nkp_keysafe *ks);
const char *nkp_keysafe_entry_kind(const nkp_keysafe *ks, size_t i);
const char *nkp_keysafe_entry_id(const nkp_keysafe *ks, size_t i);
const char *nkp_keysafe_entry_secret_uuid(const nkp_keysafe *ks, size_t i);

/* Removes the entry (kind, object_id).  -ENOENT. */
int nkp_keysafe_remove_dek(nkp_keysafe *ks, const char *kind, const char *object_id);

/* Re-binds the keysafe to `new_provider` (may be the same one) with a fresh
 * KEK salt: every DEK is unwrapped with `old_kek` and wrapped again under the
 * KEK derived from `new_kdk` and the new salt.  All or nothing: on error the
 * keysafe is unchanged.  Used by shallow rekey. */
int nkp_keysafe_rewrap(nkp_keysafe *ks, const nkp_secret *old_kek, const nkp_provider *new_provider,
                       const nkp_secret *new_kdk);

/* ------------------------------------------------------------------------ */
/* vTPM EK certificates                                                      */
/*                                                                           */
/* swtpm_setup (run by libvirt at a vTPM's first start, as libvirt's         */
/* swtpm_user) calls a create_certs_tool for the EK and platform             */
/* certificates.  nkp's tool (swtpm-hooks/nkp-swtpm-certs) issues them with  */
/* the EK CA of the VM's provider, for VMs whose vTPM the qemu hook is       */
/* manufacturing right now (a "ticket" under ROOT/run/nkp/ekca, written by   */
/* the hook's prepare step); every other request goes to swtpm's own local   */
/* CA.  Root signs in-process (nkp_ekcert_sign); any other user asks nkpd    */
/* over ROOT/run/nkp/ekca.sock (nkp_ekcert_request_remote), so the CA key    */
/* never reaches the swtpm user.  Across these functions -ENOENT means "not  */
/* nkp's VM: hand the request to swtpm's local CA".                          */

typedef struct nkp_ekcert_request nkp_ekcert_request;

/* The request in swtpm_setup's create_certs_tool command line (argv[0], the
 * program, is skipped): --type ek|platform --ek <RSA modulus hex |
 * x=<hex>,y=<hex>[,id=<curve>]> --dir D --vmid <name>:<uuid> --tpm2
 * [--tpm-spec-family F --tpm-spec-level L --tpm-spec-revision R
 * --tpm-manufacturer M --tpm-model M --tpm-version V --allow-signing
 * --decryption --logfile F --configfile C --optsfile O].  The platform
 * manufacturer/model/version come from the "--platform-manufacturer X"
 * lines of --optsfile (as swtpm_localca reads them; default "nkp", "QEMU",
 * "1").  "--help" is not a request: callers answer it before.  Nothing is
 * checked against the host.  The caller owns *ret (nkp_ekcert_request_free).
 * Errors: -EINVAL a malformed command line (an argument that is not an
 * option, an unknown option, an option without its value, or no --type,
 * --ek or --dir), in one line; -ENOENT a request that is not nkp's to judge
 * (no --tpm2, i.e. a TPM 1.2, or no --vmid ending in a UUID, as when
 * swtpm_setup runs by hand). */
int nkp_ekcert_request_from_argv(int argc, char *const argv[], nkp_ekcert_request **ret);

/* "ek" or "platform" (as given: checked when signing), and the --vmid.
 * Owned by the request. */
const char *nkp_ekcert_request_type(const nkp_ekcert_request *req);
const char *nkp_ekcert_request_vmid(const nkp_ekcert_request *req);

/* Accepts NULL. */
void nkp_ekcert_request_free(nkp_ekcert_request *req);

/* Root only, in-process: reads the VM's ticket, derives the EK CA of its
 * provider (KDK from the key cache or the store; the CA key is freed before
 * returning), and issues the DER certificate.  The caller owns *ret_der and
 * *ret_provider (the provider's name; may be NULL): free with free().
 * Errors: -ENOENT no ticket for the VM (not nkp's: swtpm's local CA);
 * -ETIMEDOUT the ticket expired ("start the VM again"); -ENOKEY the
 * provider is not on this host ("restore it"); -EBADMSG a damaged ticket;
 * -EPERM/-EACCES the ticket or the store cannot be read (not root); -EINVAL
 * a type other than ek/platform or an EK public key that does not parse;
 * errors of nkp_provider_get_kdk(). */
int nkp_ekcert_sign(nkp_context *ctx, const nkp_ekcert_request *req, uint8_t **ret_der,
                    size_t *ret_len, char **ret_provider);

/* Any user: sends the request (public data only) to nkpd's signer at
 * ROOT/run/nkp/ekca.sock (`root` NULL or "/" for the host) and waits up to
 * 15 s for the answer.  No context is needed: the config is root's.  The
 * caller owns *ret_der (free with free()).  Errors: -ENOENT nkpd has no
 * ticket for the VM (not nkp's: swtpm's local CA); -ECONNREFUSED the
 * socket is missing or nobody listens ("is nkpd running?");
 * -ENAMETOOLONG the socket path does not fit; -EREMOTEIO nkpd refused, the
 * message is its line (e.g. "nkp: only root and libvirt's swtpm user may
 * ask for vTPM certificates."); -EPROTO no, a malformed or a truncated
 * answer; -EIO the request could not be sent. */
int nkp_ekcert_request_remote(const char *root, const nkp_ekcert_request *req, uint8_t **ret_der,
                              size_t *ret_len);

/* Writes the DER certificate where swtpm_setup reads it: --dir's ek.cert or
 * platform.cert (by --type), created 0600, truncated if present, never
 * through a symlink.  -errno with the path when it cannot be written. */
int nkp_ekcert_write(const nkp_ekcert_request *req, const uint8_t *der, size_t len);

/* ------------------------------------------------------------------------ */
/* Automatic enrolment / daemon                                              */
/*                                                                           */
/* What nkpd does, as a library: enrol the plain vTPMs that virt-manager,    */
/* virt-install or virt-xml add before their first start, and sign vTPM      */
/* certificates for swtpm users that are not root.                           */

/* Enrols domain `name` if it has a plain emulator vTPM (no <encryption>)
 * with no state yet and [vtpm] policy is "enrol": a DEK wrapped into the
 * keysafe (the VM's own, else a new one for the host's default provider),
 * the keysafe in <metadata>, <encryption secret=...> on the vTPM, the
 * domain defined again.  Anything else is left alone: no vTPM, already
 * encrypted, a vTPM entry in the keysafe, existing (clear or unreadable)
 * state, a conversion by nkpctl running or interrupted, the domain gone.
 * Returns 1 enrolled, 0 nothing done; `ret_note` (may be NULL) then gets
 * one line for the log, or NULL when there is nothing to say (caller frees
 * with free()).  Errors: -ENOENT no default provider; -EPERM the provider
 * was never backed up; -EKEYREJECTED the VM's keysafe names a different
 * key than the provider on this host; -EBADMSG the domain XML or keysafe
 * does not parse; libvirt errors as -ECONNREFUSED, -EIO.  The message
 * names the VM and the fix. */
int nkp_vm_auto_enrol(nkp_context *ctx, nkp_virt *v, const char *name, char **ret_note);

/* New disks follow the VM (issue 15): for an nkp VM (a keysafe) `name`
 * under [disks] policy enrol or require, each plain file-backed qcow2 disk
 * that is EMPTY (no backing file, `qemu-img map` shows nothing present or
 * holding data) is encrypted like `nkp_vm_encrypt(…, "vdb,…")` (a DEK in
 * the VM's own keysafe, LUKS, crash-safe), if the VM is shut off with no
 * saved state; with the VM running, nothing is converted and `ret_note`
 * says so (nkpd checks again when it stops).  A plain qcow2 disk that holds
 * data (or cannot be read) is never converted: a "vm-plain-disk" alarm
 * (subject "VM:target") names it and the fix; the alarms of disks that are
 * no longer plain are cleared.  A VM without a keysafe, a conversion by
 * nkpctl running or interrupted, the domain gone, policy off: nothing.
 * Returns 1 converted, 0 nothing converted; `ret_note` (may be NULL) as
 * nkp_vm_auto_enrol.  Errors: those of nkp_vm_encrypt (-EBUSY the VM
 * started meanwhile, -ENOSPC, -ENOKEY …), libvirt's; the message names the
 * VM and the disks. */
int nkp_vm_auto_enrol_disks(nkp_context *ctx, nkp_virt *v, const char *name, char **ret_note);

typedef struct nkp_daemon nkp_daemon;

enum nkp_daemon_flags {
        NKP_DAEMON_NO_LIBVIRT = 1u << 0, /* the certificate signer only */
};

/* Sets up nkpd's services in this process and returns at once; the work
 * happens in nkp_daemon_iterate().
 *  - The vTPM certificate signer: listens on ROOT/run/nkp/ekca.sock (made
 *    0666, an old socket replaced; ROOT/run/nkp made 0755 if missing),
 *    answering root and [vtpm] swtpm_user only (a user unknown on the host
 *    leaves root only, with a warning in the log).
 *  - Unless NKP_DAEMON_NO_LIBVIRT: follows libvirt's domain events at `uri`
 *    (NULL: libvirt's default), connecting at the first iteration and again
 *    2 s after a failed connect or a closed connection (libvirtd
 *    restarted); at each connect every defined domain is passed to
 *    nkp_vm_auto_enrol() then nkp_vm_auto_enrol_disks(), and after that
 *    every domain of a "defined" or "stopped" event, and every domain whose
 *    persistent definition libvirt rewrites in ROOT/etc/libvirt/qemu
 *    (inotify; libvirt 9.0 sends no event for `attach-disk --config`);
 *    those passes, and every running definition libvirt rewrites in
 *    ROOT/run/libvirt/qemu, also raise (or clear) the vm-plain-layer alarm
 *    of a plain snapshot layer in an nkp disk's chain (issue 16).
 * Uses libvirt's default event loop (virEventRegisterDefaultImpl), which is
 * process-wide: one daemon per process.  Reports through the log function
 * (NKP_LOG_INFO per action, NKP_LOG_WARNING for refusals and connection
 * losses, NKP_LOG_ERROR for failed enrolments); `ctx` must outlive the
 * daemon.  The caller owns *ret (nkp_daemon_free).  Errors: -EINVAL an
 * unknown flag; -EIO libvirt's event loop cannot start; -errno with the
 * path when the socket cannot be made (-ENAMETOOLONG a root too deep). */
int nkp_daemon_new(nkp_context *ctx, const char *uri, unsigned flags, nkp_daemon **ret);

/* One pass of the loop: (re)connects to libvirt when due, waits up to about
 * one second for a certificate request, a domain event or a closed
 * connection, and handles what came.  A program loops on it until its stop
 * flag (set by its SIGTERM handler) is set.  Failures of single requests or
 * enrolments are logged, not returned.  -EIO when libvirt's event loop
 * itself fails (then stop). */
int nkp_daemon_iterate(nkp_daemon *d);

/* Disconnects from libvirt, closes and removes the socket.  Accepts NULL. */
void nkp_daemon_free(nkp_daemon *d);
/* Shallow rekey and provider users                                          */

/* A shallow rekey gives a VM a new KEK (fresh salt, and another provider if
 * asked): every DEK is unwrapped and wrapped again, the data, the vTPM
 * state, the secret UUIDs and the running guest stay as they are.  The
 * protocol and why it is crash safe: docs/rekey.md.  In short: the VM's
 * lock is held from the first read to the last write; a running VM's live
 * definition is written first, its persistent one last, each whole with
 * one libvirt call, so a kill between leaves both usable and a rerun
 * finishes; a start that slipped in meanwhile gets the new keysafe too. */

/* What happened to one VM.  Free with nkp_rekey_result_free(). */
typedef struct nkp_rekey_result nkp_rekey_result;

const char *nkp_rekey_result_domain(const nkp_rekey_result *res);
/* The provider that protected the VM before (NULL when the rekey failed
 * before reading it). */
const char *nkp_rekey_result_from(const nkp_rekey_result *res);
/* The target provider. */
const char *nkp_rekey_result_provider(const nkp_rekey_result *res);
/* true when the VM ran and its live definition was rekeyed too. */
bool nkp_rekey_result_running(const nkp_rekey_result *res);
/* 0 when the VM was rekeyed, else the negative errno of nkp_vm_rekey(). */
int nkp_rekey_result_error(const nkp_rekey_result *res);
/* The failure's one-line message; NULL when the VM was rekeyed. */
const char *nkp_rekey_result_message(const nkp_rekey_result *res);
/* Accepts NULL. */
void nkp_rekey_result_free(nkp_rekey_result *res);

/* Shallow rekey of the defined domain `domain` to provider `provider`
 * (NULL: the host's default), which must be on this host and active
 * (backed up); the VM's own provider rotates its KEK.  The VM's current
 * provider must be here too (key cache or store).  On success *ret (owned
 * by the caller) says from which provider and whether the live definition
 * was rekeyed too.  An encrypt, decrypt or deep rekey of the VM that a crash
 * interrupted is reconciled first, as nkp_vm_recover() does (a note is
 * logged); then the VM, as it is now, is rekeyed.  Errors (nothing changed
 * unless said):
 *  -EINVAL      `domain` is NULL;
 *  -ENOENT      no provider `provider`, no default provider, or no domain
 *               `domain`;
 *  -EPERM       the target provider was never backed up;
 *  -ENODATA     the VM is not protected by nkp (no keysafe), also after an
 *               interrupted encrypt was rolled back;
 *  the errors of nkp_vm_recover() when the interrupted operation cannot be
 *               reconciled (-ESTALE, -EUCLEAN, -EBADMSG; nothing rekeyed);
 *  -EBUSY       another process holds the VM's lock (waited ~2 s), or the
 *               VM has a managed save image (it would restore with the old
 *               keysafe);
 *  -ENOKEY      the provider of its persistent or live keysafe is not on
 *               this host; -EKEYREJECTED a provider with that key id holds
 *               another key;
 *  -EBADMSG     a wrapped DEK does not open, a keysafe is damaged, or the VM
 *               runs without a keysafe in its live definition;
 *  -ESTALE      the live and persistent keysafes hold different DEKs; or a
 *               start during the rekey ran with another keysafe (the
 *               persistent definition is rekeyed: run it again);
 *  the target's KDK errors (nkp_provider_get_kdk) and libvirt's
 *  (-ECONNREFUSED, -EIO).  When the persistent write fails after the live
 *  one, the message says the VM is half rekeyed: it starts and runs with
 *  either definition; a rerun finishes. */
int nkp_vm_rekey(nkp_context *ctx, nkp_virt *v, const char *domain, const char *provider,
                 nkp_rekey_result **ret);

/* Called by nkp_vm_rekey_all() once per nkp VM, in name order, right after
 * its rekey (so a program can report as it goes).  `res` is the library's,
 * valid during the call. */
typedef void (*nkp_rekey_func)(const nkp_rekey_result *res, void *userdata);

/* Shallow rekey of every defined VM that nkp protects to `provider` (NULL:
 * the default), one after the other; plain VMs and domains undefined
 * meanwhile are skipped silently.  A VM that fails (its result carries the
 * error and message of nkp_vm_rekey) does not stop the others.  Returns 0
 * once every VM was tried, whatever their results; a negative errno before
 * any VM was touched: the target errors of nkp_vm_rekey (-ENOENT, -EPERM,
 * KDK errors) or libvirt's when the domains cannot be listed. */
int nkp_vm_rekey_all(nkp_context *ctx, nkp_virt *v, const char *provider, nkp_rekey_func func,
                     void *userdata);

/* The defined domains that depend on the provider with key id `key_id`:
 * whose persistent definition names it (the next start needs it), or, for
 * a running domain, whose live definition does (a libvirtd restart and a
 * live migration need it), or whose managed save image does (a restore
 * needs it).  A definition whose nkp data is damaged counts when its text
 * names the key id.  *ret_names: a NULL-terminated array of *ret_n names,
 * sorted; free each and the array with free().  Errors: libvirt's when the
 * domains cannot be listed (-ECONNREFUSED, -EIO). */
int nkp_provider_dependents(nkp_context *ctx, nkp_virt *v, const char *key_id, char ***ret_names,
                            size_t *ret_n);

/* nkp_provider_delete() counting the provider's users itself
 * (nkp_provider_dependents over `v`; `v` NULL: the caller could not reach
 * libvirt).  Unless `force`, refused while a defined VM depends on it
 * (-EBUSY, the message names the VMs) and when the users cannot be counted
 * (-ENOTCONN for `v` NULL, else libvirt's error, e.g. -ECONNREFUSED).
 * With `force` it deletes anyway; on success *ret_users (may be NULL; a
 * NULL-terminated array of *ret_n names, free each and the array with
 * free()) names the VMs left without their provider: none unless `force`,
 * and none when they could not be counted.  Other errors: -EINVAL bad
 * name, -ENOENT no such provider, the store's.  Nothing is deleted on
 * error. */
int nkp_provider_delete_checked(nkp_context *ctx, nkp_virt *v, const char *name, bool force,
                                char ***ret_users, size_t *ret_n);

/* ------------------------------------------------------------------------ */
/* Alarms                                                                    */

/* An alarm is either recorded (raised by a component, e.g. "vm-locked", kept
 * in ROOT/var/lib/nkp/alarms until cleared) or derived from the current state
 * ("provider-inactive": never backed up; "provider-deleted": deleted from the
 * store but still in the key cache). */
typedef struct nkp_alarm nkp_alarm;

/* Records (or refreshes) the alarm (kind, subject) and sends it to the
 * journal with structured fields.  `message` says what is wrong and the fix. */
int nkp_alarm_raise(nkp_context *ctx, const char *kind, const char *subject, const char *message);

/* Clears recorded alarms of `kind` (every kind when NULL) for `subject`
 * (every subject when NULL). */
int nkp_alarm_clear(nkp_context *ctx, const char *kind, const char *subject);

/* Recorded and derived alarms, oldest first.  Free with nkp_alarm_list_free. */
int nkp_alarm_list(nkp_context *ctx, nkp_alarm ***ret, size_t *ret_n);
void nkp_alarm_list_free(nkp_alarm **list, size_t n);

const char *nkp_alarm_kind(const nkp_alarm *a);
const char *nkp_alarm_subject(const nkp_alarm *a);
const char *nkp_alarm_message(const nkp_alarm *a);
int64_t nkp_alarm_since(const nkp_alarm *a); /* seconds since the epoch, 0 if derived */

#ifdef __cplusplus
}
#endif

/* GLib users (include <glib.h> first) get g_autoptr() for the public
 * types. */
#ifdef G_DEFINE_AUTOPTR_CLEANUP_FUNC
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_secret, nkp_secret_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_context, nkp_context_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_backup_report, nkp_backup_report_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_provider, nkp_provider_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_keysafe, nkp_keysafe_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_virt, nkp_virt_close)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_revert_result, nkp_revert_result_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_host_status, nkp_host_status_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_hostkey_status, nkp_hostkey_status_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_rekey_result, nkp_rekey_result_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_vm_result, nkp_vm_result_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_vm_status, nkp_vm_status_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_ekcert_request, nkp_ekcert_request_free)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(nkp_daemon, nkp_daemon_free)
#endif

#endif /* NKP_NKP_H */
