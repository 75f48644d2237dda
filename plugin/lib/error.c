/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The library reports, the programs print: a thread-local "last error" text
 * for the caller and one process-wide log function. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>

#include "nkp-private.h"

/* Large enough for a sentence around a long VM name: libvirt caps no name,
 * and the hook's one line must still say why after a 5000-character one
 * (issue 13).  A fixed buffer, so a pointer from nkp_error_message() stays
 * valid; a longer message is cut at the end. */
static _Thread_local char last_error[16384];
static _Thread_local char openssl_text[512];

static nkp_log_func log_func;
static void *log_userdata;

const char *nkp_error_message(void)
{
        return last_error;
}

void nkp_error_clear(void)
{
        last_error[0] = '\0';
}

void nkp_set_log_func(nkp_log_func func, void *userdata)
{
        log_func = func;
        log_userdata = userdata;
}

void nkp_log(enum nkp_log_level level, const char *fmt, ...)
{
        if (!log_func)
                return;
        char buf[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        log_func(level, buf, log_userdata);
}

int nkp_fail(int err, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(last_error, sizeof last_error, fmt, ap);
        va_end(ap);
        nkp_log(NKP_LOG_DEBUG, "%s (%s)", last_error, strerror(-err));
        return err;
}

int nkp_fail_prefix(int err, const char *fmt, ...)
{
        g_autofree char *cause = g_strdup(last_error);
        va_list ap;
        va_start(ap, fmt);
        g_autofree char *prefix = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        if (cause[0])
                return nkp_fail(err, "%s: %s", prefix, cause);
        return nkp_fail(err, "%s", prefix);
}

const char *nkp_openssl_error(void)
{
        unsigned long e = ERR_get_error();
        openssl_text[0] = '\0';
        if (e)
                ERR_error_string_n(e, openssl_text, sizeof openssl_text);
        ERR_clear_error();
        return openssl_text;
}
