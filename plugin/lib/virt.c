/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner (domain XML / libvirt glue). */
#include "nkp-private.h"
