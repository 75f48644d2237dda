/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Libraries loaded on first use, not at process start.
 *
 * libvirt calls nkp's hook for every VM of the host, nkp's or not, about
 * six times per start and stop.  Linked normally, libvirt.so.0 alone makes
 * the dynamic loader map ~45 more objects (gnutls, curl, krb5, ssh, ICU…)
 * before main(): ~7 ms of a hook call that has nothing to do.  So, as
 * systemd does for its optional libraries (dlopen_tpm2() in
 * src/shared/tpm2-util.c), libnkp resolves the functions it calls into
 * sym_ pointers (dl-libvirt.h, dl-tss2.h) when it first needs them:
 *   libvirt  when a connection is opened (nkp_virt_open);
 *   tpm2-tss when a TPM is opened (nkp_tpm_open): a key-cache miss, a seal.
 * libnkp.so and the programs have no DT_NEEDED on either.
 *
 * What stays linked, measured on Debian 12 (a program that returns at
 * once, median of 60 runs, 2 vCPUs): nothing 0.7 ms; + GLib 0.9;
 * + libcrypto 1.6; + libkeyutils 1.6; + libxml2 (which pulls in ICU and
 * libstdc++) 2.6; + tpm2-tss 3.0; + libvirt 9.7.  libxml2 parses every
 * domain XML the hook is given (the exact "is this nkp's?" decision), so
 * it is needed on every step that can act; OpenSSL (0.7 ms, ~3 ms on a
 * loaded machine) is called through ~140 functions all over the key core,
 * some from static inline helpers in its own headers (the stacks) that a
 * sym_ redirection cannot reach; GLib and keyutils cost next to nothing.
 * Those stay ordinary link dependencies.  Figures: README, "Libraries
 * loaded on first use" and the hook's benchmark (bench/bench-hook.sh).
 *
 * The SONAMEs are the ABI nkp was built against; a missing library fails
 * the operation that needs it with one line naming the package. */
#include <dlfcn.h>
#include <errno.h>

#define NKP_DL_NO_REDIRECT
#include "dl-libvirt.h"
#include "dl-tss2.h"
#include "nkp-private.h"

typedef struct {
        const char *name;
        void **ptr;
} DlSym;

/* Loads `soname` and resolves `syms`; the handle is kept for the life of
 * the process.  0, or -ELIBACC with the message in *ret_error. */
static int dlopen_syms(const char *soname, const char *package, const DlSym *syms, size_t n,
                       char **ret_error)
{
        void *dl = dlopen(soname, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
        if (!dl) {
                *ret_error = g_strdup_printf("Cannot load %s (%s); install it (Debian: apt "
                                             "install %s).",
                                             soname, dlerror(), package);
                return -ELIBACC;
        }
        for (size_t i = 0; i < n; i++) {
                void *p = dlsym(dl, syms[i].name);
                if (!p) {
                        *ret_error = g_strdup_printf("%s has no function %s: it is older than "
                                                     "the version nkp was built against; "
                                                     "update %s.",
                                                     soname, syms[i].name, package);
                        for (size_t j = 0; j < i; j++)
                                *syms[j].ptr = NULL;
                        dlclose(dl);
                        return -ELIBACC;
                }
                *syms[i].ptr = p;
        }
        return 0;
}

/* The outcome of one library's loading, computed once per process. */
typedef struct {
        int r;
        char *error;
} DlResult;

static int dl_result(const DlResult *res)
{
        if (res->r < 0)
                return nkp_fail(res->r, "%s", res->error);
        return 0;
}

/* ---- libvirt ---------------------------------------------------------------- */

#define NKP_DL_DEFINE(f) __typeof__(f) *sym_##f;
NKP_LIBVIRT_SYMBOLS(NKP_DL_DEFINE)

#define NKP_DL_ENTRY(f) { #f, (void **) &sym_##f },

static gpointer load_libvirt(gpointer data)
{
        DlResult *res = data;
        static const DlSym syms[] = { NKP_LIBVIRT_SYMBOLS(NKP_DL_ENTRY) };
        res->r = dlopen_syms("libvirt.so.0", "libvirt0", syms, G_N_ELEMENTS(syms), &res->error);
        return res;
}

int nkp_dlopen_libvirt(void)
{
        static GOnce once = G_ONCE_INIT;
        static DlResult res;
        return dl_result(g_once(&once, load_libvirt, &res));
}

/* ---- tpm2-tss ---------------------------------------------------------------- */

NKP_TSS2_ESYS_SYMBOLS(NKP_DL_DEFINE)
NKP_TSS2_MU_SYMBOLS(NKP_DL_DEFINE)
NKP_TSS2_RC_SYMBOLS(NKP_DL_DEFINE)
NKP_TSS2_TCTILDR_SYMBOLS(NKP_DL_DEFINE)

static gpointer load_tss2(gpointer data)
{
        DlResult *res = data;
        static const DlSym esys[] = { NKP_TSS2_ESYS_SYMBOLS(NKP_DL_ENTRY) };
        static const DlSym mu[] = { NKP_TSS2_MU_SYMBOLS(NKP_DL_ENTRY) };
        static const DlSym rc[] = { NKP_TSS2_RC_SYMBOLS(NKP_DL_ENTRY) };
        static const DlSym tctildr[] = { NKP_TSS2_TCTILDR_SYMBOLS(NKP_DL_ENTRY) };
        res->r = dlopen_syms("libtss2-esys.so.0", "libtss2-esys-3.0.2-0", esys,
                             G_N_ELEMENTS(esys), &res->error);
        if (res->r == 0)
                res->r = dlopen_syms("libtss2-mu.so.0", "libtss2-mu0", mu, G_N_ELEMENTS(mu),
                                     &res->error);
        if (res->r == 0)
                res->r = dlopen_syms("libtss2-rc.so.0", "libtss2-rc0", rc, G_N_ELEMENTS(rc),
                                     &res->error);
        if (res->r == 0)
                res->r = dlopen_syms("libtss2-tctildr.so.0", "libtss2-tctildr0", tctildr,
                                     G_N_ELEMENTS(tctildr), &res->error);
        return res;
}

int nkp_dlopen_tss2(void)
{
        static GOnce once = G_ONCE_INIT;
        static DlResult res;
        return dl_result(g_once(&once, load_tss2, &res));
}
