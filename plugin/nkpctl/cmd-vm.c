/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm …: enrolling VMs (encrypt/decrypt), deep rekey, their status,
 * crash recovery, and `host unlock`: argument parsing and printing over
 * libnkp's VM operations (nkp.h "VM operations"; the protocol itself is in
 * plugin/lib/vm-convert.c).
 *
 *   vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]
 *   vm decrypt DOMAIN
 *   vm rekey DOMAIN --deep [--provider NAME]   (parsed in cmd-rekey.c)
 *   vm status DOMAIN | vm list
 *
 * The library's notes ("note: VM 'x': rolled back the interrupted …") come
 * through nkpctl's log function ("nkpctl: note: …" on stderr).
 *
 * Exit 0 on success; one line on stderr otherwise.  libvirt calls run under
 * a deadline (nkp_virt_open, NKPCTL_LIBVIRT_DEADLINE). */
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

static int open_virt(NkpctlGlobals *g, NkpVirt **ret)
{
        return nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, ret);
}

static void add_str(JsonBuilder *b, const char *member, const char *value)
{
        json_builder_set_member_name(b, member);
        if (value)
                json_builder_add_string_value(b, value);
        else
                json_builder_add_null_value(b);
}

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
        add_str(b, "name", name);
        add_str(b, "finished", nkp_vm_result_finished(res));
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
        add_str(b, "name", nkp_vm_result_name(res));
        add_str(b, "provider", nkp_vm_result_provider(res));
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

static int vm_encrypt(NkpctlGlobals *g, const char *name, const char *provider,
                      const char *disks)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        if (open_virt(g, &v) < 0 || nkp_vm_encrypt(g->ctx, v, name, provider, disks, &res) < 0)
                return nkpctl_lib_error();
        print_protected(g, res, false);
        return 0;
}

static int vm_decrypt(NkpctlGlobals *g, const char *name)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        if (open_virt(g, &v) < 0 || nkp_vm_decrypt(g->ctx, v, name, &res) < 0)
                return nkpctl_lib_error();
        if (nkp_vm_result_finished(res))
                print_finished(g, res);
        else if (!g->json)
                printf("VM '%s' is no longer encrypted by nkp.\n", name);
        else {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                add_str(b, "name", name);
                add_str(b, "state", "plain");
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        }
        return 0;
}

int nkpctl_vm_rekey_deep(NkpctlGlobals *g, const char *name, const char *provider)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(nkp_vm_result) res = NULL;
        if (open_virt(g, &v) < 0 || nkp_vm_rekey_deep(g->ctx, v, name, provider, &res) < 0)
                return nkpctl_lib_error();
        print_protected(g, res, true);
        return 0;
}

int nkpctl_vm_recover(NkpctlGlobals *g, nkp_virt *v, const char *name)
{
        enum nkp_vm_recovery outcome;
        int r = nkp_vm_recover(g->ctx, v, name, &outcome);
        return r < 0 ? r : (int) outcome;
}

/* ---- status / list ------------------------------------------------------ */

static void status_json(JsonBuilder *b, const nkp_vm_status *s)
{
        json_builder_begin_object(b);
        add_str(b, "name", nkp_vm_status_name(s));
        add_str(b, "uuid", nkp_vm_status_uuid(s));
        add_str(b, "state", nkp_vm_state_name(nkp_vm_status_state(s)));
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, nkp_vm_status_running(s));
        add_str(b, "provider", nkp_vm_status_provider(s));
        add_str(b, "key_id", nkp_vm_status_key_id(s));
        add_str(b, "reason", nkp_vm_status_reason(s));
        json_builder_set_member_name(b, "pending");
        if (nkp_vm_status_pending_op(s)) {
                json_builder_begin_object(b);
                add_str(b, "op", nkp_vm_status_pending_op(s));
                add_str(b, "phase", nkp_vm_status_pending_phase(s));
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
        json_builder_end_object(b);
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
        const char *op = nkp_vm_status_pending_op(s);
        if (op && nkp_vm_status_pending_in_progress(s))
                printf("%s: '%s' in progress\n", name, op);
        else if (op)
                printf("%s: interrupted '%s' pending (phase %s): run it again to finish or roll "
                       "it back, or start the VM (the hook does it)\n",
                       name, op, nkp_vm_status_pending_phase(s));
}

static int vm_status(NkpctlGlobals *g, const char *name)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(nkp_vm_status) s = NULL;
        if (open_virt(g, &v) < 0 || nkp_vm_status_get(g->ctx, v, name, &s) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                status_json(b, s);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                status_line(s);
        }
        return 0;
}

static int vm_list(NkpctlGlobals *g)
{
        g_autoptr(NkpVirt) v = NULL;
        nkp_vm_status **list = NULL;
        size_t n = 0;
        if (open_virt(g, &v) < 0 || nkp_vm_list(g->ctx, v, &list, &n) < 0)
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

/* ---- entry points ------------------------------------------------------- */

static const char vm_usage[] =
        "Usage: nkpctl vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]\n"
        "       nkpctl vm decrypt DOMAIN\n"
        "       nkpctl vm rekey DOMAIN [--provider NAME] [--deep] | --all [--provider NAME]\n"
        "       nkpctl vm status DOMAIN | nkpctl vm list\n";

/* An option's value: "--name VALUE" (advancing *i) or "--name=VALUE". */
static const char *option_value(int argc, char **argv, int *i, const char *name)
{
        size_t len = strlen(name);
        if (strcmp(argv[*i], name) == 0 && *i + 1 < argc)
                return argv[++*i];
        if (strncmp(argv[*i], name, len) == 0 && argv[*i][len] == '=')
                return argv[*i] + len + 1;
        return NULL;
}

static int vm_encrypt_args(NkpctlGlobals *g, int argc, char **argv)
{
        const char *provider = NULL, *disks = NULL, *domain = NULL, *value;
        for (int i = 2; i < argc; i++) {
                if ((value = option_value(argc, argv, &i, "--provider")))
                        provider = value;
                else if ((value = option_value(argc, argv, &i, "--disks")))
                        disks = value;
                else if (argv[i][0] != '-' && !domain)
                        domain = argv[i];
                else {
                        fputs(vm_usage, stderr);
                        return nkpctl_error("unknown or incomplete option '%s'.", argv[i]);
                }
        }
        if (!domain) {
                fputs(vm_usage, stderr);
                return 2;
        }
        return vm_encrypt(g, domain, provider, disks);
}

int nkpctl_vm(NkpctlGlobals *g, int argc, char **argv)
{
        if (argc < 2) {
                fputs(vm_usage, stderr);
                return 2;
        }
        const char *cmd = argv[1];
        if (strcmp(cmd, "list") == 0 && argc == 2)
                return vm_list(g);
        if (strcmp(cmd, "status") == 0 && argc == 3)
                return vm_status(g, argv[2]);
        if (strcmp(cmd, "decrypt") == 0 && argc == 3)
                return vm_decrypt(g, argv[2]);
        if (strcmp(cmd, "encrypt") == 0 && argc >= 3)
                return vm_encrypt_args(g, argc, argv);
        if (strcmp(cmd, "rekey") == 0)
                return nkpctl_vm_rekey(g, argc, argv);
        fputs(vm_usage, stderr);
        return nkpctl_error("unknown vm command '%s'.", cmd);
}

int nkpctl_host_unlock(NkpctlGlobals *g)
{
        g_autoptr(NkpVirt) v = NULL;
        nkp_vm_status **list = NULL;
        size_t n = 0;
        unsigned still = 0, unlocked = 0;
        if (open_virt(g, &v) < 0 || nkp_host_unlock(g->ctx, v, &list, &n, &still) < 0)
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

/* ==== issue 15: vm create (table row in the vm group's table) ================== */
/* vm create FILE.xml [--provider NAME] [--start] [--transient]: a new VM
 * enrolled before libvirt sees it (nkp_vm_create). */

static char *opt_create_provider;
static gboolean opt_create_start, opt_create_transient;

const GOptionEntry nkpctl_vm_create_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_create_provider,
          "The provider whose keys protect the VM (default: the host's default)", "NAME" },
        { "start", 0, 0, G_OPTION_ARG_NONE, &opt_create_start, "Start it once defined", NULL },
        { "transient", 0, 0, G_OPTION_ARG_NONE, &opt_create_transient,
          "Start it as a transient domain (virsh create), define nothing", NULL },
        G_OPTION_ENTRY_NULL,
};

int nkpctl_vm_create(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autofree char *xml = NULL;
        g_autoptr(GError) error = NULL;
        if (!g_file_get_contents(argv[1], &xml, NULL, &error))
                return nkpctl_error("Cannot read '%s': %s", argv[1], error->message);
        g_autoptr(NkpVirt) v = NULL;
        if (open_virt(g, &v) < 0)
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
