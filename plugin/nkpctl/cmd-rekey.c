/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm rekey …: vSphere's two rekeys.
 *
 *   vm rekey DOMAIN [--provider NAME]    shallow: new KEK, DEKs re-wrapped
 *   vm rekey --all [--provider NAME]     shallow, every nkp VM on the host
 *   vm rekey DOMAIN --deep [--provider NAME]
 *                                        deep: new DEKs, data re-encrypted
 *                                        (shut-off VM; cmd-vm.c) */
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

static const char rekey_usage[] =
        "Usage: nkpctl vm rekey DOMAIN [--provider NAME] [--deep]\n"
        "       nkpctl vm rekey --all [--provider NAME]\n";

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
        return nkpctl_error("shallow 'vm rekey' is not implemented yet.");
}
