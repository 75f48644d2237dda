/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* --progress for the long VM verbs (vm encrypt, decrypt, rekey): libnkp's
 * progress function (nkp_context_set_progress) printed for a person or a
 * program.
 *
 *   json  one line per step on stdout, before the result:
 *         {"progress":{"op":"encrypt","vm":"vm1","step":"vda","done":1,"total":3}}
 *         (the Cockpit page reads these while the command runs)
 *   bar   a bar on stderr, redrawn in place: for a terminal
 *   none  nothing
 * The default is "bar" when stderr is a terminal, else "none". */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "nkpctl.h"

#define BAR_WIDTH 30

static void print_json_line(const char *op, const char *vm, const char *step, unsigned done,
                            unsigned total, void *userdata)
{
        (void) userdata;
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "progress");
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "op", op);
        nkpctl_json_add_string(b, "vm", vm);
        nkpctl_json_add_string(b, "step", step);
        json_builder_set_member_name(b, "done");
        json_builder_add_int_value(b, done);
        json_builder_set_member_name(b, "total");
        json_builder_add_int_value(b, total);
        json_builder_end_object(b);
        json_builder_end_object(b);
        g_autoptr(JsonNode) root = json_builder_get_root(b);
        g_autofree char *line = json_to_string(root, FALSE);
        printf("%s\n", line);
        fflush(stdout); /* a reader sees each step as it starts */
}

static void print_bar(const char *op, const char *vm, const char *step, unsigned done,
                      unsigned total, void *userdata)
{
        (void) userdata;
        unsigned filled = total ? done * BAR_WIDTH / total : BAR_WIDTH;
        char bar[BAR_WIDTH + 1];
        memset(bar, '#', filled);
        memset(bar + filled, '.', BAR_WIDTH - filled);
        bar[BAR_WIDTH] = '\0';
        /* \r and erase-to-end: one line, redrawn in place. */
        fprintf(stderr, "\r\033[K%s %s [%s] %u/%u %s", op, vm ? vm : "", bar, done, total, step);
        if (done == total)
                fputc('\n', stderr);
        fflush(stderr);
}

int nkpctl_progress_setup(NkpctlGlobals *g, const char *mode)
{
        if (!mode)
                mode = isatty(STDERR_FILENO) ? "bar" : "none";
        if (strcmp(mode, "json") == 0)
                nkp_context_set_progress(g->ctx, print_json_line, NULL);
        else if (strcmp(mode, "bar") == 0)
                nkp_context_set_progress(g->ctx, print_bar, NULL);
        else if (strcmp(mode, "none") != 0)
                return nkpctl_usage_error(g, "--progress is json, bar or none, not '%s'.", mode);
        return 0;
}
