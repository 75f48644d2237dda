/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: nkpctl vm …, replaced by its owner. */
#include "nkpctl.h"

int nkpctl_vm(NkpctlGlobals *g, int argc, char **argv)
{
        (void) g;
        (void) argc;
        (void) argv;
        return nkpctl_error("'vm' is not implemented yet.");
}

int nkpctl_vms_using_provider(NkpctlGlobals *g, const char *key_id, GPtrArray **ret_names)
{
        (void) g;
        (void) key_id;
        *ret_names = g_ptr_array_new_with_free_func(g_free);
        return 0;
}

int nkpctl_host_unlock(NkpctlGlobals *g)
{
        (void) g;
        return nkpctl_error("'host unlock' is not implemented yet.");
}
