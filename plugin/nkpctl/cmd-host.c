/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl host …: the host's TPM, its key cache, unlocking locked VMs.
 *
 *   host status        the TPM (TCTI, in use, answers), the cached providers
 *                      (names, key ids, deleted flag: never key bytes), and
 *                      the number of alarms.  --json: one document.
 *   host flush-cache   forget every unsealed key now, as a reboot does.
 *   host unlock        after a restore: re-check locked VMs (cmd-vm.c).
 * The handlers and their rows of the command table (nkpctl.c). */
#include <stdio.h>

#include "nkpctl.h"

/* -1 when the alarms cannot be read (the reason goes to stderr). */
static int alarm_count(NkpctlGlobals *g)
{
        nkp_alarm **list = NULL;
        size_t n = 0;
        if (nkp_alarm_list(g->ctx, &list, &n) < 0) {
                fprintf(stderr, "nkpctl: warning: cannot read the alarms: %s\n",
                        nkp_error_message());
                return -1;
        }
        nkp_alarm_list_free(list, n);
        return (int) n;
}

static void status_json(NkpctlGlobals *g, const nkp_host_status *st, int alarms)
{
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "root");
        json_builder_add_string_value(b, nkp_context_root(g->ctx));
        json_builder_set_member_name(b, "tpm");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "tcti");
        json_builder_add_string_value(b, nkp_context_tcti(g->ctx));
        json_builder_set_member_name(b, "in_use");
        json_builder_add_boolean_value(b, nkp_host_status_tpm_in_use(st));
        json_builder_set_member_name(b, "answers");
        json_builder_add_boolean_value(b, nkp_host_status_tpm_answers(st));
        if (nkp_host_status_tpm_error(st)) {
                json_builder_set_member_name(b, "error");
                json_builder_add_string_value(b, nkp_host_status_tpm_error(st));
        }
        json_builder_end_object(b);
        json_builder_set_member_name(b, "cached_providers");
        json_builder_begin_array(b);
        for (size_t i = 0; i < nkp_host_status_n_cached(st); i++) {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, nkp_host_status_cached_name(st, i));
                json_builder_set_member_name(b, "key_id");
                json_builder_add_string_value(b, nkp_host_status_cached_key_id(st, i));
                json_builder_set_member_name(b, "deleted");
                json_builder_add_boolean_value(b, nkp_host_status_cached_deleted(st, i));
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        json_builder_set_member_name(b, "alarms");
        if (alarms >= 0)
                json_builder_add_int_value(b, alarms);
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
}

static void status_text(NkpctlGlobals *g, const nkp_host_status *st, int alarms)
{
        const char *tcti = nkp_context_tcti(g->ctx);
        if (!nkp_host_status_tpm_in_use(st))
                printf("TPM:              none (KDKs rest unsealed in the 0600 store)\n");
        else if (nkp_host_status_tpm_answers(st))
                printf("TPM:              %s (answers; KDKs are sealed to it)\n", tcti);
        else
                printf("TPM:              %s (NOT ANSWERING: %s)\n", tcti,
                       nkp_host_status_tpm_error(st));
        size_t n = nkp_host_status_n_cached(st);
        printf("Cached providers: %zu\n", n);
        for (size_t i = 0; i < n; i++)
                printf("  %-24s %s%s\n", nkp_host_status_cached_name(st, i),
                       nkp_host_status_cached_key_id(st, i),
                       nkp_host_status_cached_deleted(st, i)
                               ? "  (deleted from the store; gone at reboot)"
                               : "");
        if (alarms >= 0)
                printf("Alarms:           %d%s\n", alarms, alarms ? " (see nkpctl alarms)" : "");
        else
                printf("Alarms:           unknown\n");
}

static int host_status(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        g_autoptr(nkp_host_status) st = NULL;
        if (nkp_host_status_get(g->ctx, &st) < 0)
                return nkpctl_lib_error();
        int alarms = alarm_count(g);
        if (g->json)
                status_json(g, st, alarms);
        else
                status_text(g, st, alarms);
        return 0;
}

static int host_flush(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        size_t n = 0;
        if (nkp_host_flush_cache(g->ctx, &n) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "flushed");
                json_builder_add_int_value(b, (gint64) n);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("Forgot %zu unsealed provider key%s; VMs that need them stay locked until "
                       "the keys are unsealed again.\n",
                       n, n == 1 ? "" : "s");
        }
        return 0;
}

static int host_unlock(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        return nkpctl_host_unlock(g);
}

const NkpctlCommand nkpctl_host_commands[] = {
        { "host", "status", "",
          "Show the TPM, the key cache and the alarm count.",
          "The TPM in use and whether it answers, the cached providers (names and key ids, never "
          "key bytes), the number of alarms.", NULL, 0, 0, host_status },
        { "host", "unlock", "",
          "Re-check locked VMs after a provider restore.",
          "Clears the vm-locked alarm of each VM whose provider is back; exits 1 while some "
          "stay locked.", NULL, 0, 0, host_unlock },
        { "host", "flush-cache", "", "Forget every unsealed provider key now.",
          NULL, NULL, 0, 0, host_flush },
        { 0 },
};
