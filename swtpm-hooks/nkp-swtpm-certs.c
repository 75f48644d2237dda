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
 *     (0600 root, "key_id=…, expires=now+300 s", no key bytes) for an nkp
 *     VM whose vTPM has no state yet: only then does swtpm_setup run.  The
 *     release step removes it.  The ticket maps the VM to its provider
 *     without asking libvirt, and limits issuing to the window in which that
 *     VM's vTPM is being manufactured.
 *  2. Running as root (the lab, or qemu.conf swtpm_user = "root"): the tool
 *     reads the ticket and signs in-process (KDK from the key cache or the
 *     store, CA key derived, used, freed; the process is non-dumpable).
 *  3. Running as any other user (tss): the tool cannot read the ticket, the
 *     store or the cache.  It sends the request (public data only: the EK
 *     public key, the vmid, the TPM attributes) over the UNIX socket
 *     ROOT/run/nkp/ekca.sock to nkpd, which runs as root, checks the peer
 *     with SO_PEERCRED (root or the configured swtpm user only, [vtpm]
 *     swtpm_user in nkp.conf, default tss), checks the VM's ticket, signs,
 *     and sends back the DER certificate.  The key never leaves root's
 *     processes.  A tss process can at most obtain a certificate for a VM
 *     whose ticket is live, i.e. during that VM's first start -- which
 *     swtpm_setup, running as tss, does anyway.
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
 * Exit 0 with one line on stdout (swtpm_setup logs it); non-zero with one
 * line on stderr (swtpm_setup puts it into its log and fails the start).
 * Environment (tests): NKP_ROOT relocates nkp's files, NKP_SWTPM_LOCALCA the
 * fallback program. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "nkp-private.h"

static const char *const value_opts[] = {
        "type", "ek", "dir", "logfile", "vmid", "configfile", "optsfile",
        "tpm-spec-family", "tpm-spec-level", "tpm-spec-revision", "tpm-manufacturer",
        "tpm-model", "tpm-version",
};

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

/* "--platform-manufacturer X" etc. from swtpm-localca.options. */
static void read_optsfile(const char *path, GHashTable *opts)
{
        g_autofree char *text = NULL;
        if (!path || !g_file_get_contents(path, &text, NULL, NULL))
                return;
        g_auto(GStrv) tok = g_regex_split_simple("\\s+", text, 0, 0);
        for (size_t i = 0; tok[i] && tok[i + 1]; i++) {
                if (g_str_has_prefix(tok[i], "--platform-") && tok[i + 1][0] &&
                    !g_str_has_prefix(tok[i + 1], "--"))
                        g_hash_table_replace(opts, g_strdup(tok[i] + 2), g_strdup(tok[i + 1]));
        }
}

static int write_cert(const char *dir, const char *type, GBytes *der)
{
        g_autofree char *path = g_build_filename(
                dir, strcmp(type, "platform") == 0 ? "platform.cert" : "ek.cert", NULL);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
                return die("cannot write '%s': %s.", path, g_strerror(errno));
        gsize len = 0;
        const uint8_t *p = g_bytes_get_data(der, &len);
        while (len) {
                ssize_t n = write(fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) {
                        int e = errno;
                        close(fd);
                        return die("cannot write '%s': %s.", path, g_strerror(e));
                }
                p += n;
                len -= (size_t) n;
        }
        if (close(fd) < 0)
                return die("cannot write '%s': %s.", path, g_strerror(errno));
        return 0;
}

/* Asks nkpd.  Returns 0 with *ret set, 1 for "no ticket", or exit code 2
 * after printing the error. */
static int ask_signer(const char *root, const NkpEkCertRequest *req, GBytes **ret)
{
        /* No context: nkp.conf is 0600 root, and nothing else is needed. */
        g_autofree char *path = g_strconcat(root && strcmp(root, "/") != 0 ? root : "",
                                            NKP_EKCA_SOCKET, NULL);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return die("the socket path '%s' is too long.", path) + 1;
        strcpy(sa.sun_path, path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                return die("nkp's certificate signer at '%s' is not reachable (%s): is nkpd "
                           "running? (systemctl start nkpd)",
                           path, g_strerror(e)) + 1;
        }
        struct timeval tv = { .tv_sec = 15 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        g_autofree char *text = nkp_ekca_request_format(req);
        size_t len = strlen(text), off = 0;
        while (off < len) {
                ssize_t n = write(fd, text + off, len - off);
                if (n <= 0) {
                        close(fd);
                        return die("cannot send the request to nkpd: %s.", g_strerror(errno)) + 1;
                }
                off += (size_t) n;
        }
        GByteArray *in = g_byte_array_new();
        uint8_t buf[4096];
        for (;;) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                g_byte_array_append(in, buf, (guint) n);
                if (in->len > 64 * 1024)
                        break;
        }
        close(fd);
        g_autoptr(GBytes) answer = g_byte_array_free_to_bytes(in);
        gsize al = 0;
        const char *a = g_bytes_get_data(answer, &al);
        const char *nl = al ? memchr(a, '\n', al) : NULL;
        if (!nl)
                return die("nkpd sent no answer (see its log).") + 1;
        g_autofree char *head = g_strndup(a, (gsize) (nl - a));
        if (strcmp(head, "NOTICKET") == 0)
                return 1;
        if (g_str_has_prefix(head, "ERR "))
                return die("%s", head + 4) + 1;
        char *end = NULL;
        if (!g_str_has_prefix(head, "OK "))
                return die("nkpd sent a malformed answer.") + 1;
        guint64 n = g_ascii_strtoull(head + 3, &end, 10);
        size_t body = al - (size_t) (nl + 1 - a);
        if (*end || n == 0 || n != body)
                return die("nkpd sent a truncated certificate.") + 1;
        *ret = g_bytes_new(nl + 1, body);
        return 0;
}

int main(int argc, char **argv)
{
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nocore = { 0, 0 };
        setrlimit(RLIMIT_CORE, &nocore);
        signal(SIGPIPE, SIG_IGN);

        g_autoptr(GHashTable) opts = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        bool tpm2 = false, allow_signing = false, decryption = false;
        for (int i = 1; i < argc; i++) {
                const char *a = argv[i];
                if (!g_str_has_prefix(a, "--"))
                        return die("unexpected argument '%s'.", a);
                a += 2;
                if (strcmp(a, "tpm2") == 0) {
                        tpm2 = true;
                        continue;
                }
                if (strcmp(a, "allow-signing") == 0) {
                        allow_signing = true;
                        continue;
                }
                if (strcmp(a, "decryption") == 0) {
                        decryption = true;
                        continue;
                }
                if (strcmp(a, "help") == 0) {
                        printf("Usage: nkp-swtpm-certs --type ek|platform --ek PARAM --dir DIR "
                               "--vmid NAME:UUID --tpm2 … (swtpm_setup's create_certs_tool)\n");
                        return 0;
                }
                bool known = false;
                for (size_t k = 0; k < G_N_ELEMENTS(value_opts); k++)
                        known = known || strcmp(a, value_opts[k]) == 0;
                if (!known)
                        return die("unknown option '--%s'.", a);
                if (i + 1 >= argc)
                        return die("option '--%s' needs a value.", a);
                g_hash_table_replace(opts, g_strdup(a), g_strdup(argv[++i]));
        }
        const char *vmid = g_hash_table_lookup(opts, "vmid");
        const char *type = g_hash_table_lookup(opts, "type");
        const char *dir = g_hash_table_lookup(opts, "dir");
        char uuid[NKP_UUID_STRING_LEN + 1];
        /* Not ours to judge: TPM 1.2, no VM id (swtpm_setup by hand). */
        if (!tpm2 || !vmid || nkp_ekca_vmid_uuid(vmid, uuid) < 0)
                return fallback(argv);
        if (!type || !dir || !g_hash_table_lookup(opts, "ek"))
                return die("--type, --ek and --dir are required.");

        read_optsfile(g_hash_table_lookup(opts, "optsfile"), opts);
        NkpEkCertRequest req = {
                .type = type,
                .ek = g_hash_table_lookup(opts, "ek"),
                .vmid = vmid,
                .tpm_spec_family = g_hash_table_lookup(opts, "tpm-spec-family"),
                .tpm_spec_level = g_hash_table_lookup(opts, "tpm-spec-level"),
                .tpm_spec_revision = g_hash_table_lookup(opts, "tpm-spec-revision"),
                .tpm_manufacturer = g_hash_table_lookup(opts, "tpm-manufacturer"),
                .tpm_model = g_hash_table_lookup(opts, "tpm-model"),
                .tpm_version = g_hash_table_lookup(opts, "tpm-version"),
                .platform_manufacturer = g_hash_table_lookup(opts, "platform-manufacturer"),
                .platform_model = g_hash_table_lookup(opts, "platform-model"),
                .platform_version = g_hash_table_lookup(opts, "platform-version"),
                .allow_signing = allow_signing,
                .decryption = decryption,
        };
        if (!req.platform_manufacturer)
                req.platform_manufacturer = "nkp";
        if (!req.platform_model)
                req.platform_model = "QEMU";
        if (!req.platform_version)
                req.platform_version = "1";

        const char *root = g_getenv("NKP_ROOT");
        g_autoptr(GBytes) der = NULL;
        g_autofree char *provider = NULL;
        if (geteuid() == 0) {
                g_autoptr(nkp_context) ctx = NULL;
                if (nkp_context_new(root && root[0] ? root : "/", &ctx) < 0)
                        return die("%s", nkp_error_message());
                int r = nkp_ekca_sign_request(ctx, &req, &der, &provider);
                if (r == -ENOENT)
                        return fallback(argv);
                if (r < 0)
                        return die("VM '%s': %s", vmid, nkp_error_message());
        } else {
                int r = ask_signer(root, &req, &der);
                if (r == 1)
                        return fallback(argv);
                if (r != 0)
                        return 1;
        }
        if (write_cert(dir, type, der) != 0)
                return 1;
        if (provider)
                printf("nkp: issued the %s certificate of VM '%s' with the EK CA of provider '%s'\n",
                       type, vmid, provider);
        else
                printf("nkp: issued the %s certificate of VM '%s' through nkpd\n", type, vmid);
        return 0;
}
