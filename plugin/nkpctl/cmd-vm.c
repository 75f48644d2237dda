/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm …: the vm group's verbs and their rows of the command table
 * (nkpctl.c parses the options and counts the arguments), and `host
 * unlock`: printing around libnkp's VM operations (nkp.h "VM operations";
 * the protocol itself is in plugin/lib/vm-convert.c).
 *
 *   vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]
 *   vm decrypt DOMAIN
 *   vm rekey DOMAIN [--provider NAME] [--deep] | --all [--provider NAME]
 *                                      (shallow: cmd-rekey.c)
 *   vm status DOMAIN | vm list
 *
 * A domain named like an option goes after "--": vm encrypt -- -x.  The
 * library's notes ("note: VM 'x': rolled back the interrupted …") come
 * through nkpctl's log function ("nkpctl: note: …" on stderr).  libvirt
 * calls run under a deadline (nkpctl_virt_open). */
#include <stdio.h>

#include "nkpctl.h"

/* The verbs' options, filled by nkpctl.c's GOptionContext before run(). */
static char *opt_provider, *opt_disks, *opt_progress;
static gboolean opt_deep, opt_all;

/* ---- encrypt, decrypt, rekey --deep ---------------------------------------- */

static void print_finished(NkpctlGlobals *g, const nkp_vm_result *res)
{
        const char *name = nkp_vm_result_name(res);
        if (!g->json) {
                printf("VM '%s': finished the interrupted %s.\n", name,
                       nkp_vm_result_finished(res));
                return;
        }
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", name);
        nkpctl_json_add_string(b, "finished", nkp_vm_result_finished(res));
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

/* "vTPM, vda, vdb" */
static char *objects_text(const nkp_vm_result *res)
{
        GString *what = g_string_new(nkp_vm_result_vtpm(res) ? "vTPM" : "");
        for (size_t i = 0; i < nkp_vm_result_n_disks(res); i++)
                g_string_append_printf(what, "%s%s", what->len ? ", " : "",
                                       nkp_vm_result_disk(res, i));
        return g_string_free(what, FALSE);
}

static void print_protected_json(const nkp_vm_result *res)
{
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", nkp_vm_result_name(res));
        nkpctl_json_add_string(b, "provider", nkp_vm_result_provider(res));
        json_builder_set_member_name(b, "vtpm");
        json_builder_add_boolean_value(b, nkp_vm_result_vtpm(res));
        json_builder_set_member_name(b, "disks");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_vm_result_n_disks(res); i++)
                json_builder_add_string_value(b, nkp_vm_result_disk(res, i));
        json_builder_end_array(b);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

/* After encrypt or rekey --deep. */
static void print_protected(NkpctlGlobals *g, const nkp_vm_result *res, bool rekeyed)
{
        if (nkp_vm_result_finished(res)) {
                print_finished(g, res);
                return;
        }
        if (g->json) {
                print_protected_json(res);
                return;
        }
        g_autofree char *what = objects_text(res);
        const char *name = nkp_vm_result_name(res), *provider = nkp_vm_result_provider(res);
        if (rekeyed)
                printf("VM '%s' has new keys from provider '%s'; its data was re-encrypted "
                       "(%s).\n",
                       name, provider, what);
        else
                printf("VM '%s' is encrypted by provider '%s' (%s).\n", name, provider, what);
}

static int vm_encrypt(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        int r = nkpctl_progress_setup(g, opt_progress);
        if (r)
                return r;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_encrypt(g->ctx, v, argv[1], opt_provider, opt_disks, &res) < 0)
                return nkpctl_lib_error();
        print_protected(g, res, false);
        return 0;
}

static int vm_decrypt(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        const char *name = argv[1];
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        int r = nkpctl_progress_setup(g, opt_progress);
        if (r)
                return r;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_vm_decrypt(g->ctx, v, name, &res) < 0)
                return nkpctl_lib_error();
        if (nkp_vm_result_finished(res))
                print_finished(g, res);
        else if (!g->json)
                printf("VM '%s' is no longer encrypted by nkp.\n", name);
        else {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "name", name);
                nkpctl_json_add_string(b, "state", "plain");
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        }
        return 0;
}

static int vm_rekey_deep(NkpctlGlobals *g, const char *name)
{
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_rekey_deep(g->ctx, v, name, opt_provider, &res) < 0)
                return nkpctl_lib_error();
        print_protected(g, res, true);
        return 0;
}

static int vm_rekey(NkpctlGlobals *g, int argc, char **argv)
{
        if (opt_all == (argc == 2))
                return nkpctl_usage_error(g, "'vm rekey' takes one DOMAIN or --all.");
        if (opt_all && opt_deep)
                return nkpctl_usage_error(g, "--deep rekeys one shut-off DOMAIN; --all is shallow "
                                             "only.");
        int r = nkpctl_progress_setup(g, opt_progress);
        if (r)
                return r;
        if (opt_deep)
                return vm_rekey_deep(g, argv[1]);
        if (opt_all)
                return nkpctl_rekey_all(g, opt_provider);
        return nkpctl_rekey_one(g, argv[1], opt_provider);
}

/* ---- status / list ------------------------------------------------------ */

static void status_json(JsonBuilder *b, const nkp_vm_status *s)
{
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", nkp_vm_status_name(s));
        nkpctl_json_add_string(b, "uuid", nkp_vm_status_uuid(s));
        nkpctl_json_add_string(b, "state", nkp_vm_state_name(nkp_vm_status_state(s)));
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, nkp_vm_status_running(s));
        nkpctl_json_add_string(b, "provider", nkp_vm_status_provider(s));
        nkpctl_json_add_string(b, "key_id", nkp_vm_status_key_id(s));
        nkpctl_json_add_string(b, "reason", nkp_vm_status_reason(s));
        json_builder_set_member_name(b, "pending");
        if (nkp_vm_status_pending_op(s)) {
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "op", nkp_vm_status_pending_op(s));
                nkpctl_json_add_string(b, "phase", nkp_vm_status_pending_phase(s));
                json_builder_set_member_name(b, "in_progress");
                json_builder_add_boolean_value(b, nkp_vm_status_pending_in_progress(s));
                json_builder_end_object(b);
        } else {
                json_builder_add_null_value(b);
        }
        json_builder_set_member_name(b, "objects");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_vm_status_n_objects(s); i++)
                json_builder_add_string_value(b, nkp_vm_status_object(s, i));
        json_builder_end_array(b);
        json_builder_set_member_name(b, "plain_layers"); /* "TARGET PATH" */
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_vm_status_n_plain_layers(s); i++)
                json_builder_add_string_value(b, nkp_vm_status_plain_layer(s, i));
        json_builder_end_array(b);
        json_builder_set_member_name(b, "disks");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_vm_status_n_disks(s); i++) {
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "target", nkp_vm_status_disk_target(s, i));
                nkpctl_json_add_string(b, "path", nkp_vm_status_disk_path(s, i));
                nkpctl_json_add_string(b, "state", nkp_vm_status_disk_state(s, i));
                nkpctl_json_add_string(b, "note", nkp_vm_status_disk_note(s, i));
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        json_builder_set_member_name(b, "clear_copies");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_vm_status_n_clear_copies(s); i++)
                json_builder_add_string_value(b, nkp_vm_status_clear_copy(s, i));
        json_builder_end_array(b);
        json_builder_end_object(b);
}

/* "  disk vdb: plain-data: holds data, in clear (alarm …)": every disk,
 * one line each, under the VM's line (vm status). */
static void status_disk_lines(const nkp_vm_status *s)
{
        for (size_t i = 0; i < nkp_vm_status_n_disks(s); i++) {
                const char *note = nkp_vm_status_disk_note(s, i);
                printf("  disk %s: %s%s%s\n", nkp_vm_status_disk_target(s, i),
                       nkp_vm_status_disk_state(s, i), note ? ": " : "", note ? note : "");
        }
}

static void status_line(const nkp_vm_status *s)
{
        const char *name = nkp_vm_status_name(s);
        switch (nkp_vm_status_state(s)) {
        case NKP_VM_ENCRYPTED: {
                GString *objs = g_string_new(NULL);
                for (size_t i = 0; i < nkp_vm_status_n_objects(s); i++)
                        g_string_append_printf(objs, "%s%s", i ? ", " : "",
                                               nkp_vm_status_object(s, i));
                printf("%s: encrypted by %s (%s)\n", name, nkp_vm_status_provider(s), objs->str);
                g_string_free(objs, TRUE);
                break;
        }
        case NKP_VM_LOCKED:
                printf("%s: locked: %s\n", name, nkp_vm_status_reason(s));
                break;
        case NKP_VM_PLAIN:
                printf("%s: plain\n", name);
                break;
        case NKP_VM_ERROR:
                printf("%s: error: %s\n", name, nkp_vm_status_reason(s));
                break;
        }
        for (size_t i = 0; i < nkp_vm_status_n_plain_layers(s); i++) {
                g_auto(GStrv) tp = g_strsplit(nkp_vm_status_plain_layer(s, i), " ", 2);
                printf("%s: disk %s has a plain layer '%s': nkpctl vm encrypt-layer '%s' '%s'\n",
                       name, tp[0], tp[1] ? tp[1] : "", name, tp[1] ? tp[1] : "");
        }
        const char *op = nkp_vm_status_pending_op(s);
        if (op && nkp_vm_status_pending_in_progress(s))
                printf("%s: '%s' in progress\n", name, op);
        else if (op)
                printf("%s: interrupted '%s' pending (phase %s): run it again to finish or roll "
                       "it back, or start the VM (the hook does it)\n",
                       name, op, nkp_vm_status_pending_phase(s));
        for (size_t i = 0; i < nkp_vm_status_n_clear_copies(s); i++)
                printf("%s: copy in clear: %s\n", name, nkp_vm_status_clear_copy(s, i));
}

static int vm_status(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_vm_status) s = NULL;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_vm_status_get(g->ctx, v, argv[1], &s) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                status_json(b, s);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                status_line(s);
                status_disk_lines(s);
        }
        return 0;
}

static int vm_list(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        g_autoptr(nkp_virt) v = NULL;
        nkp_vm_status **list = NULL;
        size_t n = 0;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_vm_list(g->ctx, v, &list, &n) < 0)
                return nkpctl_lib_error();
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_array(b);
        for (size_t i = 0; i < n; i++) {
                if (g->json)
                        status_json(b, list[i]);
                else
                        status_line(list[i]);
        }
        json_builder_end_array(b);
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        nkp_vm_status_list_free(list, n);
        return 0;
}

/* ---- host unlock (a host verb: cmd-host.c) ----------------------------- */

int nkpctl_host_unlock(NkpctlGlobals *g)
{
        g_autoptr(nkp_virt) v = NULL;
        nkp_vm_status **list = NULL;
        size_t n = 0;
        unsigned still = 0, unlocked = 0;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_host_unlock(g->ctx, v, &list, &n, &still) < 0)
                return nkpctl_lib_error();
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_array(b);
        for (size_t i = 0; i < n; i++) {
                const nkp_vm_status *s = list[i];
                enum nkp_vm_state st = nkp_vm_status_state(s);
                if (st == NKP_VM_ENCRYPTED) {
                        unlocked++;
                        if (!g->json)
                                printf("%s: unlocked (provider '%s')\n", nkp_vm_status_name(s),
                                       nkp_vm_status_provider(s));
                } else if (st == NKP_VM_LOCKED && !g->json) {
                        printf("%s: still locked: %s\n", nkp_vm_status_name(s),
                               nkp_vm_status_reason(s));
                }
                if (g->json && st != NKP_VM_PLAIN)
                        status_json(b, s);
        }
        nkp_vm_status_list_free(list, n);
        json_builder_end_array(b);
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        else if (unlocked + still == 0)
                printf("No VM on this host is encrypted by nkp.\n");
        if (still)
                return nkpctl_error("%u VM(s) are still locked: restore their providers (nkpctl "
                                    "provider restore FILE.p12), then run nkpctl host unlock "
                                    "again.",
                                    still);
        return 0;
}

/* ---- vm create ----------------------------------------------------------- */
/* vm create FILE.xml [--provider NAME] [--start] [--transient]: a new VM
 * enrolled before libvirt sees it (nkp_vm_create). */

static char *opt_create_provider;
static gboolean opt_create_start, opt_create_transient;

static const GOptionEntry create_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_create_provider,
          "The provider whose keys protect the VM (default: the host's default)", "NAME" },
        { "start", 0, 0, G_OPTION_ARG_NONE, &opt_create_start, "Start it once defined", NULL },
        { "transient", 0, 0, G_OPTION_ARG_NONE, &opt_create_transient,
          "Start it as a transient domain (virsh create), define nothing", NULL },
        G_OPTION_ENTRY_NULL,
};

static int vm_create(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autofree char *xml = NULL;
        g_autoptr(GError) error = NULL;
        if (!g_file_get_contents(argv[1], &xml, NULL, &error))
                return nkpctl_error("Cannot read '%s': %s", argv[1], error->message);
        g_autoptr(nkp_virt) v = NULL;
        if (nkpctl_virt_open(g, &v) < 0)
                return nkpctl_lib_error();
        unsigned flags = (opt_create_start ? NKP_VM_CREATE_START : 0) |
                         (opt_create_transient ? NKP_VM_CREATE_TRANSIENT : 0);
        g_autoptr(nkp_vm_result) res = NULL;
        if (nkp_vm_create(g->ctx, v, xml, opt_create_provider, flags, &res) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                print_protected_json(res);
                return 0;
        }
        printf("VM '%s': created with its vTPM encrypted by provider '%s'; %s.\n",
               nkp_vm_result_name(res), nkp_vm_result_provider(res),
               opt_create_transient ? "started (transient: nothing defined)"
               : opt_create_start   ? "defined and started"
                                    : "defined (virsh start it)");
        return 0;
}

/* ---- the table --------------------------------------------------------- */

static const GOptionEntry encrypt_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_provider,
          "The provider whose keys protect the VM (default: the host's default)", "NAME" },
        { "disks", 0, 0, G_OPTION_ARG_STRING, &opt_disks,
          "The qcow2 disks to encrypt: all (default) or targets such as vda,vdb", "all|vda,vdb…" },
        { "progress", 0, 0, G_OPTION_ARG_STRING, &opt_progress,
          "Report each step: json (lines on stdout), bar (on a terminal, the default there), none",
          "json|bar|none" },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry decrypt_options[] = {
        { "progress", 0, 0, G_OPTION_ARG_STRING, &opt_progress,
          "Report each step: json (lines on stdout), bar (on a terminal, the default there), none",
          "json|bar|none" },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry rekey_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_provider,
          "The provider to rekey to (default: the host's default)", "NAME" },
        { "deep", 0, 0, G_OPTION_ARG_NONE, &opt_deep,
          "New data keys: vTPM state and disks re-encrypted (VM shut off)", NULL },
        { "all", 0, 0, G_OPTION_ARG_NONE, &opt_all, "Every nkp VM of this host (shallow)", NULL },
        { "progress", 0, 0, G_OPTION_ARG_STRING, &opt_progress,
          "Report each step: json (lines on stdout), bar (on a terminal, the default there), none",
          "json|bar|none" },
        G_OPTION_ENTRY_NULL,
};

const NkpctlCommand nkpctl_vm_commands[] = {
        { "vm", "encrypt", "DOMAIN",
          "Encrypt a shut-off VM's vTPM and qcow2 disks.",
          "Crash safe: an interrupted run is finished or rolled back by the next nkpctl command "
          "on the VM, or by its next start.",
          encrypt_options, 1, 1, vm_encrypt },
        { "vm", "decrypt", "DOMAIN", "Decrypt a shut-off nkp VM back to plain.", NULL,
          decrypt_options, 1, 1, vm_decrypt },
        { "vm", "rekey", "DOMAIN|--all", "Rekey one VM, or every nkp VM, to a provider.",
          "Shallow (default): a new KEK, the same data keys; online, the guest notices nothing.\n"
          "Deep (--deep): new data keys, the vTPM state and every disk re-encrypted; the VM must "
          "be shut off and a full copy of its disks must fit.",
          rekey_options, 0, 1, vm_rekey },
        { "vm", "status", "DOMAIN", "Show whether a VM is plain, encrypted or locked.",
          NULL, NULL, 1, 1, vm_status },
        { "vm", "list", "", "Show the status of every defined VM.", NULL, NULL, 0, 0, vm_list },
        { "vm", "create", "FILE.xml", "Create a new VM with its vTPM encrypted from the start.",
          "Enrols the domain XML's plain emulated vTPM (a <uuid> is needed) before libvirt sees "
          "it, then defines it (--start: and starts it; --transient: starts it as virsh create "
          "does, defining nothing). The way to create vTPM VMs under [vtpm] policy=require.",
          create_options, 1, 1, vm_create },
        NKPCTL_SNAPSHOT_CLONE_ROWS /* cmd-snapshot.c */
        /* cmd-backup.c */
        { "vm", "backup", "DOMAIN DIR", "Back up an nkp VM's disks, encrypted, into DIR.",
          "Full (default): DIR must hold no backup. --incremental: adds what changed since the "
          "last backup in DIR (libvirt checkpoints; the VM running). Every image is a LUKS "
          "qcow2 under the disk's own key; DIR also holds the VM's definition with its keysafe "
          "and its (encrypted) vTPM state. Restore with: nkpctl vm restore-backup DIR",
          nkpctl_backup_options, 2, 2, nkpctl_vm_backup },
        { "vm", "restore-backup", "DIR",
          "Define a VM from an nkp backup (full + incrementals merged), encrypted.",
          "The VM's provider must be on this host (nkpctl provider restore FILE.p12). The VM "
          "keeps its UUID: restore on another host, or undefine the original first.",
          nkpctl_restore_backup_options, 1, 1, nkpctl_vm_restore_backup },
        { "vm", "blockcopy", "DOMAIN DISK DEST",
          "Copy a running nkp VM's disk into DEST, encrypted under the disk's key.", NULL, NULL,
          3, 3, nkpctl_vm_blockcopy },
        { 0 },
};
