/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm backup / restore-backup / blockcopy: encrypted copies of an nkp
 * VM's disks (libnkp's nkp_vm_backup, nkp_vm_restore_backup,
 * nkp_vm_blockcopy in plugin/lib/vm-backup.c; docs/backup.md).  The rows
 * are in cmd-vm.c's vm table. */
#include <stdio.h>

#include "nkpctl.h"

static gboolean opt_incremental;
static char *opt_name;
static char *opt_disk_dir;

int nkpctl_vm_backup(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        unsigned level = 0;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_backup(g->ctx, v, argv[1], argv[2], opt_incremental, &level) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "name", argv[1]);
                nkpctl_json_add_string(b, "dir", argv[2]);
                json_builder_set_member_name(b, "level");
                json_builder_add_int_value(b, level);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else if (level == 0) {
                printf("VM '%s' is backed up in '%s' (full, encrypted under its own keys).\n",
                       argv[1], argv[2]);
        } else {
                printf("VM '%s' is backed up in '%s' (incremental level %u, encrypted under its "
                       "own keys).\n",
                       argv[1], argv[2], level);
        }
        return 0;
}

int nkpctl_vm_restore_backup(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        g_autofree char *name = NULL;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_restore_backup(g->ctx, v, argv[1], opt_name, opt_disk_dir, &name) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "name", name);
                nkpctl_json_add_string(b, "dir", argv[1]);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("VM '%s' is defined from the backup in '%s'; start it: virsh start %s\n",
                       name, argv[1], name);
        }
        return 0;
}

int nkpctl_vm_blockcopy(NkpctlGlobals *g, int argc, char **argv)
{
        (void) argc;
        g_autoptr(nkp_virt) v = NULL;
        if (nkpctl_virt_open(g, &v) < 0 ||
            nkp_vm_blockcopy(g->ctx, v, argv[1], argv[2], argv[3]) < 0)
                return nkpctl_lib_error();
        if (g->json) {
                g_autoptr(JsonBuilder) b = json_builder_new();
                json_builder_begin_object(b);
                nkpctl_json_add_string(b, "name", argv[1]);
                nkpctl_json_add_string(b, "disk", argv[2]);
                nkpctl_json_add_string(b, "copy", argv[3]);
                json_builder_end_object(b);
                nkpctl_print_json(json_builder_get_root(b));
        } else {
                printf("Disk '%s' of VM '%s' is copied to '%s' (LUKS, under the disk's own key).\n",
                       argv[2], argv[1], argv[3]);
        }
        return 0;
}

const GOptionEntry nkpctl_backup_options[] = {
        { "incremental", 0, 0, G_OPTION_ARG_NONE, &opt_incremental,
          "Add what changed since the last backup in DIR (running VMs)", NULL },
        G_OPTION_ENTRY_NULL,
};

const GOptionEntry nkpctl_restore_backup_options[] = {
        { "name", 0, 0, G_OPTION_ARG_STRING, &opt_name,
          "The restored VM's name (default: the backed-up VM's)", "NEW" },
        { "disk-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_disk_dir,
          "Where the restored disks go (default: beside the original disks)", "DIR" },
        G_OPTION_ENTRY_NULL,
};
