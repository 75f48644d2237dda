/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl provider …: create, list, show, set-default, delete, usage, backup,
 * restore, verify, rebind, ca-cert: the handlers and their rows of the command table
 * (nkpctl.c parses the options and counts the arguments).  --json prints
 * one JSON document on stdout. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include "nkpctl.h"

/* The verbs' options, filled by nkpctl.c's GOptionContext before run(). */
static gboolean opt_require_tpm, opt_default, opt_force, opt_password_stdin;
static char *opt_out, *opt_out_dir, *opt_bind;
static char **opt_password_files; /* --password-file, once per file or share */
static int opt_shares, opt_threshold;

/* How long `provider show/list` waits for each Tang server (GET /adv). */
#define PROBE_MS 2000

static char *iso_time(int64_t t)
{
        g_autoptr(GDateTime) dt = g_date_time_new_from_unix_utc(t);
        return dt ? g_date_time_format(dt, "%Y-%m-%dT%H:%M:%SZ") : g_strdup("?");
}

static JsonNode *provider_json(const nkp_provider *p)
{
        unsigned f = nkp_provider_flags(p);
        g_autofree char *created = iso_time(nkp_provider_created(p));
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "name");
        json_builder_add_string_value(b, nkp_provider_name(p));
        json_builder_set_member_name(b, "key_id");
        json_builder_add_string_value(b, nkp_provider_key_id(p));
        json_builder_set_member_name(b, "fingerprint");
        json_builder_add_string_value(b, nkp_provider_fingerprint(p));
        json_builder_set_member_name(b, "default");
        json_builder_add_boolean_value(b, (f & NKP_PROVIDER_DEFAULT) != 0);
        json_builder_set_member_name(b, "backed_up");
        json_builder_add_boolean_value(b, (f & NKP_PROVIDER_BACKED_UP) != 0);
        json_builder_set_member_name(b, "require_tpm");
        json_builder_add_boolean_value(b, (f & NKP_PROVIDER_REQUIRE_TPM) != 0);
        json_builder_set_member_name(b, "sealed");
        json_builder_add_string_value(b, nkp_provider_seal(p) == NKP_SEAL_TPM ? "tpm" : "none");
        json_builder_set_member_name(b, "active");
        json_builder_add_boolean_value(b, nkp_provider_is_active(p));
        json_builder_set_member_name(b, "created");
        json_builder_add_string_value(b, created);
        unsigned threshold = 0;
        const char *const *servers = nkp_provider_binding(p, &threshold);
        json_builder_set_member_name(b, "bound");
        if (!servers) {
                json_builder_add_null_value(b);
        } else {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "kind");
                json_builder_add_string_value(b, "tang");
                json_builder_set_member_name(b, "threshold");
                json_builder_add_int_value(b, threshold);
                json_builder_set_member_name(b, "servers");
                json_builder_begin_array(b);
                for (size_t i = 0; servers[i]; i++) {
                        json_builder_begin_object(b);
                        json_builder_set_member_name(b, "url");
                        json_builder_add_string_value(b, servers[i]);
                        json_builder_set_member_name(b, "answers");
                        json_builder_add_boolean_value(b, nkp_tang_probe(servers[i], PROBE_MS) == 0);
                        json_builder_end_object(b);
                }
                json_builder_end_array(b);
                json_builder_end_object(b);
        }
        json_builder_end_object(b);
        return json_builder_get_root(b);
}

/* "tpm", "tpm+tang 2/3 (2 up)", "tang 1/1 (0 up)", "none": how
 * the provider rests and, when bound, how many of its servers answer now
 * (each probe bounded by PROBE_MS). */
static char *binding_summary(const nkp_provider *p, bool probe)
{
        const char *seal = nkp_provider_seal(p) == NKP_SEAL_TPM ? "tpm" : "none";
        unsigned threshold = 0;
        const char *const *servers = nkp_provider_binding(p, &threshold);
        if (!servers)
                return g_strdup(seal);
        size_t n = g_strv_length((char **) servers), up = 0;
        for (size_t i = 0; probe && servers[i]; i++)
                up += nkp_tang_probe(servers[i], PROBE_MS) == 0;
        g_autofree char *answers = probe ? g_strdup_printf(" (%zu up)", up) : g_strdup("");
        return g_strdup_printf("%stang %u/%zu%s", nkp_provider_seal(p) == NKP_SEAL_TPM ? "tpm+" : "",
                               threshold, n, answers);
}

static const char *yes_no(bool v)
{
        return v ? "yes" : "no";
}

/* ---- passwords ------------------------------------------------------------ */

static int tty_fd = -1;
static struct termios tty_saved;

static void restore_tty_and_die(int sig)
{
        if (tty_fd >= 0)
                tcsetattr(tty_fd, TCSAFLUSH, &tty_saved);
        signal(sig, SIG_DFL);
        raise(sig);
}

/* One password from the terminal `fd`, echo off.  Returns 0, or the exit
 * code 1 with the reason printed. */
static int prompt_once(int fd, const char *prompt, nkp_secret **ret)
{
        struct termios noecho;
        struct sigaction sa = { .sa_handler = restore_tty_and_die }, old_int, old_term, old_quit;

        if (tcgetattr(fd, &tty_saved) < 0)
                return nkpctl_error("Cannot turn off the terminal echo to ask for the password; "
                                    "use --password-file FILE.");
        noecho = tty_saved;
        noecho.c_lflag &= ~(tcflag_t) (ECHO | ECHOE | ECHOK);
        noecho.c_lflag |= ICANON | ECHONL;
        tty_fd = fd;
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        sigaction(SIGQUIT, &sa, &old_quit);
        /* Echo off before the prompt appears: nothing typed after it is
         * ever echoed (or flushed away). */
        bool prompted = tcsetattr(fd, TCSAFLUSH, &noecho) == 0 &&
                        write(fd, prompt, strlen(prompt)) >= 0;
        int r = prompted ? nkp_password_read_fd(fd, ret) : -EIO;
        tcsetattr(fd, TCSAFLUSH, &tty_saved);
        tty_fd = -1;
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
        sigaction(SIGQUIT, &old_quit, NULL);
        if (!prompted)
                return nkpctl_error("Cannot prompt for the password on the terminal; use "
                                    "--password-file FILE.");
        return r < 0 ? nkpctl_lib_error() : 0;
}

/* The password from --password-file, else from the terminal without echo
 * (twice when `confirm`): nkpctl's own, the library never prompts.
 * Returns 0, or the exit code 1 with the reason printed. */
static int get_password_for(const char *file, bool confirm, const char *what, nkp_secret **ret)
{
        if (file && opt_password_stdin)
                return nkpctl_error("Give the password by --password-file or --password-stdin, not "
                                    "both; nothing was done.");
        /* --password-stdin: the first line of whatever the caller connected
         * to stdin (a pipe, or a socket as some spawners make: Cockpit's
         * bridge, node), which --password-file /dev/stdin cannot open. */
        if (opt_password_stdin)
                return nkp_password_read_fd(STDIN_FILENO, ret) < 0 ? nkpctl_lib_error() : 0;
        if (file)
                return nkp_password_read_file(file, ret) < 0 ? nkpctl_lib_error() : 0;

        int fd = open("/dev/tty", O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return nkpctl_error("There is no terminal to ask for the password; use "
                                    "--password-file FILE.");
        g_autoptr(nkp_secret) first = NULL, second = NULL;
        g_autofree char *prompt = g_strdup_printf("%s%s: ", confirm ? "New password for " : "Password for ",
                                                  what);
        int r = prompt_once(fd, prompt, &first);
        if (r == 0 && confirm) {
                r = prompt_once(fd, "Repeat the password: ", &second);
                if (r == 0 && !nkp_secret_equal(first, second))
                        r = nkpctl_error("The two passwords differ; nothing was written.");
        }
        close(fd);
        if (r)
                return r;
        *ret = g_steal_pointer(&first);
        return 0;
}

static int get_password(const char *file, bool confirm, nkp_secret **ret)
{
        return get_password_for(file, confirm, "the backup", ret);
}

/* One password per file of `files` (n of them): from the n --password-file
 * options in order, else prompted for each file by name.  *ret: n secrets,
 * free with free_passwords().  Returns 0 or the exit code 1. */
static void free_passwords(nkp_secret **pws, size_t n)
{
        for (size_t i = 0; pws && i < n; i++)
                nkp_secret_free(pws[i]);
        g_free(pws);
}

static int get_passwords(char **labels, size_t n, bool confirm, nkp_secret ***ret)
{
        size_t given = opt_password_files ? g_strv_length(opt_password_files) : 0;
        if (opt_password_stdin && n > 1)
                return nkpctl_error("--password-stdin gives one password, for one file; give one "
                                    "--password-file per file (%zu of them) instead.",
                                    n);
        if (given && given != n)
                return nkpctl_error("%zu --password-file options for %zu file%s; give one per file, in "
                                    "the same order, or none to be asked for each.",
                                    given, n, n == 1 ? "" : "s");
        nkp_secret **pws = g_new0(nkp_secret *, n);
        for (size_t i = 0; i < n; i++) {
                g_autofree char *what = g_strdup_printf("'%s'", labels[i]);
                int r = get_password_for(given ? opt_password_files[i] : NULL, confirm, what, &pws[i]);
                if (r) {
                        free_passwords(pws, n);
                        return r;
                }
        }
        *ret = pws;
        return 0;
}

/* ---- subcommands ------------------------------------------------------------ */

static int cmd_create(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        const char *name = argv[1];
        if (!nkp_provider_name_valid(name)) {
                nkp_provider_create(g->ctx, name, 0, NULL); /* for its message */
                return nkpctl_lib_error();
        }
        /* Refused before anything is written: a new provider was never
         * backed up, so it is inactive and cannot be the default. */
        if (opt_default)
                return nkpctl_error("A new provider is inactive until it is backed up, so '%s' cannot "
                                    "be created as the default; nothing was created.  Create it, back "
                                    "it up (nkpctl provider backup %s --out FILE.p12), then run: "
                                    "nkpctl provider set-default %s",
                                    name, name, name);

        if (opt_threshold && !opt_bind)
                return nkpctl_usage_error(g, "--threshold N goes with --bind tang:URL,…");
        g_autoptr(nkp_provider) p = NULL;
        if (nkp_provider_create_bound(g->ctx, name, opt_require_tpm ? NKP_PROVIDER_REQUIRE_TPM : 0, opt_bind,
                                      (unsigned) MAX(opt_threshold, 0), &p) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                nkpctl_print_json(provider_json(p));
                return 0;
        }
        g_autofree char *bound = binding_summary(p, false);
        printf("Created provider '%s' (key id %s, %s%s%s).\n"
               "It stays inactive until backed up: nkpctl provider backup %s --out %s.p12\n",
               name, nkp_provider_key_id(p),
               nkp_provider_seal(p) == NKP_SEAL_TPM ? "sealed to this host's TPM"
                                                    : "not sealed: this host has no TPM",
               opt_bind ? ", bound to the network: " : "", opt_bind ? bound : "", name, name);
        return 0;
}

static int cmd_list(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        nkp_provider **list = NULL;
        size_t n = 0;
        if (nkp_provider_list(g->ctx, &list, &n) < 0)
                return nkpctl_lib_error();

        if (g->json) {
                JsonArray *arr = json_array_new();
                for (size_t i = 0; i < n; i++)
                        json_array_add_element(arr, provider_json(list[i]));
                JsonNode *node = json_node_new(JSON_NODE_ARRAY);
                json_node_take_array(node, arr);
                nkpctl_print_json(node);
                nkp_provider_list_free(list, n);
                return 0;
        }
        if (n == 0) {
                printf("No providers (create one: nkpctl provider create NAME).\n");
                nkp_provider_list_free(list, n);
                return 0;
        }
        int w = (int) strlen("NAME"), ws = (int) strlen("SEALED");
        char **sealed = g_new0(char *, n + 1);
        for (size_t i = 0; i < n; i++) {
                w = MAX(w, (int) strlen(nkp_provider_name(list[i])));
                sealed[i] = binding_summary(list[i], true);
                ws = MAX(ws, (int) strlen(sealed[i]));
        }
        printf("%-*s  %-36s  %-16s  %-7s  %-8s  %-*s  %s\n", w, "NAME", "KEY ID", "FINGERPRINT",
               "DEFAULT", "STATE", ws, "SEALED", "CREATED");
        for (size_t i = 0; i < n; i++) {
                const nkp_provider *p = list[i];
                g_autofree char *created = iso_time(nkp_provider_created(p));
                char fp[17];
                g_strlcpy(fp, nkp_provider_fingerprint(p), sizeof fp);
                printf("%-*s  %-36s  %-16s  %-7s  %-8s  %-*s  %s\n", w, nkp_provider_name(p),
                       nkp_provider_key_id(p), fp,
                       (nkp_provider_flags(p) & NKP_PROVIDER_DEFAULT) ? "yes" : "",
                       nkp_provider_is_active(p) ? "active" : "inactive", ws,
                       sealed[i], created);
        }
        g_strfreev(sealed);
        nkp_provider_list_free(list, n);
        return 0;
}

/* The provider named by argv[1] (nkpctl.c checked there is one). */
static int get_named(NkpctlGlobals *g, char **argv, nkp_provider **ret)
{
        if (nkp_provider_get(g->ctx, argv[1], ret) < 0)
                return nkpctl_lib_error();
        return 0;
}

static int cmd_show(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_provider) p = NULL;
        int r = get_named(g, argv, &p);
        if (r)
                return r;
        if (g->json) {
                nkpctl_print_json(provider_json(p));
                return 0;
        }
        unsigned f = nkp_provider_flags(p);
        g_autofree char *created = iso_time(nkp_provider_created(p));
        printf("name:         %s\n", nkp_provider_name(p));
        printf("key id:       %s\n", nkp_provider_key_id(p));
        printf("fingerprint:  %s\n", nkp_provider_fingerprint(p));
        printf("state:        %s\n", nkp_provider_is_active(p) ? "active" : "inactive (never backed up)");
        printf("default:      %s\n", yes_no(f & NKP_PROVIDER_DEFAULT));
        printf("backed up:    %s\n", yes_no(f & NKP_PROVIDER_BACKED_UP));
        printf("require TPM:  %s\n", yes_no(f & NKP_PROVIDER_REQUIRE_TPM));
        printf("sealed:       %s\n", nkp_provider_seal(p) == NKP_SEAL_TPM ? "tpm" : "none");
        unsigned threshold = 0;
        const char *const *servers = nkp_provider_binding(p, &threshold);
        if (!servers)
                printf("bound:        no (the %s alone opens it)\n",
                       nkp_provider_seal(p) == NKP_SEAL_TPM ? "TPM" : "store file");
        else
                printf("bound:        tang, %u of %u server%s must answer%s\n", threshold,
                       g_strv_length((char **) servers), g_strv_length((char **) servers) == 1 ? "" : "s",
                       nkp_provider_seal(p) == NKP_SEAL_TPM ? ", and this host's TPM" : "");
        for (size_t i = 0; servers && servers[i]; i++)
                printf("  server:     %s  %s\n", servers[i],
                       nkp_tang_probe(servers[i], PROBE_MS) == 0 ? "answers" : "DOES NOT ANSWER");
        printf("created:      %s\n", created);
        return 0;
}

/* provider rebind NAME --bind tang:URL,… [--threshold N] | --bind none */
static int cmd_rebind(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        if (!opt_bind)
                return nkpctl_usage_error(g, "'provider rebind' needs --bind tang:URL[,URL…] (or --bind none).");
        if (nkp_provider_rebind(g->ctx, argv[1], opt_bind, (unsigned) MAX(opt_threshold, 0)) < 0)
                return nkpctl_lib_error();
        g_autoptr(nkp_provider) p = NULL;
        if (nkp_provider_get(g->ctx, argv[1], &p) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                nkpctl_print_json(provider_json(p));
                return 0;
        }
        g_autofree char *how = binding_summary(p, false);
        printf("Provider '%s' now rests as: %s (its key is unchanged; no VM was touched).\n", argv[1], how);
        return 0;
}

/* provider ca-cert NAME: the provider's EK CA certificate (PEM), derived
 * from its KDK (see plugin/lib/ekca.c).  The same CA on every host holding
 * the provider; only the self-signature differs (ECDSA nonces). */
static int cmd_ca_cert(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_provider) p = NULL;
        int r = get_named(g, argv, &p);
        if (r)
                return r;
        g_autofree char *pem = NULL; /* from malloc: g_free is free here */
        if (nkp_provider_ca_cert_pem(g->ctx, nkp_provider_key_id(p), &pem) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, nkp_provider_name(p));
                json_builder_set_member_name(b, "pem");
                json_builder_add_string_value(b, pem);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
                return 0;
        }
        fputs(pem, stdout);
        return 0;
}

static int cmd_set_default(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        if (nkp_provider_set_default(g->ctx, argv[1]) < 0)
                return nkpctl_lib_error();
        if (!g->json)
                printf("Provider '%s' is the default.\n", argv[1]);
        else {
                g_autoptr(nkp_provider) p = NULL;
                if (nkp_provider_get(g->ctx, argv[1], &p) < 0)
                        return nkpctl_lib_error();
                nkpctl_print_json(provider_json(p));
        }
        return 0;
}

static char *join_quoted(char **names)
{
        g_autoptr(GString) s = g_string_new(NULL);
        for (size_t i = 0; names[i]; i++)
                g_string_append_printf(s, "%s'%s'", i ? ", " : "", names[i]);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

static int cmd_delete(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_provider) p = NULL;
        int r = get_named(g, argv, &p);
        if (r)
                return r;
        const char *name = nkp_provider_name(p);

        g_autoptr(nkp_virt) v = NULL;
        if (nkpctl_virt_open(g, &v) < 0 && !opt_force)
                return nkpctl_error("Cannot tell which VMs use the provider: %s Provider '%s' was "
                                    "not deleted, since defined VMs may depend on it (make libvirt "
                                    "reachable with --connect URI, or use --force).",
                                    nkp_error_message(), name);
        g_auto(GStrv) users = NULL;
        size_t in_use = 0;
        if (nkp_provider_delete_checked(g->ctx, v, name, opt_force, &users, &in_use) < 0)
                return nkpctl_lib_error();
        if (in_use) {
                /* --force: say which VMs were left without their provider. */
                g_autofree char *list = join_quoted(users);
                fprintf(stderr,
                        "nkpctl: warning: provider '%s' still protects the defined VM%s %s; after "
                        "the next reboot %s will not start until the provider is restored "
                        "(nkpctl provider restore FILE.p12).\n",
                        name, in_use == 1 ? "" : "s", list, in_use == 1 ? "it" : "they");
        }
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "deleted");
                json_builder_add_string_value(b, name);
                json_builder_set_member_name(b, "key_id");
                json_builder_add_string_value(b, nkp_provider_key_id(p));
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("Deleted provider '%s'.  Its key stays in the key cache until the next reboot "
                       "(or nkpctl host flush-cache); restore it from its backup to keep it.\n",
                       name);
        }
        return 0;
}

static int cmd_usage(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_provider) p = NULL;
        int r = get_named(g, argv, &p);
        if (r)
                return r;
        g_autoptr(nkp_virt) v = NULL;
        g_auto(GStrv) vms = NULL;
        size_t n = 0;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_provider_dependents(g->ctx, v, nkp_provider_key_id(p), &vms, &n) < 0) {
                const char *why = nkp_error_message();
                return nkpctl_error("Cannot list the VMs that use provider '%s': %s",
                                    nkp_provider_name(p), why[0] ? why : "no detail.");
        }
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, nkp_provider_name(p));
                json_builder_set_member_name(b, "key_id");
                json_builder_add_string_value(b, nkp_provider_key_id(p));
                json_builder_set_member_name(b, "vms");
                json_builder_begin_array(b);
                for (size_t i = 0; i < n; i++)
                        json_builder_add_string_value(b, vms[i]);
                json_builder_end_array(b);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
                return 0;
        }
        if (n == 0)
                printf("No defined VM uses provider '%s'.\n", nkp_provider_name(p));
        for (size_t i = 0; i < n; i++)
                printf("%s\n", vms[i]);
        return 0;
}

/* provider backup NAME --shares N --threshold M --out-dir DIR */
static int backup_shares(NkpctlGlobals *g, const char *name)
{
        if (!opt_out_dir)
                return nkpctl_usage_error(g, "'provider backup --shares N' needs --out-dir DIR.");
        if (opt_out)
                return nkpctl_usage_error(g, "'provider backup' takes --out FILE.p12 or --shares N "
                                             "--out-dir DIR, not both.");
        if (opt_shares < 2 || opt_shares > 32 || opt_threshold < 2 || opt_threshold > opt_shares)
                return nkpctl_usage_error(g, "--shares N takes 2 to 32 and --threshold M 2 to N.");
        g_autoptr(nkp_provider) p = NULL;
        if (nkp_provider_get(g->ctx, name, &p) < 0)
                return nkpctl_lib_error();
        size_t n = (size_t) opt_shares;
        g_auto(GStrv) labels = g_new0(char *, n + 1);
        for (size_t i = 0; i < n; i++)
                labels[i] = g_strdup_printf("share %zu of %zu", i + 1, n);
        nkp_secret **pws = NULL;
        int r = get_passwords(labels, n, true, &pws);
        if (r)
                return r;
        g_auto(GStrv) paths = NULL;
        r = nkp_provider_backup_shares(g->ctx, name, opt_out_dir, (unsigned) n, (unsigned) opt_threshold,
                                       (const nkp_secret *const *) pws, &paths);
        free_passwords(pws, n);
        if (r < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(nkp_provider) now = NULL;
                if (nkp_provider_get(g->ctx, name, &now) < 0)
                        return nkpctl_lib_error();
                JsonNode *node = provider_json(now);
                JsonObject *o = json_node_get_object(node);
                JsonArray *files = json_array_new();
                for (size_t i = 0; paths[i]; i++)
                        json_array_add_string_element(files, paths[i]);
                json_object_set_array_member(o, "shares", files);
                json_object_set_int_member(o, "threshold", opt_threshold);
                nkpctl_print_json(node);
                return 0;
        }
        printf("Wrote %zu shares of provider '%s'; any %d of them restore it:\n", n, name, opt_threshold);
        for (size_t i = 0; paths[i]; i++)
                printf("  %s\n", paths[i]);
        printf("Give each share and its password to a different keeper, off this host.\n");
        return 0;
}

static int cmd_backup(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        if (opt_shares || opt_threshold || opt_out_dir)
                return backup_shares(g, argv[1]);
        const char *out = opt_out;
        if (!out)
                return nkpctl_usage_error(g, "'provider backup' needs --out FILE.p12 (or --shares N "
                                             "--threshold M --out-dir DIR).");
        g_autoptr(nkp_provider) p = NULL;
        if (nkp_provider_get(g->ctx, argv[1], &p) < 0)
                return nkpctl_lib_error();
        if (g_file_test(out, G_FILE_TEST_EXISTS))
                return nkpctl_error("'%s' already exists; refusing to overwrite it (choose another --out).",
                                    out);
        if (opt_password_files && g_strv_length(opt_password_files) > 1)
                return nkpctl_usage_error(g, "A single-file backup takes one --password-file.");
        g_autoptr(nkp_secret) pw = NULL;
        int r = get_password(opt_password_files ? opt_password_files[0] : NULL, true, &pw);
        if (r)
                return r;
        if (nkp_provider_backup(g->ctx, argv[1], out, pw) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(nkp_provider) now = NULL;
                if (nkp_provider_get(g->ctx, argv[1], &now) < 0)
                        return nkpctl_lib_error();
                nkpctl_print_json(provider_json(now));
        } else {
                printf("Wrote the backup of provider '%s' to '%s'.  Keep the file and its password "
                       "apart, off this host.\n",
                       argv[1], out);
        }
        return 0;
}

/* The files argv[1..argc-1], checked readable, and a password for each. */
static int backup_files(int argc, char **argv, nkp_secret ***ret_pws)
{
        for (int i = 1; i < argc; i++)
                if (!g_file_test(argv[i], G_FILE_TEST_IS_REGULAR))
                        return nkpctl_error("'%s' is not a readable file.", argv[i]);
        return get_passwords(argv + 1, (size_t) (argc - 1), false, ret_pws);
}

static int cmd_restore(NkpctlGlobals *g, int argc, char **argv)
{
        nkp_secret **pws = NULL;
        int r = backup_files(argc, argv, &pws);
        if (r)
                return r;
        size_t n = (size_t) (argc - 1);
        g_autoptr(nkp_provider) p = NULL;
        bool already = false;
        r = nkp_provider_restore_files(g->ctx, (const char *const *) argv + 1, (const nkp_secret *const *) pws,
                                       n, &p, &already);
        free_passwords(pws, n);
        if (r < 0)
                return nkpctl_lib_error();
        if (g->json) {
                JsonNode *node = provider_json(p);
                json_object_set_boolean_member(json_node_get_object(node), "already", already);
                nkpctl_print_json(node);
        } else if (already) {
                printf("Provider '%s' (key id %s) is already present, nothing changed.\n",
                       nkp_provider_name(p), nkp_provider_key_id(p));
        } else {
                printf("Restored provider '%s' (key id %s, fingerprint %s, %s).\n", nkp_provider_name(p),
                       nkp_provider_key_id(p), nkp_provider_fingerprint(p),
                       nkp_provider_seal(p) == NKP_SEAL_TPM ? "sealed to this host's TPM"
                                                            : "not sealed: this host has no TPM");
        }
        return 0;
}

static const char *here_word(enum nkp_backup_here h)
{
        switch (h) {
        case NKP_BACKUP_HERE_SAME:
                return "same";
        case NKP_BACKUP_HERE_DIFFERENT:
                return "different";
        case NKP_BACKUP_HERE_OTHER_NAME:
                return "other-name";
        case NKP_BACKUP_HERE_NONE:
        default:
                return "none";
        }
}

static void print_verify_json(const nkp_backup_report *rep)
{
        unsigned threshold = 0, given = 0;
        const char *split = NULL, *here_name = NULL;
        unsigned count = nkp_backup_report_shares(rep, &threshold, &given, &split);
        enum nkp_backup_here here = nkp_backup_report_here(rep, &here_name);
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "name");
        json_builder_add_string_value(b, nkp_backup_report_name(rep));
        json_builder_set_member_name(b, "key_id");
        json_builder_add_string_value(b, nkp_backup_report_key_id(rep));
        json_builder_set_member_name(b, "fingerprint");
        json_builder_add_string_value(b, nkp_backup_report_fingerprint(rep));
        json_builder_set_member_name(b, "require_tpm");
        json_builder_add_boolean_value(b, (nkp_backup_report_flags(rep) & NKP_PROVIDER_REQUIRE_TPM) != 0);
        if (count) {
                json_builder_set_member_name(b, "shares");
                json_builder_add_int_value(b, count);
                json_builder_set_member_name(b, "threshold");
                json_builder_add_int_value(b, threshold);
                json_builder_set_member_name(b, "shares_given");
                json_builder_add_int_value(b, given);
                json_builder_set_member_name(b, "split_id");
                json_builder_add_string_value(b, split);
        }
        json_builder_set_member_name(b, "here");
        json_builder_add_string_value(b, here_word(here));
        json_builder_set_member_name(b, "here_name");
        if (here_name)
                json_builder_add_string_value(b, here_name);
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

static int cmd_verify(NkpctlGlobals *g, int argc, char **argv)
{
        nkp_secret **pws = NULL;
        int r = backup_files(argc, argv, &pws);
        if (r)
                return r;
        size_t n = (size_t) (argc - 1);
        g_autoptr(nkp_backup_report) rep = NULL;
        r = nkp_backup_verify(g->ctx, (const char *const *) argv + 1, (const nkp_secret *const *) pws, n, &rep);
        free_passwords(pws, n);
        if (r < 0)
                return nkpctl_lib_error();
        if (g->json) {
                print_verify_json(rep);
                return 0;
        }
        unsigned threshold = 0, given = 0;
        const char *split = NULL, *here_name = NULL;
        unsigned count = nkp_backup_report_shares(rep, &threshold, &given, &split);
        printf("backup:       good (password, structure and MAC checked%s)\n",
               count ? "; the shares combine into the key" : "");
        printf("name:         %s\n", nkp_backup_report_name(rep));
        printf("key id:       %s\n", nkp_backup_report_key_id(rep));
        printf("fingerprint:  %s\n", nkp_backup_report_fingerprint(rep));
        printf("require TPM:  %s\n", yes_no(nkp_backup_report_flags(rep) & NKP_PROVIDER_REQUIRE_TPM));
        if (count)
                printf("shares:       %u given of %u, threshold %u (split %s)\n", given, count, threshold, split);
        switch (nkp_backup_report_here(rep, &here_name)) {
        case NKP_BACKUP_HERE_SAME:
                printf("this host:    holds the same provider\n");
                break;
        case NKP_BACKUP_HERE_DIFFERENT:
                printf("this host:    holds a DIFFERENT provider named '%s' (another key)\n", here_name);
                break;
        case NKP_BACKUP_HERE_OTHER_NAME:
                printf("this host:    holds this key id under another name, '%s'\n", here_name);
                break;
        case NKP_BACKUP_HERE_NONE:
                printf("this host:    does not hold it (nkpctl provider restore would add it)\n");
                break;
        }
        return 0;
}

/* ---- the command table ------------------------------------------------------ */

static const char password_note[] =
        "The password is read from the first line of --password-file F or of stdin "
        "(--password-stdin) or, without either, from the terminal without echo; never from the "
        "command line.  With --shares N --threshold M --out-dir DIR, N share files are written, "
        "each under its own password (N --password-file options in order, or N prompts); any M "
        "of them restore the provider.";

static const GOptionEntry create_options[] = {
        { "require-tpm", 0, 0, G_OPTION_ARG_NONE, &opt_require_tpm,
          "Only hosts with a TPM 2.0 may hold this provider", NULL },
        { "bind", 0, 0, G_OPTION_ARG_STRING, &opt_bind,
          "Bind to the network too: opening needs the Tang servers (and the TPM)", "tang:URL[,URL…]" },
        { "threshold", 0, 0, G_OPTION_ARG_INT, &opt_threshold,
          "How many of the Tang servers must answer (default 1)", "N" },
        { "default", 0, 0, G_OPTION_ARG_NONE, &opt_default,
          "Refused: a new provider is inactive until backed up", NULL },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry rebind_options[] = {
        { "bind", 0, 0, G_OPTION_ARG_STRING, &opt_bind, "The new binding, or none to unbind",
          "tang:URL[,URL…]|none" },
        { "threshold", 0, 0, G_OPTION_ARG_INT, &opt_threshold,
          "How many of the Tang servers must answer (default 1)", "N" },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry delete_options[] = {
        { "force", 0, 0, G_OPTION_ARG_NONE, &opt_force,
          "Delete even while defined VMs depend on it", NULL },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry backup_options[] = {
        { "out", 'o', 0, G_OPTION_ARG_FILENAME, &opt_out, "The PKCS#12 file to write (must not exist)",
          "FILE.p12" },
        { "shares", 0, 0, G_OPTION_ARG_INT, &opt_shares,
          "Split the backup into N share files (2 to 32)", "N" },
        { "threshold", 0, 0, G_OPTION_ARG_INT, &opt_threshold, "Any M shares restore (2 to N)", "M" },
        { "out-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_out_dir,
          "Write the shares as DIR/NAME-share-I-of-N.p12", "DIR" },
        { "password-file", 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &opt_password_files,
          "Read the password from the first line of F, once per share in order (else: prompt twice "
          "for each)", "F" },
        { "password-stdin", 0, 0, G_OPTION_ARG_NONE, &opt_password_stdin,
          "Read the password from the first line of stdin (a pipe or socket; one file only)", NULL },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry restore_options[] = {
        { "password-file", 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &opt_password_files,
          "Read the password from the first line of F, once per file in order (else: prompt)", "F" },
        { "password-stdin", 0, 0, G_OPTION_ARG_NONE, &opt_password_stdin,
          "Read the password from the first line of stdin (a pipe or socket; one file only)", NULL },
        G_OPTION_ENTRY_NULL,
};

const NkpctlCommand nkpctl_provider_commands[] = {
        { "provider", "create", "NAME", "Create a provider with a fresh random key.",
          "A new provider is inactive (cannot be the default or protect a VM) until it is backed "
          "up.  With --bind tang:URL[,URL…] [--threshold N] its key at rest also needs N of "
          "those Tang servers (Clevis): a stolen host opens nothing off the network.",
          create_options, 1, 1, cmd_create },
        { "provider", "rebind", "NAME", "Bind a provider to other Tang servers (or to their new keys).",
          "The key does not change and no VM is touched: the material at rest is sealed and "
          "wrapped afresh.  After tangd-rotate-keys, rebind to the same servers to move to their "
          "new keys.  --bind none unbinds.",
          rebind_options, 1, 1, cmd_rebind },
        { "provider", "list", "", "List the providers of this host.", NULL, NULL, 0, 0, cmd_list },
        { "provider", "show", "NAME", "Show one provider.", NULL, NULL, 1, 1, cmd_show },
        { "provider", "set-default", "NAME", "Make a backed-up provider the host's default.", NULL,
          NULL, 1, 1, cmd_set_default },
        { "provider", "delete", "NAME", "Delete a provider from this host's store.",
          "Refused while defined VMs depend on it (see 'provider usage'), unless --force.",
          delete_options, 1, 1, cmd_delete },
        { "provider", "usage", "NAME", "List the defined VMs that depend on a provider.", NULL, NULL,
          1, 1, cmd_usage },
        { "provider", "backup", "NAME", "Write a password-protected PKCS#12 backup (or M-of-N shares).",
          password_note, backup_options, 1, 1, cmd_backup },
        { "provider", "restore", "FILE.p12 | SHARE.p12…", "Restore a provider from its PKCS#12 backup.",
          "Give one whole backup, or any M shares of an M-of-N split.  The password of each file "
          "is read from the first line of its --password-file F (one per file, in order) or, "
          "without them, from the terminal without echo; never from the command line.",
          restore_options, 1, 32, cmd_restore },
        { "provider", "verify", "FILE.p12 | SHARE.p12…",
          "Check a backup (or M shares) without restoring it.",
          "Checks the password(s), the structure and the MAC (and that the shares combine into "
          "the key they name), prints the provider's name, key id, fingerprint and flags, and "
          "whether this host holds the same provider.  Writes nothing.  Passwords as for "
          "restore.",
          restore_options, 1, 32, cmd_verify },
        { "provider", "ca-cert", "NAME", "Print the provider's vTPM EK CA certificate.", NULL,
          NULL, 1, 1, cmd_ca_cert },
        { 0 },
};
