/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nkp-swtpm-certs: swtpm_setup's create_certs_tool.  Issues a vTPM's EK
 * certificates (RSA-2048 and ECC P-384) and its platform certificate signed
 * by the EK CA of the VM's nkp provider (plugin/lib/ekca.c), so every host
 * holding the provider issues certificates that chain to the same CA.
 *
 * Set in /etc/swtpm_setup.conf (keep the two localca lines: they are
 * passed on, and used for VMs of no nkp provider):
 *
 *   create_certs_tool = /usr/libexec/nkp/nkp-swtpm-certs
 *
 * swtpm_setup calls it once per certificate (swtpm 0.7.1, swtpm_setup.c
 * call_create_certs):
 *
 *   nkp-swtpm-certs --type ek|platform --ek <RSA modulus hex | x=..,y=..,id=..>
 *       --dir D [--logfile F] [--vmid <name>:<uuid>] --tpm-spec-family 2.0
 *       --tpm-spec-level 0 --tpm-spec-revision 164 --tpm-manufacturer id:…
 *       --tpm-model swtpm --tpm-version id:… --tpm2 [--allow-signing]
 *       [--decryption] [--configfile C] [--optsfile O]
 *
 * and stores D/ek.cert / D/platform.cert (DER) in the vTPM's NV (0x01c00002
 * RSA EK, 0x01c00016 ECC EK, 0x01c08000 platform).  The platform
 * manufacturer/model/version come from the --optsfile lines
 * "--platform-manufacturer X" etc. (swtpm-localca.options), as for
 * swtpm_localca.
 *
 * Which VMs are nkp's, and the CA key vs libvirt's swtpm_user
 * ------------------------------------------------------------
 * libvirt runs swtpm_setup (and so this tool) as its swtpm_user (Debian:
 * tss), before the VM starts, while it holds the domain's lock: the tool must
 * not call libvirt about the domain (deadlock), and the CA private key -- a
 * derivation of the provider's KDK -- must never be readable by tss, in
 * clear or otherwise: whoever holds it can mint EK certificates for any
 * "vTPM" of the provider, which is what the certificates exist to prevent.
 *
 *  1. The qemu hook's prepare step (root, runs before swtpm_setup, has the
 *     domain XML on stdin) writes a ticket ROOT/run/nkp/ekca/<vm uuid>
 *     (0600 root, the provider's key id, the VM's name, expires=now+300 s,
 *     no key bytes) for an nkp VM whose vTPM has no state yet: only then
 *     does swtpm_setup run.  It is good for one certificate of each kind
 *     (RSA EK, ECC EK, platform) whose subject is the ticket's VM; the
 *     third removes it, and so does the release step (plugin/lib/ekca.c).  The ticket maps the VM to its provider
 *     without asking libvirt, and limits issuing to the window in which that
 *     VM's vTPM is being manufactured.
 *  2. Running as root (the lab, or qemu.conf swtpm_user = "root"): the tool
 *     reads the ticket and signs in-process (KDK from the key cache or the
 *     store, CA key derived, used, freed; the process is non-dumpable).
 *  3. Running as any other user (tss): the tool cannot read the ticket, the
 *     store or the cache.  It sends the request (public data only: the EK
 *     public key, the vmid, the TPM attributes) over the UNIX socket
 *     ROOT/run/nkp/ekca.sock (in a 0750 root:<swtpm group> directory) to
 *     nkpd, which runs as root, checks the peer with SO_PEERCRED before
 *     reading (root or the configured swtpm user only, [vtpm] swtpm_user in
 *     nkp.conf, default tss), checks the VM's ticket, signs, and sends back
 *     the DER certificate.  The key never leaves root's processes.  A tss
 *     process can at most take one of the three certificates of a VM whose
 *     ticket is live, i.e. during that VM's first start, and swtpm_setup's
 *     own request of that kind is then refused (README: what the signer
 *     promises).
 *  4. No ticket (the VM has no nkp provider, or its vTPM state already
 *     exists): exec swtpm's own local CA (/usr/share/swtpm/swtpm-localca,
 *     else /usr/bin/swtpm_localca) with the same arguments, as if nkp were
 *     not there.
 *
 * Rejected alternatives: a setuid helper (a root binary that any local user
 * can run with attacker-chosen arguments); an intermediate CA key handed to
 * tss per VM (the guest would then need the intermediate to verify, and
 * tss would hold a signing key); writing the CA key to a tss-readable file
 * (the thing to avoid).
 *
 * The request, both signers and the certificate file are libnkp's (nkp.h,
 * "vTPM EK certificates"); this program picks the signer by its user and
 * falls back to swtpm's local CA.
 *
 * Exit 0 with one line on stdout (swtpm_setup logs it); non-zero with one
 * line on stderr (swtpm_setup puts it into its log and fails the start).
 * Environment (tests): NKP_ROOT relocates nkp's files, NKP_SWTPM_LOCALCA the
 * fallback program. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <signal.h>
#include <unistd.h>

#include <glib.h>

#include "nkp/nkp.h"

static int die(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static int die(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        g_autofree char *m = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        for (char *p = m; *p; p++)
                if (*p == '\n')
                        *p = ' ';
        fprintf(stderr, "nkp-swtpm-certs: %s\n", m);
        return 1;
}

/* Not nkp's VM: swtpm's own local CA, with the same arguments. */
static int fallback(char **argv)
{
        const char *prog = g_getenv("NKP_SWTPM_LOCALCA");
        if (!prog || !prog[0])
                prog = access("/usr/share/swtpm/swtpm-localca", X_OK) == 0
                               ? "/usr/share/swtpm/swtpm-localca"
                               : "/usr/bin/swtpm_localca";
        argv[0] = (char *) prog;
        execv(prog, argv);
        return die("cannot run swtpm's local CA '%s': %s.", prog, g_strerror(errno));
}

static bool wants_help(int argc, char **argv)
{
        for (int i = 1; i < argc; i++)
                if (strcmp(argv[i], "--help") == 0)
                        return true;
        return false;
}

/* Root signs in-process; any other user (libvirt's swtpm_user) asks nkpd.
 * -ENOENT: no ticket, not nkp's VM. */
static int issue(const nkp_ekcert_request *req, uint8_t **ret_der, size_t *ret_len,
                 char **ret_provider)
{
        const char *root = g_getenv("NKP_ROOT");
        if (!root || !root[0])
                root = "/";
        if (geteuid() != 0)
                /* No context: nkp.conf is 0600 root, and nothing else is needed. */
                return nkp_ekcert_request_remote(root, req, ret_der, ret_len);
        g_autoptr(nkp_context) ctx = NULL;
        int r = nkp_context_new(root, &ctx);
        if (r < 0)
                return r;
        return nkp_ekcert_sign(ctx, req, ret_der, ret_len, ret_provider);
}

int main(int argc, char **argv)
{
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);
        signal(SIGPIPE, SIG_IGN);

        if (wants_help(argc, argv)) {
                printf("Usage: nkp-swtpm-certs --type ek|platform --ek PARAM --dir DIR "
                       "--vmid NAME:UUID --tpm2 … (swtpm_setup's create_certs_tool)\n");
                return 0;
        }
        g_autoptr(nkp_ekcert_request) req = NULL;
        int r = nkp_ekcert_request_from_argv(argc, argv, &req);
        if (r == -ENOENT)
                return fallback(argv);
        if (r < 0)
                return die("%s", nkp_error_message());
        const char *vmid = nkp_ekcert_request_vmid(req);
        const char *type = nkp_ekcert_request_type(req);

        g_autofree uint8_t *der = NULL;
        size_t len = 0;
        g_autofree char *provider = NULL;
        r = issue(req, &der, &len, &provider);
        if (r == -ENOENT)
                return fallback(argv);
        if (r < 0)
                /* From nkpd the line already says "nkp: …". */
                return geteuid() == 0 ? die("VM '%s': %s", vmid, nkp_error_message())
                                      : die("%s", nkp_error_message());
        if (nkp_ekcert_write(req, der, len) < 0)
                return die("%s", nkp_error_message());
        if (provider)
                printf("nkp: issued the %s certificate of VM '%s' with the EK CA of provider "
                       "'%s'\n",
                       type, vmid, provider);
        else
                printf("nkp: issued the %s certificate of VM '%s' through nkpd\n", type, vmid);
        return 0;
}
