/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm snapshot / encrypt-layer / clone (issue 16): thin wrappers of
 * nkp_vm_snapshot, nkp_vm_encrypt_layer and nkp_vm_clone (vm-snapshot.c,
 * vm-clone.c); the rows are NKPCTL_SNAPSHOT_CLONE_ROWS in nkpctl.h. */
#include <stdio.h>

#include "nkpctl.h"

static char **opt_files;
static gboolean opt_same_keys;

const GOptionEntry nkpctl_clone_options[] = {
        { "file", 0, 0, G_OPTION_ARG_STRING_ARRAY, &opt_files,
          "The clone's file for disk TARGET (repeat per disk; default: beside the original, "
          "NEW-TARGET.qcow2)",
          "TARGET=PATH" },
        { "same-keys", 0, 0, G_OPTION_ARG_NONE, &opt_same_keys,
          "Keep the original's disk keys (re-wrapped for the clone; files copied as they are, "
          "fast) instead of new ones",
          NULL },
        { NULL },
};

/* { "name": NAME, MEMBER: VALUE } with --json, else `line` (freed). */
static int print_done(NkpctlGlobals *g, const char *member, const char *name, const char *value,
                      char *line)
{
        g_autofree char *text = line;
        if (!g->json) {
                fputs(text, stdout);
                return 0;
        }
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", name);
        nkpctl_json_add_string(b, member, value);
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
        return 0;
}

int nkpctl_vm_snapshot(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        g_auto(GStrv) files = NULL;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_vm_snapshot(g->ctx, v, argv[1], argv[2], &files) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "name", argv[1]);
                nkpctl_json_add_string(b, "snapshot", argv[2]);
                json_builder_set_member_name(b, "overlays");
                json_builder_begin_array(b);
                for (char **f = files; f && *f; f++)
                        json_builder_add_string_value(b, *f);
                json_builder_end_array(b);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
                return 0;
        }
        for (char **f = files; f && *f; f++)
                printf("VM '%s': snapshot '%s': encrypted overlay %s\n", argv[1], argv[2], *f);
        return 0;
}

int nkpctl_vm_encrypt_layer(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        if (nkpctl_virt_open(g, &v) < 0 || nkp_vm_encrypt_layer(g->ctx, v, argv[1], argv[2]) < 0)
                return nkpctl_lib_error();
        return print_done(g, "layer", argv[1], argv[2],
                          g_strdup_printf("VM '%s': layer '%s' is encrypted now.\n", argv[1],
                                          argv[2]));
}

int nkpctl_vm_clone(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_clone(g->ctx, v, argv[1], argv[2], (const char *const *) opt_files,
                         opt_same_keys ? NKP_VM_CLONE_SAME_KEYS : 0) < 0)
                return nkpctl_lib_error();
        return print_done(g, "clone", argv[1], argv[2],
                          g_strdup_printf("VM '%s' cloned into '%s' (encrypted, %s, fresh "
                                          "vTPM).\n",
                                          argv[1], argv[2],
                                          opt_same_keys ? "the original's disk keys"
                                                        : "new keys"));
}
