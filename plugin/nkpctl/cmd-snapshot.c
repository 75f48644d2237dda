/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm snapshot / encrypt-layer / revert / clone (issue 16): thin
 * wrappers of nkp_vm_snapshot, nkp_vm_encrypt_layer, nkp_vm_revert and
 * nkp_vm_clone (vm-snapshot.c, vm-revert.c, vm-clone.c); the rows are
 * NKPCTL_SNAPSHOT_CLONE_ROWS in nkpctl.h. */
#include <stdio.h>

#include "nkpctl.h"

static char **opt_files;
static gboolean opt_delete_abandoned;

const GOptionEntry nkpctl_revert_options[] = {
        { "delete-abandoned", 0, 0, G_OPTION_ARG_NONE, &opt_delete_abandoned,
          "Delete the layers left behind that no snapshot needs", NULL },
        { NULL },
};
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

/* The lines of `vm revert` (each item "TARGET PATH"). */
static void print_revert(const char *vm, const char *snap, const nkp_revert_result *res)
{
        static const char *const what[NKP_REVERT_N_ITEMS] = {
                [NKP_REVERT_LAYER] = "new encrypted layer",
                [NKP_REVERT_ABANDONED] = "left behind (no snapshot needs it: delete it when you no longer want it)",
                [NKP_REVERT_KEPT] = "left behind (another snapshot needs it: kept)",
                [NKP_REVERT_DELETED] = "left behind, deleted",
        };
        printf("VM '%s' reverted to snapshot '%s'.\n", vm, snap);
        for (int k = 0; k < NKP_REVERT_N_ITEMS; k++)
                for (size_t i = 0; i < nkp_revert_result_count(res, k); i++) {
                        g_autofree char *t = g_strdup(nkp_revert_result_item(res, k, i));
                        char *path = strchr(t, ' ');
                        *path++ = '\0';
                        printf("  disk %s: %s: %s\n", t, what[k], path);
                }
        const char *why = nkp_revert_result_current_error(res);
        if (why)
                printf("  note: libvirt did not make '%s' its current snapshot: %s\n", snap, why);
        if (nkp_revert_result_vtpm(res))
                printf("  vTPM: not part of a disk-only snapshot; it keeps its current state.\n");
}

int nkpctl_vm_revert(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        g_autoptr(nkp_revert_result) res = NULL;
        unsigned flags = opt_delete_abandoned ? NKP_VM_REVERT_DELETE_ABANDONED : 0;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_revert(g->ctx, v, argv[1], argv[2], flags, &res) < 0)
                return nkpctl_lib_error();
        if (!g->json) {
                print_revert(argv[1], argv[2], res);
                return 0;
        }
        static const char *const member[NKP_REVERT_N_ITEMS] = { "layers", "abandoned", "kept",
                                                                "deleted" };
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        nkpctl_json_add_string(b, "name", argv[1]);
        nkpctl_json_add_string(b, "snapshot", argv[2]);
        for (int k = 0; k < NKP_REVERT_N_ITEMS; k++) {
                json_builder_set_member_name(b, member[k]);
                json_builder_begin_array(b);
                for (size_t i = 0; i < nkp_revert_result_count(res, k); i++)
                        json_builder_add_string_value(b, nkp_revert_result_item(res, k, i));
                json_builder_end_array(b);
        }
        json_builder_set_member_name(b, "current");
        json_builder_add_boolean_value(b, nkp_revert_result_current_error(res) == NULL);
        if (nkp_revert_result_current_error(res))
                nkpctl_json_add_string(b, "current_error", nkp_revert_result_current_error(res));
        json_builder_set_member_name(b, "vtpm_kept");
        json_builder_add_boolean_value(b, nkp_revert_result_vtpm(res));
        json_builder_end_object(b);
        nkpctl_print_json(json_builder_get_root(b));
        return 0;
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
