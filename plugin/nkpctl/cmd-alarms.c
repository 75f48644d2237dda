/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl alarms [--json]            recorded and derived alarms, oldest first
 * nkpctl alarms clear KIND [SUBJECT]  forget recorded alarms (derived ones
 *                                     go away when their cause does) */
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
        if (argc < 2 || argc > 3) {
                fputs("nkpctl: 'alarms clear' takes KIND [SUBJECT].\n", stderr);
                return 2;
        }
        if (nkp_alarm_clear(g->ctx, argv[1], argc == 3 ? argv[2] : NULL) < 0)
                return nkpctl_lib_error();
        if (!g->json)
                printf("Cleared the recorded '%s' alarms%s%s%s.\n", argv[1], argc == 3 ? " for '" : "",
                       argc == 3 ? argv[2] : "", argc == 3 ? "'" : "");
        return 0;
}

int nkpctl_alarms(NkpctlGlobals *g, int argc, char **argv)
{
        gboolean json = FALSE;
        const GOptionEntry entries[] = {
                { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print one JSON document on stdout", NULL },
                G_OPTION_ENTRY_NULL,
        };
        g_autoptr(GOptionContext) oc = g_option_context_new("[clear KIND [SUBJECT]]");
        g_autoptr(GError) error = NULL;
        g_option_context_set_summary(oc, "Show what needs the admin: recorded alarms (e.g. vm-locked) "
                                         "and derived ones (provider-inactive, provider-deleted).");
        g_option_context_add_main_entries(oc, entries, NULL);
        g_set_prgname("nkpctl alarms");
        if (!g_option_context_parse(oc, &argc, &argv, &error)) {
                nkpctl_error("%s.", error->message);
                return 2;
        }
        if (json)
                g->json = true;
        if (argc >= 2 && strcmp(argv[1], "clear") == 0)
                return alarms_clear(g, argc - 1, argv + 1);
        if (argc != 1) {
                nkpctl_error("'alarms' takes no arguments besides 'clear KIND [SUBJECT]'.");
                return 2;
        }

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
