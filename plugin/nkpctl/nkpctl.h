/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl: shared state of the admin CLI and the entry points of its command
 * groups (one file per group). */
#ifndef NKPCTL_H
#define NKPCTL_H

#include <json-glib/json-glib.h>

#include "nkp-private.h"

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

/* The verbs of each group (cmd-provider.c, cmd-vm-table.c, cmd-host.c,
 * cmd-alarms.c), each array ended by an entry whose verb is NULL. */
extern const NkpctlCommand nkpctl_provider_commands[];
extern const NkpctlCommand nkpctl_vm_commands[];
extern const NkpctlCommand nkpctl_host_commands[];
extern const NkpctlCommand nkpctl_alarms_commands[];

/* The vm group's old entry point (cmd-vm.c): argv[0] is "vm", argv[1] the
 * verb, then its arguments and options as typed. */
int nkpctl_vm(NkpctlGlobals *g, int argc, char **argv);

/* `vm rekey` (cmd-rekey.c): shallow rekey of one VM or --all; --deep goes
 * to nkpctl_vm_rekey_deep.  argv[1] is "rekey". */
int nkpctl_vm_rekey(NkpctlGlobals *g, int argc, char **argv);

/* Deep rekey of the shut-off VM `name` (cmd-vm.c): new DEKs, the vTPM state
 * and every encrypted disk re-encrypted, under `provider` (NULL: the VM's
 * current provider). */
int nkpctl_vm_rekey_deep(NkpctlGlobals *g, const char *name, const char *provider);

/* Before changing VM `name`'s keys or files (cmd-vm.c): takes the VM's lock
 * for the call, and reconciles an operation that a crash interrupted (vm
 * encrypt/decrypt/rekey --deep, see docs/crash-safety.md) to the VM's
 * current persistent definition.  0 nothing was pending, 1 rolled back
 * (a note on stderr), 2 finished (a note on stderr); a negative errno with
 * libnkp's message set (print it with nkpctl_lib_error()), e.g. -EBUSY when
 * another nkpctl holds the VM's lock. */
int nkpctl_vm_recover(NkpctlGlobals *g, NkpVirt *v, const char *name);

/* `host unlock` (cmd-vm.c): after a restore, re-checks every defined VM
 * whose provider was missing, clears the vm-locked alarms it can. */
int nkpctl_host_unlock(NkpctlGlobals *g);

/* `vm create FILE.xml` (cmd-vm.c, issue 15 block) and its options. */
extern const GOptionEntry nkpctl_vm_create_options[];
int nkpctl_vm_create(NkpctlGlobals *g, int argc, char **argv);

/* Prints "nkpctl: <message>" on stderr; returns the exit code 1. */
int nkpctl_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
/* Prints "nkpctl: <message>  Try 'nkpctl <g->command> --help'." on stderr
 * (one line); returns the exit code 2. */
int nkpctl_usage_error(const NkpctlGlobals *g, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* Same with libnkp's last error message. */
int nkpctl_lib_error(void);
/* Prints `node` as one JSON document on stdout (takes ownership). */
void nkpctl_print_json(JsonNode *node);

#endif
