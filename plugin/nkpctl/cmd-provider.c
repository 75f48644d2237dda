/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: nkpctl provider …, replaced by its owner. */
#include "nkpctl.h"

int nkpctl_provider(NkpctlGlobals *g, int argc, char **argv)
{
        (void) g;
        (void) argc;
        (void) argv;
        return nkpctl_error("'provider' is not implemented yet.");
}
