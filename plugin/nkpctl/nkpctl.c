/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl: the admin command line of nkp.
 *
 *   nkpctl [--root DIR] [--connect URI] [--json] GROUP VERB [OPTION…] [ARG…]
 *
 * A table of verbs: each group's cmd-*.c file holds an NkpctlCommand array
 * (verb, usage, summary, its GOptionEntry list, its handler).  One
 * GOptionContext per verb parses the verb's options and the global ones, so
 * --root, --connect and --json are accepted before or after the verb.
 *
 * Exit codes, the same for every command:
 *   0  done.
 *   1  refused or failed: one line on stderr saying why (and the fix);
 *      a refused command changes nothing.
 *   2  usage error (unknown group, verb or option, a missing or extra
 *      argument): one line on stderr naming the problem and ending with
 *      "Try 'nkpctl GROUP VERB --help'.".
 * --help at every level (nkpctl, nkpctl GROUP, nkpctl GROUP VERB) prints the
 * usage on stdout and exits 0; --version prints "nkpctl VERSION", exit 0. */
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include "nkpctl.h"

#ifndef NKP_VERSION
#error "NKP_VERSION comes from meson (plugin/nkpctl/meson.build)"
#endif

typedef struct {
        const char *name;
        const char *summary;
        const NkpctlCommand *verbs;
        const char *default_verb; /* what "nkpctl GROUP" alone runs, or NULL */
} Group;

static const Group groups[] = {
        { "provider", "The keys that protect VMs: create, back up, restore, delete.",
          nkpctl_provider_commands, NULL },
        { "vm", "Encrypt, decrypt, rekey and inspect VMs.", nkpctl_vm_commands, NULL },
        { "host", "The host's TPM, its key cache, unlocking locked VMs.", nkpctl_host_commands, NULL },
        { "alarms", "What needs the administrator (nkpctl alarms = nkpctl alarms list).",
          nkpctl_alarms_commands, "list" },
};

static const char global_help[] =
        "Global options (before or after the verb):\n"
        "  --root DIR       work on the tree under DIR instead of /\n"
        "  --connect URI    the libvirt connection (default: libvirt's own)\n"
        "  --json           print one JSON document on stdout (man nkpctl: JSON OUTPUT)\n"
        "  -h, --help       this text; 'nkpctl GROUP --help', 'nkpctl GROUP VERB --help'\n"
        "  --version        print nkpctl's version\n"
        "\n"
        "Exit status: 0 done, 1 refused or failed (one line on stderr), 2 usage error.\n"
        "Passwords are read from --password-file or, without one, from the\n"
        "terminal without echo; never from the command line.\n";

static void usage_error_va(const char *help_of, const char *fmt, va_list ap) G_GNUC_PRINTF(2, 0);
static void usage_error_va(const char *help_of, const char *fmt, va_list ap)
{
        fputs("nkpctl: ", stderr);
        vfprintf(stderr, fmt, ap);
        fprintf(stderr, "  Try 'nkpctl %s%s--help'.\n", help_of ? help_of : "", help_of ? " " : "");
}

/* A usage error about `help_of` ("provider", "provider create" or NULL for
 * nkpctl itself); returns 2. */
static int usage_error(const char *help_of, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static int usage_error(const char *help_of, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        usage_error_va(help_of, fmt, ap);
        va_end(ap);
        return NKPCTL_EXIT_USAGE;
}

int nkpctl_usage_error(const NkpctlGlobals *g, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        usage_error_va(g ? g->command : NULL, fmt, ap);
        va_end(ap);
        return NKPCTL_EXIT_USAGE;
}

int nkpctl_error(const char *fmt, ...)
{
        va_list ap;
        fputs("nkpctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        return NKPCTL_EXIT_FAILED;
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

void nkpctl_json_add_string(JsonBuilder *b, const char *member, const char *value)
{
        json_builder_set_member_name(b, member);
        if (value)
                json_builder_add_string_value(b, value);
        else
                json_builder_add_null_value(b);
}

int nkpctl_virt_open(const NkpctlGlobals *g, nkp_virt **ret)
{
        return nkp_virt_open(g->connect_uri, NKPCTL_LIBVIRT_DEADLINE, ret);
}

static void log_to_stderr(enum nkp_log_level level, const char *message, void *userdata)
{
        (void) userdata;
        if (level <= NKP_LOG_WARNING || g_getenv("NKP_DEBUG"))
                fprintf(stderr, "nkpctl: %s\n", message);
}

/* ---- help ------------------------------------------------------------------ */

static void print_verb_line(const NkpctlCommand *c)
{
        g_autofree char *left = g_strdup_printf("%s %s%s%s", c->group, c->verb,
                                                c->params[0] ? " " : "", c->params);
        if (strlen(left) <= 27)
                printf("  %-27s  %s\n", left, c->summary);
        else
                printf("  %s\n  %-27s  %s\n", left, "", c->summary);
}

static void print_help(void)
{
        printf("Usage: nkpctl [--root DIR] [--connect URI] [--json] GROUP VERB [OPTION…] [ARG…]\n"
               "\nCommands:\n");
        for (size_t i = 0; i < G_N_ELEMENTS(groups); i++)
                for (const NkpctlCommand *c = groups[i].verbs; c->verb; c++)
                        print_verb_line(c);
        printf("\n%s", global_help);
}

static void print_group_help(const Group *grp)
{
        printf("Usage: nkpctl %s VERB [OPTION…] [ARG…]\n\n%s\n\nCommands:\n", grp->name,
               grp->summary);
        for (const NkpctlCommand *c = grp->verbs; c->verb; c++)
                print_verb_line(c);
        printf("\nEach verb takes --help; global options and exit codes: nkpctl --help.\n");
}

/* ---- finding the group and the verb ------------------------------------------ */

/* Whether `a` is a global option; *value_follows when its value is the
 * next word (--root DIR, not --root=DIR). */
static bool is_global_option(const char *a, bool *value_follows)
{
        *value_follows = strcmp(a, "--root") == 0 || strcmp(a, "--connect") == 0;
        return *value_follows || strcmp(a, "--json") == 0 || g_str_has_prefix(a, "--root=") ||
               g_str_has_prefix(a, "--connect=");
}

typedef struct {
        int group_at, verb_at;  /* positions in argv, -1 when absent */
        bool help, version;     /* --help or --version before the verb */
        const char *bad_option; /* an option before the verb that is not global */
} Scan;

/* Finds the first two words that are not options or option values.  Only
 * global options may come before the verb: their arity is known, so a
 * value is never taken for the group or the verb. */
static void scan_words(int argc, char **argv, Scan *s)
{
        *s = (Scan) { .group_at = -1, .verb_at = -1 };
        for (int i = 1; i < argc; i++) {
                const char *a = argv[i];
                bool value_follows;
                if (a[0] != '-' || a[1] == '\0') {
                        if (s->group_at >= 0) {
                                s->verb_at = i;
                                return;
                        }
                        s->group_at = i;
                } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
                        s->help = true;
                } else if (strcmp(a, "--version") == 0) {
                        s->version = true;
                } else if (is_global_option(a, &value_follows) && (!value_follows || ++i < argc)) {
                        continue;
                } else {
                        s->bad_option = a;
                        return;
                }
        }
}

static const Group *find_group(const char *name)
{
        for (size_t i = 0; i < G_N_ELEMENTS(groups); i++)
                if (strcmp(groups[i].name, name) == 0)
                        return &groups[i];
        return NULL;
}

static const NkpctlCommand *find_verb(const Group *grp, const char *verb)
{
        for (const NkpctlCommand *c = grp->verbs; c->verb; c++)
                if (strcmp(c->verb, verb) == 0)
                        return c;
        return NULL;
}

static char *verb_names(const Group *grp)
{
        g_autoptr(GString) s = g_string_new(NULL);
        for (const NkpctlCommand *c = grp->verbs; c->verb; c++)
                g_string_append_printf(s, "%s%s", s->len ? ", " : "", c->verb);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

/* ---- running one verb ---------------------------------------------------------- */

/* What is wrong with the number of positional arguments, or NULL. */
static char *arity_problem(const NkpctlCommand *c, const char *name, int n)
{
        if (n >= c->min_args && n <= c->max_args)
                return NULL;
        if (c->max_args == 0)
                return g_strdup_printf("'%s' takes no arguments.", name);
        if (c->min_args == 1 && c->max_args == 1)
                return g_strdup_printf("'%s' takes exactly one %s.", name, c->params);
        return g_strdup_printf("'%s' takes %s.", name, c->params);
}

/* GOption keeps the "--" that ends the options when a word after it starts
 * with '-' (vm encrypt -- -x): drop it, so that word is the argument. */
static void drop_separator(int *argc, char **argv)
{
        for (int i = 1; i < *argc; i++)
                if (strcmp(argv[i], "--") == 0) {
                        memmove(&argv[i], &argv[i + 1], (size_t) (*argc - i) * sizeof *argv);
                        (*argc)--;
                        return;
                }
}

/* Parses the verb's options and the global ones from every word of argv
 * but the group and the verb, checks the positional arguments, opens the
 * context and runs the verb.  --help is GOption's: usage on stdout, exit 0. */
static int run_verb(NkpctlGlobals *g, const NkpctlCommand *c, int argc, char **argv, int group_at,
                    int verb_at)
{
        g_autofree char *prog = g_strdup_printf("nkpctl %s %s", c->group, c->verb);
        g_autofree char **args = g_new0(char *, (size_t) argc + 1);
        int n = 0;
        args[n++] = prog;
        for (int i = 1; i < argc; i++)
                if (i != group_at && i != verb_at)
                        args[n++] = argv[i];

        g_autofree char *root = NULL, *connect_uri = NULL;
        gboolean json = FALSE;
        const GOptionEntry globals[] = {
                { "root", 0, 0, G_OPTION_ARG_FILENAME, &root,
                  "Work on the tree under DIR instead of /", "DIR" },
                { "connect", 0, 0, G_OPTION_ARG_STRING, &connect_uri,
                  "The libvirt connection (default: libvirt's own)", "URI" },
                { "json", 0, 0, G_OPTION_ARG_NONE, &json,
                  "Print one JSON document on stdout (its members: man nkpctl, JSON OUTPUT)", NULL },
                G_OPTION_ENTRY_NULL,
        };
        g_autoptr(GOptionContext) oc = g_option_context_new(c->params);
        g_option_context_set_summary(oc, c->summary);
        if (c->description)
                g_option_context_set_description(oc, c->description);
        if (c->options)
                g_option_context_add_main_entries(oc, c->options, NULL);
        g_option_context_add_main_entries(oc, globals, NULL);
        g_set_prgname(prog);
        g->command = prog + strlen("nkpctl ");

        g_autoptr(GError) error = NULL;
        char **parsed = args;
        if (!g_option_context_parse(oc, &n, &parsed, &error))
                return nkpctl_usage_error(g, "%s.", error->message);
        drop_separator(&n, parsed);
        g_autofree char *problem = arity_problem(c, g->command, n - 1);
        if (problem)
                return nkpctl_usage_error(g, "%s", problem);

        if (root && !root[0])
                return nkpctl_usage_error(g, "--root needs a directory (--root / for this host "
                                             "itself).");
        g->root = root;
        g->connect_uri = connect_uri;
        g->json = json;
        if (nkp_context_new(g->root, &g->ctx) < 0)
                return nkpctl_lib_error();
        int rc = c->run(g, n, parsed);
        nkp_context_free(g->ctx);
        g->ctx = NULL;
        return rc;
}

int main(int argc, char **argv)
{
        NkpctlGlobals g = { 0 };
        Scan s;

        /* nkpctl holds KDKs and passwords in memory: no core dump and no
         * ptrace by other processes of the same user, like the hook and
         * nkpd. */
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);

        /* The terminal's charset for GOption's usage text; numbers and
         * messages stay in the C locale. */
        setlocale(LC_CTYPE, "");
        nkp_set_log_func(log_to_stderr, NULL);
        scan_words(argc, argv, &s);
        if (s.version) {
                puts("nkpctl " NKP_VERSION);
                return NKPCTL_EXIT_OK;
        }
        if (s.group_at < 0) {
                if (s.bad_option)
                        return usage_error(NULL, "unknown or incomplete option '%s'.", s.bad_option);
                if (s.help) {
                        print_help();
                        return NKPCTL_EXIT_OK;
                }
                return usage_error(NULL, "no command given.");
        }

        const char *group_name = argv[s.group_at];
        const Group *grp = find_group(group_name);
        if (!grp)
                return usage_error(NULL, "unknown command '%s'.", group_name);
        if (s.verb_at < 0) {
                if (s.help) {
                        print_group_help(grp);
                        return NKPCTL_EXIT_OK;
                }
                /* "nkpctl alarms --json": the group's own verb, which
                 * reports an unknown option itself. */
                if (grp->default_verb)
                        return run_verb(&g, find_verb(grp, grp->default_verb), argc, argv,
                                        s.group_at, -1);
                if (s.bad_option)
                        return usage_error(grp->name,
                                           "unknown or incomplete option '%s' (a verb's options "
                                           "go after the verb).",
                                           s.bad_option);
                g_autofree char *verbs = verb_names(grp);
                return usage_error(grp->name, "'%s' needs a verb: %s.", grp->name, verbs);
        }

        const NkpctlCommand *c = find_verb(grp, argv[s.verb_at]);
        if (!c)
                return usage_error(grp->name, "unknown %s command '%s'.", grp->name,
                                   argv[s.verb_at]);
        return run_verb(&g, c, argc, argv, s.group_at, s.verb_at);
}
