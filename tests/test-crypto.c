/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The key chain: HKDF (RFC 5869, Wycheproof), AES-256-GCM (Wycheproof),
 * KEK derivation and the KDK fingerprint. */
#include <errno.h>
#include <string.h>

#include <json-glib/json-glib.h>

#include "testutil.h"

/* ---- RFC 5869, appendix A.1-A.3 (SHA-256) ----------------------------------- */

typedef struct {
        const char *ikm, *salt, *info, *okm;
} Rfc5869Case;

static const Rfc5869Case rfc5869_cases[] = {
        { /* A.1: basic */
          "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
          "000102030405060708090a0b0c",
          "f0f1f2f3f4f5f6f7f8f9",
          "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
          "34007208d5b887185865" },
        { /* A.2: longer inputs and outputs */
          "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
          "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
          "404142434445464748494a4b4c4d4e4f",
          "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
          "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
          "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
          "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
          "d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
          "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
          "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
          "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
          "cc30c58179ec3e87c14c01d5c1f3434f1d87" },
        { /* A.3: zero-length salt and info */
          "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
          "",
          "",
          "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
          "9d201395faa4b61a96c8" },
};

static void test_hkdf_rfc5869(void)
{
        for (size_t i = 0; i < G_N_ELEMENTS(rfc5869_cases); i++) {
                const Rfc5869Case *c = &rfc5869_cases[i];
                g_autoptr(GBytes) ikm = testutil_unhex(c->ikm);
                g_autoptr(GBytes) salt = testutil_unhex(c->salt);
                g_autoptr(GBytes) info = testutil_unhex(c->info);
                g_autoptr(GBytes) okm = testutil_unhex(c->okm);
                size_t n = g_bytes_get_size(okm);
                g_autofree uint8_t *out = g_malloc(n);

                g_assert_cmpint(nkp_hkdf_sha256(g_bytes_get_data(ikm, NULL), g_bytes_get_size(ikm),
                                                g_bytes_get_data(salt, NULL), g_bytes_get_size(salt),
                                                g_bytes_get_data(info, NULL), g_bytes_get_size(info),
                                                out, n),
                                ==, 0);
                g_assert_cmpmem(out, n, g_bytes_get_data(okm, NULL), n);
        }
}

static void test_hkdf_bad_sizes(void)
{
        uint8_t ikm[32] = { 1 }, out[32];
        g_assert_cmpint(nkp_hkdf_sha256(ikm, sizeof ikm, NULL, 0, NULL, 0, out, 0), ==, -EINVAL);
        g_autofree uint8_t *big = g_malloc(255 * 32 + 1);
        g_assert_cmpint(nkp_hkdf_sha256(ikm, sizeof ikm, NULL, 0, NULL, 0, big, 255 * 32 + 1), ==,
                        -EINVAL);
        g_assert_cmpint(nkp_hkdf_sha256(ikm, sizeof ikm, NULL, 0, NULL, 0, big, 255 * 32), ==, 0);
}

/* ---- Wycheproof --------------------------------------------------------------- */

static JsonParser *load_vectors(const char *file)
{
        g_autofree char *path = testutil_vector_path(file);
        if (!path)
                return NULL;
        JsonParser *parser = json_parser_new();
        g_autoptr(GError) error = NULL;
        json_parser_load_from_file(parser, path, &error);
        g_assert_no_error(error);
        return parser;
}

static GBytes *member_hex(JsonObject *o, const char *name)
{
        return testutil_unhex(json_object_get_string_member(o, name));
}

static const void *data_or_null(GBytes *b)
{
        return g_bytes_get_size(b) ? g_bytes_get_data(b, NULL) : NULL;
}

static bool is_valid_result(JsonObject *t)
{
        const char *result = json_object_get_string_member(t, "result");
        /* "acceptable" vectors do not occur in these files; treat them as
         * valid so one appearing later is noticed if we disagree. */
        return strcmp(result, "invalid") != 0;
}

static void test_hkdf_wycheproof(void)
{
        g_autoptr(JsonParser) parser = load_vectors("wycheproof_hkdf_sha256_test.json");
        if (!parser)
                return;
        JsonArray *groups = json_object_get_array_member(json_node_get_object(json_parser_get_root(parser)),
                                                         "testGroups");
        unsigned run = 0, invalid = 0;
        for (guint g = 0; g < json_array_get_length(groups); g++) {
                JsonArray *tests = json_object_get_array_member(json_array_get_object_element(groups, g),
                                                                "tests");
                for (guint i = 0; i < json_array_get_length(tests); i++) {
                        JsonObject *t = json_array_get_object_element(tests, i);
                        g_autoptr(GBytes) ikm = member_hex(t, "ikm");
                        g_autoptr(GBytes) salt = member_hex(t, "salt");
                        g_autoptr(GBytes) info = member_hex(t, "info");
                        g_autoptr(GBytes) okm = member_hex(t, "okm");
                        size_t size = (size_t) json_object_get_int_member(t, "size");
                        g_autofree uint8_t *out = g_malloc0(size + 1);
                        int r = nkp_hkdf_sha256(data_or_null(ikm), g_bytes_get_size(ikm),
                                                data_or_null(salt), g_bytes_get_size(salt),
                                                data_or_null(info), g_bytes_get_size(info), out, size);
                        if (is_valid_result(t)) {
                                if (r != 0)
                                        g_error("HKDF tcId %" G_GINT64_FORMAT ": %s",
                                                json_object_get_int_member(t, "tcId"), nkp_error_message());
                                g_assert_cmpmem(out, size, g_bytes_get_data(okm, NULL), g_bytes_get_size(okm));
                        } else {
                                g_assert_cmpint(r, ==, -EINVAL);
                                invalid++;
                        }
                        run++;
                }
        }
        g_test_message("Wycheproof HKDF-SHA256: %u vectors run (%u invalid)", run, invalid);
        g_assert_cmpuint(run, >, 0);
        g_assert_cmpuint(invalid, >, 0);
}

typedef struct {
        unsigned run, valid, bad_tag, bad_iv, long_iv, other_key_size;
} GcmCounts;

static void run_gcm_vector(JsonObject *t, unsigned key_bits, GcmCounts *counts)
{
        g_autoptr(GBytes) key = member_hex(t, "key");
        g_autoptr(GBytes) iv = member_hex(t, "iv");
        g_autoptr(GBytes) aad = member_hex(t, "aad");
        g_autoptr(GBytes) msg = member_hex(t, "msg");
        g_autoptr(GBytes) ct = member_hex(t, "ct");
        g_autoptr(GBytes) tag = member_hex(t, "tag");
        gint64 id = json_object_get_int_member(t, "tcId");
        size_t len = g_bytes_get_size(ct);
        g_autofree uint8_t *pt = g_malloc(len + 1);
        memset(pt, 0xa5, len + 1);

        int r = nkp_aes256gcm_open(g_bytes_get_data(key, NULL), g_bytes_get_size(key),
                                   data_or_null(iv), g_bytes_get_size(iv), data_or_null(aad),
                                   g_bytes_get_size(aad), data_or_null(ct), len,
                                   g_bytes_get_data(tag, NULL), g_bytes_get_size(tag), len ? pt : NULL);
        counts->run++;

        if (key_bits != 256) {
                /* AES-128/192 keys are not ours to open: refused up front. */
                g_assert_cmpint(r, ==, -EINVAL);
                counts->other_key_size++;
                return;
        }
        if (g_bytes_get_size(iv) > 128) {
                /* Beyond what OpenSSL 3 accepts (nkp uses 12 bytes): refused
                 * up front, whatever the vector's verdict. */
                g_assert_cmpint(r, ==, -EINVAL);
                counts->long_iv++;
                return;
        }
        if (is_valid_result(t)) {
                if (r != 0)
                        g_error("AES-GCM tcId %" G_GINT64_FORMAT ": %s", id, nkp_error_message());
                g_assert_cmpmem(pt, len, g_bytes_get_data(msg, NULL), g_bytes_get_size(msg));
                counts->valid++;

                /* seal must give back the same ciphertext and tag */
                if (g_bytes_get_size(tag) == NKP_GCM_TAG_SIZE) {
                        g_autofree uint8_t *ct2 = g_malloc(len + 1);
                        uint8_t tag2[NKP_GCM_TAG_SIZE];
                        g_assert_cmpint(nkp_aes256gcm_seal(g_bytes_get_data(key, NULL), data_or_null(iv),
                                                           g_bytes_get_size(iv), data_or_null(aad),
                                                           g_bytes_get_size(aad), data_or_null(msg), len,
                                                           len ? ct2 : NULL, tag2),
                                        ==, 0);
                        g_assert_cmpmem(ct2, len, g_bytes_get_data(ct, NULL), len);
                        g_assert_cmpmem(tag2, sizeof tag2, g_bytes_get_data(tag, NULL), sizeof tag2);
                }
                return;
        }
        if (g_bytes_get_size(iv) == 0) {
                /* GCM is undefined with an empty IV. */
                g_assert_cmpint(r, ==, -EINVAL);
                counts->bad_iv++;
        } else {
                if (r != -EBADMSG)
                        g_error("AES-GCM tcId %" G_GINT64_FORMAT ": expected -EBADMSG, got %d", id, r);
                counts->bad_tag++;
        }
        /* no plaintext may leak out of a failed open */
        for (size_t i = 0; i < len; i++)
                g_assert_true(pt[i] == 0 || r == -EINVAL);
}

static void test_gcm_wycheproof(void)
{
        g_autoptr(JsonParser) parser = load_vectors("wycheproof_aes_gcm_test.json");
        if (!parser)
                return;
        JsonArray *groups = json_object_get_array_member(json_node_get_object(json_parser_get_root(parser)),
                                                         "testGroups");
        GcmCounts counts = { 0 };
        for (guint g = 0; g < json_array_get_length(groups); g++) {
                JsonObject *group = json_array_get_object_element(groups, g);
                unsigned key_bits = (unsigned) json_object_get_int_member(group, "keySize");
                JsonArray *tests = json_object_get_array_member(group, "tests");
                for (guint i = 0; i < json_array_get_length(tests); i++)
                        run_gcm_vector(json_array_get_object_element(tests, i), key_bits, &counts);
        }
        g_test_message("Wycheproof AES-GCM: %u vectors run: %u valid AES-256, %u bad tag/ct (-EBADMSG), "
                       "%u empty IV (-EINVAL), %u IV > 128 bytes (-EINVAL), %u AES-128/192 (-EINVAL)",
                       counts.run, counts.valid, counts.bad_tag, counts.bad_iv, counts.long_iv,
                       counts.other_key_size);
        g_assert_cmpuint(counts.valid, >, 0);
        g_assert_cmpuint(counts.bad_tag, >, 0);
}

/* ---- AES-GCM properties --------------------------------------------------------- */

static void test_gcm_round_trip_and_tamper(void)
{
        uint8_t key[32], iv[NKP_GCM_IV_SIZE], pt[32], ct[32], out[32], tag[NKP_GCM_TAG_SIZE];
        static const uint8_t aad[] = "bound context";
        g_assert_cmpint(nkp_random_bytes(key, sizeof key), ==, 0);
        g_assert_cmpint(nkp_random_bytes(iv, sizeof iv), ==, 0);
        g_assert_cmpint(nkp_random_bytes(pt, sizeof pt), ==, 0);
        g_assert_cmpint(nkp_aes256gcm_seal(key, iv, sizeof iv, aad, sizeof aad, pt, sizeof pt, ct, tag), ==, 0);
        g_assert_cmpint(nkp_aes256gcm_open(key, sizeof key, iv, sizeof iv, aad, sizeof aad, ct, sizeof ct,
                                           tag, sizeof tag, out),
                        ==, 0);
        g_assert_cmpmem(out, sizeof out, pt, sizeof pt);

        /* every single-bit change of ct or tag is caught */
        for (size_t bit = 0; bit < 8 * (sizeof ct + sizeof tag); bit++) {
                uint8_t *p = bit < 8 * sizeof ct ? &ct[bit / 8] : &tag[bit / 8 - sizeof ct];
                *p ^= (uint8_t) (1u << (bit % 8));
                g_assert_cmpint(nkp_aes256gcm_open(key, sizeof key, iv, sizeof iv, aad, sizeof aad, ct,
                                                   sizeof ct, tag, sizeof tag, out),
                                ==, -EBADMSG);
                *p ^= (uint8_t) (1u << (bit % 8));
                for (size_t i = 0; i < sizeof out; i++)
                        g_assert_cmpuint(out[i], ==, 0);
        }
        g_assert_nonnull(strstr(nkp_error_message(), "does not authenticate"));

        /* a short tag is refused, not verified on fewer bits */
        g_assert_cmpint(nkp_aes256gcm_open(key, sizeof key, iv, sizeof iv, aad, sizeof aad, ct, sizeof ct,
                                           tag, 12, out),
                        ==, -EINVAL);
        nkp_wipe(key, sizeof key);
}

/* ---- KEK and fingerprint ----------------------------------------------------------- */

#define KEY_ID "6f1c2a4e-8d3b-4c7a-9e21-0b5f3d7c9a18"
#define VM_UUID "c2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f5"

static nkp_secret *kek_of(const nkp_secret *kdk, const uint8_t *salt, const char *key_id,
                          const char *vm_uuid)
{
        nkp_secret *kek = NULL;
        g_assert_cmpint(nkp_kek_derive(kdk, salt, key_id, vm_uuid, &kek), ==, 0);
        g_assert_cmpuint(nkp_secret_len(kek), ==, NKP_KEK_SIZE);
        return kek;
}

static void test_kek_known_answer(void)
{
        /* Computed independently (Python hmac/hashlib) from the layout in
         * nkp.h: KDK = 00 01 .. 1f, salt = 32 x 0xaa,
         * info = "nkp kek v1" 0x00 key_id[16] vm_uuid[16]. */
        uint8_t kdk_bytes[NKP_KDK_SIZE], salt[NKP_KEK_SALT_SIZE];
        for (size_t i = 0; i < sizeof kdk_bytes; i++)
                kdk_bytes[i] = (uint8_t) i;
        memset(salt, 0xaa, sizeof salt);
        g_autoptr(nkp_secret) kdk = NULL;
        g_assert_cmpint(nkp_secret_new_copy(kdk_bytes, sizeof kdk_bytes, &kdk), ==, 0);
        g_autoptr(GBytes) expect =
                testutil_unhex("507dc82cb10352473e2801851be768b35ecb6563b7c3ec3297861b640dc736d4");

        g_autoptr(nkp_secret) kek = kek_of(kdk, salt, KEY_ID, VM_UUID);
        g_assert_cmpmem(nkp_secret_data(kek), NKP_KEK_SIZE, g_bytes_get_data(expect, NULL), 32);

        /* upper-case UUIDs name the same bytes */
        g_autofree char *upper_vm = g_ascii_strup(VM_UUID, -1);
        g_autoptr(nkp_secret) kek_upper = kek_of(kdk, salt, KEY_ID, upper_vm);
        g_assert_true(nkp_secret_equal(kek, kek_upper));
}

static void test_kek_each_input_matters(void)
{
        g_autoptr(nkp_secret) kdk = NULL, kdk2 = NULL;
        uint8_t salt[NKP_KEK_SALT_SIZE], salt2[NKP_KEK_SALT_SIZE];
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk2), ==, 0);
        g_assert_cmpint(nkp_random_bytes(salt, sizeof salt), ==, 0);
        memcpy(salt2, salt, sizeof salt);
        salt2[31] ^= 1;

        g_autoptr(nkp_secret) base = kek_of(kdk, salt, KEY_ID, VM_UUID);
        g_autoptr(nkp_secret) again = kek_of(kdk, salt, KEY_ID, VM_UUID);
        g_assert_true(nkp_secret_equal(base, again));

        g_autoptr(nkp_secret) other_kdk = kek_of(kdk2, salt, KEY_ID, VM_UUID);
        g_autoptr(nkp_secret) other_salt = kek_of(kdk, salt2, KEY_ID, VM_UUID);
        g_autoptr(nkp_secret) other_key = kek_of(kdk, salt, "6f1c2a4e-8d3b-4c7a-9e21-0b5f3d7c9a19", VM_UUID);
        g_autoptr(nkp_secret) other_vm = kek_of(kdk, salt, KEY_ID, "c2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f6");
        /* swapping key id and VM UUID must not collide either */
        g_autoptr(nkp_secret) swapped = kek_of(kdk, salt, VM_UUID, KEY_ID);
        g_assert_false(nkp_secret_equal(base, other_kdk));
        g_assert_false(nkp_secret_equal(base, other_salt));
        g_assert_false(nkp_secret_equal(base, other_key));
        g_assert_false(nkp_secret_equal(base, other_vm));
        g_assert_false(nkp_secret_equal(base, swapped));
        g_assert_false(nkp_secret_equal(base, kdk));
}

static void test_kek_bad_input(void)
{
        g_autoptr(nkp_secret) kdk = NULL, short_kdk = NULL;
        uint8_t salt[NKP_KEK_SALT_SIZE] = { 0 };
        nkp_secret *kek = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        static const char *bad[] = {
                "", "not-a-uuid", "c2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f",
                "c2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f55", "c2d8e3f4x1a2b-4c3d-8e9f-a0b1c2d3e4f5",
                "g2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f5", NULL,
        };
        for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
                g_assert_cmpint(nkp_kek_derive(kdk, salt, KEY_ID, bad[i], &kek), ==, -EINVAL);
                g_assert_nonnull(strstr(nkp_error_message(), "VM UUID"));
                g_assert_cmpint(nkp_kek_derive(kdk, salt, bad[i], VM_UUID, &kek), ==, -EINVAL);
                g_assert_nonnull(strstr(nkp_error_message(), "key id"));
        }
        g_assert_cmpint(nkp_secret_new_random(16, &short_kdk), ==, 0);
        g_assert_cmpint(nkp_kek_derive(short_kdk, salt, KEY_ID, VM_UUID, &kek), ==, -EINVAL);
        g_assert_null(kek);
}

static void test_fingerprint(void)
{
        g_autoptr(nkp_secret) kdk = NULL, kdk2 = NULL;
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk), ==, 0);
        g_assert_cmpint(nkp_secret_new_random(NKP_KDK_SIZE, &kdk2), ==, 0);
        char *fp = NULL, *again = NULL, *other = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk, &fp), ==, 0);
        g_assert_cmpint(nkp_kdk_fingerprint(kdk, &again), ==, 0);
        g_assert_cmpint(nkp_kdk_fingerprint(kdk2, &other), ==, 0);
        g_assert_cmpuint(strlen(fp), ==, 64);
        for (const char *c = fp; *c; c++)
                g_assert_nonnull(strchr("0123456789abcdef", *c));
        g_assert_cmpstr(fp, ==, again);
        g_assert_cmpstr(fp, !=, other);

        /* the fingerprint is not the key (nor its hex) */
        char key_hex[65];
        nkp_hex_encode(nkp_secret_data(kdk), 32, key_hex);
        g_assert_cmpstr(fp, !=, key_hex);
        nkp_wipe(key_hex, sizeof key_hex);

        /* Known answer, computed independently (Python hmac/hashlib):
         * HKDF-SHA256(ikm = 32 x 0x00, no salt, info = "nkp fingerprint v1"). */
        g_autoptr(nkp_secret) zero = NULL;
        g_autofree char *zero_fp = NULL;
        g_assert_cmpint(nkp_secret_new(NKP_KDK_SIZE, &zero), ==, 0);
        g_assert_cmpint(nkp_kdk_fingerprint(zero, &zero_fp), ==, 0);
        g_assert_cmpstr(zero_fp, ==, "39884430b1a8f8dcf5e8f9fa21dc0b76c58a08e1f410061614d8a4a17ed01dfb");

        free(fp);
        free(again);
        free(other);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
        g_test_add_func("/crypto/hkdf/rfc5869", test_hkdf_rfc5869);
        g_test_add_func("/crypto/hkdf/bad-sizes", test_hkdf_bad_sizes);
        g_test_add_func("/crypto/hkdf/wycheproof", test_hkdf_wycheproof);
        g_test_add_func("/crypto/gcm/wycheproof", test_gcm_wycheproof);
        g_test_add_func("/crypto/gcm/round-trip-tamper", test_gcm_round_trip_and_tamper);
        g_test_add_func("/crypto/kek/known-answer", test_kek_known_answer);
        g_test_add_func("/crypto/kek/each-input-matters", test_kek_each_input_matters);
        g_test_add_func("/crypto/kek/bad-input", test_kek_bad_input);
        g_test_add_func("/crypto/fingerprint", test_fingerprint);
        return g_test_run();
}
