/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkpctl vm …: the vm group's rows of the command table (nkpctl.c).
 *
 * Transitional: cmd-vm.c and cmd-rekey.c still parse their own argv, so
 * each handler here checks what the table cannot (--all against DOMAIN),
 * then rebuilds the argv those entry points expect (nkpctl_vm,
 * nkpctl_vm_rekey) from the options nkpctl.c parsed.  Nothing reaches them
 * that their parsers refuse, so usage errors all exit 2 from here.  When
 * cmd-vm.c becomes table handlers itself, this file goes. */
#include <stdio.h>

#include "nkpctl.h"

static char *opt_provider, *opt_disks;
static gboolean opt_deep, opt_all;

/* Calls `entry` with "vm VERB args… [--provider P] [--disks D]". */
static int call_vm(NkpctlGlobals *g, int (*entry)(NkpctlGlobals *, int, char **),
                   const char *verb, int argc, char **argv, const char *const *extra)
{
        g_autoptr(GPtrArray) a = g_ptr_array_new();
        g_ptr_array_add(a, (char *) "vm");
        g_ptr_array_add(a, (char *) verb);
        for (int i = 1; i < argc; i++)
                g_ptr_array_add(a, argv[i]);
        for (; extra && *extra; extra++)
                g_ptr_array_add(a, (char *) *extra);
        if (opt_provider) {
                g_ptr_array_add(a, (char *) "--provider");
                g_ptr_array_add(a, opt_provider);
        }
        if (opt_disks) {
                g_ptr_array_add(a, (char *) "--disks");
                g_ptr_array_add(a, opt_disks);
        }
        g_ptr_array_add(a, NULL);
        return entry(g, (int) a->len - 1, (char **) a->pdata);
}

static int vm_encrypt(NkpctlGlobals *g, int argc, char **argv)
{
        return call_vm(g, nkpctl_vm, "encrypt", argc, argv, NULL);
}

static int vm_decrypt(NkpctlGlobals *g, int argc, char **argv)
{
        return call_vm(g, nkpctl_vm, "decrypt", argc, argv, NULL);
}

static int vm_rekey(NkpctlGlobals *g, int argc, char **argv)
{
        if (opt_all == (argc == 2))
                return nkpctl_usage_error(g, "'vm rekey' takes one DOMAIN or --all.");
        if (opt_all && opt_deep)
                return nkpctl_usage_error(g, "--deep rekeys one shut-off DOMAIN; --all is shallow "
                                             "only.");
        const char *const flags[] = { opt_all ? "--all" : opt_deep ? "--deep" : NULL, NULL };
        return call_vm(g, nkpctl_vm_rekey, "rekey", argc, argv, flags);
}

static int vm_status(NkpctlGlobals *g, int argc, char **argv)
{
        return call_vm(g, nkpctl_vm, "status", argc, argv, NULL);
}

static int vm_list(NkpctlGlobals *g, int argc, char **argv)
{
        return call_vm(g, nkpctl_vm, "list", argc, argv, NULL);
}

static const GOptionEntry encrypt_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_provider,
          "The provider whose keys protect the VM (default: the host's default)", "NAME" },
        { "disks", 0, 0, G_OPTION_ARG_STRING, &opt_disks,
          "The qcow2 disks to encrypt: all (default) or targets such as vda,vdb", "all|vda,vdb…" },
        G_OPTION_ENTRY_NULL,
};

static const GOptionEntry rekey_options[] = {
        { "provider", 0, 0, G_OPTION_ARG_STRING, &opt_provider,
          "The provider to rekey to (default: the host's default)", "NAME" },
        { "deep", 0, 0, G_OPTION_ARG_NONE, &opt_deep,
          "New data keys: vTPM state and disks re-encrypted (VM shut off)", NULL },
        { "all", 0, 0, G_OPTION_ARG_NONE, &opt_all, "Every nkp VM of this host (shallow)", NULL },
        G_OPTION_ENTRY_NULL,
};

const NkpctlCommand nkpctl_vm_commands[] = {
        { "vm", "encrypt", "DOMAIN",
          "Encrypt a shut-off VM's vTPM and qcow2 disks.",
          "Crash safe: an interrupted run is finished or rolled back by the next nkpctl command "
          "on the VM, or by its next start.",
          encrypt_options, 1, 1, vm_encrypt },
        { "vm", "decrypt", "DOMAIN", "Decrypt a shut-off nkp VM back to plain.", NULL, NULL, 1,
          1, vm_decrypt },
        { "vm", "rekey", "DOMAIN|--all", "Rekey one VM, or every nkp VM, to a provider.",
          "Shallow (default): a new KEK, the same data keys; online, the guest notices nothing.\n"
          "Deep (--deep): new data keys, the vTPM state and every disk re-encrypted; the VM must "
          "be shut off and a full copy of its disks must fit.",
          rekey_options, 0, 1, vm_rekey },
        { "vm", "status", "DOMAIN", "Show whether a VM is plain, encrypted or locked.",
          NULL, NULL, 1, 1, vm_status },
        { "vm", "list", "", "Show the status of every defined VM.", NULL, NULL, 0, 0, vm_list },
        { "vm", "create", "FILE.xml", "Create a new VM with its vTPM encrypted from the start.",
          "Enrols the domain XML's plain emulated vTPM (a <uuid> is needed) before libvirt sees "
          "it, then defines it (--start: and starts it; --transient: starts it as virsh create "
          "does, defining nothing). The way to create vTPM VMs under [vtpm] policy=require.",
          nkpctl_vm_create_options, 1, 1, nkpctl_vm_create },
        { 0 },
};
