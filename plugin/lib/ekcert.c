/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* vTPM EK certificate requests (public API, nkp.h "vTPM EK certificates"):
 * swtpm_setup's create_certs_tool command line parsed into a request, the
 * in-process signer for root, the client of nkpd's signer socket for any
 * other user, and the certificate file swtpm_setup reads back.
 *
 * The certificates themselves, the tickets and the server side of the socket
 * are in ekca.c; the program is swtpm-hooks/nkp-swtpm-certs.c, whose header
 * explains which VMs are nkp's and why the CA key stays with root. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "nkp-private.h"

#define ANSWER_MAX (64 * 1024)
#define CLIENT_TIMEOUT_SECONDS 15

struct nkp_ekcert_request {
        NkpEkCertRequest req; /* strings point into `opts` or are literals */
        GHashTable *opts;     /* option name without "--" -> value (owned) */
        const char *dir;
};

/* swtpm 0.7.1's call_create_certs: the options that take a value. */
static const char *const value_opts[] = {
        "type", "ek", "dir", "logfile", "vmid", "configfile", "optsfile",
        "tpm-spec-family", "tpm-spec-level", "tpm-spec-revision", "tpm-manufacturer",
        "tpm-model", "tpm-version",
};

void nkp_ekcert_request_free(nkp_ekcert_request *r)
{
        if (!r)
                return;
        if (r->opts)
                g_hash_table_unref(r->opts);
        g_free(r);
}

const char *nkp_ekcert_request_type(const nkp_ekcert_request *r)
{
        return r->req.type;
}

const char *nkp_ekcert_request_vmid(const nkp_ekcert_request *r)
{
        return r->req.vmid;
}

static bool is_value_opt(const char *name)
{
        for (size_t k = 0; k < G_N_ELEMENTS(value_opts); k++)
                if (strcmp(name, value_opts[k]) == 0)
                        return true;
        return false;
}

/* "--platform-manufacturer X" etc. from swtpm-localca.options; a file that
 * cannot be read adds nothing, as for swtpm_localca. */
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

static const char *opt(const nkp_ekcert_request *r, const char *name, const char *dflt)
{
        const char *v = g_hash_table_lookup(r->opts, name);
        return v ? v : dflt;
}

int nkp_ekcert_request_from_argv(int argc, char *const argv[], nkp_ekcert_request **ret)
{
        g_autoptr(nkp_ekcert_request) r = g_new0(nkp_ekcert_request, 1);
        r->opts = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        bool tpm2 = false;
        for (int i = 1; i < argc; i++) {
                const char *a = argv[i];
                if (!g_str_has_prefix(a, "--"))
                        return nkp_fail(-EINVAL, "Unexpected argument '%s'.", a);
                a += 2;
                if (strcmp(a, "tpm2") == 0)
                        tpm2 = true;
                else if (strcmp(a, "allow-signing") == 0)
                        r->req.allow_signing = true;
                else if (strcmp(a, "decryption") == 0)
                        r->req.decryption = true;
                else if (!is_value_opt(a))
                        return nkp_fail(-EINVAL, "Unknown option '--%s'.", a);
                else if (i + 1 >= argc)
                        return nkp_fail(-EINVAL, "Option '--%s' needs a value.", a);
                else
                        g_hash_table_replace(r->opts, g_strdup(a), g_strdup(argv[++i]));
        }
        const char *vmid = opt(r, "vmid", NULL);
        char uuid[NKP_UUID_STRING_LEN + 1];
        /* Not ours to judge: TPM 1.2, no VM id (swtpm_setup by hand). */
        if (!tpm2 || !vmid || nkp_ekca_vmid_uuid(vmid, uuid) < 0)
                return nkp_fail(-ENOENT, "Not a request for an nkp VM (no --tpm2, or no --vmid "
                                         "ending in a UUID): swtpm's local CA answers it.");
        if (!opt(r, "type", NULL) || !opt(r, "dir", NULL) || !opt(r, "ek", NULL))
                return nkp_fail(-EINVAL, "--type, --ek and --dir are required.");
        read_optsfile(opt(r, "optsfile", NULL), r->opts);

        r->dir = opt(r, "dir", NULL);
        r->req = (NkpEkCertRequest) {
                .type = opt(r, "type", NULL),
                .ek = opt(r, "ek", NULL),
                .vmid = vmid,
                .tpm_spec_family = opt(r, "tpm-spec-family", NULL),
                .tpm_spec_level = opt(r, "tpm-spec-level", NULL),
                .tpm_spec_revision = opt(r, "tpm-spec-revision", NULL),
                .tpm_manufacturer = opt(r, "tpm-manufacturer", NULL),
                .tpm_model = opt(r, "tpm-model", NULL),
                .tpm_version = opt(r, "tpm-version", NULL),
                .platform_manufacturer = opt(r, "platform-manufacturer", "nkp"),
                .platform_model = opt(r, "platform-model", "QEMU"),
                .platform_version = opt(r, "platform-version", "1"),
                .allow_signing = r->req.allow_signing,
                .decryption = r->req.decryption,
        };
        *ret = g_steal_pointer(&r);
        return 0;
}

static void bytes_out(GBytes *b, uint8_t **ret, size_t *ret_len)
{
        gsize len = 0;
        const void *p = g_bytes_get_data(b, &len);
        *ret = g_memdup2(p, len);
        *ret_len = len;
}

int nkp_ekcert_sign(nkp_context *ctx, const nkp_ekcert_request *r, uint8_t **ret_der,
                    size_t *ret_len, char **ret_provider)
{
        g_autoptr(GBytes) der = NULL;
        g_autofree char *provider = NULL;
        int rc = nkp_ekca_sign_request(ctx, &r->req, &der, &provider);
        if (rc < 0)
                return rc;
        bytes_out(der, ret_der, ret_len);
        if (ret_provider)
                *ret_provider = g_steal_pointer(&provider);
        return 0;
}

/* ---- the client of nkpd's signer (wire format: ekca.c) ---------------------- */

static int connect_signer(const char *root, int *ret_fd)
{
        g_autofree char *path = g_strconcat(root && strcmp(root, "/") != 0 ? root : "",
                                            NKP_EKCA_SOCKET, NULL);
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return nkp_fail(-ENAMETOOLONG, "The socket path '%s' is too long.", path);
        strcpy(sa.sun_path, path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                int e = errno;
                if (fd >= 0)
                        close(fd);
                /* Always -ECONNREFUSED: a missing socket (ENOENT) must not read as
                 * "not nkp's VM", which would hand an nkp VM to swtpm's CA. */
                return nkp_fail(-ECONNREFUSED,
                                "nkp's certificate signer at '%s' is not reachable (%s): is "
                                "nkpd running? (systemctl start nkpd)",
                                path, g_strerror(e));
        }
        struct timeval tv = { .tv_sec = CLIENT_TIMEOUT_SECONDS };
        (void) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        *ret_fd = fd;
        return 0;
}

static bool send_all(int fd, const char *p, size_t len)
{
        while (len) {
                ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return false;
                p += n;
                len -= (size_t) n;
        }
        return true;
}

/* Everything nkpd sends until it closes (at most ANSWER_MAX + 1 bytes). */
static GBytes *receive_all(int fd)
{
        GByteArray *in = g_byte_array_new();
        uint8_t buf[4096];
        while (in->len <= ANSWER_MAX) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                g_byte_array_append(in, buf, (guint) n);
        }
        return g_byte_array_free_to_bytes(in);
}

/* "OK <n>\n" + n bytes of DER, "NOTICKET\n" or "ERR <line>\n". */
static int parse_answer(GBytes *answer, uint8_t **ret_der, size_t *ret_len)
{
        gsize al = 0;
        const char *a = g_bytes_get_data(answer, &al);
        const char *nl = al ? memchr(a, '\n', al) : NULL;
        if (!nl)
                return nkp_fail(-EPROTO, "nkpd sent no answer (see its log).");
        g_autofree char *head = g_strndup(a, (gsize) (nl - a));
        if (strcmp(head, "NOTICKET") == 0)
                return nkp_fail(-ENOENT, "nkpd has no certificate ticket for this VM: swtpm's "
                                         "local CA answers it.");
        if (g_str_has_prefix(head, "ERR "))
                return nkp_fail(-EREMOTEIO, "%s", head + 4);
        if (!g_str_has_prefix(head, "OK "))
                return nkp_fail(-EPROTO, "nkpd sent a malformed answer.");
        char *end = NULL;
        guint64 n = g_ascii_strtoull(head + 3, &end, 10);
        size_t body = al - (size_t) (nl + 1 - a);
        if (*end || n == 0 || n != body)
                return nkp_fail(-EPROTO, "nkpd sent a truncated certificate.");
        *ret_der = g_memdup2(nl + 1, body);
        *ret_len = body;
        return 0;
}

int nkp_ekcert_request_remote(const char *root, const nkp_ekcert_request *r, uint8_t **ret_der,
                              size_t *ret_len)
{
        int fd = -1;
        int rc = connect_signer(root, &fd);
        if (rc < 0)
                return rc;
        g_autofree char *text = nkp_ekca_request_format(&r->req);
        /* nkpd refuses some clients before reading (SO_PEERCRED) and closes:
         * its one line is still there to read after a failed send. */
        bool sent = send_all(fd, text, strlen(text));
        int e = errno;
        g_autoptr(GBytes) answer = receive_all(fd);
        close(fd);
        if (!sent && g_bytes_get_size(answer) == 0)
                return nkp_fail(-EIO, "Cannot send the request to nkpd: %s.", g_strerror(e));
        return parse_answer(answer, ret_der, ret_len);
}

/* ---- the file swtpm_setup reads ------------------------------------------- */

int nkp_ekcert_write(const nkp_ekcert_request *r, const uint8_t *der, size_t len)
{
        const char *name = strcmp(r->req.type, "platform") == 0 ? "platform.cert" : "ek.cert";
        g_autofree char *path = g_build_filename(r->dir, name, NULL);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot write '%s': %s.", path, g_strerror(e));
        }
        while (len) {
                ssize_t n = write(fd, der, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) {
                        int e = n < 0 ? errno : EIO;
                        close(fd);
                        return nkp_fail(-e, "Cannot write '%s': %s.", path, g_strerror(e));
                }
                der += n;
                len -= (size_t) n;
        }
        if (close(fd) < 0) {
                int e = errno;
                return nkp_fail(-e, "Cannot write '%s': %s.", path, g_strerror(e));
        }
        return 0;
}
