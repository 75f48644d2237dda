/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl alarms [list] [--json]      recorded and derived alarms, oldest first
 * nkpctl alarms clear KIND [SUBJECT]  forget recorded alarms (derived ones
 *                                     go away when their cause does)
 * The handlers and their rows of the command table (nkpctl.c). */
#include <stdio.h>
#include <string.h>

#include "nkpctl.h"

static char *since_text(int64_t t)
{
        if (t == 0)
                return NULL;
        g_autoptr(GDateTime) dt = g_date_time_new_from_unix_utc(t);
        return dt ? g_date_time_format(dt, "%Y-%m-%dT%H:%M:%SZ") : NULL;
}

static int alarms_clear(NkpctlGlobals *g, int argc, char **argv)
{
        if (nkp_alarm_clear(g->ctx, argv[1], argc == 3 ? argv[2] : NULL) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                /* --json prints one document for every verb (nkpctl(8), JSON OUTPUT). */
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "cleared", argv[1]);
                nkpctl_json_add_string(b, "subject", argc == 3 ? argv[2] : NULL);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
                return 0;
        }
        printf("Cleared the recorded '%s' alarms%s%s%s.\n", argv[1], argc == 3 ? " for '" : "",
               argc == 3 ? argv[2] : "", argc == 3 ? "'" : "");
        return 0;
}

static int alarms_list(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        (void) argv;
        nkp_alarm **list = NULL;
        size_t n = 0;
        if (nkp_alarm_list(g->ctx, &list, &n) < 0)
                return nkpctl_lib_error();

        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_array(b);
                for (size_t i = 0; i < n; i++) {
                        g_autofree char *since = since_text(nkp_alarm_since(list[i]));
                        json_builder_begin_object(b);
                        json_builder_set_member_name(b, "kind");
                        json_builder_add_string_value(b, nkp_alarm_kind(list[i]));
                        json_builder_set_member_name(b, "subject");
                        json_builder_add_string_value(b, nkp_alarm_subject(list[i]));
                        json_builder_set_member_name(b, "message");
                        json_builder_add_string_value(b, nkp_alarm_message(list[i]));
                        json_builder_set_member_name(b, "since");
                        if (since)
                                json_builder_add_string_value(b, since);
                        else
                                json_builder_add_null_value(b);
                        json_builder_set_member_name(b, "derived");
                        json_builder_add_boolean_value(b, nkp_alarm_since(list[i]) == 0);
                        json_builder_end_object(b);
                }
                json_builder_end_array(b);
                nkpctl_print_json(json_builder_get_root(b));
                nkp_alarm_list_free(list, n);
                return 0;
        }

        if (n == 0) {
                printf("No alarms.\n");
                nkp_alarm_list_free(list, n);
                return 0;
        }
        int wk = (int) strlen("KIND"), ws = (int) strlen("SUBJECT");
        for (size_t i = 0; i < n; i++) {
                wk = MAX(wk, (int) strlen(nkp_alarm_kind(list[i])));
                ws = MAX(ws, (int) g_utf8_strlen(nkp_alarm_subject(list[i]), -1));
        }
        printf("%-*s  %-*s  %-20s  %s\n", wk, "KIND", ws, "SUBJECT", "SINCE", "MESSAGE");
        for (size_t i = 0; i < n; i++) {
                g_autofree char *since = since_text(nkp_alarm_since(list[i]));
                printf("%-*s  %-*s  %-20s  %s\n", wk, nkp_alarm_kind(list[i]), ws,
                       nkp_alarm_subject(list[i]), since ? since : "-", nkp_alarm_message(list[i]));
        }
        nkp_alarm_list_free(list, n);
        return 0;
}

const NkpctlCommand nkpctl_alarms_commands[] = {
        { "alarms", "list", "", "Show what needs the administrator.",
          "Recorded alarms (e.g. vm-locked) and derived ones (provider-inactive, "
          "provider-deleted), oldest first.  'nkpctl alarms' alone runs this verb.",
          NULL, 0, 0, alarms_list },
        { "alarms", "clear", "KIND [SUBJECT]", "Forget recorded alarms of KIND [for SUBJECT].",
          "Derived alarms go away when their cause does.", NULL, 1, 2, alarms_clear },
        { 0 },
};
