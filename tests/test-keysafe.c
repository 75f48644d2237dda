/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The keysafe: XML round trip, wrap/unwrap, tampering, hostile XML, rewrap. */
#include <errno.h>
#include <string.h>

#include "testutil.h"

#define VM_UUID "c2d8e3f4-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
#define OTHER_UUID "0e4b9f3a-5c6d-4e7f-8a9b-0c1d2e3f4a5b"
#define KEY_ID "6f1c2a4e-8d3b-4c7a-9e21-0b5f3d7c9a18"
#define KEY_ID2 "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
#define SECRET_TPM "11111111-2222-4333-8444-555555555555"
#define SECRET_VDA "66666666-7777-4888-9999-aaaaaaaaaaaa"
#define SECRET_VDB "bbbbbbbb-cccc-4ddd-8eee-ffffffffffff"
#define NS NKP_KEYSAFE_NS

/* One provider (KDK + fields) and a keysafe protected by it. */
typedef struct {
        nkp_secret *kdk;
        char *fingerprint;
        nkp_keysafe *ks;
        nkp_secret *kek;
        nkp_secret *dek_tpm, *dek_vda, *dek_vdb;
} Fixture;

static nkp_secret *derive_kek(const nkp_keysafe *ks, const nkp_secret *kdk)
{
        nkp_secret *kek = NULL;
        g_assert_cmpint(nkp_kek_derive(kdk, nkp_keysafe_kek_salt(ks), nkp_keysafe_provider_key_id(ks),
                                       nkp_keysafe_vm_uuid(ks), &kek),
                        ==, 0);
        return kek;
}

static nkp_secret *random_key(void)
{
        nkp_secret *s = NULL;
        g_assert_cmpint(nkp_secret_new_random(32, &s), ==, 0);
        return s;
}

static void fixture_setup(Fixture *f, gconstpointer data)
{
        (void) data;
        f->kdk = random_key();
        g_assert_cmpint(nkp_kdk_fingerprint(f->kdk, &f->fingerprint), ==, 0);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", KEY_ID, f->fingerprint, &f->ks), ==, 0);
        f->kek = derive_kek(f->ks, f->kdk);
        f->dek_tpm = random_key();
        f->dek_vda = random_key();
        f->dek_vdb = random_key();
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, NKP_OBJECT_VTPM, "tpm0", SECRET_TPM, f->dek_tpm), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, NKP_OBJECT_DISK, "vda", SECRET_VDA, f->dek_vda), ==, 0);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, NKP_OBJECT_DISK, "vdb", SECRET_VDB, f->dek_vdb), ==, 0);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_secret_free(f->kdk);
        free(f->fingerprint);
        nkp_keysafe_free(f->ks);
        nkp_secret_free(f->kek);
        nkp_secret_free(f->dek_tpm);
        nkp_secret_free(f->dek_vda);
        nkp_secret_free(f->dek_vdb);
}

static char *format(const nkp_keysafe *ks)
{
        char *xml = NULL;
        g_assert_cmpint(nkp_keysafe_format(ks, &xml), ==, 0);
        return xml;
}

static nkp_keysafe *parse_ok(const char *xml)
{
        nkp_keysafe *ks = NULL;
        int r = nkp_keysafe_parse(xml, strlen(xml), &ks);
        if (r < 0)
                g_error("parse failed (%d): %s\n%s", r, nkp_error_message(), xml);
        return ks;
}

static int parse_err(const char *xml, size_t len)
{
        nkp_keysafe *ks = NULL;
        int r = nkp_keysafe_parse(xml, len, &ks);
        g_assert_cmpint(r, <, 0);
        g_assert_null(ks);
        g_assert_cmpstr(nkp_error_message(), !=, "");
        return r;
}

static void assert_dek(const nkp_keysafe *ks, const nkp_secret *kek, const char *kind, const char *id,
                       const nkp_secret *expect)
{
        g_autoptr(nkp_secret) dek = NULL;
        int r = nkp_keysafe_get_dek(ks, kek, kind, id, &dek);
        if (r < 0)
                g_error("get %s %s: %s", kind, id, nkp_error_message());
        g_assert_true(nkp_secret_equal(dek, expect));
}

static int get_err(const nkp_keysafe *ks, const nkp_secret *kek, const char *kind, const char *id)
{
        nkp_secret *dek = NULL;
        int r = nkp_keysafe_get_dek(ks, kek, kind, id, &dek);
        g_assert_cmpint(r, <, 0);
        g_assert_null(dek);
        return r;
}

/* `s` with its one occurrence of `from` replaced by `to`. */
static char *replace_once(const char *s, const char *from, const char *to)
{
        const char *at = strstr(s, from);
        g_assert_nonnull(at);
        g_assert_null(strstr(at + 1, from));
        return g_strdup_printf("%.*s%s%s", (int) (at - s), s, to, at + strlen(from));
}

/* ---- Round trip --------------------------------------------------------------- */

static void test_round_trip(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        g_autoptr(nkp_keysafe) back = parse_ok(xml);

        g_assert_cmpstr(nkp_keysafe_vm_uuid(back), ==, VM_UUID);
        g_assert_cmpstr(nkp_keysafe_provider_name(back), ==, "prod");
        g_assert_cmpstr(nkp_keysafe_provider_key_id(back), ==, KEY_ID);
        g_assert_cmpstr(nkp_keysafe_provider_fingerprint(back), ==, f->fingerprint);
        g_assert_cmpmem(nkp_keysafe_kek_salt(back), NKP_KEK_SALT_SIZE, nkp_keysafe_kek_salt(f->ks),
                        NKP_KEK_SALT_SIZE);
        g_assert_cmpuint(nkp_keysafe_n_entries(back), ==, 3);
        static const char *kinds[] = { "vtpm", "disk", "disk" };
        static const char *ids[] = { "tpm0", "vda", "vdb" };
        static const char *secrets[] = { SECRET_TPM, SECRET_VDA, SECRET_VDB };
        for (size_t i = 0; i < 3; i++) {
                g_assert_cmpstr(nkp_keysafe_entry_kind(back, i), ==, kinds[i]);
                g_assert_cmpstr(nkp_keysafe_entry_id(back, i), ==, ids[i]);
                g_assert_cmpstr(nkp_keysafe_entry_secret_uuid(back, i), ==, secrets[i]);
        }
        g_assert_null(nkp_keysafe_entry_id(back, 3));

        /* a KEK derived again from the parsed fields opens every DEK */
        g_autoptr(nkp_secret) kek = derive_kek(back, f->kdk);
        assert_dek(back, kek, "vtpm", "tpm0", f->dek_tpm);
        assert_dek(back, kek, "disk", "vda", f->dek_vda);
        assert_dek(back, kek, "disk", "vdb", f->dek_vdb);

        /* format(parse(format(x))) == format(x) */
        g_autofree char *again = format(back);
        g_assert_cmpstr(again, ==, xml);
        g_assert_nonnull(strstr(xml, "xmlns=\"" NS "\""));
        g_assert_nonnull(strstr(xml, "version=\"1\""));
}

/* libvirt's forms: the domain XML uses a prefix; virDomainGetMetadata()
 * strips the namespace. */
static void test_namespace_forms(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        g_autofree char *canonical = g_strdup(xml);

        g_autoptr(GString) prefixed = g_string_new(xml);
        g_string_replace(prefixed, "<keysafe xmlns=", "<nkp:keysafe xmlns:nkp=", 1);
        g_string_replace(prefixed, "</keysafe>", "</nkp:keysafe>", 1);
        g_string_replace(prefixed, "<vm ", "<nkp:vm ", 1);
        g_string_replace(prefixed, "<provider ", "<nkp:provider ", 1);
        g_string_replace(prefixed, "<kek ", "<nkp:kek ", 1);
        g_string_replace(prefixed, "<dek ", "<nkp:dek ", 0);
        g_autoptr(nkp_keysafe) a = parse_ok(prefixed->str);
        g_autofree char *a_xml = format(a);
        g_assert_cmpstr(a_xml, ==, canonical);

        g_autofree char *bare = replace_once(xml, " xmlns=\"" NS "\"", "");
        g_autoptr(nkp_keysafe) b = parse_ok(bare);
        g_autofree char *b_xml = format(b);
        g_assert_cmpstr(b_xml, ==, canonical);

        /* exactly as libvirt 9.0 hands it back (checked with virsh -c
         * test:///default): virDomainGetMetadata() drops the namespace from
         * the elements but leaves the prefix declaration; the domain XML
         * keeps ours and adds its own. */
        g_autofree char *got = replace_once(xml, " xmlns=\"" NS "\"", " xmlns:nkp=\"" NS "\"");
        g_autoptr(nkp_keysafe) e = parse_ok(got);
        g_autofree char *e_xml = format(e);
        g_assert_cmpstr(e_xml, ==, canonical);
        g_autofree char *dumped = replace_once(xml, " xmlns=\"" NS "\"",
                                               " xmlns=\"" NS "\" xmlns:nkp=\"" NS "\"");
        g_autoptr(nkp_keysafe) g = parse_ok(dumped);
        g_autofree char *g_xml = format(g);
        g_assert_cmpstr(g_xml, ==, canonical);

        /* comments and an XML declaration are fine */
        g_autofree char *decl = g_strconcat("<?xml version=\"1.0\"?>\n<!-- nkp -->\n", xml, NULL);
        g_autoptr(nkp_keysafe) c = parse_ok(decl);
        g_assert_cmpuint(nkp_keysafe_n_entries(c), ==, 3);

        /* another namespace or root is not a keysafe */
        g_autofree char *other_ns = replace_once(xml, NS, "https://example.org/keysafe");
        g_assert_cmpint(parse_err(other_ns, strlen(other_ns)), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "not an nkp keysafe"));
        g_autofree char *other_root = g_strdup(xml);
        memcpy(strstr(other_root, "<keysafe"), "<keyring", 8);
        memcpy(strstr(other_root, "</keysafe"), "</keyring", 9);
        g_assert_cmpint(parse_err(other_root, strlen(other_root)), ==, -EBADMSG);
        g_autofree char *foreign_child = replace_once(xml, "<vm ", "<x:vm xmlns:x=\"urn:x\" ");
        g_assert_cmpint(parse_err(foreign_child, strlen(foreign_child)), ==, -EBADMSG);
        g_autofree char *upper = g_ascii_strup(VM_UUID, -1);
        g_autofree char *upper_xml = replace_once(xml, VM_UUID, upper);
        g_autoptr(nkp_keysafe) d = parse_ok(upper_xml);
        g_assert_cmpstr(nkp_keysafe_vm_uuid(d), ==, VM_UUID);
}

/* ---- Tampering ------------------------------------------------------------------- */

static char *wrapped_attr(const char *xml, const char *id)
{
        g_autofree char *needle = g_strdup_printf("id=\"%s\"", id);
        const char *at = strstr(strstr(xml, needle), "wrapped=\"");
        g_assert_nonnull(at);
        at += strlen("wrapped=\"");
        return g_strndup(at, strcspn(at, "\""));
}

static void test_flip_every_bit(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        g_autofree char *b64 = wrapped_attr(xml, "vda");
        gsize n = 0;
        g_autofree guchar *raw = g_base64_decode(b64, &n);
        g_assert_cmpuint(n, ==, 60);

        unsigned flipped = 0;
        for (size_t bit = 0; bit < 8 * n; bit++) {
                raw[bit / 8] ^= (guchar) (1u << (bit % 8));
                g_autofree char *b64_bad = g_base64_encode(raw, n);
                raw[bit / 8] ^= (guchar) (1u << (bit % 8));
                g_autofree char *bad = replace_once(xml, b64, b64_bad);
                g_autoptr(nkp_keysafe) ks = parse_ok(bad);
                g_assert_cmpint(get_err(ks, f->kek, "disk", "vda"), ==, -EBADMSG);
                /* the other objects are untouched */
                assert_dek(ks, f->kek, "disk", "vdb", f->dek_vdb);
                flipped++;
        }
        g_assert_cmpuint(flipped, ==, 480);
}

static void put_lp(GByteArray *aad, const void *data, size_t len)
{
        const guint8 be[4] = { (guint8) (len >> 24), (guint8) (len >> 16), (guint8) (len >> 8), (guint8) len };
        g_byte_array_append(aad, be, 4);
        g_byte_array_append(aad, data, (guint) len);
}

static void put_lp_uuid(GByteArray *aad, const char *uuid)
{
        uint8_t raw[16];
        g_assert_cmpint(nkp_uuid_parse(uuid, raw), ==, 0);
        put_lp(aad, raw, sizeof raw);
}

/* The layout documented at the top of keysafe.c, rebuilt by hand: the
 * wrapped DEK opens with plain AES-256-GCM under exactly that AAD. */
static void test_documented_layout(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        g_autofree char *b64 = wrapped_attr(xml, "tpm0");
        gsize n = 0;
        g_autofree guchar *wrapped = g_base64_decode(b64, &n);
        g_assert_cmpuint(n, ==, 12 + 32 + 16);

        g_autoptr(GByteArray) aad = g_byte_array_new();
        static const guint8 version[4] = { 0, 0, 0, 1 };
        put_lp(aad, "nkp keysafe dek", 15);
        put_lp(aad, version, 4);
        put_lp_uuid(aad, VM_UUID);
        put_lp(aad, "vtpm", 4);
        put_lp(aad, "tpm0", 4);
        put_lp_uuid(aad, SECRET_TPM);
        put_lp_uuid(aad, KEY_ID);

        uint8_t dek[32];
        g_assert_cmpint(nkp_aes256gcm_open(nkp_secret_data(f->kek), 32, wrapped, 12, aad->data, aad->len,
                                           wrapped + 12, 32, wrapped + 44, 16, dek),
                        ==, 0);
        g_assert_cmpmem(dek, sizeof dek, nkp_secret_data(f->dek_tpm), 32);
        nkp_wipe(dek, sizeof dek);
}

static void test_bound_fields(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        struct {
                const char *from, *to, *kind, *id;
        } cases[] = {
                { "uuid=\"" VM_UUID "\"", "uuid=\"" OTHER_UUID "\"", "vtpm", "tpm0" },
                { "kind=\"vtpm\" id=\"tpm0\"", "kind=\"disk\" id=\"tpm0\"", "disk", "tpm0" },
                { "id=\"tpm0\"", "id=\"tpm1\"", "vtpm", "tpm1" },
                { "secret=\"" SECRET_TPM "\"", "secret=\"" OTHER_UUID "\"", "vtpm", "tpm0" },
                { "key-id=\"" KEY_ID "\"", "key-id=\"" KEY_ID2 "\"", "vtpm", "tpm0" },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_autofree char *bad = replace_once(xml, cases[i].from, cases[i].to);
                g_autoptr(nkp_keysafe) ks = parse_ok(bad);
                /* same KEK on purpose: the AAD alone must catch the change */
                g_assert_cmpint(get_err(ks, f->kek, cases[i].kind, cases[i].id), ==, -EBADMSG);
                g_assert_nonnull(strstr(nkp_error_message(), "does not open"));
        }

        /* swapping two entries' wrapped keys is caught too */
        g_autofree char *w_vda = wrapped_attr(xml, "vda");
        g_autofree char *w_vdb = wrapped_attr(xml, "vdb");
        g_autofree char *swap1 = replace_once(xml, w_vda, "PLACEHOLDER");
        g_autofree char *swap2 = replace_once(swap1, w_vdb, w_vda);
        g_autofree char *swap3 = replace_once(swap2, "PLACEHOLDER", w_vdb);
        g_autoptr(nkp_keysafe) swapped = parse_ok(swap3);
        g_assert_cmpint(get_err(swapped, f->kek, "disk", "vda"), ==, -EBADMSG);
        g_assert_cmpint(get_err(swapped, f->kek, "disk", "vdb"), ==, -EBADMSG);

        /* the version is bound too, and a change is refused up front */
        g_autofree char *v2 = replace_once(xml, "version=\"1\"", "version=\"2\"");
        g_assert_cmpint(parse_err(v2, strlen(v2)), ==, -EPROTONOSUPPORT);
}

static void test_wrong_kek(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_secret) other_kdk = random_key();
        g_autoptr(nkp_secret) wrong = derive_kek(f->ks, other_kdk);
        g_assert_cmpint(get_err(f->ks, wrong, "vtpm", "tpm0"), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "vtpm 'tpm0'"));
        g_assert_cmpint(get_err(f->ks, f->kdk /* not a KEK */, "disk", "vda"), ==, -EBADMSG);
        g_autoptr(nkp_secret) short_key = NULL;
        g_assert_cmpint(nkp_secret_new_random(16, &short_key), ==, 0);
        g_assert_cmpint(get_err(f->ks, short_key, "disk", "vda"), ==, -EINVAL);
}

static void test_versions(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        static const char *unsupported[] = { "2", "99", "123456789" };
        for (size_t i = 0; i < G_N_ELEMENTS(unsupported); i++) {
                g_autofree char *v = g_strdup_printf("version=\"%s\"", unsupported[i]);
                g_autofree char *bad = replace_once(xml, "version=\"1\"", v);
                g_assert_cmpint(parse_err(bad, strlen(bad)), ==, -EPROTONOSUPPORT);
                g_assert_nonnull(strstr(nkp_error_message(), "version"));
        }
        static const char *malformed[] = { "", "0", "01", "1.0", "one", "-1", " 1", "1234567890" };
        for (size_t i = 0; i < G_N_ELEMENTS(malformed); i++) {
                g_autofree char *v = g_strdup_printf("version=\"%s\"", malformed[i]);
                g_autofree char *bad = replace_once(xml, "version=\"1\"", v);
                g_assert_cmpint(parse_err(bad, strlen(bad)), ==, -EBADMSG);
        }
        g_autofree char *none = replace_once(xml, " version=\"1\"", "");
        g_assert_cmpint(parse_err(none, strlen(none)), ==, -EBADMSG);
}

/* ---- Malformed and hostile XML ------------------------------------------------------ */

static void test_malformed_fields(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        g_autofree char *salt = g_base64_encode(nkp_keysafe_kek_salt(f->ks), NKP_KEK_SALT_SIZE);
        g_autofree char *wrapped = wrapped_attr(xml, "tpm0");
        g_autofree char *salt_attr = g_strdup_printf("salt=\"%s\"", salt);
        g_autofree char *wrapped_a = g_strdup_printf("wrapped=\"%s\"", wrapped);
        g_autofree char *short_wrapped = g_strdup_printf("wrapped=\"%.76s\"", wrapped);
        g_autofree char *spaced_wrapped = g_strdup_printf("wrapped=\" %.79s\"", wrapped);
        g_autofree char *spaced_salt = g_strdup_printf("salt=\"%.20s %.23s\"", salt, salt + 20);
        struct {
                const char *from, *to;
        } cases[] = {
                { "uuid=\"" VM_UUID "\"", "uuid=\"not-a-uuid\"" },
                { "uuid=\"" VM_UUID "\"", "uuid=\"\"" },
                { "uuid=\"" VM_UUID "\"", "" },
                { "uuid=\"" VM_UUID "\"", "uuid=\"" VM_UUID "\" extra=\"1\"" },
                { "name=\"prod\"", "name=\"pr od\"" },
                { "name=\"prod\"", "name=\"\"" },
                { "name=\"prod\"", "name=\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"" },
                { "name=\"prod\"", "name=\"prod&amp;\"" },
                { "key-id=\"" KEY_ID "\"", "key-id=\"" KEY_ID "0\"" },
                { "fingerprint=\"", "fingerprint=\"0" },
                { "fingerprint=\"", "fingerprint=\"g" },
                { salt_attr, "salt=\"AAAA\"" },
                { salt_attr, spaced_salt },
                { salt_attr, "salt=\"!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=\"" },
                { "kind=\"vtpm\"", "kind=\"tpm\"" },
                { "kind=\"vtpm\"", "kind=\"VTPM\"" },
                { "id=\"tpm0\"", "id=\"../tpm0\"" },
                { "id=\"tpm0\"", "id=\"-tpm0\"" },
                { "id=\"tpm0\"", "id=\"\"" },
                { "id=\"tpm0\"", "id=\"tpm0 \"" },
                { "secret=\"" SECRET_TPM "\"", "secret=\"" SECRET_TPM "x\"" },
                { "secret=\"" SECRET_TPM "\"", "secret=\"" SECRET_VDA "\"" }, /* duplicate secret */
                { "id=\"tpm0\"", "id=\"vda\" " }, /* kind differs: allowed? see below */
                { wrapped_a, short_wrapped },
                { wrapped_a, spaced_wrapped },
                { wrapped_a, "wrapped=\"\"" },
                { "<kek ", "<kek2 " },
                { "<vm uuid=\"" VM_UUID "\"/>", "" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\"/><vm uuid=\"" VM_UUID "\"/>" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\">text</vm>" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\"><x/></vm>" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\"/>stray text" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\"/><![CDATA[x]]>" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\"/><?pi x?>" },
                { "<vm uuid=\"" VM_UUID "\"/>", "<vm uuid=\"" VM_UUID "\" x:a=\"1\" xmlns:x=\"urn:x\"/>" },
                { "</keysafe>", "<extra/></keysafe>" },
        };
        for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
                g_autofree char *bad = replace_once(xml, cases[i].from, cases[i].to);
                if (strstr(cases[i].to, "id=\"vda\" ")) {
                        /* (vtpm, vda) next to (disk, vda) is a distinct object: accepted */
                        g_autoptr(nkp_keysafe) ok = parse_ok(bad);
                        g_assert_cmpstr(nkp_keysafe_entry_id(ok, 0), ==, "vda");
                        continue;
                }
                nkp_keysafe *ks = NULL;
                int r = nkp_keysafe_parse(bad, strlen(bad), &ks);
                if (r != -EBADMSG)
                        g_error("case %zu: expected -EBADMSG, got %d\n%s", i, r, bad);
                g_assert_null(ks);
                g_assert_true(g_str_has_prefix(nkp_error_message(), "The keysafe is malformed"));
                g_test_message("case %zu: %s", i, nkp_error_message());
        }

        /* a duplicate (kind, id) is refused */
        g_autofree char *dup = replace_once(xml, "id=\"vdb\"", "id=\"vda\"");
        g_assert_cmpint(parse_err(dup, strlen(dup)), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "appears twice"));
}

static void test_truncated_and_garbage(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        size_t complete = (size_t) (strstr(xml, "</keysafe>") - xml) + strlen("</keysafe>");
        for (size_t len = 0; len < complete; len++)
                g_assert_cmpint(parse_err(xml, len), ==, -EBADMSG);

        GRand *rand = g_rand_new_with_seed(5869);
        for (unsigned i = 0; i < 2000; i++) {
                size_t len = 1 + (size_t) g_rand_int_range(rand, 0, 512);
                g_autofree char *junk = g_malloc(len);
                for (size_t k = 0; k < len; k++)
                        junk[k] = (char) g_rand_int_range(rand, 0, 256);
                if (i % 2)
                        junk[0] = '<';
                g_assert_cmpint(parse_err(junk, len), ==, -EBADMSG);
        }
        /* mutate single bytes of a valid keysafe: never a crash; an error is
         * always -EBADMSG or -EPROTONOSUPPORT */
        size_t n = strlen(xml);
        for (unsigned i = 0; i < 3000; i++) {
                g_autofree char *m = g_strdup(xml);
                m[g_rand_int_range(rand, 0, (gint32) n)] = (char) g_rand_int_range(rand, 1, 256);
                nkp_keysafe *ks = NULL;
                int r = nkp_keysafe_parse(m, n, &ks);
                g_assert_true(r == 0 || r == -EBADMSG || r == -EPROTONOSUPPORT);
                nkp_keysafe_free(ks);
        }
        g_rand_free(rand);

        g_assert_cmpint(parse_err("", 0), ==, -EBADMSG);
        g_assert_cmpint(parse_err(NULL, 0), ==, -EBADMSG);
        g_autofree char *with_nul = g_strdup(xml);
        with_nul[10] = '\0';
        g_assert_cmpint(parse_err(with_nul, n), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "NUL"));
        /* UTF-16 is refused (it carries NULs) */
        static const char utf16[] = "<\0k\0e\0y\0s\0a\0f\0e\0/\0>\0";
        g_assert_cmpint(parse_err(utf16, sizeof utf16 - 1), ==, -EBADMSG);
}

static void test_oversized(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autofree char *xml = format(f->ks);
        /* valid XML padded with a comment past 64 KiB */
        g_autoptr(GString) big = g_string_new(xml);
        g_string_append(big, "<!--");
        while (big->len < 64 * 1024)
                g_string_append_c(big, 'x');
        g_string_append(big, "-->");
        g_assert_cmpint(parse_err(big->str, big->len), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "64 KiB"));

        /* just under the cap is fine */
        g_autoptr(GString) fits = g_string_new(xml);
        g_string_append(fits, "<!--");
        while (fits->len < 64 * 1024 - 3)
                g_string_append_c(fits, 'x');
        g_string_append(fits, "-->");
        g_assert_cmpuint(fits->len, ==, 64 * 1024);
        g_autoptr(nkp_keysafe) ok = parse_ok(fits->str);
        g_assert_cmpuint(nkp_keysafe_n_entries(ok), ==, 3);

        /* 65 entries: refused before they are read */
        g_autofree char *wrapped = wrapped_attr(xml, "tpm0");
        g_autoptr(GString) many = g_string_new(NULL);
        const char *end = strstr(xml, "  <dek ");
        g_string_append_len(many, xml, end - xml);
        for (unsigned i = 0; i < 65; i++) {
                char uuid[NKP_UUID_STRING_LEN + 1];
                nkp_uuid_random(uuid);
                g_string_append_printf(many, "  <dek kind=\"disk\" id=\"d%u\" secret=\"%s\" wrapped=\"%s\"/>\n",
                                       i, uuid, wrapped);
        }
        g_string_append(many, "</keysafe>\n");
        g_assert_cmpint(parse_err(many->str, many->len), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "more than 64"));
}

static void test_entities(Fixture *f, gconstpointer data)
{
        (void) data;
        static const char bomb[] =
                "<?xml version=\"1.0\"?>\n"
                "<!DOCTYPE keysafe [\n"
                " <!ENTITY a \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\">\n"
                " <!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">\n"
                " <!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\">\n"
                " <!ENTITY d \"&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;\">\n"
                " <!ENTITY e \"&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;\">\n"
                " <!ENTITY f \"&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;\">\n"
                " <!ENTITY g \"&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;\">\n"
                "]>\n"
                "<keysafe xmlns=\"" NS "\" version=\"1\"><vm uuid=\"&g;\"/></keysafe>\n";
        g_assert_cmpint(parse_err(bomb, strlen(bomb)), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "DTD"));

        static const char xxe[] =
                "<!DOCTYPE keysafe [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>"
                "<keysafe xmlns=\"" NS "\" version=\"1\"><vm uuid=\"&x;\"/></keysafe>";
        g_assert_cmpint(parse_err(xxe, strlen(xxe)), ==, -EBADMSG);
        static const char external_dtd[] =
                "<!DOCTYPE keysafe SYSTEM \"http://127.0.0.1:9/ks.dtd\"><keysafe xmlns=\"" NS "\" version=\"1\"/>";
        g_assert_cmpint(parse_err(external_dtd, strlen(external_dtd)), ==, -EBADMSG);

        /* an undeclared entity is simply not well-formed */
        g_autofree char *xml = format(f->ks);
        g_autofree char *undeclared = replace_once(xml, "name=\"prod\"", "name=\"&x;\"");
        g_assert_cmpint(parse_err(undeclared, strlen(undeclared)), ==, -EBADMSG);
        /* a declared encoding does not get past the checks */
        g_autofree char *latin = g_strconcat("<?xml version=\"1.0\" encoding=\"EBCDIC-US\"?>", xml, NULL);
        nkp_keysafe *ks = NULL;
        int r = nkp_keysafe_parse(latin, strlen(latin), &ks);
        g_assert_true(r == 0 || r == -EBADMSG);
        nkp_keysafe_free(ks);
}

/* ---- API --------------------------------------------------------------------------- */

static void test_put_get_remove(Fixture *f, gconstpointer data)
{
        (void) data;
        nkp_secret *none = NULL;
        g_assert_cmpint(nkp_keysafe_get_dek(f->ks, f->kek, "disk", "vdc", &none), ==, -ENOENT);
        g_assert_cmpint(nkp_keysafe_remove_dek(f->ks, "disk", "vdc"), ==, -ENOENT);

        /* replace keeps the position; the old DEK is gone */
        g_autoptr(nkp_secret) dek2 = random_key();
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "vda", SECRET_VDA, dek2), ==, 0);
        g_assert_cmpuint(nkp_keysafe_n_entries(f->ks), ==, 3);
        g_assert_cmpstr(nkp_keysafe_entry_id(f->ks, 1), ==, "vda");
        assert_dek(f->ks, f->kek, "disk", "vda", dek2);

        /* a secret UUID carries one key only */
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "vdc", SECRET_VDA, dek2), ==, -EEXIST);
        /* bad arguments */
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "nvram", "x", OTHER_UUID, dek2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "a/b", OTHER_UUID, dek2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "vdc", "nope", dek2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "vdc", OTHER_UUID, NULL), ==, -EINVAL);
        g_assert_cmpuint(nkp_keysafe_n_entries(f->ks), ==, 3);
        /* a hostile id is not echoed verbatim: the message stays one short line */
        g_autofree char *hostile = g_strnfill(1000, 'x');
        hostile[5] = '\n';
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", hostile, OTHER_UUID, dek2), ==, -EINVAL);
        g_assert_null(strchr(nkp_error_message(), '\n'));
        g_assert_cmpuint(strlen(nkp_error_message()), <, 200);

        /* secret UUIDs are stored in lower case */
        g_autofree char *upper = g_ascii_strup(OTHER_UUID, -1);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "vdc", upper, dek2), ==, 0);
        g_assert_cmpstr(nkp_keysafe_entry_secret_uuid(f->ks, 3), ==, OTHER_UUID);

        g_assert_cmpint(nkp_keysafe_remove_dek(f->ks, "disk", "vda"), ==, 0);
        g_assert_cmpuint(nkp_keysafe_n_entries(f->ks), ==, 3);
        g_assert_cmpstr(nkp_keysafe_entry_id(f->ks, 0), ==, "tpm0");
        g_assert_cmpstr(nkp_keysafe_entry_id(f->ks, 1), ==, "vdb");
        g_assert_cmpstr(nkp_keysafe_entry_id(f->ks, 2), ==, "vdc");
        g_assert_cmpint(get_err(f->ks, f->kek, "disk", "vda"), ==, -ENOENT);

        /* at most 64 entries */
        for (unsigned i = 0; nkp_keysafe_n_entries(f->ks) < 64; i++) {
                char id[16], uuid[NKP_UUID_STRING_LEN + 1];
                g_snprintf(id, sizeof id, "x%u", i);
                nkp_uuid_random(uuid);
                g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", id, uuid, dek2), ==, 0);
        }
        char uuid[NKP_UUID_STRING_LEN + 1];
        nkp_uuid_random(uuid);
        g_assert_cmpint(nkp_keysafe_put_dek(f->ks, f->kek, "disk", "one-too-many", uuid, dek2), ==, -ENOSPC);
        /* a full keysafe formats and parses back */
        g_autofree char *xml = format(f->ks);
        g_autoptr(nkp_keysafe) back = parse_ok(xml);
        g_assert_cmpuint(nkp_keysafe_n_entries(back), ==, 64);
        assert_dek(back, f->kek, "disk", "x0", dek2);
}

static void test_new_validation(void)
{
        nkp_keysafe *ks = NULL;
        char fp[65];
        memset(fp, 'a', 64);
        fp[64] = '\0';
        g_assert_cmpint(nkp_keysafe_new_for("bad", "prod", KEY_ID, fp, &ks), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "bad name", KEY_ID, fp, &ks), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", "bad", fp, &ks), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", KEY_ID, "abc", &ks), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", KEY_ID, NULL, &ks), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_new(VM_UUID, NULL, &ks), ==, -EINVAL);
        g_assert_null(ks);

        /* two keysafes get different salts */
        g_autoptr(nkp_keysafe) a = NULL, b = NULL;
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", KEY_ID, fp, &a), ==, 0);
        g_assert_cmpint(nkp_keysafe_new_for(VM_UUID, "prod", KEY_ID, fp, &b), ==, 0);
        g_assert_true(memcmp(nkp_keysafe_kek_salt(a), nkp_keysafe_kek_salt(b), NKP_KEK_SALT_SIZE) != 0);
        g_assert_cmpuint(nkp_keysafe_n_entries(a), ==, 0);
        /* an empty keysafe round-trips too */
        g_autofree char *xml = format(a);
        g_autoptr(nkp_keysafe) back = parse_ok(xml);
        g_assert_cmpuint(nkp_keysafe_n_entries(back), ==, 0);
}

/* ---- Rewrap -------------------------------------------------------------------------- */

static void test_rewrap(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_secret) kdk2 = random_key();
        g_autofree char *fp2 = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk2, &fp2), ==, 0);
        uint8_t old_salt[NKP_KEK_SALT_SIZE];
        memcpy(old_salt, nkp_keysafe_kek_salt(f->ks), sizeof old_salt);

        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, f->kek, "backup-site", KEY_ID2, fp2, kdk2), ==, 0);
        g_assert_cmpstr(nkp_keysafe_provider_name(f->ks), ==, "backup-site");
        g_assert_cmpstr(nkp_keysafe_provider_key_id(f->ks), ==, KEY_ID2);
        g_assert_cmpstr(nkp_keysafe_provider_fingerprint(f->ks), ==, fp2);
        g_assert_cmpstr(nkp_keysafe_vm_uuid(f->ks), ==, VM_UUID);
        g_assert_true(memcmp(old_salt, nkp_keysafe_kek_salt(f->ks), sizeof old_salt) != 0);
        g_assert_cmpuint(nkp_keysafe_n_entries(f->ks), ==, 3);
        g_assert_cmpstr(nkp_keysafe_entry_secret_uuid(f->ks, 0), ==, SECRET_TPM);

        /* through the XML, with a KEK derived from the new provider */
        g_autofree char *xml = format(f->ks);
        g_autoptr(nkp_keysafe) back = parse_ok(xml);
        g_autoptr(nkp_secret) kek2 = derive_kek(back, kdk2);
        assert_dek(back, kek2, "vtpm", "tpm0", f->dek_tpm);
        assert_dek(back, kek2, "disk", "vda", f->dek_vda);
        assert_dek(back, kek2, "disk", "vdb", f->dek_vdb);
        /* the old KEK no longer opens anything */
        g_assert_cmpint(get_err(back, f->kek, "vtpm", "tpm0"), ==, -EBADMSG);

        /* same provider, fresh salt (a plain shallow rekey) */
        g_assert_cmpint(nkp_keysafe_rewrap_for(back, kek2, "backup-site", KEY_ID2, fp2, kdk2), ==, 0);
        g_autoptr(nkp_secret) kek3 = derive_kek(back, kdk2);
        g_assert_false(nkp_secret_equal(kek2, kek3));
        assert_dek(back, kek3, "disk", "vdb", f->dek_vdb);
}

static void test_rewrap_all_or_nothing(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_secret) kdk2 = random_key();
        g_autofree char *fp2 = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk2, &fp2), ==, 0);
        g_autofree char *before = format(f->ks);

        /* wrong old KEK */
        g_autoptr(nkp_secret) wrong = random_key();
        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, wrong, "site2", KEY_ID2, fp2, kdk2), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "Nothing was rewrapped"));
        g_autofree char *after = format(f->ks);
        g_assert_cmpstr(after, ==, before);

        /* the last entry alone is damaged: the first two must not be rewrapped */
        g_autofree char *w = wrapped_attr(before, "vdb");
        g_autofree char *w_bad = g_strdup(w);
        w_bad[10] = w_bad[10] == 'A' ? 'B' : 'A';
        g_autofree char *damaged_xml = replace_once(before, w, w_bad);
        g_autoptr(nkp_keysafe) damaged = parse_ok(damaged_xml);
        g_autofree char *damaged_before = format(damaged);
        g_assert_cmpint(nkp_keysafe_rewrap_for(damaged, f->kek, "site2", KEY_ID2, fp2, kdk2), ==, -EBADMSG);
        g_assert_nonnull(strstr(nkp_error_message(), "disk 'vdb'"));
        g_autofree char *damaged_after = format(damaged);
        g_assert_cmpstr(damaged_after, ==, damaged_before);

        /* bad new provider fields or KDK: unchanged too */
        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, f->kek, "bad name", KEY_ID2, fp2, kdk2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, f->kek, "site2", "nope", fp2, kdk2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, f->kek, "site2", KEY_ID2, "00", kdk2), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_rewrap_for(f->ks, f->kek, "site2", KEY_ID2, fp2, NULL), ==, -EINVAL);
        g_assert_cmpint(nkp_keysafe_rewrap(f->ks, f->kek, NULL, kdk2), ==, -EINVAL);
        g_autofree char *still = format(f->ks);
        g_assert_cmpstr(still, ==, before);
}

/* The public entry points that take a provider object. */
static nkp_provider *provider_for(const char *name, const char *key_id, const char *fingerprint)
{
        NkpStoreEntry e = { 0 };
        g_strlcpy(e.name, name, sizeof e.name);
        g_strlcpy(e.key_id, key_id, sizeof e.key_id);
        g_strlcpy(e.fingerprint, fingerprint, sizeof e.fingerprint);
        nkp_provider *p = nkp_provider_from_entry(&e);
        g_assert_nonnull(p);
        return p;
}

static void test_provider_entry_points(Fixture *f, gconstpointer data)
{
        (void) data;
        g_autoptr(nkp_provider) prod = provider_for("prod", KEY_ID, f->fingerprint);
        g_autoptr(nkp_keysafe) ks = NULL;
        g_assert_cmpint(nkp_keysafe_new(VM_UUID, prod, &ks), ==, 0);
        g_assert_cmpstr(nkp_keysafe_provider_name(ks), ==, "prod");
        g_assert_cmpstr(nkp_keysafe_provider_key_id(ks), ==, KEY_ID);
        g_assert_cmpstr(nkp_keysafe_provider_fingerprint(ks), ==, f->fingerprint);
        g_autoptr(nkp_secret) kek = derive_kek(ks, f->kdk);
        g_assert_cmpint(nkp_keysafe_put_dek(ks, kek, "vtpm", "tpm0", SECRET_TPM, f->dek_tpm), ==, 0);

        g_autoptr(nkp_secret) kdk2 = random_key();
        g_autofree char *fp2 = NULL;
        g_assert_cmpint(nkp_kdk_fingerprint(kdk2, &fp2), ==, 0);
        g_autoptr(nkp_provider) site2 = provider_for("site2", KEY_ID2, fp2);
        g_autofree char *before = format(ks);
        /* f->kek belongs to another keysafe (other salt): refused, unchanged */
        g_assert_cmpint(nkp_keysafe_rewrap(ks, f->kek, site2, kdk2), ==, -EBADMSG);
        g_autofree char *unchanged = format(ks);
        g_assert_cmpstr(unchanged, ==, before);
        g_assert_cmpint(nkp_keysafe_rewrap(ks, kek, site2, kdk2), ==, 0);
        g_assert_cmpstr(nkp_keysafe_provider_name(ks), ==, "site2");
        g_autoptr(nkp_secret) kek2 = derive_kek(ks, kdk2);
        assert_dek(ks, kek2, "vtpm", "tpm0", f->dek_tpm);
}

int main(int argc, char **argv)
{
        g_test_init(&argc, &argv, NULL);
#define ADD(path, fn) g_test_add("/keysafe/" path, Fixture, NULL, fixture_setup, fn, fixture_teardown)
        ADD("round-trip", test_round_trip);
        ADD("namespace-forms", test_namespace_forms);
        ADD("flip-every-bit", test_flip_every_bit);
        ADD("documented-layout", test_documented_layout);
        ADD("bound-fields", test_bound_fields);
        ADD("wrong-kek", test_wrong_kek);
        ADD("versions", test_versions);
        ADD("malformed-fields", test_malformed_fields);
        ADD("truncated-garbage", test_truncated_and_garbage);
        ADD("oversized", test_oversized);
        ADD("entities", test_entities);
        ADD("put-get-remove", test_put_get_remove);
        ADD("rewrap", test_rewrap);
        ADD("rewrap-all-or-nothing", test_rewrap_all_or_nothing);
        ADD("provider-entry-points", test_provider_entry_points);
#undef ADD
        g_test_add_func("/keysafe/new-validation", test_new_validation);
        return g_test_run();
}
