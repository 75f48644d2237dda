/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl: the admin command line of nkp.
 *
 *   nkpctl [--root DIR] [--connect URI] [--json] GROUP COMMAND …
 *
 * Global options come before the group; each group parses its own. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "nkp-config.h"
#include "nkpctl.h"

static const char usage[] =
        "Usage: nkpctl [--root DIR] [--connect URI] [--json] COMMAND …\n"
        "\n"
        "  provider create NAME [--require-tpm] [--default]\n"
        "  provider list | show NAME | usage NAME\n"
        "  provider backup NAME --out FILE.p12 [--password-file F]\n"
        "  provider restore FILE.p12 [--password-file F]\n"
        "  provider set-default NAME\n"
        "  provider delete NAME [--force]\n"
        "  vm encrypt DOMAIN [--provider NAME] [--disks all|vda,vdb…]\n"
        "  vm decrypt DOMAIN\n"
        "  vm rekey DOMAIN|--all [--provider NAME] [--deep]\n"
        "  vm status DOMAIN | vm list\n"
        "  host status | host unlock | host flush-cache\n"
        "  alarms [clear KIND [SUBJECT]]\n"
        "\n"
        "Passwords are read from --password-file or, without one, from the\n"
        "terminal without echo; never from the command line.\n";

int nkpctl_error(const char *fmt, ...)
{
        va_list ap;
        fputs("nkpctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        return 1;
}

int nkpctl_lib_error(void)
{
        const char *msg = nkp_error_message();
        return nkpctl_error("%s", msg[0] ? msg : "failed (no detail)");
}

void nkpctl_print_json(JsonNode *node)
{
        g_autoptr(JsonGenerator) gen = json_generator_new();
        json_generator_set_pretty(gen, TRUE);
        json_generator_set_root(gen, node);
        g_autofree char *text = json_generator_to_data(gen, NULL);
        json_node_unref(node);
        puts(text);
}

static void log_to_stderr(enum nkp_log_level level, const char *message, void *userdata)
{
        (void) userdata;
        if (level <= NKP_LOG_WARNING || g_getenv("NKP_DEBUG"))
                fprintf(stderr, "nkpctl: %s\n", message);
}

int main(int argc, char **argv)
{
        NkpctlGlobals g = { 0 };
        int i = 1;

        nkp_set_log_func(log_to_stderr, NULL);
        for (; i < argc && argv[i][0] == '-'; i++) {
                const char *a = argv[i];
                if (strcmp(a, "--json") == 0)
                        g.json = true;
                else if (strcmp(a, "--root") == 0 && i + 1 < argc)
                        g.root = argv[++i];
                else if (g_str_has_prefix(a, "--root="))
                        g.root = a + strlen("--root=");
                else if (strcmp(a, "--connect") == 0 && i + 1 < argc)
                        g.connect_uri = argv[++i];
                else if (g_str_has_prefix(a, "--connect="))
                        g.connect_uri = a + strlen("--connect=");
                else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
                        fputs(usage, stdout);
                        return 0;
                } else if (strcmp(a, "--version") == 0) {
                        puts("nkpctl " NKP_VERSION);
                        return 0;
                } else {
                        nkpctl_error("unknown or incomplete option '%s' (see: nkpctl --help).", a);
                        return 2; /* usage error */
                }
        }
        if (i >= argc) {
                fputs(usage, stderr);
                return 2;
        }

        if (nkp_context_new(g.root, &g.ctx) < 0)
                return nkpctl_lib_error();

        const char *group = argv[i];
        int rc;
        if (strcmp(group, "provider") == 0)
                rc = nkpctl_provider(&g, argc - i, argv + i);
        else if (strcmp(group, "vm") == 0)
                rc = nkpctl_vm(&g, argc - i, argv + i);
        else if (strcmp(group, "host") == 0)
                rc = nkpctl_host(&g, argc - i, argv + i);
        else if (strcmp(group, "alarms") == 0)
                rc = nkpctl_alarms(&g, argc - i, argv + i);
        else {
                nkpctl_error("unknown command '%s' (see: nkpctl --help).", group);
                rc = 2; /* usage error */
        }
        nkp_context_free(g.ctx);
        return rc;
}
