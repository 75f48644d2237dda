/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: nkpctl alarms …, replaced by its owner. */
#include "nkpctl.h"

int nkpctl_alarms(NkpctlGlobals *g, int argc, char **argv)
{
        (void) g;
        (void) argc;
        (void) argv;
        return nkpctl_error("'alarms' is not implemented yet.");
}
