/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: a certificate request as nkpd reads it from its socket
 * (sent by nkp-swtpm-certs, running as libvirt's swtpm user, not root),
 * through the parser and the certificate issuer with its hand-made DER.
 * Whatever is issued must be a certificate OpenSSL parses back and that
 * verifies under the provider's CA key; a parsed request must format and
 * parse back to the same request. */
#include <openssl/x509.h>
#include <stdlib.h>
#include <string.h>

#include "nkp-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const NkpEkCa *fuzz_ca(EVP_PKEY **ret_ca_key)
{
        static NkpEkCa *ca;
        static EVP_PKEY *ca_key;
        if (!ca) {
                uint8_t k[NKP_KDK_SIZE];
                for (size_t i = 0; i < sizeof k; i++)
                        k[i] = (uint8_t) i;
                nkp_secret *kdk = NULL;
                GBytes *der = NULL;
                if (nkp_secret_new_copy(k, sizeof k, &kdk) < 0 ||
                    nkp_ekca_new(kdk, "fuzz", "5b3e4f8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b", &ca) < 0 ||
                    nkp_ekca_cert_der(ca, &der) < 0)
                        abort();
                gsize n = 0;
                const unsigned char *p = g_bytes_get_data(der, &n);
                X509 *root = d2i_X509(NULL, &p, (long) n);
                if (!root || !(ca_key = X509_get_pubkey(root)))
                        abort();
                X509_free(root);
                g_bytes_unref(der);
                nkp_secret_free(kdk);
        }
        *ret_ca_key = ca_key;
        return ca;
}

static bool same(const char *a, const char *b)
{
        return g_strcmp0(a, b) == 0;
}

static void check_round_trip(const NkpEkCertRequest *req)
{
        char *text = nkp_ekca_request_format(req);
        NkpEkCertRequest back;
        if (nkp_ekca_request_parse(text, &back) < 0)
                abort();
        /* Values with a newline cannot be sent and are left out on purpose. */
        if (!req->vmid || strchr(req->vmid, '\n') || !req->type || strchr(req->type, '\n'))
                goto out;
        if (!same(req->vmid, back.vmid) || !same(req->type, back.type) ||
            req->allow_signing != back.allow_signing || req->decryption != back.decryption)
                abort();
out:
        g_free(text);
}

static void check_issued(GBytes *der, EVP_PKEY *ca_key)
{
        gsize n = 0;
        const unsigned char *p = g_bytes_get_data(der, &n);
        X509 *cert = d2i_X509(NULL, &p, (long) n);
        if (!cert || p != (const unsigned char *) g_bytes_get_data(der, NULL) + n ||
            X509_verify(cert, ca_key) != 1)
                abort();
        X509_free(cert);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        if (size > NKP_EKCA_REQ_MAX)
                return 0; /* nkpd reads no more */
        EVP_PKEY *ca_key = NULL;
        const NkpEkCa *ca = fuzz_ca(&ca_key);
        /* As nkpd hands it over: NUL-terminated, modified in place. */
        char *text = g_strndup((const char *) data, size);
        NkpEkCertRequest req;
        if (nkp_ekca_request_parse(text, &req) == 0) {
                check_round_trip(&req);
                GBytes *der = NULL;
                if (nkp_ekca_issue(ca, &req, &der) == 0) {
                        check_issued(der, ca_key);
                        g_bytes_unref(der);
                } else if (der || !nkp_error_message()[0]) {
                        abort();
                }
        }
        g_free(text);
        return 0;
}
