/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl host …: the host's TPM, its key cache, unlocking locked VMs.
 *
 *   host status        the TPM (TCTI, in use, answers), the cached providers
 *                      (names, key ids, deleted flag: never key bytes), and
 *                      the number of alarms.  --json: one document.
 *   host flush-cache   forget every unsealed key now, as a reboot does.
 *   host unlock        after a restore: re-check locked VMs (cmd-vm.c).
 * The handlers and their rows of the command table (nkpctl.c). */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

typedef struct {
        bool in_use;
        bool answers;
        char *error; /* why it does not answer */
} TpmState;

static void tpm_probe(NkpctlGlobals *g, TpmState *st)
{
        const char *tcti = nkp_context_tcti(g->ctx);
        st->in_use = tcti && strcmp(tcti, "none") != 0;
        if (!st->in_use)
                return;
        NkpTpm *tpm = NULL;
        int r = nkp_tpm_open(g->ctx, &tpm);
        if (r == 0) {
                st->answers = true;
                nkp_tpm_close(tpm);
        } else if (r == -ENODEV) {
                st->in_use = false; /* default device absent: no TPM */
        } else {
                st->error = g_strdup(nkp_error_message());
        }
}

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

static int host_status(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        g_autoptr(GArray) cached = NULL;
        if (nkp_cache_list(g->ctx, &cached) < 0)
                return nkpctl_lib_error();
        TpmState tpm = { 0 };
        tpm_probe(g, &tpm);
        int alarms = alarm_count(g);
        const char *tcti = nkp_context_tcti(g->ctx);

        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "root");
                json_builder_add_string_value(b, nkp_context_root(g->ctx));
                json_builder_set_member_name(b, "tpm");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "tcti");
                json_builder_add_string_value(b, tcti);
                json_builder_set_member_name(b, "in_use");
                json_builder_add_boolean_value(b, tpm.in_use);
                json_builder_set_member_name(b, "answers");
                json_builder_add_boolean_value(b, tpm.answers);
                if (tpm.error) {
                        json_builder_set_member_name(b, "error");
                        json_builder_add_string_value(b, tpm.error);
                }
                json_builder_end_object(b);
                json_builder_set_member_name(b, "cached_providers");
                json_builder_begin_array(b);
                for (guint i = 0; i < cached->len; i++) {
                        const NkpCacheInfo *c = &g_array_index(cached, NkpCacheInfo, i);
                        json_builder_begin_object(b);
                        json_builder_set_member_name(b, "name");
                        json_builder_add_string_value(b, c->name);
                        json_builder_set_member_name(b, "key_id");
                        json_builder_add_string_value(b, c->key_id);
                        json_builder_set_member_name(b, "deleted");
                        json_builder_add_boolean_value(b, c->deleted);
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
        } else {
                if (!tpm.in_use)
                        printf("TPM:              none (KDKs rest unsealed in the 0600 store)\n");
                else if (tpm.answers)
                        printf("TPM:              %s (answers; KDKs are sealed to it)\n", tcti);
                else
                        printf("TPM:              %s (NOT ANSWERING: %s)\n", tcti, tpm.error);
                printf("Cached providers: %u\n", cached->len);
                for (guint i = 0; i < cached->len; i++) {
                        const NkpCacheInfo *c = &g_array_index(cached, NkpCacheInfo, i);
                        printf("  %-24s %s%s\n", c->name, c->key_id,
                               c->deleted ? "  (deleted from the store; gone at reboot)" : "");
                }
                if (alarms >= 0)
                        printf("Alarms:           %d%s\n", alarms,
                               alarms ? " (see nkpctl alarms)" : "");
                else
                        printf("Alarms:           unknown\n");
        }
        g_free(tpm.error);
        return 0;
}

static int host_flush(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        g_autoptr(GArray) cached = NULL;
        if (nkp_cache_list(g->ctx, &cached) < 0)
                return nkpctl_lib_error();
        if (nkp_cache_flush(g->ctx) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "flushed");
                json_builder_add_int_value(b, cached->len);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("Forgot %u unsealed provider key%s; VMs that need them stay locked until "
                       "the keys are unsealed again.\n",
                       cached->len, cached->len == 1 ? "" : "s");
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
