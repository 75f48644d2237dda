/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: nkpctl host …, replaced by its owner. */
#include "nkpctl.h"

int nkpctl_host(NkpctlGlobals *g, int argc, char **argv)
{
        (void) g;
        (void) argc;
        (void) argv;
        return nkpctl_error("'host' is not implemented yet.");
}
