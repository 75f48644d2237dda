/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl: shared state of the admin CLI and the entry points of its command
 * groups (one file per group). */
#ifndef NKPCTL_H
#define NKPCTL_H

/* Programs include only the public API (nkp.h) and link libnkp.so; GLib
 * first, for nkp.h's g_autoptr declarations. */
#include <glib.h>
#include <json-glib/json-glib.h>

#include "nkp/nkp.h"

/* Bound on each libvirt call (nkp_virt_open): libvirt has no timeout. */
#define NKPCTL_LIBVIRT_DEADLINE 60

/* Exit codes, the same for every command (see nkpctl.c). */
enum {
        NKPCTL_EXIT_OK = 0,      /* done */
        NKPCTL_EXIT_FAILED = 1,  /* refused or failed: one line on stderr */
        NKPCTL_EXIT_USAGE = 2,   /* usage error: one line naming it + "Try …" */
};

typedef struct {
        const char *root;        /* --root, NULL for "/" */
        const char *connect_uri; /* --connect, NULL for libvirt's default */
        bool json;               /* --json: one JSON document on stdout */
        nkp_context *ctx;
        const char *command;     /* "provider create": names the --help of usage errors */
} NkpctlGlobals;

/* One verb of the command table.  nkpctl.c parses the verb's `options` and
 * the global ones (--root, --connect, --json, before or after the verb) with
 * one GOptionContext, checks that min_args..max_args positional arguments
 * remain, and calls run() with argv[0] = "nkpctl GROUP VERB" and the
 * positional arguments after it.  run() returns the exit code. */
typedef struct {
        const char *group;            /* "provider" */
        const char *verb;             /* "create"; NULL ends a table */
        const char *params;           /* positional arguments for the usage: "NAME" */
        const char *summary;          /* one line, ends with a full stop */
        const char *description;      /* more text for --help, or NULL */
        const GOptionEntry *options;  /* the verb's own options, or NULL */
        int min_args, max_args;       /* positional arguments accepted */
        int (*run)(NkpctlGlobals *g, int argc, char **argv);
} NkpctlCommand;

/* The verbs of each group (cmd-provider.c, cmd-vm.c, cmd-host.c,
 * cmd-alarms.c), each array ended by an entry whose verb is NULL. */
extern const NkpctlCommand nkpctl_provider_commands[];
extern const NkpctlCommand nkpctl_vm_commands[];
extern const NkpctlCommand nkpctl_host_commands[];
extern const NkpctlCommand nkpctl_alarms_commands[];
/* vm backup, restore-backup, blockcopy (cmd-backup.c): their run functions
 * and options, for the rows in cmd-vm.c's vm table. */
int nkpctl_vm_backup(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_vm_restore_backup(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_vm_blockcopy(NkpctlGlobals *g, int argc, char **argv);
extern const GOptionEntry nkpctl_backup_options[];
extern const GOptionEntry nkpctl_restore_backup_options[];

/* Shallow rekey (cmd-rekey.c) of VM `name`, or of every nkp VM, to
 * `provider` (NULL: the default); prints the result(s); returns the exit
 * code. */
/* vm snapshot, vm encrypt-layer, vm revert, vm clone (cmd-snapshot.c): rows of
 * nkpctl_vm_commands. */
int nkpctl_vm_snapshot(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_vm_encrypt_layer(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_vm_revert(NkpctlGlobals *g, int argc, char **argv);
extern const GOptionEntry nkpctl_revert_options[];
int nkpctl_vm_clone(NkpctlGlobals *g, int argc, char **argv);
extern const GOptionEntry nkpctl_clone_options[];
#define NKPCTL_SNAPSHOT_CLONE_ROWS                                                              \
        { "vm", "snapshot", "DOMAIN NAME",                                                      \
          "Take a disk-only snapshot of an nkp VM with encrypted overlays.",                    \
          "Running: live and atomic; shut off: offline. Each nkp disk gets a LUKS qcow2 "       \
          "overlay beside its active layer (vm1.qcow2 -> vm1.NAME) under the disk's own key. "  \
          "Plain 'virsh snapshot-create-as --disk-only' makes plain overlays: nkp finds them "  \
          "(vm status) and refuses the next start until 'vm encrypt-layer'.",                   \
          NULL, 2, 2, nkpctl_vm_snapshot },                                                     \
        { "vm", "encrypt-layer", "DOMAIN FILE",                                                 \
          "Encrypt a plain snapshot layer of a shut-off nkp VM in place.",                      \
          "FILE keeps its backing file; crash safe: run it again after an interruption.",       \
          NULL, 2, 2, nkpctl_vm_encrypt_layer },                                                \
        { "vm", "revert", "DOMAIN SNAPSHOT",                                                    \
          "Revert a shut-off nkp VM to one of its disk-only snapshots.",                        \
          "Each disk gets a new LUKS layer over its layer at SNAPSHOT, which stays untouched "  \
          "(revert again at will); the layers left behind are listed. The vTPM is not part "    \
          "of a disk-only snapshot: it keeps its state. (virsh snapshot-revert cannot revert "  \
          "external snapshots with libvirt 9.0.)",                                              \
          nkpctl_revert_options, 2, 2, nkpctl_vm_revert },                                      \
        { "vm", "clone", "SOURCE NEW",                                                          \
          "Clone a shut-off nkp VM into a new encrypted VM (what virt-clone does).",            \
          "New UUID, keysafe, secret UUIDs, MAC addresses and a fresh vTPM; every disk copied " \
          "(its chain flattened) under NEW data keys, or with --same-keys copied as it is "     \
          "under the original's keys re-wrapped for the clone. virt-clone itself fails on "     \
          "LUKS disks with libvirt 9.0 (docs/snapshots-clones.md).",                            \
          nkpctl_clone_options, 2, 2, nkpctl_vm_clone },

int nkpctl_rekey_one(NkpctlGlobals *g, const char *name, const char *provider);
int nkpctl_rekey_all(NkpctlGlobals *g, const char *provider);

/* `host unlock` (cmd-vm.c): after a restore, re-checks every defined VM
 * whose provider was missing, clears the vm-locked alarms it can. */
int nkpctl_host_unlock(NkpctlGlobals *g);

/* --progress MODE (progress.c): json, bar, none, or NULL for the default
 * (bar on a terminal).  Returns 0, or the usage exit code 2 with the
 * reason printed. */
int nkpctl_progress_setup(NkpctlGlobals *g, const char *mode);

/* nkp_virt_open() of --connect's URI under NKPCTL_LIBVIRT_DEADLINE. */
int nkpctl_virt_open(const NkpctlGlobals *g, nkp_virt **ret);

/* Prints "nkpctl: <message>" on stderr; returns the exit code 1. */
int nkpctl_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
/* Prints "nkpctl: <message>  Try 'nkpctl <g->command> --help'." on stderr
 * (one line); returns the exit code 2. */
int nkpctl_usage_error(const NkpctlGlobals *g, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* Same with libnkp's last error message. */
int nkpctl_lib_error(void);
/* Prints `node` as one JSON document on stdout (takes ownership). */
void nkpctl_print_json(JsonNode *node);
/* Adds member `member` to the object being built: `value`, or null. */
void nkpctl_json_add_string(JsonBuilder *b, const char *member, const char *value);

#endif
