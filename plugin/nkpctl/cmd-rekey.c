/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm rekey …: vSphere's two rekeys.
 *
 *   vm rekey DOMAIN [--provider NAME]    shallow: new KEK, DEKs re-wrapped
 *   vm rekey --all [--provider NAME]     shallow, every nkp VM on the host
 *   vm rekey DOMAIN --deep [--provider NAME]
 *                                        deep: new DEKs, data re-encrypted
 *                                        (shut-off VM; cmd-vm.c)
 *
 * The shallow rekey is libnkp's (nkp_vm_rekey, plugin/lib/vm-rekey.c; the
 * protocol and its crash safety: docs/rekey.md).  This file parses the
 * arguments and prints the results, one line (or JSON object) per VM. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

static const char rekey_usage[] =
        "Usage: nkpctl vm rekey DOMAIN [--provider NAME] [--deep]\n"
        "       nkpctl vm rekey --all [--provider NAME]\n";

/* ---- output --------------------------------------------------------------- */

/* One VM's line (or JSON object): a library result, or a failure that
 * nkpctl met itself (reconciling an interrupted conversion). */
typedef struct {
        const char *name;
        int error;
        const char *from, *to;
        bool running;
        const char *reason;
} Outcome;

static Outcome outcome_of(const nkp_rekey_result *res)
{
        return (Outcome) {
                .name = nkp_rekey_result_domain(res),
                .error = nkp_rekey_result_error(res),
                .from = nkp_rekey_result_from(res),
                .to = nkp_rekey_result_provider(res),
                .running = nkp_rekey_result_running(res),
                .reason = nkp_rekey_result_message(res),
        };
}

/* "rekeyed"; "locked" when the VM's provider is missing or holds another
 * key (what `vm status` calls a locked VM); "failed" otherwise. */
static const char *result_word(const Outcome *o)
{
        if (o->error == 0)
                return "rekeyed";
        return (o->error == -ENOKEY || o->error == -EKEYREJECTED) ? "locked" : "failed";
}

static void add_str(JsonBuilder *b, const char *member, const char *value)
{
        json_builder_set_member_name(b, member);
        if (value)
                json_builder_add_string_value(b, value);
        else
                json_builder_add_null_value(b);
}

static void outcome_json(JsonBuilder *b, const Outcome *o)
{
        json_builder_begin_object(b);
        add_str(b, "name", o->name);
        add_str(b, "result", result_word(o));
        add_str(b, "from", o->from);
        add_str(b, "provider", o->to);
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, o->running);
        add_str(b, "reason", o->reason);
        json_builder_end_object(b);
}

/* --all's line for one VM. */
static void outcome_line(const Outcome *o)
{
        if (o->error < 0)
                printf("%s: %s: %s\n", o->name, result_word(o), o->reason);
        else if (strcmp(o->from, o->to) == 0)
                printf("%s: rekeyed to '%s' (same provider, new KEK)\n", o->name, o->to);
        else
                printf("%s: rekeyed to '%s' (was '%s')\n", o->name, o->to, o->from);
        fflush(stdout);
}

/* ---- one VM --------------------------------------------------------------- */

static int rekey_single(NkpctlGlobals *g, const char *name, const char *provider)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(nkp_rekey_result) res = NULL;
        if (nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, &v) < 0 ||
            nkp_vm_rekey(g->ctx, v, name, provider, &res) < 0)
                return nkpctl_lib_error();
        Outcome o = outcome_of(res);
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                outcome_json(b, &o);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("VM '%s' is rekeyed to provider '%s' (was '%s'): new KEK, same data "
                       "keys; %s.\n",
                       name, o.to, o.from,
                       o.running ? "live and persistent definitions" : "persistent definition");
        }
        return 0;
}

/* ---- every nkp VM ------------------------------------------------------------ */

typedef struct {
        NkpctlGlobals *g;
        NkpVirt *v;
        const char *provider;
        JsonBuilder *json; /* NULL: text */
        unsigned done, not_done;
} RekeyAll;

/* nkp_vm_rekey_all's callback: one line (or JSON object) per nkp VM. */
static void report_one(const nkp_rekey_result *res, void *userdata)
{
        RekeyAll *all = userdata;
        Outcome o = outcome_of(res);
        if (o.error == 0)
                all->done++;
        else
                all->not_done++;
        if (all->json)
                outcome_json(all->json, &o);
        else
                outcome_line(&o);
}

static int rekey_all(NkpctlGlobals *g, const char *provider)
{
        g_autoptr(NkpVirt) v = NULL;
        g_autoptr(JsonBuilder) b = json_builder_new();
        if (nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, &v) < 0)
                return nkpctl_lib_error();
        RekeyAll all = { .g = g, .v = v, .provider = provider, .json = g->json ? b : NULL };
        json_builder_begin_array(b);
        if (nkp_vm_rekey_all(g->ctx, v, provider, report_one, &all) < 0)
                return nkpctl_lib_error();
        json_builder_end_array(b);
        if (g->json)
                nkpctl_print_json(json_builder_get_root(b));
        else if (all.done + all.not_done == 0)
                printf("No VM on this host is encrypted by nkp.\n");
        if (all.not_done)
                return nkpctl_error("%u of %u nkp VMs were not rekeyed (see above); fix what "
                                    "their lines say and run the rekey again.",
                                    all.not_done, all.done + all.not_done);
        return 0;
}

/* ---- entry point ------------------------------------------------------------- */

int nkpctl_vm_rekey(NkpctlGlobals *g, int argc, char **argv)
{
        const char *provider = NULL, *domain = NULL;
        bool deep = false, all = false;
        for (int i = 2; i < argc; i++) {
                if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc)
                        provider = argv[++i];
                else if (g_str_has_prefix(argv[i], "--provider="))
                        provider = argv[i] + strlen("--provider=");
                else if (strcmp(argv[i], "--deep") == 0)
                        deep = true;
                else if (strcmp(argv[i], "--all") == 0)
                        all = true;
                else if (argv[i][0] != '-' && !domain)
                        domain = argv[i];
                else {
                        fputs(rekey_usage, stderr);
                        return nkpctl_error("unknown or incomplete option '%s'.", argv[i]);
                }
        }
        if (all == (domain != NULL) || (all && deep)) {
                fputs(rekey_usage, stderr);
                return nkpctl_error("name one DOMAIN, or --all (shallow rekey only).");
        }
        if (deep)
                return nkpctl_vm_rekey_deep(g, domain, provider);
        if (all)
                return rekey_all(g, provider);
        return rekey_single(g, domain, provider);
}
