/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Sealing KDKs to the host TPM 2.0 with tpm2-tss ESAPI.
 *
 * Seal:   CreatePrimary(owner, SRK template) → salted HMAC session bound to
 *         nothing, salted with the SRK, parameter encryption on → Create a
 *         KEYEDHASH sealed object holding the 32 KDK bytes → marshal its
 *         TPM2B_PUBLIC and TPM2B_PRIVATE into one blob.
 * Unseal: CreatePrimary again, compare the SRK's name with the one stored
 *         next to the blob (another TPM, or a cleared one, gives another
 *         name: a clear -ENXIO instead of an opaque integrity error) → Load →
 *         Unseal with response encryption → copy into an nkp_secret, wipe
 *         tpm2-tss's buffer, flush every handle.
 *
 * The SRK is the TCG provisioning guidance's ECC P-256 storage key
 * (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA,
 * restricted, decrypt; AES-128-CFB; empty unique), so it is the same key that
 * `tpm2_createprimary -C o -G ecc256:aes128cfb` and systemd derive, and it is
 * re-created deterministically from the owner seed: nothing is persisted in
 * the TPM.  The owner hierarchy's auth value must be empty (the default).
 *
 * The sealed object: KEYEDHASH, nameAlg SHA-256, fixedTPM | fixedParent |
 * userWithAuth | noDA, empty auth value, no policy.  noDA because there is
 * no secret auth value to guess: a locked-out TPM must not lock VMs out.
 * What protects the KDK is that the private part is wrapped by the SRK,
 * which never leaves this TPM.
 *
 * Blob layout (version 1), all header integers little-endian:
 *
 *   offset size
 *        0    4  magic "NKPT"
 *        4    1  version = 1 (SRK = ECC P-256 template above)
 *        5    3  reserved, zero
 *        8    4  public_len  (bytes of the marshalled TPM2B_PUBLIC)
 *       12    4  private_len (bytes of the marshalled TPM2B_PRIVATE)
 *       16    …  TPM2B_PUBLIC  (Tss2_MU, TPM byte order)
 *        …    …  TPM2B_PRIVATE (Tss2_MU, TPM byte order)
 *
 * Nothing else may follow; both lengths are capped before unmarshalling, and
 * the unmarshaller must consume exactly each length.  The blob holds no key
 * bytes in clear: TPM2B_PRIVATE is encrypted and integrity-protected under
 * the SRK.
 *
 * Bounded time: tpm2-tss 3.2's swtpm TCTI blocks forever on a peer that
 * accepts but never answers, and ESAPI's synchronous calls ignore
 * Esys_SetTimeout.  So nkp_tpm_open() first probes an swtpm TCTI itself (a
 * TPM2_GetRandom over its own socket, with a deadline); a closed port fails
 * at once.  A device TCTI is bounded by the kernel driver's timeouts.
 */
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include "dl-tss2.h" /* tpm2-tss is loaded by nkp_tpm_open(), not at start */
#include "nkp-private.h"

#define BLOB_MAGIC "NKPT"
#define BLOB_VERSION 1
#define BLOB_HEADER_SIZE 16
#define BLOB_MAX_PART 2048 /* well above sizeof(TPM2B_PUBLIC)/sizeof(TPM2B_PRIVATE) */
#define BLOB_MAX_SIZE (BLOB_HEADER_SIZE + 2 * BLOB_MAX_PART)
#define SRK_NAME_MAX_HEX (2 * sizeof(TPMU_NAME))
#define PROBE_TIMEOUT_MS 5000
#define LOCK_TIMEOUT_MS 30000

struct NkpTpm {
        char *tcti_name;
        TSS2_TCTI_CONTEXT *tcti;
        ESYS_CONTEXT *esys;
        int lock_fd; /* -1, or the flock serializing a TPM without resource manager */
};

/* ---- errors -------------------------------------------------------------- */

static bool rc_is_comm(TSS2_RC rc)
{
        return (rc & TSS2_RC_LAYER_MASK) == TSS2_TCTI_RC_LAYER ||
               (rc & ~TSS2_RC_LAYER_MASK) == TSS2_BASE_RC_IO_ERROR ||
               (rc & ~TSS2_RC_LAYER_MASK) == TSS2_BASE_RC_NO_CONNECTION;
}

static int tss_fail(const NkpTpm *tpm, TSS2_RC rc, const char *what)
{
        if (rc_is_comm(rc))
                return nkp_fail(-EIO,
                                "Lost the TPM at TCTI '%s' during %s (%s); check that the TPM "
                                "(or the swtpm playing it) is running.",
                                tpm->tcti_name, what, Tss2_RC_Decode(rc));
        return nkp_fail(-EIO, "TPM command %s failed on TCTI '%s': %s.", what, tpm->tcti_name,
                        Tss2_RC_Decode(rc));
}

/* A TPM format-one response code, whatever handle/parameter it names. */
static bool rc_fmt1_is(TSS2_RC rc, TSS2_RC want)
{
        rc &= ~TSS2_RC_LAYER_MASK;
        return (rc & TPM2_RC_FMT1) && (rc & (TPM2_RC_FMT1 | 0x3f)) == want;
}

/* tpm2-tss prints its own errors on stderr unless told otherwise; the
 * library never prints.  An administrator who sets TSS2_LOG keeps control. */
static void quiet_tss_logging(void)
{
        static gsize once;
        if (g_once_init_enter(&once)) {
                if (!g_getenv("TSS2_LOG"))
                        g_setenv("TSS2_LOG", "all+none", FALSE);
                g_once_init_leave(&once, 1);
        }
}

/* ---- swtpm probe ---------------------------------------------------------- */

static int64_t now_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` on fd until `deadline`: 0 ready, -ETIMEDOUT. */
static int wait_fd(int fd, short events, int64_t deadline)
{
        for (;;) {
                int64_t left = deadline - now_ms();
                if (left <= 0)
                        return -ETIMEDOUT;
                struct pollfd p = { .fd = fd, .events = events };
                int n = poll(&p, 1, (int) left);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n > 0)
                        return 0;
        }
}

static int connect_deadline(int fd, const struct sockaddr *sa, socklen_t len, int64_t deadline)
{
        if (connect(fd, sa, len) == 0)
                return 0;
        if (errno != EINPROGRESS)
                return -errno;
        int r = wait_fd(fd, POLLOUT, deadline);
        if (r < 0)
                return r;
        int err = 0;
        socklen_t elen = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
                return -errno;
        return err ? -err : 0;
}

/* Sends TPM2_GetRandom(8) and reads the response header: any TPM answer
 * (even TPM_RC_INITIALIZE) proves the swtpm is alive. */
static int probe_exchange(int fd, int64_t deadline)
{
        static const uint8_t cmd[12] = { 0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8 };
        size_t sent = 0;
        while (sent < sizeof cmd) {
                int r = wait_fd(fd, POLLOUT, deadline);
                if (r < 0)
                        return r;
                ssize_t n = send(fd, cmd + sent, sizeof cmd - sent, MSG_NOSIGNAL);
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n < 0)
                        return -errno;
                sent += (size_t) n;
        }
        uint8_t resp[64];
        size_t got = 0, want = 10;
        while (got < want) {
                int r = wait_fd(fd, POLLIN, deadline);
                if (r < 0)
                        return r;
                ssize_t n = recv(fd, resp + got, sizeof resp - got, 0);
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -ECONNRESET;
                got += (size_t) n;
                if (got >= 10 && want == 10) {
                        uint32_t size = (uint32_t) resp[2] << 24 | (uint32_t) resp[3] << 16 |
                                        (uint32_t) resp[4] << 8 | resp[5];
                        if (resp[0] != 0x80 || size < 10 || size > sizeof resp)
                                return -EPROTO;
                        want = size;
                }
        }
        return 0;
}

/* Parses "swtpm[:host=H,port=P|path=F]" like tpm2-tss does. */
static int probe_swtpm(const char *conf)
{
        g_autofree char *host = g_strdup("localhost");
        g_autofree char *port = g_strdup("2321");
        g_autofree char *path = NULL;
        g_auto(GStrv) kv = g_strsplit(conf, ",", -1);
        for (char **p = kv; *p; p++) {
                if ((*p)[0] == '\0')
                        continue;
                if (g_str_has_prefix(*p, "host="))
                        g_free(host), host = g_strdup(*p + 5);
                else if (g_str_has_prefix(*p, "port="))
                        g_free(port), port = g_strdup(*p + 5);
                else if (g_str_has_prefix(*p, "path="))
                        path = g_strdup(*p + 5);
        }

        int64_t deadline = now_ms() + PROBE_TIMEOUT_MS;
        int r = -EADDRNOTAVAIL;
        if (path) {
                struct sockaddr_un sun = { .sun_family = AF_UNIX };
                if (strlen(path) >= sizeof sun.sun_path)
                        return -ENAMETOOLONG;
                strcpy(sun.sun_path, path);
                int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
                if (fd < 0)
                        return -errno;
                r = connect_deadline(fd, (struct sockaddr *) &sun, sizeof sun, deadline);
                if (r == 0)
                        r = probe_exchange(fd, deadline);
                close(fd);
                return r;
        }

        struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC };
        struct addrinfo *res = NULL;
        if (getaddrinfo(host, port, &hints, &res) != 0)
                return -EHOSTUNREACH;
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                                ai->ai_protocol);
                if (fd < 0) {
                        r = -errno;
                        continue;
                }
                r = connect_deadline(fd, ai->ai_addr, ai->ai_addrlen, deadline);
                if (r == 0)
                        r = probe_exchange(fd, deadline);
                close(fd);
                if (r == 0 || r == -ETIMEDOUT)
                        break;
        }
        freeaddrinfo(res);
        return r;
}

/* ---- TPMs without a resource manager ------------------------------------------ */

/* The kernel's /dev/tpmrm* and tpm2-abrmd give every client its own view of
 * the TPM's few object and session slots.  An swtpm (the lab's and the
 * tests' host TPM) or /dev/tpm0 has no such manager: two concurrent unseals
 * run out of slots (TPM_RC_OBJECT_MEMORY), and a process killed mid-way
 * leaves its objects loaded for good.  For those nkp serializes its own TPM
 * use with a flock on the directory of the config that names the TPM
 * (ROOT/etc/nkp), bounded in time, and, holding it, flushes whatever
 * transient objects and sessions a dead process left behind. */
static bool tcti_has_rm(const char *tcti)
{
        return strstr(tcti, "tpmrm") != NULL || g_str_has_prefix(tcti, "tabrmd");
}

static int lock_tpm(const nkp_context *ctx, NkpTpm *tpm)
{
        g_autofree char *dir = g_path_get_dirname(ctx->conf_path);
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return 0; /* no config directory: nothing to share it with */
        int64_t deadline = now_ms() + LOCK_TIMEOUT_MS;
        while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                if (errno != EWOULDBLOCK && errno != EINTR) {
                        int err = errno;
                        close(fd);
                        return nkp_fail(-err, "Cannot lock '%s' to use the TPM: %s.", dir,
                                        g_strerror(err));
                }
                if (now_ms() > deadline) {
                        close(fd);
                        return nkp_fail(-EBUSY,
                                        "The TPM at TCTI '%s' stayed busy for %d seconds (another "
                                        "nkp process holds the lock on '%s'); try again.",
                                        tpm->tcti_name, LOCK_TIMEOUT_MS / 1000, dir);
                }
                g_usleep(5000);
        }
        tpm->lock_fd = fd;
        return 0;
}

/* TPM2_FlushContext(handle), sent raw: ESAPI knows nothing of these
 * handles (they belong to a dead process). */
static void flush_raw(NkpTpm *tpm, TPM2_HANDLE h)
{
        uint8_t cmd[14] = { 0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x65,
                            (uint8_t) (h >> 24), (uint8_t) (h >> 16), (uint8_t) (h >> 8),
                            (uint8_t) h };
        uint8_t resp[64];
        size_t len = sizeof resp;
        if (Tss2_Tcti_Transmit(tpm->tcti, sizeof cmd, cmd) == TSS2_RC_SUCCESS)
                (void) Tss2_Tcti_Receive(tpm->tcti, &len, resp, TSS2_TCTI_TIMEOUT_BLOCK);
}

static void flush_stale(NkpTpm *tpm)
{
        static const TPM2_HANDLE ranges[] = { TPM2_TRANSIENT_FIRST, TPM2_LOADED_SESSION_FIRST,
                                              TPM2_POLICY_SESSION_FIRST };
        for (size_t i = 0; i < G_N_ELEMENTS(ranges); i++) {
                TPMI_YES_NO more;
                TPMS_CAPABILITY_DATA *cap = NULL;
                if (Esys_GetCapability(tpm->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                       TPM2_CAP_HANDLES, ranges[i], TPM2_MAX_CAP_HANDLES, &more,
                                       &cap) != TSS2_RC_SUCCESS)
                        continue;
                for (UINT32 j = 0; j < cap->data.handles.count; j++) {
                        TPM2_HANDLE h = cap->data.handles.handle[j];
                        if ((h >> 24) != (ranges[i] >> 24))
                                break;
                        nkp_log(NKP_LOG_DEBUG, "Flushing TPM handle 0x%08x left by a dead process.",
                                (unsigned) h);
                        flush_raw(tpm, h);
                }
                Esys_Free(cap);
        }
}

/* ---- open / close ---------------------------------------------------------- */

void nkp_tpm_close(NkpTpm *tpm)
{
        if (!tpm)
                return;
        if (tpm->esys)
                Esys_Finalize(&tpm->esys);
        if (tpm->tcti)
                Tss2_TctiLdr_Finalize(&tpm->tcti);
        if (tpm->lock_fd >= 0)
                close(tpm->lock_fd);
        g_free(tpm->tcti_name);
        g_free(tpm);
}

int nkp_tpm_open(const nkp_context *ctx, NkpTpm **ret)
{
        const char *tcti = ctx->tcti;

        if (!tcti || strcmp(tcti, "none") == 0)
                return nkp_fail(-ENODEV, "This host has no TPM configured ([tpm] tcti=none in '%s').",
                                ctx->conf_path);

        int loaded = nkp_dlopen_tss2();
        if (loaded < 0)
                return loaded;
        quiet_tss_logging();
        g_autoptr(NkpTpm) tpm = g_new0(NkpTpm, 1);
        tpm->tcti_name = g_strdup(tcti);
        tpm->lock_fd = -1;

        /* Serialize first: an swtpm serves one connection at a time, so
         * even the probe must not race another nkp process. */
        bool has_rm = tcti_has_rm(tcti);
        if (!has_rm) {
                int r = lock_tpm(ctx, tpm);
                if (r < 0)
                        return r;
        }

        if (strcmp(tcti, "swtpm") == 0 || g_str_has_prefix(tcti, "swtpm:")) {
                int r = probe_swtpm(tcti[5] == ':' ? tcti + 6 : "");
                if (r == -ETIMEDOUT)
                        return nkp_fail(-ETIMEDOUT,
                                        "The TPM at TCTI '%s' did not answer within %d seconds; "
                                        "check that the swtpm playing it is running and not stuck.",
                                        tcti, PROBE_TIMEOUT_MS / 1000);
                if (r < 0)
                        return nkp_fail(-EIO,
                                        "Cannot reach the TPM at TCTI '%s' (%s); check that the "
                                        "swtpm playing it is running, or fix [tpm] tcti= in '%s'.",
                                        tcti, g_strerror(-r), ctx->conf_path);
        } else if (!ctx->tcti_explicit && g_str_has_prefix(tcti, "device:") &&
                   access(tcti + strlen("device:"), F_OK) < 0) {
                return nkp_fail(-ENODEV, "This host has no TPM device (%s).", tcti);
        }

        TSS2_RC rc = Tss2_TctiLdr_Initialize(tcti, &tpm->tcti);
        if (rc != TSS2_RC_SUCCESS)
                return nkp_fail(-EIO,
                                "Cannot open the TPM at TCTI '%s': %s; check the TPM, or fix "
                                "[tpm] tcti= in '%s'.",
                                tcti, Tss2_RC_Decode(rc), ctx->conf_path);
        rc = Esys_Initialize(&tpm->esys, tpm->tcti, NULL);
        if (rc != TSS2_RC_SUCCESS)
                return nkp_fail(-EIO, "Cannot initialize ESAPI on TCTI '%s': %s.", tcti,
                                Tss2_RC_Decode(rc));
        rc = Esys_Startup(tpm->esys, TPM2_SU_CLEAR);
        if (rc != TSS2_RC_SUCCESS && rc != TPM2_RC_INITIALIZE)
                return tss_fail(tpm, rc, "Startup");
        if (!has_rm)
                flush_stale(tpm);

        *ret = g_steal_pointer(&tpm);
        return 0;
}

/* ---- SRK and session -------------------------------------------------------- */

static const TPM2B_PUBLIC srk_template = {
        .publicArea = {
                .type = TPM2_ALG_ECC,
                .nameAlg = TPM2_ALG_SHA256,
                .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                    TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                                    TPMA_OBJECT_NODA | TPMA_OBJECT_RESTRICTED |
                                    TPMA_OBJECT_DECRYPT,
                .parameters.eccDetail = {
                        .symmetric = {
                                .algorithm = TPM2_ALG_AES,
                                .keyBits.aes = 128,
                                .mode.aes = TPM2_ALG_CFB,
                        },
                        .scheme.scheme = TPM2_ALG_NULL,
                        .curveID = TPM2_ECC_NIST_P256,
                        .kdf.scheme = TPM2_ALG_NULL,
                },
        },
};

static void flush(NkpTpm *tpm, ESYS_TR *h)
{
        if (*h != ESYS_TR_NONE) {
                (void) Esys_FlushContext(tpm->esys, *h);
                *h = ESYS_TR_NONE;
        }
}

/* Creates the SRK, returns its handle and its name as lower-case hex. */
static int srk_create(NkpTpm *tpm, ESYS_TR *ret_srk, char **ret_name)
{
        TPM2B_SENSITIVE_CREATE in_sensitive = { 0 };
        TPM2B_DATA outside = { 0 };
        TPML_PCR_SELECTION pcrs = { 0 };
        ESYS_TR srk = ESYS_TR_NONE;
        TPM2B_PUBLIC *out_public = NULL;
        TPM2B_CREATION_DATA *creation_data = NULL;
        TPM2B_DIGEST *creation_hash = NULL;
        TPMT_TK_CREATION *ticket = NULL;
        TPM2B_NAME *name = NULL;

        TSS2_RC rc = Esys_CreatePrimary(tpm->esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                        ESYS_TR_NONE, &in_sensitive, &srk_template, &outside, &pcrs,
                                        &srk, &out_public, &creation_data, &creation_hash, &ticket);
        Esys_Free(out_public);
        Esys_Free(creation_data);
        Esys_Free(creation_hash);
        Esys_Free(ticket);
        if (rc != TSS2_RC_SUCCESS)
                return tss_fail(tpm, rc, "CreatePrimary (storage root key, owner hierarchy)");

        rc = Esys_TR_GetName(tpm->esys, srk, &name);
        if (rc != TSS2_RC_SUCCESS) {
                flush(tpm, &srk);
                return tss_fail(tpm, rc, "TR_GetName (storage root key)");
        }
        char *hex = g_malloc(2 * (size_t) name->size + 1);
        nkp_hex_encode(name->name, name->size, hex);
        Esys_Free(name);
        *ret_srk = srk;
        *ret_name = hex;
        return 0;
}

/* An HMAC session salted with the SRK, so the KDK crosses the bus encrypted
 * (AES-128-CFB parameter encryption) in both directions. */
static int session_start(NkpTpm *tpm, ESYS_TR srk, ESYS_TR *ret)
{
        const TPMT_SYM_DEF sym = {
                .algorithm = TPM2_ALG_AES,
                .keyBits.aes = 128,
                .mode.aes = TPM2_ALG_CFB,
        };
        ESYS_TR session = ESYS_TR_NONE;
        TSS2_RC rc = Esys_StartAuthSession(tpm->esys, srk, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                           ESYS_TR_NONE, NULL, TPM2_SE_HMAC, &sym,
                                           TPM2_ALG_SHA256, &session);
        if (rc != TSS2_RC_SUCCESS)
                return tss_fail(tpm, rc, "StartAuthSession (salted with the storage root key)");
        *ret = session;
        return 0;
}

static int session_attrs(NkpTpm *tpm, ESYS_TR session, TPMA_SESSION attrs)
{
        TSS2_RC rc = Esys_TRSess_SetAttributes(tpm->esys, session,
                                               attrs | TPMA_SESSION_CONTINUESESSION, 0xff);
        if (rc != TSS2_RC_SUCCESS)
                return tss_fail(tpm, rc, "TRSess_SetAttributes");
        return 0;
}

/* ESAPI keeps copies of secret parameters where we cannot reach them: the
 * plaintext of Create's inSensitive in its context (kept for a resubmission),
 * and the decrypted response of Unseal in the SAPI buffer.  Both are freed
 * without a wipe by Esys_Finalize.  Overwrite them while the context lives:
 * an Esys_Create_Async with a zero inSensitive stores it over the old copy
 * and then fails on an unknown parent handle before sending anything, and an
 * 83-byte GetCapability response covers the buffer where the unsealed bytes
 * were.  Best effort: failures here are expected or harmless. */
static void scrub(NkpTpm *tpm)
{
        TPM2B_SENSITIVE_CREATE zero = { 0 };
        TSS2_RC rc = Esys_Create_Async(tpm->esys, (ESYS_TR) 0x7ffffff0, ESYS_TR_PASSWORD,
                                       ESYS_TR_NONE, ESYS_TR_NONE, &zero, NULL, NULL, NULL);
        if (rc == TSS2_RC_SUCCESS) /* should not happen; complete it */
                (void) Esys_Create_Finish(tpm->esys, NULL, NULL, NULL, NULL, NULL);
        TPMI_YES_NO more;
        TPMS_CAPABILITY_DATA *cap = NULL;
        if (Esys_GetCapability(tpm->esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                               TPM2_CAP_TPM_PROPERTIES, TPM2_PT_FIXED, 8, &more, &cap) ==
            TSS2_RC_SUCCESS)
                Esys_Free(cap);
}

/* ---- blob ----------------------------------------------------------------- */

static void put_le32(uint8_t *p, uint32_t v)
{
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
        p[2] = (uint8_t) (v >> 16);
        p[3] = (uint8_t) (v >> 24);
}

static uint32_t get_le32(const uint8_t *p)
{
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 |
               (uint32_t) p[3] << 24;
}

static int blob_pack(const TPM2B_PUBLIC *pub, const TPM2B_PRIVATE *priv, GBytes **ret)
{
        uint8_t *buf = g_malloc0(BLOB_MAX_SIZE);
        size_t pub_len = 0, priv_len = 0;
        TSS2_RC rc = Tss2_MU_TPM2B_PUBLIC_Marshal(pub, buf + BLOB_HEADER_SIZE, BLOB_MAX_PART,
                                                  &pub_len);
        if (rc == TSS2_RC_SUCCESS)
                rc = Tss2_MU_TPM2B_PRIVATE_Marshal(priv, buf + BLOB_HEADER_SIZE + pub_len,
                                                   BLOB_MAX_PART, &priv_len);
        if (rc != TSS2_RC_SUCCESS) {
                g_free(buf);
                return nkp_fail(-EINVAL, "Cannot marshal the sealed object: %s.",
                                Tss2_RC_Decode(rc));
        }
        memcpy(buf, BLOB_MAGIC, 4);
        buf[4] = BLOB_VERSION;
        put_le32(buf + 8, (uint32_t) pub_len);
        put_le32(buf + 12, (uint32_t) priv_len);
        *ret = g_bytes_new_take(g_realloc(buf, BLOB_HEADER_SIZE + pub_len + priv_len),
                                BLOB_HEADER_SIZE + pub_len + priv_len);
        return 0;
}

static int blob_unpack(GBytes *blob, TPM2B_PUBLIC *pub, TPM2B_PRIVATE *priv)
{
        size_t len = 0;
        const uint8_t *p = blob ? g_bytes_get_data(blob, &len) : NULL;

        if (!p || len < BLOB_HEADER_SIZE || len > BLOB_MAX_SIZE || memcmp(p, BLOB_MAGIC, 4) != 0)
                return nkp_fail(-EBADMSG, "The TPM-sealed key in the store is not an nkp sealed "
                                          "blob (truncated or corrupted); restore the provider "
                                          "from its backup.");
        if (p[4] != BLOB_VERSION)
                return nkp_fail(-EPROTONOSUPPORT,
                                "The TPM-sealed key in the store has version %u, this nkp knows "
                                "version %u; use a newer nkp or restore the provider from its "
                                "backup.",
                                p[4], BLOB_VERSION);
        uint32_t pub_len = get_le32(p + 8), priv_len = get_le32(p + 12);
        if (pub_len > BLOB_MAX_PART || priv_len > BLOB_MAX_PART ||
            (size_t) BLOB_HEADER_SIZE + pub_len + priv_len != len || p[5] || p[6] || p[7])
                return nkp_fail(-EBADMSG, "The TPM-sealed key in the store has inconsistent "
                                          "sizes (corrupted); restore the provider from its "
                                          "backup.");
        size_t off = 0;
        TSS2_RC rc = Tss2_MU_TPM2B_PUBLIC_Unmarshal(p + BLOB_HEADER_SIZE, pub_len, &off, pub);
        if (rc != TSS2_RC_SUCCESS || off != pub_len)
                return nkp_fail(-EBADMSG, "The public part of the TPM-sealed key in the store is "
                                          "malformed; restore the provider from its backup.");
        off = 0;
        rc = Tss2_MU_TPM2B_PRIVATE_Unmarshal(p + BLOB_HEADER_SIZE + pub_len, priv_len, &off, priv);
        if (rc != TSS2_RC_SUCCESS || off != priv_len)
                return nkp_fail(-EBADMSG, "The private part of the TPM-sealed key in the store is "
                                          "malformed; restore the provider from its backup.");
        if (pub->publicArea.type != TPM2_ALG_KEYEDHASH ||
            !(pub->publicArea.objectAttributes & TPMA_OBJECT_FIXEDTPM))
                return nkp_fail(-EBADMSG, "The TPM-sealed key in the store is not a sealed data "
                                          "object; restore the provider from its backup.");
        return 0;
}

/* ---- seal / unseal ---------------------------------------------------------- */

int nkp_tpm_seal(NkpTpm *tpm, const nkp_secret *kdk, GBytes **ret_blob, char **ret_srk_name)
{
        ESYS_TR srk = ESYS_TR_NONE, session = ESYS_TR_NONE;
        g_autofree char *srk_name = NULL;
        TPM2B_PRIVATE *out_private = NULL;
        TPM2B_PUBLIC *out_public = NULL;
        TPM2B_CREATION_DATA *creation_data = NULL;
        TPM2B_DIGEST *creation_hash = NULL;
        TPMT_TK_CREATION *ticket = NULL;
        GBytes *blob = NULL;
        int r;

        if (nkp_secret_len(kdk) > sizeof(((TPM2B_SENSITIVE_DATA *) NULL)->buffer))
                return nkp_fail(-EINVAL, "A %zu-byte secret is too large to seal.",
                                nkp_secret_len(kdk));

        r = srk_create(tpm, &srk, &srk_name);
        if (r < 0)
                return r;
        r = session_start(tpm, srk, &session);
        if (r < 0)
                goto out;
        r = session_attrs(tpm, session, TPMA_SESSION_DECRYPT);
        if (r < 0)
                goto out;

        const TPM2B_PUBLIC templ = {
                .publicArea = {
                        .type = TPM2_ALG_KEYEDHASH,
                        .nameAlg = TPM2_ALG_SHA256,
                        .objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                                            TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA,
                        .parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL,
                },
        };
        TPM2B_DATA outside = { 0 };
        TPML_PCR_SELECTION pcrs = { 0 };
        TPM2B_SENSITIVE_CREATE *sens = g_new0(TPM2B_SENSITIVE_CREATE, 1);
        sens->sensitive.data.size = (UINT16) nkp_secret_len(kdk);
        memcpy(sens->sensitive.data.buffer, nkp_secret_data(kdk), nkp_secret_len(kdk));

        TSS2_RC rc = Esys_Create(tpm->esys, srk, session, ESYS_TR_NONE, ESYS_TR_NONE, sens, &templ,
                                 &outside, &pcrs, &out_private, &out_public, &creation_data,
                                 &creation_hash, &ticket);
        nkp_wipe(sens, sizeof *sens);
        g_free(sens);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss_fail(tpm, rc, "Create (sealed object)");
                goto out;
        }
        r = blob_pack(out_public, out_private, &blob);
        if (r < 0)
                goto out;

        *ret_blob = blob;
        *ret_srk_name = g_steal_pointer(&srk_name);
        r = 0;
out:
        scrub(tpm);
        Esys_Free(out_private);
        Esys_Free(out_public);
        Esys_Free(creation_data);
        Esys_Free(creation_hash);
        Esys_Free(ticket);
        flush(tpm, &session);
        flush(tpm, &srk);
        return r;
}

int nkp_tpm_unseal(NkpTpm *tpm, GBytes *blob, const char *srk_name, nkp_secret **ret)
{
        ESYS_TR srk = ESYS_TR_NONE, session = ESYS_TR_NONE, obj = ESYS_TR_NONE;
        g_autofree char *name = NULL;
        TPM2B_PUBLIC pub = { 0 };
        TPM2B_PRIVATE priv = { 0 };
        TPM2B_SENSITIVE_DATA *out = NULL;
        int r;

        if (!srk_name || strlen(srk_name) > SRK_NAME_MAX_HEX || strlen(srk_name) < 4)
                return nkp_fail(-EBADMSG, "The store lacks a valid TPM key name for a sealed key "
                                          "(corrupted); restore the provider from its backup.");
        r = blob_unpack(blob, &pub, &priv);
        if (r < 0)
                return r;

        r = srk_create(tpm, &srk, &name);
        if (r < 0)
                return r;
        if (g_ascii_strcasecmp(name, srk_name) != 0) {
                r = nkp_fail(-ENXIO,
                             "The key was sealed to a different TPM (the TPM was replaced or "
                             "cleared, or the store was copied from another host); restore the "
                             "provider from its backup: nkpctl provider restore FILE.p12");
                goto out;
        }

        TSS2_RC rc = Esys_Load(tpm->esys, srk, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, &priv,
                               &pub, &obj);
        if (rc != TSS2_RC_SUCCESS) {
                if (rc_fmt1_is(rc, TPM2_RC_INTEGRITY))
                        r = nkp_fail(-EBADMSG,
                                     "The TPM refused the sealed key as altered (%s); restore "
                                     "the provider from its backup: nkpctl provider restore "
                                     "FILE.p12",
                                     Tss2_RC_Decode(rc));
                else
                        r = tss_fail(tpm, rc, "Load (sealed object)");
                goto out;
        }

        r = session_start(tpm, srk, &session);
        if (r < 0)
                goto out;
        r = session_attrs(tpm, session, TPMA_SESSION_ENCRYPT);
        if (r < 0)
                goto out;
        rc = Esys_Unseal(tpm->esys, obj, session, ESYS_TR_NONE, ESYS_TR_NONE, &out);
        if (rc != TSS2_RC_SUCCESS) {
                r = tss_fail(tpm, rc, "Unseal");
                goto out;
        }
        if (out->size != NKP_KDK_SIZE) {
                r = nkp_fail(-EBADMSG, "The TPM unsealed %u bytes where a %d-byte key was "
                                       "expected; restore the provider from its backup.",
                             out->size, NKP_KDK_SIZE);
                goto out;
        }
        r = nkp_secret_new_copy(out->buffer, out->size, ret);
out:
        if (out) {
                nkp_wipe(out, sizeof *out);
                Esys_Free(out);
        }
        nkp_wipe(&priv, sizeof priv);
        flush(tpm, &session);
        flush(tpm, &obj);
        flush(tpm, &srk);
        scrub(tpm);
        return r;
}
