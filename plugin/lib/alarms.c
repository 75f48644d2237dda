/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* STUB: replaced by its owner. */
#include <errno.h>
#include "nkp-private.h"
#define STUB return nkp_fail(-ENOSYS, "%s is not implemented yet.", __func__)

int nkp_alarm_raise(nkp_context *ctx, const char *kind, const char *subject, const char *message) { STUB; }
int nkp_alarm_clear(nkp_context *ctx, const char *kind, const char *subject) { STUB; }
int nkp_alarm_list(nkp_context *ctx, nkp_alarm ***ret, size_t *ret_n) { STUB; }
void nkp_alarm_list_free(nkp_alarm **list, size_t n) { (void) list; }
const char *nkp_alarm_kind(const nkp_alarm *a) { return NULL; }
const char *nkp_alarm_subject(const nkp_alarm *a) { return NULL; }
const char *nkp_alarm_message(const nkp_alarm *a) { return NULL; }
int64_t nkp_alarm_since(const nkp_alarm *a) { return 0; }
