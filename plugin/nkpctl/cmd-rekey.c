/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm rekey …, shallow: vSphere's rekey of the KEK.
 *
 *   vm rekey DOMAIN [--provider NAME]    new KEK, DEKs re-wrapped
 *   vm rekey --all [--provider NAME]     the same for every nkp VM on the host
 *
 * (The verb's row, its options and the deep rekey, --deep, are in
 * cmd-vm.c.)  The shallow rekey is libnkp's (nkp_vm_rekey, which also
 * reconciles an interrupted conversion first; plugin/lib/vm-rekey.c; the
 * protocol and its crash safety: docs/rekey.md).  This file prints the
 * results, one line (or JSON object) per VM. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

/* ---- output --------------------------------------------------------------- */

/* "rekeyed"; "locked" when the VM's provider is missing or holds another
 * key (what `vm status` calls a locked VM); "failed" otherwise. */
static const char *result_word(const nkp_rekey_result *res)
{
        int error = nkp_rekey_result_error(res);
        if (error == 0)
                return "rekeyed";
        return (error == -ENOKEY || error == -EKEYREJECTED) ? "locked" : "failed";
}

static void result_json(JsonBuilder *b, const nkp_rekey_result *res)
{
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", nkp_rekey_result_domain(res));
        nkpctl_json_add_string(b, "result", result_word(res));
        nkpctl_json_add_string(b, "from", nkp_rekey_result_from(res));
        nkpctl_json_add_string(b, "provider", nkp_rekey_result_provider(res));
        json_builder_set_member_name(b, "running");
        json_builder_add_boolean_value(b, nkp_rekey_result_running(res));
        nkpctl_json_add_string(b, "reason", nkp_rekey_result_message(res));
        json_builder_end_object(b);
}

/* --all's line for one VM. */
static void result_line(const nkp_rekey_result *res)
{
        const char *name = nkp_rekey_result_domain(res);
        const char *from = nkp_rekey_result_from(res), *to = nkp_rekey_result_provider(res);
        if (nkp_rekey_result_error(res) < 0)
                printf("%s: %s: %s\n", name, result_word(res), nkp_rekey_result_message(res));
        else if (strcmp(from, to) == 0)
                printf("%s: rekeyed to '%s' (same provider, new KEK)\n", name, to);
        else
                printf("%s: rekeyed to '%s' (was '%s')\n", name, to, from);
        fflush(stdout);
}

/* ---- one VM --------------------------------------------------------------- */

int nkpctl_rekey_one(NkpctlGlobals *g, const char *name, const char *provider)
{
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_rekey_result) res = NULL;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_rekey(g->ctx, v, name, provider, &res) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                result_json(b, res);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("VM '%s' is rekeyed to provider '%s' (was '%s'): new KEK, same data "
                       "keys; %s.\n",
                       name, nkp_rekey_result_provider(res), nkp_rekey_result_from(res),
                       nkp_rekey_result_running(res) ? "live and persistent definitions"
                                                     : "persistent definition");
        }
        return 0;
}

/* ---- every nkp VM ------------------------------------------------------------ */

typedef struct {
        JsonBuilder *json; /* NULL: text */
        unsigned done, not_done;
} RekeyAll;

/* nkp_vm_rekey_all's callback: one line (or JSON object) per nkp VM. */
static void report_one(const nkp_rekey_result *res, void *userdata)
{
        RekeyAll *all = userdata;
        if (nkp_rekey_result_error(res) == 0)
                all->done++;
        else
                all->not_done++;
        if (all->json)
                result_json(all->json, res);
        else
                result_line(res);
}

int nkpctl_rekey_all(NkpctlGlobals *g, const char *provider)
{
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(JsonBuilder) b = json_builder_new();
        if (nkpctl_virt_open(g, &v) < 0)
                return nkpctl_lib_error();
        RekeyAll all = { .json = g->json ? b : NULL };
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
