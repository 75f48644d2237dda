/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl: shared state of the admin CLI and the entry points of its command
 * groups (one file per group). */
#ifndef NKPCTL_H
#define NKPCTL_H

#include <json-glib/json-glib.h>

#include "nkp-private.h"

/* Bound on each libvirt call (nkp_virt_open): libvirt has no timeout. */
#define NKPCTL_LIBVIRT_DEADLINE 60

typedef struct {
        const char *root;        /* --root, NULL for "/" */
        const char *connect_uri; /* --connect, NULL for libvirt's default */
        bool json;               /* --json: one JSON document on stdout */
        nkp_context *ctx;
} NkpctlGlobals;

/* Each returns the process exit code.  argv[0] is the group name. */
int nkpctl_provider(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_alarms(NkpctlGlobals *g, int argc, char **argv);
int nkpctl_host(NkpctlGlobals *g, int argc, char **argv);
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

/* Prints "nkpctl: <message>" on stderr; returns the exit code 1. */
int nkpctl_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
/* Same with libnkp's last error message. */
int nkpctl_lib_error(void);
/* Prints `node` as one JSON document on stdout (takes ownership). */
void nkpctl_print_json(JsonNode *node);

#endif
